"""Tests for data.sword: a tiny zText module written here in SWORD's binary layout is read back verse by verse."""

import struct
import zlib
from pathlib import Path

import pytest

from data.sword import find_module, parse_conf, read_module
from data.versification import VERSIFICATIONS
from nmt.errors import NMTError

VERSES = {
    ("Gen", 1, 1): '<w lemma="strong:H7225">EN el principio</w> crió Dios los cielos y la tierra.',
    ("Gen", 1, 2): "Y la tierra estaba desordenada y vacía.",
    ("Gen", 2, 1): "Y fueron acabados los cielos y la tierra.",
    ("Exod", 1, 1): "Estos son los nombres de los hijos de Israel.",
    ("John", 3, 16): "Porque de tal manera amó Dios al mundo.",
}


def write_ztext_module(root: Path, name: str, verses: dict, versification: str = "KJV",
                       driver: str = "zText") -> None:
    """A SWORD tree under root: mods.d/<name>.conf and per testament .bzs (block offset, compressed size,
    uncompressed size), .bzv (block, offset, size per index slot) and .bzz (zlib blocks, one per book)."""
    data_dir = root / "modules" / "texts" / "ztext" / name.lower()
    data_dir.mkdir(parents=True)
    (root / "mods.d").mkdir(exist_ok=True)
    (root / "mods.d" / f"{name.lower()}.conf").write_text(
        f"[{name}]\nDataPath=./modules/texts/ztext/{name.lower()}/\nModDrv={driver}\nEncoding=UTF-8\n"
        f"SourceType=OSIS\nCompressType=ZIP\nVersification={versification}\n"
        "About=A test module \\\n  spanning two lines\n", encoding="utf-8")
    for testament in ("ot", "nt"):
        slots = VERSIFICATIONS[versification].slots(testament)
        books = {ref[0] for ref in verses if ref in slots}
        if not books:
            continue
        last = max(slots.index(ref) for ref in verses if ref in slots)
        blocks: dict[str, bytearray] = {}
        entries = []
        for book, chapter, verse in slots[:last + 1]:
            text = verses.get((book, chapter, verse), "").encode("utf-8")
            if not text:
                entries.append((0, 0, 0))
                continue
            block = blocks.setdefault(book, bytearray())
            entries.append((list(blocks).index(book), len(block), len(text)))
            block += text
        compressed, index, offset = bytearray(), bytearray(), 0
        for block in blocks.values():
            packed = zlib.compress(bytes(block))
            index += struct.pack("<III", offset, len(packed), len(block))
            compressed += packed
            offset += len(packed)
        (data_dir / f"{testament}.bzs").write_bytes(bytes(index))
        (data_dir / f"{testament}.bzv").write_bytes(b"".join(struct.pack("<IIH", *e) for e in entries))
        (data_dir / f"{testament}.bzz").write_bytes(bytes(compressed))


def test_reads_back_every_verse_of_a_tiny_ztext_module(tmp_path):
    write_ztext_module(tmp_path, "TinyES", VERSES)
    assert read_module("TinyES", tmp_path) == VERSES


def test_module_names_are_matched_without_regard_to_case(tmp_path):
    write_ztext_module(tmp_path, "TinyES", VERSES)
    module = find_module("tinyes", tmp_path)
    assert module.name == "TinyES" and module.versification == "KJV" and module.driver == "zText"


def test_nrsva_versification_places_new_testament_slots_after_its_own_chapter_lengths(tmp_path):
    verses = {("3John", 1, 15): "Peace be to you.", ("Rev", 12, 18): "Then the dragon stood on the sand."}
    write_ztext_module(tmp_path, "TinyEN", verses, versification="NRSVA")
    assert read_module("TinyEN", tmp_path) == verses


def test_missing_module_says_how_to_get_it(tmp_path):
    (tmp_path / "mods.d").mkdir()
    with pytest.raises(NMTError, match="apt-get install sword-text-sparv"):
        read_module("spaRV1909eb", tmp_path)


def test_module_with_another_driver_is_refused(tmp_path):
    write_ztext_module(tmp_path, "RawMod", VERSES, driver="RawText")
    with pytest.raises(NMTError, match="only zText"):
        find_module("RawMod", tmp_path)


def test_conf_values_continue_over_backslash_lines_and_keep_first_repeat():
    sections = parse_conf("[Mod]\nAbout=one \\\n two\nFeature=A\nFeature=B\n# comment\n")
    assert sections == {"Mod": {"About": "one \n two", "Feature": "A"}}


def test_slot_counts_match_the_installed_module_index_sizes():
    # 2 headings + one intro per book + one heading per chapter + the verses: the sizes of real .bzv files
    assert len(VERSIFICATIONS["KJV"].slots("ot")) == 24115
    assert len(VERSIFICATIONS["KJV"].slots("nt")) == 8246
    assert len(VERSIFICATIONS["NRSVA"].slots("ot")) == 31027
    assert len(VERSIFICATIONS["NRSVA"].slots("nt")) == 8248
