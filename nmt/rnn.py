"""rnn.py — recurrent cells for the encoder and decoder: GRU or LSTM, optionally layer-normalized (Nematus).

Every cell splits its work in two: the input projection (`input_weight` · x + `input_bias`), which the decoder
computes for all target positions at once where the input does not depend on the recurrence, and `step`, the
recurrence on a projected input. The plain cells have torch.nn.GRUCell / LSTMCell's parameters (names, shapes,
gate order) and function, so checkpoints of either load in both. Layer-normalized cells normalize each gate
block of both projections (and an LSTM's cell state before its output tanh); the gate functions here are the
one definition that the cells, the hand-written training loops (nmt.bptt) and the exported encoder's loops
(`scan_layer_norm_gru` / `_lstm`, TorchScript) all run. A "state" here is the hidden tensor for a GRU and the
(hidden, cell) pair for an LSTM.
"""

from __future__ import annotations

import math
from typing import Optional

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

    @property
    def recurrent_weight(self) -> torch.Tensor:  # [G·H, H]
        return self.weight_hh

    @property
    def recurrent_bias(self) -> torch.Tensor | None:  # [G·H]
        return self.bias_hh

    def norms(self) -> tuple[torch.Tensor | None, ...]:
        """The layer norms' gains and biases: input projection [G, H] ×2, recurrent projection [G, H] ×2, LSTM
        cell state [H] ×2; None for what the cell does not normalize."""
        return (None,) * 6

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.input_weight, self.input_bias)

    def recurrent(self, h: torch.Tensor) -> torch.Tensor:
        """W_hh · h + b_hh [N, G·H] (before any layer norm)."""
        return F.linear(h, self.recurrent_weight, self.recurrent_bias)

    def normalize_input(self, projected: torch.Tensor) -> torch.Tensor:
        """The input projection as the gates read it: layer-normalized per gate block where the cell has norms."""
        gain, bias = self.norms()[:2]
        return projected if gain is None else gate_norm(projected, gain, bias)

    def normalize_recurrent(self, recurrent: torch.Tensor) -> torch.Tensor:
        """The recurrent projection as the gates read it (see `normalize_input`)."""
        gain, bias = self.norms()[2:4]
        return recurrent if gain is None else gate_norm(recurrent, gain, bias)

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
        return gru_gates(self.normalize_input(projected), self.normalize_recurrent(self.recurrent(h)), h)[0]


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
        gates = self.normalize_input(projected) + self.normalize_recurrent(self.recurrent(h))
        h, c, _ = lstm_gates(gates, c, *self.norms()[4:])
        return h, c


LAYER_NORM_EPS = 1e-5  # torch's default, which checkpoints of layer-normalized cells were trained with


def gru_gates(projected: torch.Tensor, recurrent: torch.Tensor,
              h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GRU update from W_ih·x + b_ih and W_hh·h + b_hh [..., 3H] → new h, reset, update, candidate [..., H], in
    the state's dtype (under autocast the projections come in bf16; the state stays float32)."""
    projected, recurrent = projected.to(h.dtype), recurrent.to(h.dtype)
    projected_r, projected_z, projected_n = projected.chunk(3, dim=-1)
    recurrent_r, recurrent_z, recurrent_n = recurrent.chunk(3, dim=-1)
    reset, update = torch.sigmoid(projected_r + recurrent_r), torch.sigmoid(projected_z + recurrent_z)
    candidate = torch.tanh(projected_n + reset * recurrent_n)
    return candidate + update * (h - candidate), reset, update, candidate


def lstm_gates(gates: torch.Tensor, c: torch.Tensor, cell_gain: Optional[torch.Tensor] = None,
               cell_bias: Optional[torch.Tensor] = None,
               eps: float = LAYER_NORM_EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LSTM update from all gate pre-activations [N, 4H] → new h, new c [N, H], activations i, f, g, o
    [N, 4H], in the cell state's dtype; with `cell_gain`, the output reads the layer-normalized cell state."""
    i, f, g, o = gates.to(c.dtype).chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    shown = c if cell_gain is None or cell_bias is None else normalize(c, eps) * cell_gain + cell_bias
    return o * torch.tanh(shown), c, torch.cat([i, f, g, o], dim=1)


def normalize(x: torch.Tensor, eps: float = LAYER_NORM_EPS) -> torch.Tensor:
    """(x - mean) / σ over the last dimension: F.layer_norm's one kernel, but written out for export (ONNX wants a
    constant normalized shape, which neither the traced graph nor the scripted encoder loop has)."""
    if not torch.jit.is_scripting():
        if not torch.jit.is_tracing():
            return F.layer_norm(x, x.shape[-1:], None, None, eps)
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + eps)


def gate_norm(x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, eps: float = LAYER_NORM_EPS) -> torch.Tensor:
    """Layer norm of each of the G gate blocks of x [..., G·H] on its own, gain and bias [G, H] (or [..., G, H]
    broadcast against x's leading dimensions: several layers' norms at once)."""
    return (normalize(x.view(x.shape[:-1] + gain.shape[-2:]), eps) * gain + bias).view(x.shape)


def _uniform(cell: nn.Module, hidden_size: int) -> None:
    """torch's default for recurrent cells, U(±1/√H); Seq2Seq.reset_parameters sets the model's own init."""
    bound = 1.0 / math.sqrt(hidden_size)
    for param in cell.parameters():
        nn.init.uniform_(param, -bound, bound)


class GateLayerNorm(nn.Module):
    """The gain and bias of a layer norm applied to each of `gates` blocks of size `hidden` on its own."""

    def __init__(self, gates: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(gates, hidden))
        self.bias = nn.Parameter(torch.zeros(gates, hidden))


class _LayerNormed:
    """What both layer-normalized cells share: bias-free input projection (the norm after it has a bias) and
    projections held as Linear modules (the parameter names of their checkpoints)."""

    input_weight = property(lambda self: self.weight_ih.weight)
    input_bias = property(lambda self: None)
    recurrent_weight = property(lambda self: self.weight_hh.weight)
    recurrent_bias = property(lambda self: self.weight_hh.bias)

    def _init_layer_normed(self, input_size: int, hidden_size: int, gates: int, recurrent_bias: bool) -> None:
        nn.Module.__init__(self)  # not the plain cell's parameters
        self.hidden_size = hidden_size
        self.weight_ih = nn.Linear(input_size, gates * hidden_size, bias=False)
        self.weight_hh = nn.Linear(hidden_size, gates * hidden_size, bias=recurrent_bias)
        self.norm_ih, self.norm_hh = GateLayerNorm(gates, hidden_size), GateLayerNorm(gates, hidden_size)


class LayerNormGRUCell(_LayerNormed, GRUCell):
    """A GRU whose input and recurrent projections are layer-normalized per gate."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        self._init_layer_normed(input_size, hidden_size, 3, recurrent_bias=False)

    def norms(self) -> tuple[torch.Tensor | None, ...]:
        return self.norm_ih.weight, self.norm_ih.bias, self.norm_hh.weight, self.norm_hh.bias, None, None


class LayerNormLSTMCell(_LayerNormed, LSTMCell):
    """An LSTM with layer-normalized input and recurrent projections and cell state (as its output reads it)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        self._init_layer_normed(input_size, hidden_size, 4, recurrent_bias=True)
        self.norm_cell = nn.LayerNorm(hidden_size)

    def norms(self) -> tuple[torch.Tensor | None, ...]:
        return (self.norm_ih.weight, self.norm_ih.bias, self.norm_hh.weight, self.norm_hh.bias,
                self.norm_cell.weight, self.norm_cell.bias)


def make_cell(rnn_type: str, input_size: int, hidden_size: int, layer_norm: bool) -> Cell:
    if rnn_type == "lstm":
        return LayerNormLSTMCell(input_size, hidden_size) if layer_norm else LSTMCell(input_size, hidden_size)
    return LayerNormGRUCell(input_size, hidden_size) if layer_norm else GRUCell(input_size, hidden_size)


def hidden_of(state: State) -> torch.Tensor:
    return state[0] if isinstance(state, tuple) else state


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of x [B, S, ...] within its own length; padding stays at the end. Self-inverse."""
    steps = x.size(1)
    positions = torch.arange(steps, device=x.device).unsqueeze(0)  # [1, S]
    lengths = lengths.to(x.device).unsqueeze(1)  # [B, 1]
    flip = torch.where(positions < lengths, lengths - 1 - positions, positions)  # [B, S]
    index = flip.view(*flip.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def scan_layer_norm_gru(projected: torch.Tensor, mask: torch.Tensor, recurrent_weight: torch.Tensor,
                        hh_gain: torch.Tensor, hh_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer-normalized GRU over padded sequences: normalized input projections [B, S, 3H], mask [B, S] (True =
    real; padding leaves the state unchanged) → outputs [B, S, H] (zero at padding), final hidden [B, H].
    Written for TorchScript, without optional inputs: the exported encoder runs it as one ONNX Loop whatever the
    source length (training runs nmt.bptt's packed loop instead)."""
    h = projected.new_zeros(mask.size(0), recurrent_weight.size(1))
    outputs = projected.new_zeros(mask.size(0), mask.size(1), h.size(1))
    for t in range(mask.size(1)):
        recurrent = gate_norm(F.linear(h, recurrent_weight), hh_gain, hh_bias)
        h = torch.where(mask[:, t].unsqueeze(1), gru_gates(projected[:, t], recurrent, h)[0], h)
        outputs[:, t] = h
    return outputs * mask.unsqueeze(-1), h


def scan_layer_norm_lstm(projected: torch.Tensor, mask: torch.Tensor, recurrent_weight: torch.Tensor,
                         recurrent_bias: torch.Tensor, hh_gain: torch.Tensor, hh_bias: torch.Tensor,
                         cell_gain: torch.Tensor, cell_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`scan_layer_norm_gru` for a layer-normalized LSTM (inputs [B, S, 4H])."""
    h = projected.new_zeros(mask.size(0), recurrent_weight.size(1))
    c = torch.zeros_like(h)
    outputs = projected.new_zeros(mask.size(0), mask.size(1), h.size(1))
    for t in range(mask.size(1)):
        recurrent = gate_norm(F.linear(h, recurrent_weight, recurrent_bias), hh_gain, hh_bias)
        new_h, new_c, _ = lstm_gates(projected[:, t] + recurrent, c, cell_gain, cell_bias)
        live = mask[:, t].unsqueeze(1)
        h, c = torch.where(live, new_h, h), torch.where(live, new_c, c)
        outputs[:, t] = h
    return outputs * mask.unsqueeze(-1), h
