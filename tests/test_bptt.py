"""Hand-written backpropagation through time: packing, and gradients checked against finite differences."""

from __future__ import annotations

import pytest
import torch

from nmt import bptt
from nmt.bptt import LayerWeights, Packing
from tests.conftest import tiny_random_model


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


def _layer_weights(lstm: bool, layer_norm: bool, gates: int, size: int, inputs: int | None,
                   input_bias: bool) -> LayerWeights:
    """Random weights of one layer, in float64, requiring gradients (None where such a layer has none)."""
    blocks = gates // size
    norms = [torch.randn(blocks, size), torch.randn(blocks, size)] * 2 if layer_norm else [None] * 4
    norms += [torch.randn(size), torch.randn(size)] if layer_norm and lstm else [None] * 2
    weights = [None if inputs is None else torch.randn(gates, inputs), torch.randn(gates, size),
               None if layer_norm and not lstm else torch.randn(gates),
               torch.randn(gates) if input_bias and not layer_norm else None, *norms]
    return LayerWeights(*(None if w is None else w.double().mul(0.5).requires_grad_() for w in weights))


def _inputs(lstm: bool, layers: int, layer_norm: bool, seed: int = 0):
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
    tensors = [t.double().mul(0.5).requires_grad_() for t in tensors]
    layer_weights = [_layer_weights(lstm, layer_norm, gates, size, att if l == 0 else size, l > 0)
                     for l in range(layers)]
    return packing, mask[packing.order], tensors, layer_weights


def _grouped(layer_weights: list[LayerWeights], weights) -> list[LayerWeights]:
    """layer_weights with their tensors replaced, in order, by `weights` (what gradcheck perturbs)."""
    it = iter(weights)
    return [LayerWeights(*(None if w is None else next(it) for w in ws)) for ws in layer_weights]


@pytest.mark.parametrize("lstm", [False, True])
@pytest.mark.parametrize("layers,dropout,tanh,feed_dropout,layer_norm", [(1, 0.0, True, 0.0, False),
                                                                        (2, 0.3, False, 0.3, False),
                                                                        (2, 0.3, False, 0.0, True)])
def test_teacher_forced_gradients_match_finite_differences(lstm, layers, dropout, tanh, feed_dropout, layer_norm):
    packing, mask, tensors, layer_weights = _inputs(lstm, layers, layer_norm)
    plan = packing.plan(lstm, layers, dropout, tanh, feed_dropout)
    flat = [w for ws in layer_weights for w in ws if w is not None]

    def run(gates, hidden, cell, keys, memory, query, energy, out_w, out_b, *weights):
        torch.manual_seed(1)  # the same dropout masks at every evaluation
        return bptt.teacher_forced(plan, gates, hidden, cell if lstm else None, keys, memory, mask, query, energy,
                                   out_w, out_b, _grouped(layer_weights, weights))

    assert torch.autograd.gradcheck(run, (*tensors, *flat), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("lstm", [False, True])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_recurrence_gradients_match_finite_differences(lstm, layer_norm):
    torch.manual_seed(0)
    packing = Packing(torch.tensor([3, 1, 4]))
    size, gates = 3, 4 * 3 if lstm else 3 * 3
    rows = sum(packing.rows)
    args = [torch.randn(rows, gates).double().requires_grad_(), torch.randn(3, size).double().requires_grad_(),
            torch.randn(3, size).double().requires_grad_()]
    layer_weights = [_layer_weights(lstm, layer_norm, gates, size, None, False)._replace(ih_gain=None, ih_bias=None)]
    flat = [w for w in layer_weights[0] if w is not None]

    def run(projected, hidden, cell, *weights):
        return bptt.recurrence(packing.plan(lstm), projected, hidden, cell if lstm else None,
                               _grouped(layer_weights, weights)[0])

    assert torch.autograd.gradcheck(run, (*args, *flat), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", [{}, {"rnn_type": "lstm"}, {"layer_norm": True},
                                   {"layer_norm": True, "encoder_layers": 2},
                                   {"layer_norm": True, "rnn_type": "lstm", "encoder_layers": 2}])
def test_the_packed_encoder_equals_the_padded_one_the_export_traces(model):
    """Packed without gradients (a GRU's two directions in one loop), packed with them (the hand-written
    recurrence of training) and padded (the exported loops): one encoding."""
    net = tiny_random_model(vocab_size=11, seed=3, **model).double().eval()
    lengths = torch.tensor([2, 6, 1, 4])
    src = torch.randint(4, 11, (4, 6)).masked_fill(torch.arange(6) >= lengths.unsqueeze(1), 0)
    trained = net.encode_tensors(src, lengths)
    with torch.no_grad():
        packed, padded = net.encode_tensors(src, lengths), net.encode_tensors(src, lengths, packed=False)
    for p, q, r in zip(packed, padded, trained):
        assert torch.allclose(p, q, atol=1e-12, rtol=0) if p.is_floating_point() else torch.equal(p, q)
        assert torch.allclose(p, r.detach(), atol=1e-12, rtol=0) if p.is_floating_point() else torch.equal(p, r)
