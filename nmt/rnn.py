"""rnn.py — recurrent cells for the encoder and decoder: GRU or LSTM, optionally layer-normalized (Nematus).

Plain cells are PyTorch's own; layer-normalized cells normalize the input and recurrent projections per gate.
A "state" here is the hidden tensor for a GRU and the (hidden, cell) pair for an LSTM.
"""

from __future__ import annotations

import torch
from torch import nn

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


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


class LayerNormGRUCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Linear(input_size, 3 * hidden_size, bias=False)
        self.weight_hh = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.norm_ih, self.norm_hh = GateLayerNorm(3, hidden_size), GateLayerNorm(3, hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        i_r, i_z, i_n = self.norm_ih(self.weight_ih(x)).chunk(3, dim=-1)
        h_r, h_z, h_n = self.norm_hh(self.weight_hh(h)).chunk(3, dim=-1)
        reset, update = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        candidate = torch.tanh(i_n + reset * h_n)
        return (1 - update) * candidate + update * h


class LayerNormLSTMCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.weight_hh = nn.Linear(hidden_size, 4 * hidden_size, bias=True)
        self.norm_ih, self.norm_hh = GateLayerNorm(4, hidden_size), GateLayerNorm(4, hidden_size)
        self.norm_cell = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        gates = self.norm_ih(self.weight_ih(x)) + self.norm_hh(self.weight_hh(h))
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(self.norm_cell(c)), c


def make_cell(rnn_type: str, input_size: int, hidden_size: int, layer_norm: bool) -> nn.Module:
    if rnn_type == "lstm":
        return LayerNormLSTMCell(input_size, hidden_size) if layer_norm else nn.LSTMCell(input_size, hidden_size)
    return LayerNormGRUCell(input_size, hidden_size) if layer_norm else nn.GRUCell(input_size, hidden_size)


def hidden_of(state: State) -> torch.Tensor:
    return state[0] if isinstance(state, tuple) else state


def zero_state(cell: nn.Module, batch: int, like: torch.Tensor) -> State:
    h = like.new_zeros(batch, cell.hidden_size)
    return (h, h.clone()) if isinstance(cell, (nn.LSTMCell, LayerNormLSTMCell)) else h


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
