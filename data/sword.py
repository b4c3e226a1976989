"""sword.py — read CrossWire SWORD zText Bible modules (conf in mods.d, .bzs/.bzv/.bzz files) without libsword.

Returns each verse's raw markup keyed by (book OSIS id, chapter, verse); it does not strip markup or align
anything. A module that cannot be found or read raises NMTError saying how to get it.
"""

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from data.versification import VERSIFICATIONS
from nmt.errors import NMTError

DEFAULT_SWORD_DIR = Path("/usr/share/sword")
HOW_TO_GET = (
    "install it with `apt-get install sword-text-sparv sword-text-web sword-text-kjv`, or download it from "
    "CrossWire's module repository (https://crosswire.org/sword/modules/) and pass the folder holding mods.d/"
)
BLOCK_ENTRY = struct.Struct("<III")  # .bzs: offset in .bzz, compressed size, uncompressed size
VERSE_ENTRY = struct.Struct("<IIH")  # .bzv: block number, offset in the block, size

VerseRef = tuple[str, int, int]  # (book OSIS id, chapter, verse)


@dataclass(frozen=True)
class SwordModule:
    name: str
    data_dir: Path
    driver: str
    versification: str
    encoding: str
    source_type: str


def parse_conf(text: str) -> dict[str, dict[str, str]]:
    """Sections of a SWORD .conf: {module name: {key: value}}; a trailing backslash continues a value,
    and a repeated key keeps its first value."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    key, pending = "", ""
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if pending:
            pending += "\n" + line.rstrip("\\")
            if not line.endswith("\\"):
                current.setdefault(key, pending.strip())
                pending = ""
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1].strip(), {})
        elif "=" in stripped and current is not None:
            key, value = (part.strip() for part in stripped.split("=", 1))
            if value.endswith("\\"):
                pending = value.rstrip("\\") or " "
            else:
                current.setdefault(key, value)
    return sections


def find_module(name: str, modules_dir: str | Path | None = None) -> SwordModule:
    """The module called `name` in a SWORD tree (a folder holding mods.d/; /usr/share/sword by default)."""
    root = Path(modules_dir) if modules_dir is not None else DEFAULT_SWORD_DIR
    for conf_path in sorted((root / "mods.d").glob("*.conf")):
        for section, entries in parse_conf(conf_path.read_text(encoding="utf-8", errors="replace")).items():
            if section.lower() == name.lower():
                return _module_from_conf(section, entries, root)
    raise NMTError(f"SWORD module {name} not found under {root}: {HOW_TO_GET}")


def _module_from_conf(name: str, entries: dict[str, str], root: Path) -> SwordModule:
    module = SwordModule(
        name=name,
        data_dir=root / entries.get("DataPath", "").lstrip("./").rstrip("/"),
        driver=entries.get("ModDrv", ""),
        versification=entries.get("Versification", "KJV"),
        encoding=entries.get("Encoding", "Latin-1"),
        source_type=entries.get("SourceType", "Plaintext"),
    )
    if module.driver.lower() != "ztext":
        raise NMTError(f"SWORD module {name} uses driver {module.driver or '(none)'}; only zText is supported")
    if entries.get("CompressType", "ZIP").upper() != "ZIP":
        raise NMTError(f"SWORD module {name} is compressed with {entries['CompressType']}; only ZIP is supported")
    if module.versification not in VERSIFICATIONS:
        raise NMTError(
            f"SWORD module {name} uses versification {module.versification}; "
            f"supported: {', '.join(sorted(VERSIFICATIONS))}"
        )
    return module


def read_verses(module: SwordModule) -> dict[VerseRef, str]:
    """Every non-empty verse of the module as raw markup, keyed by (book, chapter, verse), in canonical order."""
    versification = VERSIFICATIONS[module.versification]
    encoding = "utf-8" if module.encoding.upper().replace("-", "") == "UTF8" else "latin-1"
    verses: dict[VerseRef, str] = {}
    for testament in ("ot", "nt"):
        if not (module.data_dir / f"{testament}.bzv").exists():
            continue  # a module may hold one testament only
        slots = versification.slots(testament)
        for index, raw in enumerate(_read_testament(module, testament)):
            if index >= len(slots):
                raise NMTError(f"SWORD module {module.name}: {testament}.bzv has more entries than "
                               f"{module.versification} versification allows")
            book, chapter, verse = slots[index]
            text = raw.decode(encoding, errors="replace").strip()
            if verse and text:
                verses[(book, chapter, verse)] = text
    if not verses:
        raise NMTError(f"SWORD module {module.name}: no verse files in {module.data_dir}: {HOW_TO_GET}")
    return verses


def _read_testament(module: SwordModule, testament: str) -> list[bytes]:
    """The raw bytes of each .bzv index entry of one testament, decompressing each block once."""
    try:
        block_index = (module.data_dir / f"{testament}.bzs").read_bytes()
        verse_index = (module.data_dir / f"{testament}.bzv").read_bytes()
        compressed = (module.data_dir / f"{testament}.bzz").read_bytes()
    except OSError as error:
        raise NMTError(f"SWORD module {module.name} is incomplete ({error}): {HOW_TO_GET}") from None
    blocks = [BLOCK_ENTRY.unpack_from(block_index, at) for at in range(0, len(block_index), BLOCK_ENTRY.size)]
    decompressed: dict[int, bytes] = {}
    entries = []
    for at in range(0, len(verse_index) - VERSE_ENTRY.size + 1, VERSE_ENTRY.size):
        block, offset, size = VERSE_ENTRY.unpack_from(verse_index, at)
        if size == 0:
            entries.append(b"")
            continue
        if block not in decompressed:
            decompressed[block] = _decompress_block(module, compressed, blocks, block)
        entries.append(decompressed[block][offset:offset + size])
    return entries


def _decompress_block(module: SwordModule, compressed: bytes, blocks: list[tuple[int, int, int]],
                      block: int) -> bytes:
    if block >= len(blocks):
        raise NMTError(f"SWORD module {module.name}: verse index points at missing block {block}")
    start, size, _ = blocks[block]
    try:
        return zlib.decompress(compressed[start:start + size])
    except zlib.error as error:
        raise NMTError(f"SWORD module {module.name}: block {block} is corrupt ({error})") from None


def read_module(name: str, modules_dir: str | Path | None = None) -> dict[VerseRef, str]:
    """find_module + read_verses: the raw verses of the module called `name`."""
    return read_verses(find_module(name, modules_dir))
