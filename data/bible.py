"""bible.py — prepare the Spanish→English Bible corpus from two local SWORD modules: clean each verse, pair
verses (re-aligning the chapters where the Spanish module's numbering is shifted), split by whole books and
write the corpus with data.corpus. Reads only local files; knows nothing of models or vocabularies.
"""

import argparse
import math
import re
import statistics
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from data.corpus import write_corpus
from data.osis import osis_to_text
from data.sword import VerseRef, find_module, read_verses
from data.versification import KJV_NT, KJV_OT
from nmt.errors import NMTError

PREPARATION_VERSION = "bible-1"
SRC_LANG, TGT_LANG = "es", "en"
# Held-out books, one narrative, one poetry/wisdom, one epistle each; books that near-duplicate others
# (Samuel/Kings/Chronicles, the synoptic gospels) stay in train.
DEV_BOOKS = ("Ruth", "Eccl", "Phil")
TEST_BOOKS = ("Acts", "Prov", "Rom")
# Books whose last verse carries a Spanish postscript ("Fué escrita de Corinto á los Romanos...").
POSTSCRIPT_BOOKS = ("Rom", "1Cor", "2Cor", "Gal", "Eph", "Phil", "Col", "1Thess", "2Thess", "1Tim", "2Tim",
                    "Titus", "Phlm", "Heb")
LAST_AMEN = "Amén."
POSTSCRIPT_WORD = re.compile(r"\b(?:[Ee]scrita|[Ee]nviada)\b")
BOOK_END = re.compile(r"""<div\b[^>]*\beID=[^>]*\btype=["']book["'][^>]*/>""")
# osis2mod puts verses the versification lacks into the previous slot, each behind its own preverse milestone.
PREVERSE_START = re.compile(r"""<div\b[^>]*\bsubType=["']x-preverse["'][^>]*\bsID=""")
# A capitalised word that does not start the verse or a sentence: most are proper names.
NAME = re.compile(r"(?<![.!?:;“¿¡«\"] )(?<!^)\b([A-ZÁÉÍÓÚÑ][a-záéíóúñüâêîôû]{2,})")

# Re-alignment scores, in the units of the squared length deviation (about 1 for a typical verse pair).
SUSPECT_CHAPTER_COST = 5.0  # mean cost of a chapter's verse-number pairs above which it is re-aligned
SAME_VERSE_BONUS = 1.0  # prefer keeping verse numbers paired when the evidence is even
NAME_SHARED_GAIN = 2.0
NAME_UNSHARED_COST = 0.5
MERGE_COST = 4.0
SKIP_COST = 10.0
MAX_GROUP = 10  # most verses one verse may be paired with (extra verses merged into a chapter's last slot)
BAND = 12  # how far (in verses) a re-aligned window may drift from its diagonal

PROTESTANT_CANON = KJV_OT + KJV_NT
CHAPTER_LENGTHS = {(book, chapter): count for book, verses in PROTESTANT_CANON
                   for chapter, count in enumerate(verses, start=1)}


@dataclass(frozen=True)
class Verse:
    ref: VerseRef
    text: str


@dataclass(frozen=True)
class AlignedPair:
    src_refs: tuple[VerseRef, ...]
    tgt_refs: tuple[VerseRef, ...]
    src: str
    tgt: str

    @property
    def book(self) -> str:
        return self.tgt_refs[0][0]

    @property
    def moved(self) -> bool:
        return not set(self.src_refs) & set(self.tgt_refs)

    @property
    def many_to_one(self) -> bool:
        return len(self.src_refs) > 1 or len(self.tgt_refs) > 1


# ---- reading and cleaning ----------------------------------------------------------------------------------

def clean_markup(markup: str) -> str:
    """Raw verse markup without what SWORD stores after it: matter after the book's end (the WEB glossary
    after Rev 22:21) and verses merged in from numbering the versification lacks (the WEB's Rom 14:24-26)."""
    markup = BOOK_END.split(markup, maxsplit=1)[0]
    for start in PREVERSE_START.finditer(markup):
        if osis_to_text(markup[:start.start()]) and osis_to_text(markup[start.start():]):
            return markup[:start.start()]
    return markup


def remove_postscript(text: str) -> str:
    """A letter's last verse without the Spanish postscript after its final "Amén."."""
    end = text.rfind(LAST_AMEN) + len(LAST_AMEN)
    if end >= len(LAST_AMEN) and POSTSCRIPT_WORD.search(text[end:]):
        return text[:end]
    return text


def load_bible(module_name: str, modules_dir: str | Path | None = None) -> dict[VerseRef, str]:
    """Plain text of every non-empty verse of the Protestant canon in a module, cleaned, in canonical order."""
    raw = read_verses(find_module(module_name, modules_dir))
    verses = {}
    for ref in canonical_refs():
        text = osis_to_text(clean_markup(raw.get(ref, "")))
        if text:
            verses[ref] = text
    for book in POSTSCRIPT_BOOKS:
        last = max((ref for ref in verses if ref[0] == book), default=None, key=lambda ref: ref[1:])
        if last is not None:
            verses[last] = remove_postscript(verses[last])
    return verses


def canonical_refs() -> list[VerseRef]:
    return [(book, chapter, verse) for book, verses in PROTESTANT_CANON
            for chapter, count in enumerate(verses, start=1) for verse in range(1, count + 1)]


# ---- scoring pairs -----------------------------------------------------------------------------------------

def name_keys(text: str) -> set[str]:
    """Proper-name keys of a verse: capitalised words, accents removed, first three letters (so that
    "Hebrón"/"Hebron", "María"/"Mary" and "Eliú"/"Elihu" meet)."""
    keys = set()
    for word in NAME.findall(text):
        plain = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if not unicodedata.combining(c))
        keys.add(plain[:3])
    return keys


def name_overlap(pairs: list[tuple[str, str]]) -> float:
    """Shared name keys over all name keys (Jaccard, pooled over pairs): higher means better-paired verses."""
    shared = total = 0
    for src, tgt in pairs:
        a, b = name_keys(src), name_keys(tgt)
        shared += len(a & b)
        total += len(a | b)
    return shared / total if total else 0.0


class PairScorer:
    """Cost of pairing groups of verses: Gale and Church's squared length deviation (characters, variance
    growing with length, both fitted on the verse-number pairs) minus shared proper names."""

    def __init__(self, src: dict[VerseRef, str], tgt: dict[VerseRef, str]):
        lengths = [(len(src[ref]) + 1, len(tgt[ref]) + 1) for ref in src if ref in tgt]
        self.ratio = sum(t for _, t in lengths) / sum(s for s, _ in lengths)
        self.variance = statistics.fmean((t - self.ratio * s) ** 2 / s for s, t in lengths)
        self._names: dict[str, set[str]] = {}

    def names(self, text: str) -> set[str]:
        if text not in self._names:
            self._names[text] = name_keys(text)
        return self._names[text]

    def cost(self, src: list[Verse], tgt: list[Verse]) -> float:
        src_length = sum(len(v.text) + 1 for v in src)
        tgt_length = sum(len(v.text) + 1 for v in tgt)
        length = (tgt_length - self.ratio * src_length) ** 2 / (self.variance * src_length)
        a = set().union(*(self.names(v.text) for v in src))
        b = set().union(*(self.names(v.text) for v in tgt))
        return length - NAME_SHARED_GAIN * len(a & b) + NAME_UNSHARED_COST * len(a ^ b)


# ---- alignment ---------------------------------------------------------------------------------------------

def suspect_chapters(src: dict[VerseRef, str], tgt: dict[VerseRef, str], scorer: PairScorer) -> list[tuple[str, int]]:
    """Chapters where pairing by verse number looks wrong: the source leaves a slot empty that the target
    fills (osis2mod's mark of a numbering shift), or the verse-number pairs cost too much on average.
    A slot empty only in the target is an omission there (the WEB's Acts 8:37), not a shift."""
    suspects = []
    for (book, chapter), count in CHAPTER_LENGTHS.items():
        refs = [(book, chapter, verse) for verse in range(1, count + 1)]
        if any(ref in tgt and ref not in src for ref in refs):
            suspects.append((book, chapter))
            continue
        paired = [ref for ref in refs if ref in src and ref in tgt]
        mean_cost = statistics.fmean(scorer.cost([Verse(r, src[r])], [Verse(r, tgt[r])]) for r in paired)
        if mean_cost > SUSPECT_CHAPTER_COST:
            suspects.append((book, chapter))
    return suspects


def chapter_windows(chapters: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """Runs of consecutive chapters of one book: a shift that spills over a chapter end stays in one window."""
    windows: list[list[tuple[str, int]]] = []
    for book, chapter in chapters:
        if windows and windows[-1][-1] == (book, chapter - 1):
            windows[-1].append((book, chapter))
        else:
            windows.append([(book, chapter)])
    return windows


MOVES = ((1, 1), (1, 0), (0, 1)) + tuple((k, 1) for k in range(2, MAX_GROUP + 1)) \
    + tuple((1, k) for k in range(2, MAX_GROUP + 1))


def align_window(src: list[Verse], tgt: list[Verse],
                 scorer: PairScorer) -> tuple[list[AlignedPair], list[tuple[str, VerseRef]]]:
    """Monotone alignment of two verse sequences (1-1, 1-k, k-1 or skip) by dynamic programming within a band
    around the diagonal; returns the pairs and the skipped verses as (language, reference)."""
    n, m = len(src), len(tgt)
    best = [[math.inf] * (m + 1) for _ in range(n + 1)]
    back: list[list[tuple[int, int]]] = [[(0, 0)] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for i in range(n + 1):
        for j in range(max(0, i - BAND), min(m, i + BAND) + 1):
            if best[i][j] == math.inf:
                continue
            for di, dj in MOVES:
                if i + di > n or j + dj > m:
                    continue
                total = best[i][j] + _move_cost(src[i:i + di], tgt[j:j + dj], scorer)
                if total < best[i + di][j + dj]:
                    best[i + di][j + dj] = total
                    back[i + di][j + dj] = (di, dj)
    pairs, skipped = [], []
    i, j = n, m
    while i or j:
        di, dj = back[i][j]
        group_src, group_tgt = src[i - di:i], tgt[j - dj:j]
        if di and dj:
            pairs.append(AlignedPair(tuple(v.ref for v in group_src), tuple(v.ref for v in group_tgt),
                                     " ".join(v.text for v in group_src), " ".join(v.text for v in group_tgt)))
        else:
            skipped.extend([(SRC_LANG, v.ref) for v in group_src] + [(TGT_LANG, v.ref) for v in group_tgt])
        i, j = i - di, j - dj
    return pairs[::-1], skipped[::-1]


def _move_cost(src: list[Verse], tgt: list[Verse], scorer: PairScorer) -> float:
    if not src or not tgt:
        return SKIP_COST
    cost = scorer.cost(src, tgt)
    if len(src) > 1 or len(tgt) > 1:
        return cost + MERGE_COST
    return cost - SAME_VERSE_BONUS if src[0].ref == tgt[0].ref else cost


@dataclass
class Alignment:
    pairs: list[AlignedPair]
    realigned_chapters: list[tuple[str, int]]
    skipped: list[tuple[str, VerseRef]]  # (language, verse) left without a partner in re-aligned chapters
    unpaired: list[VerseRef]  # verses whose slot is empty on the other side outside re-aligned chapters


def align_bibles(src: dict[VerseRef, str], tgt: dict[VerseRef, str]) -> Alignment:
    """Pair verses by reference, except in suspect chapters, which are re-aligned window by window."""
    scorer = PairScorer(src, tgt)
    suspects = suspect_chapters(src, tgt, scorer)
    in_window = set(suspects)
    pairs = [AlignedPair((ref,), (ref,), src[ref], tgt[ref]) for ref in src
             if ref in tgt and ref[:2] not in in_window]
    unpaired = [ref for ref in canonical_refs() if ref[:2] not in in_window and (ref in src) != (ref in tgt)]
    skipped: list[tuple[str, VerseRef]] = []
    for window in chapter_windows(suspects):
        chapters = set(window)
        window_src = [Verse(ref, text) for ref, text in src.items() if ref[:2] in chapters]
        window_tgt = [Verse(ref, text) for ref, text in tgt.items() if ref[:2] in chapters]
        window_pairs, window_skipped = align_window(window_src, window_tgt, scorer)
        pairs.extend(window_pairs)
        skipped.extend(window_skipped)
    order = {ref: index for index, ref in enumerate(canonical_refs())}
    pairs.sort(key=lambda pair: order[pair.tgt_refs[0]])
    return Alignment(pairs, suspects, skipped, unpaired)


# ---- splitting and writing ---------------------------------------------------------------------------------

def split_by_book(pairs: list[AlignedPair]) -> dict[str, list[AlignedPair]]:
    splits: dict[str, list[AlignedPair]] = {"train": [], "dev": [], "test": []}
    for pair in pairs:
        split = "dev" if pair.book in DEV_BOOKS else "test" if pair.book in TEST_BOOKS else "train"
        splits[split].append(pair)
    return splits


def format_ref(refs: tuple[VerseRef, ...] | VerseRef) -> str:
    """"Num 13:33" for one reference; a group joins its references with "+" ("Num 13:32+Num 13:33")."""
    if isinstance(refs[0], str):
        book, chapter, verse = refs
        return f"{book} {chapter}:{verse}"
    return "+".join(format_ref(ref) for ref in refs)


def alignment_report(alignment: Alignment, src: dict[VerseRef, str], tgt: dict[VerseRef, str]) -> dict:
    """What the re-alignment did, for the manifest: chapters, moved verses, merged groups, name overlap."""
    chapters = set(alignment.realigned_chapters)
    by_number = [(src[ref], tgt[ref]) for ref in src if ref in tgt and ref[:2] in chapters]
    realigned = [pair for pair in alignment.pairs if pair.tgt_refs[0][:2] in chapters]
    return {
        "realigned_chapters": [f"{book} {chapter}" for book, chapter in alignment.realigned_chapters],
        "moved_verses": sum(len(pair.src_refs) for pair in realigned if pair.moved),
        "many_to_one": {
            "policy": "merged: the verses of a group are joined into one line on their side",
            "groups": [f"{format_ref(p.src_refs)} = {format_ref(p.tgt_refs)}" for p in realigned if p.many_to_one],
        },
        "dropped": {
            "skipped_in_realignment": [f"{lang} {format_ref(ref)}" for lang, ref in alignment.skipped],
            "empty_on_other_side": [format_ref(ref) for ref in alignment.unpaired],
        },
        "name_overlap_in_realigned_chapters": {
            "by_verse_number": round(name_overlap(by_number), 4),
            "realigned": round(name_overlap([(p.src, p.tgt) for p in realigned]), 4),
        },
    }


def extra_split(module: str) -> str:
    """The split holding the training books' sources paired with a further English translation."""
    return f"train-{module}"


def prepare_bible(out_dir: str | Path, modules_dir: str | Path | None = None,
                  src_module: str = "spaRV1909eb", tgt_module: str = "engWEB2015eb",
                  extra_tgt_modules: tuple[str, ...] = ()) -> dict:
    """Build the Bible corpus in out_dir from two SWORD modules; returns the manifest written there. Each of
    `extra_tgt_modules` (another English Bible, such as engKJV2006eb) adds a split `train-<module>`: the training
    books' verses aligned with that translation, a second reference for them (dev and test keep tgt_module's)."""
    src = load_bible(src_module, modules_dir)
    tgt = load_bible(tgt_module, modules_dir)
    alignment = align_bibles(src, tgt)
    splits = split_by_book(alignment.pairs)
    extras = {module: load_bible(module, modules_dir) for module in extra_tgt_modules}
    source = {
        "name": "bible",
        "description": f"Bible verses, {src_module} (SWORD) aligned with {tgt_module} (SWORD), split by book",
        "src_module": src_module,
        "tgt_module": tgt_module,
        "label": "derived from the World English Bible" if "WEB" in tgt_module else tgt_module,
        "licence": "public domain",
        "dev_books": list(DEV_BOOKS),
        "test_books": list(TEST_BOOKS),
        "alignment": alignment_report(alignment, src, tgt),
    }
    corpus = {split: [(p.src, p.tgt) for p in pairs] for split, pairs in splits.items()}
    for module, text in extras.items():
        extra = align_bibles(src, text)
        corpus[extra_split(module)] = [(p.src, p.tgt) for p in split_by_book(extra.pairs)["train"]]
        source.setdefault("extra_alignments", {})[module] = alignment_report(extra, src, text)
    return write_corpus(out_dir, corpus, SRC_LANG, TGT_LANG, source, PREPARATION_VERSION)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.bible", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for {train,dev,test}.{es,en} and manifest.json")
    parser.add_argument("--modules", default=None, help="SWORD folder holding mods.d/ (default /usr/share/sword)")
    parser.add_argument("--src-module", default="spaRV1909eb")
    parser.add_argument("--tgt-module", default="engWEB2015eb")
    parser.add_argument("--extra-tgt-module", action="append", default=[],
                        help="another English Bible for a second reference of the training books (repeatable)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        manifest = prepare_bible(args.out, args.modules, args.src_module, args.tgt_module,
                                 tuple(args.extra_tgt_module))
    except NMTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    alignment = manifest["source"]["alignment"]
    for split, count in manifest["counts"].items():
        words = manifest["words"][split]
        print(f"{split}: {count} verses, {words[SRC_LANG]} {SRC_LANG} words, {words[TGT_LANG]} {TGT_LANG} words")
    print(f"total: {sum(manifest['counts'].values())} verses; re-aligned {len(alignment['realigned_chapters'])} "
          f"chapters, {alignment['moved_verses']} verses moved, {len(alignment['many_to_one']['groups'])} "
          f"groups merged; {time.monotonic() - started:.1f} s → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
