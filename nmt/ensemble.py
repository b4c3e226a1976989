"""ensemble.py — several models as one DecoderStep: each member encodes and steps on its own part of the state,
and the ensemble's log-probabilities are the mean of the members' (Marian's ensembles sum them), so the one
search and forced scoring serve ensembles exactly as they serve single models. Members may be any backends;
they must share the vocabulary (checked where they are opened).
"""

from __future__ import annotations

import torch

from nmt.errors import NMTError
from nmt.search import DecoderStep, State
from nmt.vocab import Vocab


def combine(members: list[tuple[str, DecoderStep, Vocab]]) -> tuple[DecoderStep, Vocab]:
    """(name, model, vocabulary) of one or several models → one DecoderStep (an Ensemble for several) and the
    shared vocabulary; members with another vocabulary are one NMTError line."""
    first_name, first, vocab = members[0]
    for name, _, other in members[1:]:
        if other.to_state() != vocab.to_state():
            raise NMTError(f"{name}: another vocabulary than {first_name}'s (an ensemble's members need the same "
                           f"SentencePiece model and target ids)")
    return (first if len(members) == 1 else Ensemble([member for _, member, _ in members])), vocab


class Ensemble:
    def __init__(self, members: list[DecoderStep]) -> None:
        self.members = members

    @staticmethod
    def _join(states: list[State]) -> State:
        """The members' states side by side; the attention is the members' mean (where every member gives it)."""
        weights = [s.attention for s in states]
        return State(rows={f"{i}.{k}": v for i, s in enumerate(states) for k, v in s.rows.items()},
                     sentences={f"{i}.{k}": v for i, s in enumerate(states) for k, v in s.sentences.items()},
                     attention=None if any(w is None for w in weights) else torch.stack(weights).mean(0))

    @staticmethod
    def _part(state: State, member: int) -> State:
        prefix = f"{member}."
        return State(rows={k[len(prefix):]: v for k, v in state.rows.items() if k.startswith(prefix)},
                     sentences={k[len(prefix):]: v for k, v in state.sentences.items() if k.startswith(prefix)})

    def parameter_count(self) -> int:
        return sum(member.parameter_count() for member in self.members)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> State:
        return self._join([member.encode(src, src_lengths) for member in self.members])

    def step(self, prev_tokens: torch.Tensor, state: State, normalize: bool = True) -> tuple[torch.Tensor, State]:
        """The mean of the members' log-probabilities (normalized whatever `normalize` asks: each member's)."""
        total, states = None, []
        for i, member in enumerate(self.members):
            log_probs, new = member.step(prev_tokens, self._part(state, i))
            total = log_probs if total is None else total.add_(log_probs)
            states.append(new)
        return total.div_(len(self.members)), self._join(states)
