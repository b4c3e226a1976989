"""checkpoint.py — atomic checkpoint files of plain containers, loaded safely, and models rebuilt from them.

A checkpoint holds the resolved config, the vocabulary (SentencePiece bytes) and the model weights, so it is
self-contained; `last.pt` adds optimizer, scheduler, RNG states and the data position. Loading always uses
`torch.load(weights_only=True)`: no pickled code is ever run. Every failure is one NMTError line.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from nmt.config import Config, config_from_checkpoint
from nmt.atomic import atomic_output
from nmt.errors import NMTError
from nmt.model import Seq2Seq
from nmt.vocab import Vocab

FORMAT = "nmt-checkpoint-v1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write the checkpoint atomically (nmt.atomic): a kill or a full disk keeps the previous one."""
    with atomic_output(path) as out:
        torch.save({"format": FORMAT, **payload}, out)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise NMTError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:160]
        if "Unsupported global" in detail:
            raise NMTError(f"{path}: refused to load: it holds pickled objects, not plain tensors and containers "
                           f"({detail})") from None
        raise NMTError(f"{path}: not a readable checkpoint ({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as err:
        raise NMTError(f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err)[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise NMTError(f"{path}: not an nmt checkpoint")
    for key in ("config", "vocab", "model"):
        if key not in payload:
            raise NMTError(f"{path}: checkpoint lacks {key!r}")
    return payload


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder means its best checkpoint (or last, before any validation); a file means itself."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt", path / "best.pt"):
            if candidate.is_file():
                return candidate
        raise NMTError(f"{path}: no checkpoints/best.pt or checkpoints/last.pt in this folder")
    return path


def model_from_payload(payload: dict[str, Any], where: str = "checkpoint") -> tuple[Seq2Seq, Vocab, Config]:
    config = config_from_checkpoint(payload["config"])
    vocab = Vocab.from_state(payload["vocab"])
    model = Seq2Seq(config.model, vocab.src_size, vocab.tgt_size, vocab.output_ids)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise NMTError(f"{where}: weights do not fit the model ({str(err).splitlines()[0][:200]})") from None
    return model, vocab, config


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Seq2Seq, Vocab, Config]:
    """Load a run folder or checkpoint as an eval-mode model on `device`, with its vocabulary and config."""
    checkpoint = resolve_checkpoint(path)
    model, vocab, config = model_from_payload(load_checkpoint(checkpoint), str(checkpoint))
    return model.to(device).eval(), vocab, config
