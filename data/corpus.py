"""corpus.py — write a prepared parallel corpus: `{split}.{lang}` files (one sentence a line) plus manifest.json.

Shared by every preparer (Bible, hub, local files). It only writes what it is given: no cleaning beyond
making each sentence one line, no alignment, no splitting, and nothing about models or vocabularies.
"""

import hashlib
import json
import re
from pathlib import Path

from nmt.atomic import write_atomic
from nmt.errors import NMTError

SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def one_line(sentence: str) -> str:
    """The sentence with every run of whitespace (tabs, newlines, Unicode separators) turned into one space."""
    return " ".join(sentence.split())


def write_corpus(out_dir: str | Path, splits: dict[str, list[tuple[str, str]]], src_lang: str, tgt_lang: str,
                 source: dict, version: str) -> dict:
    """Write `{split}.{src_lang}` / `{split}.{tgt_lang}` for each split and then manifest.json; returns the
    manifest. The old manifest goes first and the new one comes last, each file written to a temporary name
    and renamed, so a folder with a manifest always holds complete files that match its checksums."""
    if src_lang == tgt_lang or not SPLIT_NAME.match(src_lang) or not SPLIT_NAME.match(tgt_lang):
        raise NMTError(f"corpus languages must be two different simple codes, got {src_lang!r} and {tgt_lang!r}")
    for split in splits:
        if not SPLIT_NAME.match(split):
            raise NMTError(f"corpus split name {split!r} must be letters, digits, '-' or '_'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # until the new one exists, the folder reads as unfinished
    files, counts, words = {}, {}, {}
    for split, pairs in splits.items():
        counts[split] = len(pairs)
        words[split] = {}
        for lang, side in ((src_lang, 0), (tgt_lang, 1)):
            lines = [one_line(pair[side]) for pair in pairs]
            name = f"{split}.{lang}"
            data = "".join(line + "\n" for line in lines).encode("utf-8")
            write_atomic(out / name, data)
            files[name] = hashlib.sha256(data).hexdigest()
            words[split][lang] = sum(len(line.split()) for line in lines)
    manifest = {
        "version": version,
        "source": source,
        "languages": {"src": src_lang, "tgt": tgt_lang},
        "counts": counts,
        "words": words,
        "sha256": files,
    }
    write_atomic(out / "manifest.json", (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode())
    return manifest


def sha256_of(path: str | Path) -> str:
    """SHA-256 in hex of a file's bytes, as recorded in a manifest."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
