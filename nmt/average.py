"""average.py — weight averaging: an exponential moving average of the parameters during training (Marian's
exponential smoothing), and `nmt average`, the mean of saved checkpoints (fairseq, OpenNMT-py and Marian ship
both). Knows nothing of the training loop: the Trainer calls `update` after each step and validates under
`applied`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmt.checkpoint import load_checkpoint, model_from_payload, resolve_checkpoint, save_checkpoint
from nmt.errors import NMTError


class ExponentialAverage:
    """avg ← avg + (1 − d_t) · (θ − avg) after update t, with d_t = min(decay, (1 + t) / (10 + t)): early on the
    average follows the weights closely instead of staying near their initial values."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for p in model.parameters()]

    def update(self, model: nn.Module) -> None:
        rate = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in model.parameters()], 1.0 - rate)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own again after it."""
        params = list(model.parameters())
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "weights": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        if set(weights) != set(self.names):
            raise KeyError("the averaged weights are of another model")
        self.updates = int(state["updates"])
        for target, name in zip(self.shadow, self.names):
            target.copy_(weights[name])


def run_average(checkpoints: list[str], out: str) -> dict[str, Any]:
    """`nmt average`: the mean of the models of several checkpoints (run folders or files) of one model,
    written as a checkpoint with the first one's config and vocabulary. Returns a summary."""
    if not checkpoints:
        raise NMTError("nmt average: name the checkpoints to average")
    paths = [resolve_checkpoint(path) for path in checkpoints]
    first = load_checkpoint(paths[0])
    model, _, _ = model_from_payload(first, str(paths[0]))  # checks that the weights fit the model
    total = {key: value.double() for key, value in first["model"].items()}
    for path in paths[1:]:
        weights = load_checkpoint(path)["model"]
        if set(weights) != set(total) or any(weights[k].shape != total[k].shape for k in total):
            raise NMTError(f"{path}: another model than {paths[0]} (the weights' names or shapes differ)")
        for key, value in weights.items():
            total[key] += value.double()
    averaged = {key: (value / len(paths)).to(first["model"][key].dtype) for key, value in total.items()}
    model.load_state_dict(averaged)
    save_checkpoint(Path(out), {"config": first["config"], "vocab": first["vocab"], "model": averaged,
                                "step": first.get("step", 0), "best_bleu": first.get("best_bleu", -1.0),
                                "averaged": [str(p) for p in paths]})
    return {"averaged": [str(p) for p in paths], "out": out}
