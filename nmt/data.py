"""data.py — parallel corpora through Hugging Face `datasets`: loading, cleaning, tokenizing, batching.

Every source (a file pair, a TSV/JSONL/CSV/parquet file, a hub name or a saved dataset) becomes a `Dataset`
with `src` / `tgt` text columns; tokenization is a batched, cached `Dataset.map`; training batches hold about
`batch_tokens` pieces, from length buckets, in a seeded order, sharded per rank for DDP. Knows no model.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nmt.config import CorpusSpec, DataConfig
from nmt.errors import NMTError
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID, Vocab

if TYPE_CHECKING:
    import datasets

_FILE_BUILDERS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@functools.cache
def hf():
    """The `datasets` module, imported on first use (it takes a second; decoding never needs it)."""
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    return datasets


def check_utf8(path: str | Path) -> int:
    """Return the file's line count; raise NMTError naming the first line that is not valid UTF-8."""
    count = 0
    with open(path, "rb") as handle:
        for count, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                raise NMTError(f"{path}: line {count} is not valid UTF-8") from None
    return count


def _text_file(path: str) -> datasets.Dataset:
    return hf().load_dataset("text", data_files=path, split="train")


def _load_file_pair(spec: CorpusSpec) -> datasets.Dataset:
    src_lines, tgt_lines = check_utf8(spec.src), check_utf8(spec.tgt)
    if src_lines != tgt_lines:
        raise NMTError(f"misaligned corpus: {spec.src} has {src_lines} lines, {spec.tgt} has {tgt_lines}")
    if src_lines == 0:  # `datasets` cannot build a table from an empty text file
        return hf().Dataset.from_dict({"src": [], "tgt": []})
    src = _text_file(spec.src).rename_column("text", "src")
    tgt = _text_file(spec.tgt).rename_column("text", "tgt")
    return hf().concatenate_datasets([src, tgt], axis=1)


def _load_table(spec: CorpusSpec) -> datasets.Dataset:
    builder = _FILE_BUILDERS.get(Path(spec.path).suffix.lower())
    if builder is None:
        raise NMTError(f"{spec.path}: unknown file type (use one of {', '.join(_FILE_BUILDERS)})")
    if builder != "parquet":
        check_utf8(spec.path)
    options = {"delimiter": "\t", "quoting": 3} if spec.path.lower().endswith(".tsv") else {}
    try:
        table = hf().load_dataset(builder, data_files=spec.path, split="train", **options)
    except (hf().exceptions.DatasetGenerationError, ValueError) as err:
        raise NMTError(f"{spec.path}: cannot read as {builder} ({err.__cause__ or err})") from None
    return _select_columns(table, spec.src_column, spec.tgt_column, spec.path)


def _select_columns(table: datasets.Dataset, src: str, tgt: str, where: str) -> datasets.Dataset:
    missing = [c for c in (src, tgt) if c not in table.column_names]
    if missing:
        raise NMTError(f"{where}: no column {missing[0]!r} (columns: {', '.join(table.column_names)})")
    table = table.select_columns([src, tgt])
    if (src, tgt) != ("src", "tgt"):
        table = table.rename_columns({src: "__src", tgt: "__tgt"}).rename_columns({"__src": "src", "__tgt": "tgt"})
    return table.map(lambda b: {"src": [t or "" for t in b["src"]], "tgt": [t or "" for t in b["tgt"]]},
                     batched=True)


def _load_hub(spec: CorpusSpec) -> datasets.Dataset:
    local = Path(spec.hub)
    try:
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            table = hf().load_from_disk(str(local))
            if isinstance(table, hf().DatasetDict):
                if spec.split not in table:
                    raise NMTError(f"{spec.hub}: no split {spec.split!r} (splits: {', '.join(table)})")
                table = table[spec.split]
        else:
            table = hf().load_dataset(spec.hub, spec.config, split=spec.split)
    except NMTError:
        raise
    except Exception as err:  # the hub client raises many types (connection, missing config, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NMTError(f"cannot load dataset {spec.describe()}: {first}") from None
    if "translation" in table.column_names:
        langs = (spec.src_lang, spec.tgt_lang)
        sample = table[0]["translation"] if len(table) else {}
        if any(lang not in sample for lang in langs):
            raise NMTError(f"{spec.describe()}: translation pairs have languages {sorted(sample)}, not {langs}")
        return table.map(
            lambda b: {"src": [p[langs[0]] or "" for p in b["translation"]],
                       "tgt": [p[langs[1]] or "" for p in b["translation"]]},
            batched=True, remove_columns=table.column_names)
    by_language = spec.src_lang in table.column_names
    columns = (spec.src_lang, spec.tgt_lang) if by_language else (spec.src_column, spec.tgt_column)
    return _select_columns(table, *columns, spec.describe())


def load_parallel(spec: CorpusSpec) -> datasets.Dataset:
    """Load one corpus split as a Dataset with `src` and `tgt` text columns, in file order."""
    if spec.hub:
        table = _load_hub(spec)
    elif spec.path:
        table = _load_table(spec)
    else:
        table = _load_file_pair(spec)
    if spec.limit:
        table = table.select(range(min(spec.limit, len(table))))
    if spec.src_prefix:
        prefix = spec.src_prefix
        table = table.map(lambda batch: {"src": [f"{prefix} {line}" if line.strip() else line for line in batch["src"]]},
                          batched=True, new_fingerprint=_fingerprint(table._fingerprint, prefix, "src-prefix-v1"))
    return table


def load_training(data: DataConfig) -> datasets.Dataset:
    """The training pairs: `data.train`, then each `data.extra_train` corpus, in file order."""
    tables = [load_parallel(spec) for spec in (data.train, *data.extra_train)]
    return tables[0] if len(tables) == 1 else hf().concatenate_datasets(tables)


def source_tags(data: DataConfig) -> list[str]:
    """The tags the training corpora put before their sources: the vocabulary keeps each as one piece."""
    return sorted({spec.src_prefix for spec in (data.train, *data.extra_train) if spec and spec.src_prefix})


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def tokenize(table: datasets.Dataset, vocab: Vocab) -> datasets.Dataset:
    """Add `src_ids` / `tgt_ids` (cached by `datasets`, keyed on the data and the vocabulary)."""
    vocab_hash = vocab.fingerprint()

    def encode(batch: dict[str, list[str]]) -> dict[str, list]:
        src = [s.strip() for s in batch["src"]]
        tgt = [t.strip() for t in batch["tgt"]]
        return {"src_ids": vocab.encode_src(src), "tgt_ids": vocab.encode_tgt(tgt)}

    return table.map(encode, batched=True, batch_size=2000,
                     new_fingerprint=_fingerprint(table._fingerprint, vocab_hash, "tokenize-v1"))


def rejection(src_len: int, tgt_len: int, config: DataConfig) -> str | None:
    """Why a training pair of these piece counts is filtered out, or None when it is kept."""
    if min(src_len, tgt_len) < max(config.min_len, 1):
        return "an empty side" if min(src_len, tgt_len) == 0 else f"a side shorter than {config.min_len} pieces"
    if max(src_len, tgt_len) > config.max_len:
        return f"a side longer than data.max_len ({config.max_len} pieces)"
    if max(src_len, tgt_len) > config.max_len_ratio * min(src_len, tgt_len):
        return f"a length ratio above data.max_len_ratio ({config.max_len_ratio:g})"
    return None


def filter_for_training(table: datasets.Dataset, config: DataConfig) -> datasets.Dataset:
    """Drop pairs with an empty side, too short / too long sides, or a piece-count ratio above the limit; a
    corpus with no pair left is one NMTError line counting the reasons."""
    lo, hi, ratio = config.min_len, config.max_len, config.max_len_ratio

    def keep(batch: dict[str, list]) -> list[bool]:
        return [rejection(len(s), len(t), config) is None for s, t in zip(batch["src_ids"], batch["tgt_ids"])]

    kept = table.filter(keep, batched=True, batch_size=2000,
                        new_fingerprint=_fingerprint(table._fingerprint, str((lo, hi, ratio)), "filter-v1"))
    if len(kept) == 0:
        reasons: dict[str, int] = {}
        for s, t in zip(table["src_ids"], table["tgt_ids"]):
            reason = rejection(len(s), len(t), config)
            reasons[reason] = reasons.get(reason, 0) + 1
        if not reasons:
            raise NMTError("no training pairs: the training corpus is empty")
        counts = ", ".join(f"{n:,} with {reason}" for reason, n in sorted(reasons.items(), key=lambda r: -r[1]))
        raise NMTError(f"no training pairs left after filtering: all {len(table):,} were dropped ({counts})")
    return kept


def pad(sequences: list[list[int]], prefix: int | None = None,
        suffix: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists (optionally wrapped in bos/eos) into a [B, L] tensor; returns it and the lengths [B]."""
    pre = [prefix] if prefix is not None else []
    post = [suffix] if suffix is not None else []
    rows = [pre + list(s) + post for s in sequences]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    out = torch.full((len(rows), max(int(lengths.max()), 1) if rows else 1), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out, lengths


@dataclass
class Batch:
    """A padded batch: the source ends with eos; the target is fed as bos+y and predicted as y+eos."""

    src: torch.Tensor  # [B, S]
    src_lengths: torch.Tensor  # [B]
    tgt_in: torch.Tensor  # [B, T]
    tgt_out: torch.Tensor  # [B, T]
    tgt_lengths: torch.Tensor  # [B]

    @classmethod
    def from_ids(cls, src_ids: list[list[int]], tgt_ids: list[list[int]]) -> Batch:
        src, src_lengths = pad(src_ids, suffix=EOS_ID)
        tgt_in, tgt_lengths = pad(tgt_ids, prefix=BOS_ID)
        tgt_out, _ = pad(tgt_ids, suffix=EOS_ID)
        return cls(src, src_lengths, tgt_in, tgt_out, tgt_lengths)

    @property
    def n_tgt_tokens(self) -> int:
        return int(self.tgt_lengths.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.src, self.src_lengths, self.tgt_in, self.tgt_out, self.tgt_lengths)))


class TokenBatcher:
    """Length-bucketed batches of about `batch_tokens` padded pieces (source + target), in a seeded order.

    Epoch e's batches depend only on (seed, e), so a data position (epoch, batch index) is enough to resume.
    With `world_size` > 1 each rank takes every world_size-th batch of the same list (equal counts per rank).
    """

    bucket_size = 2000  # examples sorted together; larger = less padding, less randomness

    def __init__(self, src_lengths: np.ndarray, tgt_lengths: np.ndarray, batch_tokens: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.src_lengths = np.asarray(src_lengths, dtype=np.int64) + 1  # + eos
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int64) + 1  # + bos / eos
        self.batch_tokens, self.seed, self.rank, self.world_size = batch_tokens, seed, rank, world_size

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.src_lengths))
        batches: list[list[int]] = []
        for start in range(0, len(order), self.bucket_size):
            bucket = order[start: start + self.bucket_size]
            bucket = bucket[np.lexsort((self.tgt_lengths[bucket], self.src_lengths[bucket]))]
            batches.extend(self._pack(bucket))
        batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank:usable:self.world_size]

    def _pack(self, indices: np.ndarray) -> Iterator[list[int]]:
        batch: list[int] = []
        longest_src = longest_tgt = 0
        for i in indices.tolist():
            s, t = max(longest_src, self.src_lengths[i]), max(longest_tgt, self.tgt_lengths[i])
            if batch and (s + t) * (len(batch) + 1) > self.batch_tokens:
                yield batch
                batch, s, t = [], self.src_lengths[i], self.tgt_lengths[i]
            batch.append(i)
            longest_src, longest_tgt = s, t
        if batch:
            yield batch


class TrainingData:
    """The tokenized, filtered training set and its batcher."""

    def __init__(self, table: datasets.Dataset, batch_tokens: int, seed: int, rank: int = 0, world_size: int = 1):
        self.table = table
        lengths = table.map(lambda b: {"ls": [len(x) for x in b["src_ids"]], "lt": [len(x) for x in b["tgt_ids"]]},
                            batched=True, remove_columns=table.column_names,
                            new_fingerprint=_fingerprint(table._fingerprint, "lengths-v1"))
        self.batcher = TokenBatcher(np.array(lengths["ls"]), np.array(lengths["lt"]), batch_tokens, seed, rank,
                                    world_size)

    def __len__(self) -> int:
        return len(self.table)

    def batch(self, indices: list[int]) -> Batch:
        rows = self.table[indices]
        return Batch.from_ids(rows["src_ids"], rows["tgt_ids"])


def read_lines(path: str | Path) -> list[str]:
    """Read a text file as lines (without newlines); undecodable bytes become U+FFFD, lines are never merged."""
    with open(path, "rb") as handle:
        return [line.rstrip(b"\r\n").decode("utf-8", errors="replace") for line in handle]
