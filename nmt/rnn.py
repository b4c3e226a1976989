"""rnn.py — recurrent cells for the encoder and decoder: GRU or LSTM, optionally layer-normalized (Nematus).

Every cell splits its work in two: the input projection (`input_weight` · x + `input_bias`), which the decoder
computes for all target positions at once where the input does not depend on the recurrence, and `step`, the
recurrence on a projected input. The plain cells have torch.nn.GRUCell / LSTMCell's parameters (names, shapes,
gate order) and function, so checkpoints of either load in both. A "state" here is the hidden tensor for a GRU
and the (hidden, cell) pair for an LSTM.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class Cell(nn.Module):
    """A recurrent cell: `forward(x, state)` is `step(project(x), state)`."""

    hidden_size: int

    @property
    def input_weight(self) -> torch.Tensor:  # [G·H, I]
        return self.weight_ih

    @property
    def input_bias(self) -> torch.Tensor | None:  # [G·H]
        return self.bias_ih

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.input_weight, self.input_bias)

    def recurrent(self, h: torch.Tensor) -> torch.Tensor:
        """W_hh · h + b_hh [N, G·H] (plain cells)."""
        return F.linear(h, self.weight_hh, self.bias_hh)

    def step(self, projected: torch.Tensor, state: State) -> State:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: State) -> State:
        return self.step(self.project(x), state)


class GRUCell(Cell):
    """torch.nn.GRUCell: r, z = σ(W_i{r,z} x + W_h{r,z} h + b), n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),
    h' = n + z ⊙ (h - n)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size))
        _uniform(self, hidden_size)

    def step(self, projected: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return gru_gates(projected, self.recurrent(h), h)[0]


class LSTMCell(Cell):
    """torch.nn.LSTMCell: gates i, f, g, o = W_ih x + b_ih + W_hh h + b_hh."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        _uniform(self, hidden_size)

    def step(self, projected: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        h, c, _ = lstm_gates(projected + self.recurrent(h), c)
        return h, c


def gru_gates(projected: torch.Tensor, recurrent: torch.Tensor,
              h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GRU update from W_ih·x + b_ih and W_hh·h + b_hh [N, 3H] → new h, reset, update, candidate [N, H], in
    the state's dtype (under autocast the projections come in bf16; the state stays float32)."""
    projected, recurrent = projected.to(h.dtype), recurrent.to(h.dtype)
    projected_r, projected_z, projected_n = projected.chunk(3, dim=1)
    recurrent_r, recurrent_z, recurrent_n = recurrent.chunk(3, dim=1)
    reset, update = torch.sigmoid(projected_r + recurrent_r), torch.sigmoid(projected_z + recurrent_z)
    candidate = torch.tanh(projected_n + reset * recurrent_n)
    return candidate + update * (h - candidate), reset, update, candidate


def lstm_gates(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LSTM update from all gate pre-activations [N, 4H] → new h, new c [N, H], activations i, f, g, o
    [N, 4H], in the cell state's dtype."""
    i, f, g, o = gates.to(c.dtype).chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return o * torch.tanh(c), c, torch.cat([i, f, g, o], dim=1)


def _uniform(cell: nn.Module, hidden_size: int) -> None:
    """torch's default for recurrent cells, U(±1/√H); Seq2Seq.reset_parameters sets the model's own init."""
    bound = 1.0 / math.sqrt(hidden_size)
    for param in cell.parameters():
        nn.init.uniform_(param, -bound, bound)


class GateLayerNorm(nn.Module):
    """Layer norm applied separately to each of `gates` blocks of size `hidden` (one gain/bias per block)."""

    def __init__(self, gates: int, hidden: int) -> None:
        super().__init__()
        self.gates, self.hidden = gates, hidden
        self.weight = nn.Parameter(torch.ones(gates, hidden))
        self.bias = nn.Parameter(torch.zeros(gates, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(*shape[:-1], self.gates, self.hidden)
        x = nn.functional.layer_norm(x, (self.hidden,)) * self.weight + self.bias
        return x.view(shape)


class LayerNormCell(Cell):
    """Input projection without bias (the layer norm that follows has one)."""

    @property
    def input_weight(self) -> torch.Tensor:
        return self.weight_ih.weight

    @property
    def input_bias(self) -> None:
        return None


class LayerNormGRUCell(LayerNormCell):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Linear(input_size, 3 * hidden_size, bias=False)
        self.weight_hh = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.norm_ih, self.norm_hh = GateLayerNorm(3, hidden_size), GateLayerNorm(3, hidden_size)

    def step(self, projected: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        i_r, i_z, i_n = self.norm_ih(projected).chunk(3, dim=-1)
        h_r, h_z, h_n = self.norm_hh(self.weight_hh(h)).chunk(3, dim=-1)
        reset, update = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        candidate = torch.tanh(i_n + reset * h_n)
        return (1 - update) * candidate + update * h


class LayerNormLSTMCell(LayerNormCell):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.weight_hh = nn.Linear(hidden_size, 4 * hidden_size, bias=True)
        self.norm_ih, self.norm_hh = GateLayerNorm(4, hidden_size), GateLayerNorm(4, hidden_size)
        self.norm_cell = nn.LayerNorm(hidden_size)

    def step(self, projected: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        gates = self.norm_ih(projected) + self.norm_hh(self.weight_hh(h))
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(self.norm_cell(c)), c


def make_cell(rnn_type: str, input_size: int, hidden_size: int, layer_norm: bool) -> Cell:
    if rnn_type == "lstm":
        return LayerNormLSTMCell(input_size, hidden_size) if layer_norm else LSTMCell(input_size, hidden_size)
    return LayerNormGRUCell(input_size, hidden_size) if layer_norm else GRUCell(input_size, hidden_size)


def hidden_of(state: State) -> torch.Tensor:
    return state[0] if isinstance(state, tuple) else state


def zero_state(cell: nn.Module, batch: int, like: torch.Tensor) -> State:
    h = like.new_zeros(batch, cell.hidden_size)
    return (h, h.clone()) if isinstance(cell, (LSTMCell, LayerNormLSTMCell)) else h


def keep_where(mask: torch.Tensor, new: State, old: State) -> State:
    """Take `new` where mask [B] is True and `old` elsewhere (padding steps leave the state unchanged)."""
    m = mask.unsqueeze(-1)
    if isinstance(new, tuple):
        return tuple(torch.where(m, n, o) for n, o in zip(new, old))
    return torch.where(m, new, old)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of x [B, S, ...] within its own length; padding stays at the end. Self-inverse."""
    steps = x.size(1)
    positions = torch.arange(steps, device=x.device).unsqueeze(0)  # [1, S]
    lengths = lengths.to(x.device).unsqueeze(1)  # [B, 1]
    flip = torch.where(positions < lengths, lengths - 1 - positions, positions)  # [B, S]
    index = flip.view(*flip.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def run_cell(cell: nn.Module, inputs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unroll `cell` over inputs [B, S, I] with mask [B, S] (True = real token; padding leaves the state
    unchanged); returns outputs [B, S, H] (zero at padding) and the final hidden [B, H]."""
    state = zero_state(cell, inputs.size(0), inputs)
    outputs = []
    for t in range(inputs.size(1)):
        state = keep_where(mask[:, t], cell(inputs[:, t], state), state)
        outputs.append(hidden_of(state))
    return torch.stack(outputs, dim=1) * mask.unsqueeze(-1), hidden_of(state)
