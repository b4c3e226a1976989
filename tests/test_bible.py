"""Tests for the Bible corpus: OSIS stripping, clean-ups, re-alignment, corpus writing, and (when the Debian
SWORD modules are installed) the prepared corpus itself."""

import hashlib
import json
from pathlib import Path

import pytest

from data.bible import (DEV_BOOKS, TEST_BOOKS, PairScorer, Verse, align_window, clean_markup, main,
                        name_overlap, prepare_bible, remove_postscript)
from data.corpus import write_corpus
from data.osis import osis_to_text
from nmt.errors import NMTError

SPANISH_MODULE = Path("/usr/share/sword/modules/texts/ztext/spaRV1909eb")
needs_modules = pytest.mark.skipif(not SPANISH_MODULE.exists(),
                                   reason="apt-get install sword-text-sparv sword-text-web for these checks")


# ---- OSIS → text ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("markup, text", [
    ('<w lemma="strong:H7225">EN el principio</w> <w lemma="strong:H1254">crió</w> Dios.', "EN el principio crió Dios."),
    ('<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">1:1 </reference>'
     'The Hebrew word is “Elohim”.</note><w lemma="strong:H1254">created</w>.', "God created."),
    ('sin.<note type="crossReference"><reference>Exodus 30:12</reference></note> And', "sin. And"),
    ('hay allí</w><transChange type="added">también</transChange><w lemma="x">bdelio', "hay allí también bdelio"),
    ('<divineName><w lemma="strong:H3068">LORD</w></divineName>, how', "LORD, how"),
    ('clean</w>.”</q><w lemma="strong:G2112">Immediately</w>', "clean.” Immediately"),
    ('<speaker>Beloved</speaker> <l level="1" sID="a"/>Let him kiss me<l eID="a" level="1"/>', "Let him kiss me"),
    ('<title type="x-section">The Fall</title>Now the serpent', "Now the serpent"),
    ('<title canonical="true" type="psalm">A Psalm by David.</title> <l sID="b"/>Yahweh', "A Psalm by David. Yahweh"),
    ('Aaron &amp; Hur\tsaid,\n “Go” ', "Aaron & Hur said, “Go”"),
    ('¶ <w lemma="strong:G1063">For</w> God', "For God"),
    ('earth<note placement="foot">note with <rdg type="alternate">a reading</rdg></note>.', "earth."),
])
def test_osis_markup_becomes_one_clean_line(markup, text):
    assert osis_to_text(markup) == text


def test_clean_markup_cuts_the_glossary_after_the_book_end():
    markup = ('saints. Amen. <chapter eID="Rev.22"/> <div canonical="true" eID="g1" osisID="Rev" type="book"/> '
              '<div sID="g2" type="glossary"/> <title>World English Bible Glossary</title> Abaddon is Hebrew.')
    assert osis_to_text(clean_markup(markup)) == "saints. Amen."


def test_clean_markup_drops_a_verse_merged_in_after_a_later_preverse_milestone():
    markup = ('<w>is</w> <w>sin</w>. <div eID="p1" type="x-p"/> <div type="x-milestone" subType="x-preverse" '
              'sID="pv2"/><div sID="p2" type="x-p"/>Now to him who is able to establish you...')
    assert osis_to_text(clean_markup(markup)) == "is sin."


def test_remove_postscript_keeps_the_letter_up_to_its_last_amen():
    verse = "La gracia sea con vosotros. Amén. Fué escrita á los Hebreos desde Italia con Timoteo."
    assert remove_postscript(verse) == "La gracia sea con vosotros. Amén."
    assert remove_postscript("Amén. Y dijo Jehová.") == "Amén. Y dijo Jehová."


# ---- alignment ---------------------------------------------------------------------------------------------

def _verses(chapter_texts):
    return [Verse(("Num", 13, number), text) for number, text in enumerate(chapter_texts, start=1)]


def test_align_window_follows_a_shift_and_merges_the_extra_verse():
    english = ["Of the tribe of Reuben, Shammua.", "Of the tribe of Simeon, Shaphat the son of Hori.",
               "Of the tribe of Judah, Caleb the son of Jephunneh.", "Of the tribe of Issachar, Igal son of Joseph.",
               "These are the names of the men.", "Moses sent them to spy out the land of Canaan."]
    spanish = ["De la tribu de Rubén, Sammua.", "De la tribu de Simeón, Saphat hijo de Hurí.",
               "De la tribu de Judá, Caleb hijo de Jephone.", "De la tribu de Issachâr, Igal hijo de Joseph.",
               "Estos son los nombres de los varones. Enviólos Moisés á reconocer la tierra de Canaán."]
    src, tgt = _verses(spanish), _verses(english)
    scorer = PairScorer({v.ref: v.text for v in src}, {v.ref: v.text for v in tgt})
    pairs, skipped = align_window(src, tgt, scorer)
    assert [(len(p.src_refs), len(p.tgt_refs)) for p in pairs] == [(1, 1)] * 4 + [(1, 2)]
    assert pairs[1].tgt == english[1] and skipped == []


def test_name_overlap_is_higher_for_correct_pairs():
    right = [("Caleb hijo de Jephone.", "Caleb the son of Jephunneh."), ("Igal de Issachâr.", "Igal of Issachar.")]
    wrong = [("Caleb hijo de Jephone.", "Igal of Issachar."), ("Igal de Issachâr.", "Caleb the son of Jephunneh.")]
    assert name_overlap(right) > name_overlap(wrong) == 0.0


# ---- corpus writing ----------------------------------------------------------------------------------------

def test_write_corpus_writes_aligned_lines_and_a_manifest_with_checksums(tmp_path):
    splits = {"train": [("hola\tmundo", "hello\nworld"), ("uno", "one")], "dev": [("dos", "two")], "test": []}
    manifest = write_corpus(tmp_path, splits, "es", "en", {"name": "toy"}, "toy-1")
    assert (tmp_path / "train.es").read_text(encoding="utf-8") == "hola mundo\nuno\n"
    assert (tmp_path / "train.en").read_text(encoding="utf-8") == "hello world\none\n"
    assert (tmp_path / "test.en").read_text(encoding="utf-8") == ""
    assert manifest == json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"] == {"train": 2, "dev": 1, "test": 0} and manifest["version"] == "toy-1"
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_corpus_refuses_a_split_name_that_is_not_a_plain_word(tmp_path):
    with pytest.raises(NMTError, match="split name"):
        write_corpus(tmp_path, {"../train": []}, "es", "en", {}, "1")


def test_missing_modules_give_nmt_error_and_exit_status_2(tmp_path, capsys):
    (tmp_path / "mods.d").mkdir()
    with pytest.raises(NMTError, match="sword-text-sparv"):
        prepare_bible(tmp_path / "out", modules_dir=tmp_path)
    assert main(["--out", str(tmp_path / "out"), "--modules", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: SWORD module spaRV1909eb not found")


# ---- the real corpus ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("bible")
    manifest = prepare_bible(out, extra_tgt_modules=("engKJV2006eb",))
    lines = {name: (out / name).read_text(encoding="utf-8").splitlines() for name in manifest["sha256"]}
    return out, manifest, lines


def _pair_containing(lines, spanish_fragment):
    for split in ("train", "dev", "test"):
        for es, en in zip(lines[f"{split}.es"], lines[f"{split}.en"]):
            if spanish_fragment in es:
                return es, en
    raise AssertionError(f"no Spanish line contains {spanish_fragment!r}")


@needs_modules
def test_bible_corpus_has_the_measured_number_of_aligned_verses(corpus):
    _, manifest, lines = corpus
    total = sum(manifest["counts"][split] for split in ("train", "dev", "test"))
    assert 31060 <= total <= 31090  # measured: 31,074
    assert manifest["counts"]["dev"] == 411 and manifest["counts"]["test"] == 2348
    for split, count in manifest["counts"].items():
        assert len(lines[f"{split}.es"]) == len(lines[f"{split}.en"]) == count


@needs_modules
def test_known_verses_are_paired_and_clean(corpus):
    _, _, lines = corpus
    assert lines["train.es"][0] == "EN el principio crió Dios los cielos y la tierra."
    assert lines["train.en"][0] == "In the beginning, God created the heavens and the earth."
    es, en = _pair_containing(lines, "Porque de tal manera amó Dios al mundo")
    assert en.startswith("For God so loved the world, that he gave his only born Son")
    assert lines["train.en"][-1] == "The grace of the Lord Jesus Christ be with all the saints. Amen."
    assert not any("Glossary" in line or "<" in line or "\t" in line for line in lines["train.en"])
    _, romans_14_23 = _pair_containing(lines, "todo lo que no es de fe, es pecado")
    assert romans_14_23.endswith("is not of faith is sin.")
    assert not any("Fué escrita" in line or "fué enviada de Roma" in line for line in lines["train.es"])


@needs_modules
def test_shifted_chapters_are_realigned(corpus):
    _, manifest, lines = corpus
    alignment = manifest["source"]["alignment"]
    assert {"Num 13", "Num 30", "1Sam 24", "1Kgs 22", "1Chr 21", "2Chr 33", "Job 39", "Job 40", "Hos 12",
            "Jonah 2"} <= set(alignment["realigned_chapters"])
    assert alignment["moved_verses"] == 174 and len(alignment["many_to_one"]["groups"]) == 17
    overlap = alignment["name_overlap_in_realigned_chapters"]
    assert overlap["realigned"] > overlap["by_verse_number"] + 0.05
    _, en = _pair_containing(lines, "De la tribu de Simeón, Saphat hijo de Hurí.")  # Spanish Num 13:6
    assert en == "Of the tribe of Simeon, Shaphat the son of Hori."  # WEB Num 13:5
    _, en = _pair_containing(lines, "¿Sabes tú el tiempo en que paren las cabras monteses?")  # Spanish Job 39:4
    assert en.startswith("“Do you know the time when the mountain goats give birth?")  # WEB Job 39:1


@needs_modules
def test_split_books_are_disjoint_and_checksums_match(corpus):
    out, manifest, _ = corpus
    assert not set(DEV_BOOKS) & set(TEST_BOOKS)
    assert manifest["source"]["dev_books"] == list(DEV_BOOKS)
    assert manifest["source"]["test_books"] == list(TEST_BOOKS)
    assert not {"1Kgs", "2Kgs", "1Chr", "2Chr", "1Sam", "2Sam", "Matt", "Mark", "Luke"} & set(DEV_BOOKS + TEST_BOOKS)
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


@needs_modules
def test_a_second_english_bible_pairs_the_training_books_only(corpus):
    _, manifest, lines = corpus
    es, en = lines["train-engKJV2006eb.es"], lines["train-engKJV2006eb.en"]
    assert len(es) == len(en) == manifest["counts"]["train-engKJV2006eb"]
    assert abs(len(es) - manifest["counts"]["train"]) < 50  # measured: 28,314 against 28,315
    assert es[0] == lines["train.es"][0] and en[0] == "In the beginning God created the heaven and the earth."
    held_out = set(lines["dev.es"]) | set(lines["test.es"])
    assert held_out & set(es) <= set(lines["train.es"])  # only verses repeated word for word in a training book
    assert not any("<" in line or "\t" in line for line in en)
    assert "engKJV2006eb" in manifest["source"]["extra_alignments"]
