"""hub.py — prepare a Hugging Face corpus (a hub name, a folder saved with `save_to_disk`, or a folder of parquet
files) as plain parallel files + manifest via data.corpus. Loading is nmt.data.load_parallel's job and is not
repeated here; this module only cleans, carves missing dev/test splits from train, samples, and writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets

from data.corpus import one_line, write_corpus
from nmt.config import CorpusSpec
from nmt.data import load_parallel
from nmt.errors import NMTError

PREPARATION_VERSION = "hub-1"
CARVE_SEED = 1234  # dev/test carved from train and the max_train sample depend only on this and the data
CARVE_FRACTION = 0.05  # of the cleaned training pairs, for each carved split ...
CARVE_MAX = 3000  # ... but at most this many pairs

Pairs = list[tuple[str, str]]


def split_names(name: str, config: str | None) -> list[str]:
    """The splits a dataset offers: from a saved DatasetDict's index, a saved Dataset (train only), or the hub."""
    folder = Path(name)
    if (folder / "dataset_dict.json").is_file():
        return list(json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"])
    if (folder / "dataset_info.json").is_file():
        return ["train"]
    try:
        return list(datasets.get_dataset_split_names(name, config))
    except Exception as err:  # the hub client raises many types (connection, missing config, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NMTError(f"cannot list the splits of dataset {name}{':' + config if config else ''}: {first}") from None


def clean_pairs(table: datasets.Dataset) -> Pairs:
    """Each side on one line with single spaces (strip, newlines and tabs collapsed); pairs with an empty side go."""
    pairs = ((one_line(s or ""), one_line(t or "")) for s, t in zip(table["src"], table["tgt"]))
    return [(s, t) for s, t in pairs if s and t]


def load_split(name: str, config: str | None, split: str, src_lang: str, tgt_lang: str) -> Pairs:
    spec = CorpusSpec(hub=name, config=config, split=split, src_lang=src_lang, tgt_lang=tgt_lang)
    return clean_pairs(load_parallel(spec))


def carve(train: Pairs, names: list[str]) -> tuple[Pairs, dict[str, Pairs]]:
    """Take held-out splits from a seeded shuffle of train; training pairs whose source is held out are dropped."""
    size = min(CARVE_MAX, max(1, int(len(train) * CARVE_FRACTION)))
    if len(train) < size * len(names) + 1:
        raise NMTError(f"only {len(train)} training pairs: too few to carve {', '.join(names)} from them")
    order = list(range(len(train)))
    random.Random(CARVE_SEED).shuffle(order)
    carved = {name: [train[i] for i in order[k * size: (k + 1) * size]] for k, name in enumerate(names)}
    held_out = {src for pairs in carved.values() for src, _ in pairs}
    taken = set(order[: size * len(names)])
    rest = [pair for i, pair in enumerate(train) if i not in taken and pair[0] not in held_out]
    return rest, carved


def sample(pairs: Pairs, limit: int) -> Pairs:
    """At most `limit` pairs, a seeded sample kept in corpus order (0 = all)."""
    if not limit or len(pairs) <= limit:
        return pairs
    keep = sorted(random.Random(CARVE_SEED).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def prepare_hub(name: str, config: str | None, src_lang: str, tgt_lang: str, out_dir: str | Path,
                max_train: int = 0, dev_split: str = "validation", test_split: str = "test") -> dict:
    """Write `{train,dev,test}.{src_lang,tgt_lang}` + manifest.json in out_dir from a hub or local dataset;
    a missing dev or test split is carved from train. Returns the manifest."""
    if max_train < 0:
        raise NMTError(f"max_train must be >= 0, got {max_train}")
    available = split_names(name, config)
    if "train" not in available:
        raise NMTError(f"dataset {name} has no train split (splits: {', '.join(available)})")
    wanted = {"dev": dev_split, "test": test_split}
    train = load_split(name, config, "train", src_lang, tgt_lang)
    if not train:
        raise NMTError(f"dataset {name}: no training pair has text on both sides")
    splits = {split: load_split(name, config, hub_split, src_lang, tgt_lang)
              for split, hub_split in wanted.items() if hub_split in available}
    missing = [split for split in wanted if split not in splits]
    if missing:
        train, carved = carve(train, missing)
        splits.update(carved)
    origin = {split: ("carved from train" if split in missing else hub_split) for split, hub_split in wanted.items()}
    source = {
        "name": "hub", "dataset": name, "config": config, "splits": {"train": "train", **origin},
        "max_train": max_train, "carve_seed": CARVE_SEED,
    }
    ordered = {"train": sample(train, max_train), "dev": splits["dev"], "test": splits["test"]}
    return write_corpus(out_dir, ordered, src_lang, tgt_lang, source, PREPARATION_VERSION)
