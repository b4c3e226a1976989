"""Hand-written backpropagation through time: packing, and gradients checked against finite differences."""

from __future__ import annotations

import pytest
import torch

from nmt import bptt
from nmt.bptt import Packing


def test_packing_sorts_by_length_and_round_trips():
    lengths = torch.tensor([2, 4, 1, 4])
    packing = Packing(lengths)
    assert packing.rows == (4, 3, 2, 2) and packing.order.tolist() == [1, 3, 0, 2]
    x = torch.arange(4 * 5).view(4, 5)  # [B, T]
    packed = packing.pack(x)
    assert packed.tolist() == [5, 15, 0, 10, 6, 16, 1, 7, 17, 8, 18]  # step 0 of rows 1, 3, 0, 2; step 1 ...
    live = torch.arange(5) < lengths.unsqueeze(1)
    assert torch.equal(packing.unpack(packed, 5), x * live)
    mirror = packing.reversed_positions()
    assert packing.unpack(packed[mirror], 5)[1].tolist() == [8, 7, 6, 5, 0]  # row 1 reversed within its length
    assert packed[packing.last_positions()].tolist() == [1, 8, 10, 18]


def _inputs(lstm: bool, layers: int, seed: int = 0):
    torch.manual_seed(seed)
    batch, src_len, size, embed, att, memory_size, attention = 3, 4, 5, 3, 4, 6, 3
    lengths = torch.tensor([4, 2, 3])
    packing = Packing(lengths)
    gates = 4 * size if lstm else 3 * size
    rows = sum(packing.rows)
    mask = torch.arange(src_len).unsqueeze(0) < torch.tensor([4, 3, 2]).unsqueeze(1)
    tensors = [torch.randn(rows, gates), torch.randn(layers, batch, size), torch.randn(layers, batch, size),
               torch.randn(batch, src_len, attention), torch.randn(batch, src_len, memory_size),
               torch.randn(attention, size), torch.randn(1, attention), torch.randn(att, size + memory_size),
               torch.randn(att)]
    layer_weights = [(torch.randn(gates, att if l == 0 else size), torch.randn(gates, size), torch.randn(gates),
                      None if l == 0 else torch.randn(gates)) for l in range(layers)]
    tensors = [t.double().mul(0.5).requires_grad_() for t in tensors]
    layer_weights = [tuple(None if w is None else w.double().mul(0.5).requires_grad_() for w in ws)
                     for ws in layer_weights]
    return packing, mask[packing.order], tensors, layer_weights


@pytest.mark.parametrize("lstm", [False, True])
@pytest.mark.parametrize("layers,dropout,tanh,feed_dropout", [(1, 0.0, True, 0.0), (2, 0.3, False, 0.3)])
def test_teacher_forced_gradients_match_finite_differences(lstm, layers, dropout, tanh, feed_dropout):
    packing, mask, tensors, layer_weights = _inputs(lstm, layers)
    plan = packing.plan(lstm, layers, dropout, tanh, feed_dropout)
    flat = [w for ws in layer_weights for w in ws if w is not None]

    def run(gates, hidden, cell, keys, memory, query, energy, out_w, out_b, *weights):
        torch.manual_seed(1)  # the same dropout masks at every evaluation
        it = iter(weights)
        grouped = [tuple(None if w is None else next(it) for w in ws) for ws in layer_weights]
        return bptt.teacher_forced(plan, gates, hidden, cell if lstm else None, keys, memory, mask, query, energy,
                                   out_w, out_b, grouped)

    assert torch.autograd.gradcheck(run, (*tensors, *flat), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("lstm", [False, True])
def test_recurrence_gradients_match_finite_differences(lstm):
    torch.manual_seed(0)
    packing = Packing(torch.tensor([3, 1, 4]))
    size, gates = 3, 4 * 3 if lstm else 3 * 3
    rows = sum(packing.rows)
    args = [torch.randn(rows, gates), torch.randn(3, size), torch.randn(3, size), torch.randn(gates, size),
            torch.randn(gates)]
    args = [a.double().requires_grad_() for a in args]

    def run(projected, hidden, cell, w_hh, b_hh):
        return bptt.recurrence(packing.plan(lstm), projected, hidden, cell if lstm else None, w_hh, b_hh)

    assert torch.autograd.gradcheck(run, args, eps=1e-6, atol=1e-6)
