"""vocab.py — SentencePiece vocabularies: training, loading, encoding to ids and decoding to text.

Ids 0..3 are reserved for pad, unk, bos and eos in every vocabulary. A `Vocab` is either joint (one model for
both sides) or separate (one per side). Model files travel as bytes inside checkpoints and export folders.
Target ids are the model's: with an output map (`output_ids`, the pieces seen in the training targets) target id i
is SentencePiece id output_ids[i], applied here and nowhere else, so search and backends see one id space.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm

from nmt.atomic import write_atomic
from nmt.config import VocabConfig
from nmt.errors import NMTError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
OUTPUT_MAP_FILE = "output_ids.json"  # beside the SentencePiece model(s): the target-side output map


def _processor(model_bytes: bytes) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError) as err:
        raise NMTError(f"not a SentencePiece model ({err})") from None
    if processor.pad_id() != PAD_ID or processor.eos_id() != EOS_ID or processor.bos_id() != BOS_ID:
        raise NMTError("SentencePiece model does not reserve ids 0-3 for pad, unk, bos, eos")
    return processor


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(texts: list[str]) -> list[str]:
    """Texts SentencePiece can take: a lone surrogate (what `surrogateescape` makes of an undecodable byte) becomes
    U+FFFD, as invalid UTF-8 read elsewhere does."""
    return [LONE_SURROGATE.sub("\ufffd", text) for text in texts]


@dataclass
class Vocab:
    src_model: bytes
    tgt_model: bytes
    output_ids: tuple[int, ...] | None = None  # SentencePiece id of each target id; None = all pieces, unmapped

    def __post_init__(self) -> None:
        self._src = _processor(self.src_model)
        self._tgt = self._src if self.tgt_model == self.src_model else _processor(self.tgt_model)
        self._to_target: dict[int, int] | None = None
        if self.output_ids is not None:
            ids = self.output_ids = tuple(int(i) for i in self.output_ids)
            pieces = self._tgt.get_piece_size()
            if ids[:len(SPECIAL_IDS)] != SPECIAL_IDS or len(set(ids)) != len(ids) or not all(0 <= i < pieces for i in ids):
                raise NMTError(f"output map: expected distinct SentencePiece ids below {pieces}, starting with "
                               f"the special ids {list(SPECIAL_IDS)}")
            self._to_target = {piece: index for index, piece in enumerate(ids)}

    def restricted_to(self, target_ids: Iterable[list[int]]) -> Vocab:
        """The same SentencePiece model(s) with an output map: the special ids, then every piece that occurs in
        `target_ids` (SentencePiece ids of the training targets) in id order."""
        seen = set(SPECIAL_IDS)
        for ids in target_ids:
            seen.update(ids)
        return Vocab(self.src_model, self.tgt_model, SPECIAL_IDS + tuple(sorted(seen - set(SPECIAL_IDS))))

    @property
    def joint(self) -> bool:
        return self.src_model == self.tgt_model

    @property
    def src_size(self) -> int:
        return self._src.get_piece_size()

    @property
    def tgt_size(self) -> int:
        """Target ids the model predicts: the output map's size, else every piece."""
        return len(self.output_ids) if self.output_ids is not None else self._tgt.get_piece_size()

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        return self._src.encode(encodable(texts))

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        """Target ids; a piece outside the output map becomes unk."""
        encoded = self._tgt.encode(encodable(texts))
        if self._to_target is None:
            return encoded
        to_target = self._to_target
        return [[to_target.get(i, UNK_ID) for i in ids] for ids in encoded]

    def _pieces_of(self, ids: list[int]) -> list[int]:
        return ids if self.output_ids is None else [self.output_ids[i] for i in ids]

    def decode_tgt(self, ids: list[int]) -> str:
        return self._tgt.decode(self._pieces_of([i for i in ids if i > EOS_ID]))

    def tgt_pieces(self, ids: list[int]) -> list[str]:
        return [self._tgt.id_to_piece(i) for i in self._pieces_of(ids)]

    def src_pieces(self, ids: list[int]) -> list[str]:
        return [self._src.id_to_piece(i) for i in ids]

    def fingerprint(self) -> str:
        """A digest of the model(s) and the output map: what tokenized data depends on."""
        digest = hashlib.sha256(self.src_model + self.tgt_model)
        digest.update(json.dumps(self.output_ids).encode())
        return digest.hexdigest()

    def save(self, folder: str | Path) -> list[Path]:
        """Write `spm.model` (joint) or `spm.src.model` + `spm.tgt.model`, and the output map if there is one;
        returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"spm.model": self.src_model} if self.joint else {
            "spm.src.model": self.src_model, "spm.tgt.model": self.tgt_model}
        if self.output_ids is not None:
            files[OUTPUT_MAP_FILE] = json.dumps({"sentencepiece_ids": list(self.output_ids)}).encode()
        for name, data in files.items():
            write_atomic(folder / name, data)  # a kill mid-write must not leave a vocabulary the next run loads
        return [folder / name for name in files]

    @classmethod
    def load(cls, folder: str | Path) -> Vocab:
        folder = Path(folder)
        if (folder / "spm.model").is_file():
            src = tgt = (folder / "spm.model").read_bytes()
        elif (folder / "spm.src.model").is_file() and (folder / "spm.tgt.model").is_file():
            src, tgt = (folder / "spm.src.model").read_bytes(), (folder / "spm.tgt.model").read_bytes()
        else:
            raise NMTError(f"no SentencePiece model (spm.model or spm.src.model + spm.tgt.model) in {folder}")
        return cls(src, tgt, _read_output_map(folder / OUTPUT_MAP_FILE))

    def to_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"src": self.src_model, "tgt": self.tgt_model}
        if self.output_ids is not None:
            state["output_ids"] = list(self.output_ids)
        return state

    @classmethod
    def from_state(cls, state: dict) -> Vocab:
        if not isinstance(state, dict) or not all(isinstance(state.get(side), bytes) for side in ("src", "tgt")):
            raise NMTError("checkpoint has no valid vocabulary")
        output_ids = state.get("output_ids")
        if output_ids is not None and not (isinstance(output_ids, list) and all(type(i) is int for i in output_ids)):
            raise NMTError("checkpoint has an invalid output map (expected a list of SentencePiece ids)")
        return cls(state["src"], state["tgt"], output_ids)


def _read_output_map(path: Path) -> list[int] | None:
    if not path.is_file():
        return None
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))["sentencepiece_ids"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ids = None
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise NMTError(f"{path}: not an output map (expected {{\"sentencepiece_ids\": [ids...]}})")
    return ids


def _train_one(sentences: Iterable[str], config: VocabConfig, symbols: list[str] | None = None) -> bytes:
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=config.size,
            model_type=config.type,
            character_coverage=config.character_coverage,
            input_sentence_size=config.max_sentences,
            shuffle_input_sentence=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            hard_vocab_limit=False,
            user_defined_symbols=symbols or [],
            train_extremely_large_corpus=False,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise NMTError(f"SentencePiece training failed: {str(err).strip().splitlines()[-1]}") from None
    size = _processor(model.getvalue()).get_piece_size()
    if size < config.size:
        print(f"warning: vocab.size {config.size} asked for, but SentencePiece built {size} pieces from this "
              f"corpus (it has no more)", file=sys.stderr)
    return model.getvalue()


def train_vocab(config: VocabConfig, src_texts: Iterable[str], tgt_texts: Iterable[str],
                src_tags: Iterable[str] = ()) -> Vocab:
    """Train a joint (default) or separate SentencePiece vocabulary on the training texts; each of `src_tags`
    (the tags training corpora put before their sources) becomes one source piece.

    `hard_vocab_limit=False` lets a small corpus yield fewer pieces than `config.size` instead of failing.
    """
    src_texts, tgt_texts = list(src_texts), list(tgt_texts)
    if not any(t.strip() for t in src_texts) or not any(t.strip() for t in tgt_texts):
        raise NMTError("cannot train a vocabulary: the training corpus has no text")
    src_tags = list(src_tags)
    if config.joint:
        joint = _train_one(_chain(src_texts, tgt_texts), config, src_tags)
        return Vocab(joint, joint)
    return Vocab(_train_one(src_texts, config, src_tags), _train_one(tgt_texts, config))


def _chain(*lists: list[str]) -> Iterator[str]:
    for texts in lists:
        yield from texts
