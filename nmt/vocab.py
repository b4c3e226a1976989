"""vocab.py — SentencePiece vocabularies: training, loading, encoding to ids and decoding to text.

Ids 0..3 are reserved for pad, unk, bos and eos in every vocabulary. A `Vocab` is either joint (one model for
both sides) or separate (one per side). Model files travel as bytes inside checkpoints and export folders.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from nmt.config import VocabConfig
from nmt.errors import NMTError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def _processor(model_bytes: bytes) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError) as err:
        raise NMTError(f"not a SentencePiece model ({err})") from None
    if processor.pad_id() != PAD_ID or processor.eos_id() != EOS_ID or processor.bos_id() != BOS_ID:
        raise NMTError("SentencePiece model does not reserve ids 0-3 for pad, unk, bos, eos")
    return processor


@dataclass
class Vocab:
    src_model: bytes
    tgt_model: bytes

    def __post_init__(self) -> None:
        self._src = _processor(self.src_model)
        self._tgt = self._src if self.tgt_model == self.src_model else _processor(self.tgt_model)

    @property
    def joint(self) -> bool:
        return self.src_model == self.tgt_model

    @property
    def src_size(self) -> int:
        return self._src.get_piece_size()

    @property
    def tgt_size(self) -> int:
        return self._tgt.get_piece_size()

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        return self._src.encode(texts)

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        return self._tgt.encode(texts)

    def decode_tgt(self, ids: list[int]) -> str:
        return self._tgt.decode([i for i in ids if i > EOS_ID])

    def tgt_pieces(self, ids: list[int]) -> list[str]:
        return [self._tgt.id_to_piece(i) for i in ids]

    def save(self, folder: str | Path) -> list[Path]:
        """Write `spm.model` (joint) or `spm.src.model` + `spm.tgt.model`; returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"spm.model": self.src_model} if self.joint else {
            "spm.src.model": self.src_model, "spm.tgt.model": self.tgt_model}
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return [folder / name for name in files]

    @classmethod
    def load(cls, folder: str | Path) -> Vocab:
        folder = Path(folder)
        if (folder / "spm.model").is_file():
            data = (folder / "spm.model").read_bytes()
            return cls(data, data)
        if (folder / "spm.src.model").is_file() and (folder / "spm.tgt.model").is_file():
            return cls((folder / "spm.src.model").read_bytes(), (folder / "spm.tgt.model").read_bytes())
        raise NMTError(f"no SentencePiece model (spm.model or spm.src.model + spm.tgt.model) in {folder}")

    def to_state(self) -> dict[str, bytes]:
        return {"src": self.src_model, "tgt": self.tgt_model}

    @classmethod
    def from_state(cls, state: dict) -> Vocab:
        if not isinstance(state, dict) or not all(isinstance(state.get(side), bytes) for side in ("src", "tgt")):
            raise NMTError("checkpoint has no valid vocabulary")
        return cls(state["src"], state["tgt"])


def _train_one(sentences: Iterable[str], config: VocabConfig) -> bytes:
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
            train_extremely_large_corpus=False,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise NMTError(f"SentencePiece training failed: {str(err).strip().splitlines()[-1]}") from None
    return model.getvalue()


def train_vocab(config: VocabConfig, src_texts: Iterable[str], tgt_texts: Iterable[str]) -> Vocab:
    """Train a joint (default) or separate SentencePiece vocabulary on the training texts.

    `hard_vocab_limit=False` lets a small corpus yield fewer pieces than `config.size` instead of failing.
    """
    src_texts, tgt_texts = list(src_texts), list(tgt_texts)
    if not any(t.strip() for t in src_texts) or not any(t.strip() for t in tgt_texts):
        raise NMTError("cannot train a vocabulary: the training corpus has no text")
    if config.joint:
        joint = _train_one(_chain(src_texts, tgt_texts), config)
        return Vocab(joint, joint)
    return Vocab(_train_one(src_texts, config), _train_one(tgt_texts, config))


def _chain(*lists: list[str]) -> Iterator[str]:
    for texts in lists:
        yield from texts
