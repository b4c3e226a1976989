"""bptt.py — the recurrent loops of training with hand-written backpropagation through time: the teacher-forced
decoder and each encoder direction, for GRU and LSTM cells, plain or layer-normalized.

Same function and gradients as running `Decoder.step` under autograd, computed with less work: rows are sorted by
target length and stored packed, t-major (step t holds its n_t live rows, as a PackedSequence does), so padding
costs nothing; the forward loop saves what backward needs; the backward loop only propagates gradients through
time, and every weight gradient is one matmul over all steps' rows at the end instead of one per step. Forward
math comes from the cells and the attention (nmt.rnn, nmt.attention); only the loops and backward live here.
The attention's tanh(q + keys) [rows, S, A] is recomputed by the backward rather than stored (stored, it was fresh
memory every step, faulted in page by page); on CPU the fused kernels of nmt.kernels do both passes over it.
Without gradients (decoding), `bidirectional_gru` runs an encoder layer's two directions in one loop instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn import functional as F

from nmt import kernels
from nmt.attention import attend
from nmt.rnn import LAYER_NORM_EPS, Cell, gate_norm, gru_gates, lstm_gates


@dataclass(frozen=True)
class Plan:
    """The static shape of one pass: live rows per step (non-increasing), cell type, dropout between layers."""

    rows: tuple[int, ...]  # n_t
    lstm: bool = False
    layers: int = 1
    dropout: float = 0.0  # between stacked layers (training only)
    attentional_tanh: bool = True  # tanh on the attentional layer, else linear
    feed_dropout: float = 0.0  # dropout on the attentional vector, for both its uses (output and input feeding)

    @property
    def offsets(self) -> list[int]:
        offsets, total = [], 0
        for n in self.rows:
            offsets.append(total)
            total += n
        return offsets


class Packing:
    """Sequences of a batch sorted by length, longest first, and their positions packed t-major: step t holds
    its n_t live rows (the longest n_t sequences), then step t + 1 follows. `order` maps sorted rows to batch
    rows; `pack` / `unpack` move [B, T, ...] tensors to and from the packed [R, ...] layout."""

    def __init__(self, lengths: torch.Tensor) -> None:
        self.order = lengths.argsort(descending=True, stable=True)  # [B]
        self.lengths = lengths
        sorted_lengths = lengths[self.order]
        steps = int(sorted_lengths[0]) if lengths.numel() else 0
        live = torch.arange(steps, device=lengths.device).unsqueeze(1) < sorted_lengths.unsqueeze(0)  # [T, B]
        self.rows = tuple(live.sum(1).tolist())
        self.step, rank = live.nonzero(as_tuple=True)  # [R]: t-major
        self.row = self.order[rank]  # [R]: the batch row of each packed position

    def plan(self, lstm: bool = False, layers: int = 1, dropout: float = 0.0, attentional_tanh: bool = True,
             feed_dropout: float = 0.0) -> Plan:
        return Plan(self.rows, lstm, layers, dropout, attentional_tanh, feed_dropout)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, ...] → [R, ...]."""
        return x[self.row, self.step]

    def unpack(self, packed: torch.Tensor, steps: int) -> torch.Tensor:
        """packed [R, ...] → [B, steps, ...], zero at padding."""
        out = packed.new_zeros(self.lengths.size(0), steps, *packed.shape[1:])
        return out.index_put((self.row, self.step), packed)

    def reversed_positions(self) -> torch.Tensor:
        """[R]: the packed index of each position's mirror (t → length - 1 - t) in its own sequence; packing by
        it reverses every sequence within its length."""
        index = torch.full((self.lengths.size(0), len(self.rows)), -1, dtype=torch.long, device=self.row.device)
        index[self.row, self.step] = torch.arange(self.row.size(0), device=self.row.device)
        return index[self.row, self.lengths[self.row] - 1 - self.step]

    def last_positions(self) -> torch.Tensor:
        """[B]: the packed index of each batch row's last position."""
        index = torch.empty(self.lengths.size(0), dtype=torch.long, device=self.row.device)
        is_last = self.step == self.lengths[self.row] - 1
        index[self.row[is_last]] = is_last.nonzero().squeeze(1)
        return index


class LayerWeights(NamedTuple):
    """One recurrent layer's parameters as the loops take them; None for what the layer lacks (input weight and
    bias: where the caller projects the inputs itself; the norms: plain cells)."""

    input_weight: torch.Tensor | None  # [G·H, I] (the decoder's first layer: its input-feeding columns)
    recurrent_weight: torch.Tensor  # [G·H, H]
    recurrent_bias: torch.Tensor | None
    input_bias: torch.Tensor | None
    ih_gain: torch.Tensor | None = None  # [G, H]: the input projection's layer norm
    ih_bias: torch.Tensor | None = None
    hh_gain: torch.Tensor | None = None  # [G, H]: the recurrent projection's
    hh_bias: torch.Tensor | None = None
    cell_gain: torch.Tensor | None = None  # [H]: an LSTM's cell state, as its output reads it
    cell_bias: torch.Tensor | None = None

    @classmethod
    def of(cls, cell: Cell, input_weight: torch.Tensor | None, input_bias: torch.Tensor | None,
           input_norm: bool = True) -> LayerWeights:
        """A cell's parameters; input_norm=False leaves out its input norm (the caller applies it)."""
        ih_gain, ih_bias, *norms = cell.norms()
        if not input_norm:
            ih_gain = ih_bias = None
        return cls(input_weight, cell.recurrent_weight, cell.recurrent_bias, input_bias, ih_gain, ih_bias, *norms)


class _Norm:
    """A per-block layer norm over a pass's packed rows: the forward keeps x̂ and 1/σ of every row, the backward
    keeps d(output) for the gain's and bias' gradients, taken over all rows at the end."""

    def __init__(self, total: int, blocks: int, size: int, like: torch.Tensor) -> None:
        self.normed, self.rstd = like.new_empty(total, blocks, size), like.new_empty(total, blocks, 1)
        self.grad: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, span: slice) -> torch.Tensor:
        size = self.normed.size(2)
        normed, _, rstd = torch.native_layer_norm(x.view_as(self.normed[span]), (size,), None, None, LAYER_NORM_EPS)
        self.normed[span], self.rstd[span] = normed, rstd
        return torch.addcmul(bias.view(-1, size), normed, gain.view(-1, size)).view_as(x)

    def backward(self, grad: torch.Tensor, gain: torch.Tensor, span: slice) -> torch.Tensor:
        """d(output) [n, G·H] → d(input): the normalization's backward on x̂ (mean 0, σ 1), then scaled by 1/σ."""
        if self.grad is None:
            self.grad = self.normed.new_empty(self.normed.size(0), self.normed[0].numel())
            self.unit = (torch.zeros_like(self.rstd), torch.ones_like(self.rstd))
        self.grad[span] = grad
        normed = self.normed[span]
        grad_normed = grad.view_as(normed) * gain.view(-1, normed.size(2))
        grad_x = torch.ops.aten.native_layer_norm_backward(grad_normed, normed, (normed.size(2),), self.unit[0][span],
                                                           self.unit[1][span], None, None, (True, False, False))[0]
        return grad_x.mul_(self.rstd[span]).view_as(grad)

    def parameter_grads(self, gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad = self.grad.view_as(self.normed)
        return (grad * self.normed).sum(0).view_as(gain), grad.sum(0).view_as(gain)


class _Layer:
    """One recurrent layer over a pass's packed rows (t-major): the state entering each step and what its
    backward needs (GRU: reset, update, candidate and the gates' W_hn·h + b_hn; LSTM: the gate activations and
    the cell states; layer norms: their x̂ and 1/σ), then the gradients flowing back through time and those of
    both projections."""

    def __init__(self, weights: LayerWeights, total: int, batch: int, lstm: bool, like: torch.Tensor) -> None:
        size = weights.recurrent_weight.size(1)
        gates = weights.recurrent_weight.size(0) // size
        new = like.new_empty
        self.lstm, self.batch = lstm, batch
        self.h_in, self.acts = new(total, size), new(total, 4 * size)
        self.c_in, self.c_out = (new(total, size), new(total, size)) if lstm else (None, None)
        self.ih_norm = _Norm(total, gates, size, like) if weights.ih_gain is not None else None
        self.hh_norm = _Norm(total, gates, size, like) if weights.hh_gain is not None else None
        self.cell_norm = _Norm(total, 1, size, like) if weights.cell_gain is not None else None

    def step(self, span: slice, weights: LayerWeights, projected: torch.Tensor, hidden: torch.Tensor,
             cell: torch.Tensor | None) -> torch.Tensor:
        """The step of the rows in `span` from their projected inputs [n, G·H]: the first n rows of hidden (and
        cell) [B, H] are updated in place; returns the new hidden rows [n, H]."""
        n = projected.size(0)
        self.h_in[span] = h_prev = hidden[:n]
        if self.ih_norm is not None:
            projected = self.ih_norm.forward(projected, weights.ih_gain, weights.ih_bias, span)
        recurrent = F.linear(h_prev, weights.recurrent_weight, weights.recurrent_bias)
        if self.hh_norm is not None:
            recurrent = self.hh_norm.forward(recurrent, weights.hh_gain, weights.hh_bias, span)
        if self.lstm:
            self.c_in[span] = cell[:n]
            h, c, self.acts[span] = lstm_gates(projected + recurrent, cell[:n], weights.cell_gain, weights.cell_bias)
            self.c_out[span] = cell[:n] = c
        else:
            h, reset, update, candidate = gru_gates(projected, recurrent, h_prev)
            torch.cat([reset, update, candidate, recurrent.chunk(3, dim=1)[2]], dim=1, out=self.acts[span])
        hidden[:n] = h
        return h

    def start_backward(self) -> None:
        total, size = self.h_in.shape
        self.grad_projected = self.h_in.new_empty(total, self.acts.size(1) if self.lstm else 3 * size)
        self.grad_recurrent = torch.empty_like(self.grad_projected)
        self.carry_h = self.h_in.new_zeros(self.batch, size)  # d(state) flowing back into the previous step
        self.carry_c = self.h_in.new_zeros(self.batch, size) if self.lstm else None

    def step_backward(self, span: slice, weights: LayerWeights, grad_h: torch.Tensor) -> torch.Tensor:
        """`step`'s backward for d(new hidden rows) from above [n, H] (the carry from the next step is added
        here) → d(projected inputs) [n, G·H]; the carries now flow into the previous step."""
        n = grad_h.size(0)
        grad_h = grad_h + self.carry_h[:n]
        if self.lstm:
            d_projected, self.carry_c[:n] = self._lstm_backward(span, weights, grad_h)
            d_recurrent, direct = d_projected, 0
        else:
            d_projected, d_recurrent, direct = _gru_backward(grad_h, self.acts[span], self.h_in[span])
        if self.hh_norm is not None:
            d_recurrent = self.hh_norm.backward(d_recurrent, weights.hh_gain, span)
        if self.ih_norm is not None:
            d_projected = self.ih_norm.backward(d_projected, weights.ih_gain, span)
        self.grad_projected[span], self.grad_recurrent[span] = d_projected, d_recurrent
        self.carry_h[:n] = d_recurrent @ weights.recurrent_weight + direct
        return d_projected

    def _lstm_backward(self, span: slice, weights: LayerWeights,
                       grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LSTM gates' backward → d(gate pre-activations), d(previous cell state)."""
        i, f, g, o = self.acts[span].chunk(4, dim=1)
        c_prev, c = self.c_in[span], self.c_out[span]
        shown = c  # the cell state as the output's tanh reads it; its norm is recomputed from the saved state
        if self.cell_norm is not None:
            shown = self.cell_norm.forward(c, weights.cell_gain, weights.cell_bias, span)
        tanh_c = torch.tanh(shown)
        grad_shown = grad_h * o * (1 - tanh_c * tanh_c)
        if self.cell_norm is not None:
            grad_shown = self.cell_norm.backward(grad_shown, weights.cell_gain, span)
        grad_c = self.carry_c[:c.size(0)] + grad_shown
        grad_gates = torch.cat([grad_c * g * i * (1 - i), grad_c * c_prev * f * (1 - f), grad_c * i * (1 - g * g),
                                grad_h * tanh_c * o * (1 - o)], dim=1)
        return grad_gates, grad_c * f

    def weight_grads(self, weights: LayerWeights, inputs: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The gradients of `weights`, field by field, each one product or sum over all rows; `inputs` [R, I]: what
        the input weight multiplied (None: no input weight here)."""
        grads = [None if inputs is None else self.grad_projected.t() @ inputs, self.grad_recurrent.t() @ self.h_in,
                 None if weights.recurrent_bias is None else self.grad_recurrent.sum(0),
                 None if weights.input_bias is None else self.grad_projected.sum(0)]
        for norm, gain in ((self.ih_norm, weights.ih_gain), (self.hh_norm, weights.hh_gain),
                           (self.cell_norm, weights.cell_gain)):
            grads += norm.parameter_grads(gain) if norm is not None else [None, None]
        return grads


def _gru_backward(grad_h: torch.Tensor, acts: torch.Tensor, h_prev: torch.Tensor):
    """GRU gates' backward: saved [reset, update, candidate, recurrent_n] → d(projected), d(recurrent), dh_prev
    part (the gradients of the projections as the gates read them)."""
    reset, update, candidate, recurrent_n = acts.chunk(4, dim=1)
    grad_update = grad_h * (h_prev - candidate) * update * (1 - update)
    grad_candidate = grad_h * (1 - update) * (1 - candidate * candidate)
    grad_reset = grad_candidate * recurrent_n * reset * (1 - reset)
    grad_projected = torch.cat([grad_reset, grad_update, grad_candidate], dim=1)
    grad_recurrent = torch.cat([grad_reset, grad_update, grad_candidate * reset], dim=1)
    return grad_projected, grad_recurrent, grad_h * update


def _unflat(tensors, layers: int) -> list[LayerWeights]:
    size = len(LayerWeights._fields)
    return [LayerWeights(*tensors[size * l: size * (l + 1)]) for l in range(layers)]


class _Recurrence(torch.autograd.Function):
    """One recurrent layer over packed inputs: projected inputs [R, G·H] (W_ih·x + b_ih, layer-normalized where
    the cell normalizes it; t-major, n_t live rows per step), initial hidden / cell [B, H], the layer's weights
    (`LayerWeights`, flat, without input weight, bias and norm) → the hidden state of every live position [R, H]."""

    @staticmethod
    def forward(ctx, plan: Plan, projected, hidden0, cell0, *flat_weights):
        (weights,) = _unflat(flat_weights, 1)
        hidden = hidden0.clone()
        cell = cell0.clone() if plan.lstm else None
        layer = _Layer(weights, projected.size(0), hidden0.size(0), plan.lstm, projected)
        out = projected.new_empty(projected.size(0), hidden0.size(1))
        for n, o in zip(plan.rows, plan.offsets):
            span = slice(o, o + n)
            out[span] = layer.step(span, weights, projected[span], hidden, cell)
        ctx.plan, ctx.layer = plan, layer
        ctx.save_for_backward(*flat_weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        plan, layer = ctx.plan, ctx.layer
        (weights,) = _unflat(ctx.saved_tensors, 1)
        layer.start_backward()
        for n, o in zip(reversed(plan.rows), reversed(plan.offsets)):
            span = slice(o, o + n)
            layer.step_backward(span, weights, grad_out[span])
        return None, layer.grad_projected, layer.carry_h, layer.carry_c, *layer.weight_grads(weights, None)


class _TeacherForced(torch.autograd.Function):
    """Inputs: token gates [R, G·H] (packed), initial hidden / cell [L, B, H], keys [B, S, A], memory [B, S, M],
    source mask [B, S]; query weight, energy weight, attentional layer weight and bias; each layer's
    `LayerWeights`, flat (layer 0: the input-feeding columns as input weight, no input bias). Output: the
    attentional vectors [R, A'], packed like the token gates."""

    @staticmethod
    def forward(ctx, plan: Plan, gates0, hidden0, cell0, keys, memory, src_mask, query_weight, energy_weight,
                out_weight, out_bias, *flat_weights):
        rows, offsets, layers = plan.rows, plan.offsets, plan.layers
        total, (batch, _, _) = gates0.size(0), keys.shape
        size = hidden0.size(-1)
        att_size = out_weight.size(0)
        new = gates0.new_empty  # packed buffers: every row is written by its step
        weights = _unflat(flat_weights, layers)
        hidden = [hidden0[l].clone() for l in range(layers)]  # [B, H], rows updated in place step by step
        cell = [cell0[l].clone() if plan.lstm else None for l in range(layers)]
        stack = [_Layer(w, total, batch, plan.lstm, gates0) for w in weights]
        x_in = [None] + [new(total, size) for _ in range(1, layers)]  # inputs of layers above the first
        masks = [None] * layers
        if plan.dropout > 0 and layers > 1:
            keep = 1 - plan.dropout
            masks = [None] + [new(total, size).bernoulli_(keep).div_(keep) for _ in range(1, layers)]
        feed_mask = None
        if plan.feed_dropout > 0:
            keep = 1 - plan.feed_dropout
            feed_mask = new(total, att_size).bernoulli_(keep).div_(keep)
        att_in = new(total, att_size)  # the attentional vector fed into each step
        alphas = new(total, keys.size(1))
        queries = new(total, keys.size(-1))  # q = W_q·h of every step; backward recomputes tanh(q + keys) from it
        fused = kernels.usable(keys, energy_weight)  # the energies' passes fused (nmt.kernels), or eager ones
        src_lengths = src_mask.sum(1) if fused else None
        hidden_att = None if fused else torch.empty_like(keys)  # tanh(q + keys) of one step [B, S, A], reused
        top_context = new(total, size + memory.size(-1))  # [top hidden, context]: the attentional layer's input
        att_out = new(total, att_size)
        att_vec = gates0.new_zeros(batch, att_size)
        for n, o in zip(rows, offsets):
            span = slice(o, o + n)
            att_in[span] = att_vec[:n]
            h = None
            for l, (layer, w) in enumerate(zip(stack, weights)):
                if l == 0:
                    projected = torch.addmm(gates0[span], att_vec[:n], w.input_weight.t())
                else:
                    x = h * masks[l][span] if masks[l] is not None else h
                    x_in[l][span] = x
                    projected = F.linear(x, w.input_weight, w.input_bias)
                h = layer.step(span, w, projected, hidden[l], cell[l])
            top_context[span, :size] = h
            queries[span] = q = F.linear(h, query_weight)
            context, alphas[span] = attend(q, keys[:n], memory[:n], src_mask[:n], energy_weight,
                                           None if fused else hidden_att[:n].unsqueeze(1),
                                           src_lengths[:n] if fused else None)
            top_context[span, size:] = context
            a = torch.addmm(out_bias, top_context[span], out_weight.t())
            att_out[span] = a = a.tanh_() if plan.attentional_tanh else a
            att_vec[:n] = a if feed_mask is None else a * feed_mask[span]
        ctx.plan, ctx.stack, ctx.x_in, ctx.masks, ctx.feed_mask = plan, stack, x_in, masks, feed_mask
        ctx.src_lengths = src_lengths
        ctx.save_for_backward(keys, memory, query_weight, energy_weight, out_weight, att_in, queries, alphas,
                              top_context, att_out, *flat_weights)
        return att_out if feed_mask is None else att_out * feed_mask

    @staticmethod
    def backward(ctx, grad_out):
        plan, stack, x_in, masks, feed_mask = ctx.plan, ctx.stack, ctx.x_in, ctx.masks, ctx.feed_mask
        src_lengths = ctx.src_lengths  # set where the forward ran the fused kernel
        rows, offsets, layers = plan.rows, plan.offsets, plan.layers
        (keys, memory, query_weight, energy_weight, out_weight, att_in, queries, alphas, top_context, att_out,
         *flat_weights) = ctx.saved_tensors
        weights = _unflat(flat_weights, layers)
        batch, size, total = keys.size(0), stack[0].h_in.size(1), att_out.size(0)
        new, zeros = att_out.new_empty, att_out.new_zeros  # packed gradients are written row by row; carries add up
        # d(q + keys) = (1 - u²) · d_energy · v with u = tanh(q + keys): the keys' gradient is gathered without
        # the factor v, as Σ_t d_energy - Σ_t u² · d_energy, and multiplied by v once at the end
        keys_minus, keys_plus = torch.zeros_like(keys), keys.new_zeros(keys.shape[:2])
        grad_energy = torch.zeros_like(energy_weight)
        if src_lengths is None:
            hidden_att, scratch = torch.empty_like(keys), torch.empty_like(keys)  # u and u² of one step
        grad_out_pre = new(total, att_out.size(1))  # d(attentional layer pre-activation)
        grad_queries = new(total, keys.size(-1))
        grad_context = new(total, memory.size(-1))
        for layer in stack:
            layer.start_backward()
        carry_att = zeros(batch, att_out.size(1))  # d(attentional vector) through input feeding
        for n, o in zip(reversed(rows), reversed(offsets)):
            span = slice(o, o + n)
            g = grad_out[span] + carry_att[:n]  # both uses of the (dropped-out) attentional vector
            if feed_mask is not None:
                g = g * feed_mask[span]
            if plan.attentional_tanh:
                a = att_out[span]
                g = g * (1 - a * a)
            grad_out_pre[span] = g
            grad_top_context = g @ out_weight  # [n, H + M]
            grad_h = grad_top_context[:, :size]
            grad_context[span] = d_context = grad_top_context[:, size:]
            alpha = alphas[span]
            d_alpha = torch.bmm(memory[:n], d_context.unsqueeze(2)).squeeze(2)  # [n, S]
            d_energy = alpha * (d_alpha - (alpha * d_alpha).sum(1, keepdim=True))
            if src_lengths is not None:  # the same three updates in one pass that recomputes u
                query_minus = kernels.attention_energies_backward(queries[span], keys, src_lengths[:n], d_energy,
                                                                  grad_energy, keys_minus)
            else:
                u = torch.add(queries[span].unsqueeze(1), keys[:n], out=hidden_att[:n]).tanh_()  # [n, S, A]
                grad_energy += d_energy.reshape(1, -1) @ u.reshape(-1, u.size(-1))
                u_squared = torch.mul(u, u, out=scratch[:n])
                keys_minus[:n].addcmul_(u_squared, d_energy.unsqueeze(2))
                query_minus = torch.bmm(d_energy.unsqueeze(1), u_squared).squeeze(1)  # Σ_s d·u²
            keys_plus[:n] += d_energy
            d_query = d_energy.sum(1, keepdim=True) - query_minus
            grad_queries[span] = d_query = d_query * energy_weight  # [n, A]
            grad_h = grad_h + d_query @ query_weight
            for l in reversed(range(layers)):
                d_projected = stack[l].step_backward(span, weights[l], grad_h)
                if l == 0:
                    carry_att[:n] = d_projected @ weights[0].input_weight
                else:
                    grad_h = d_projected @ weights[l].input_weight
                    if masks[l] is not None:
                        grad_h = grad_h * masks[l][span]
        # Weight gradients: one matmul each over all steps' rows.
        grad_weights = []
        for l, (layer, w) in enumerate(zip(stack, weights)):
            grad_weights += layer.weight_grads(w, att_in if l == 0 else x_in[l])
        steps = len(rows)
        step_of = torch.repeat_interleave(torch.arange(steps, device=keys.device),
                                          torch.tensor(rows, device=keys.device))
        row_of = torch.arange(total, device=keys.device) - torch.tensor(offsets, device=keys.device)[step_of]
        unpacked_alpha = alphas.new_zeros(batch, steps, alphas.size(1))
        unpacked_alpha[row_of, step_of] = alphas
        unpacked_context = grad_context.new_zeros(batch, steps, grad_context.size(1))
        unpacked_context[row_of, step_of] = grad_context
        grad_memory = torch.bmm(unpacked_alpha.transpose(1, 2), unpacked_context)  # [B, S, M]
        grad_keys = keys_minus.neg_().add_(keys_plus.unsqueeze(2)).mul_(energy_weight)
        grad_hidden0 = torch.stack([layer.carry_h for layer in stack])
        grad_cell0 = torch.stack([layer.carry_c for layer in stack]) if plan.lstm else None
        return (None, stack[0].grad_projected, grad_hidden0, grad_cell0, grad_keys, grad_memory, None,
                grad_queries.t() @ top_context[:, :size], grad_energy, grad_out_pre.t() @ top_context,
                grad_out_pre.sum(0), *grad_weights)


def _apply(run: Callable[..., torch.Tensor], plan: Plan, *tensors: torch.Tensor | None) -> torch.Tensor:
    """Run a hand-written pass; under autocast its inputs are cast to float32 first (by autograd ops, so their
    gradients come back in their own dtypes) and the loops run in float32 with autocast off."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return run(plan, *tensors)
    tensors = tuple(t.float() if t is not None and t.is_floating_point() else t for t in tensors)
    with torch.autocast(device, enabled=False):
        return run(plan, *tensors)


def _gru_both_directions(plan: Plan, projected: torch.Tensor, *flat_weights: torch.Tensor | None) -> torch.Tensor:
    """See `bidirectional_gru`."""
    forward, backward = _unflat(flat_weights, 2)
    size = forward.recurrent_weight.size(1)
    both = lambda name: None if getattr(forward, name) is None else torch.stack(
        [getattr(forward, name), getattr(backward, name)]).unsqueeze(1)
    weight = torch.stack([forward.recurrent_weight, backward.recurrent_weight]).transpose(1, 2)  # [2, H, 3H]
    bias, gain, norm_bias = both("recurrent_bias"), both("hh_gain"), both("hh_bias")  # [2, 1, 3H], [2, 1, 3, H]
    hidden = projected.new_zeros(2, plan.rows[0] if plan.rows else 0, size)
    out = projected.new_empty(2, projected.size(1), size)
    for n, o in zip(plan.rows, plan.offsets):
        h = hidden[:, :n]
        recurrent = torch.bmm(h, weight) if bias is None else torch.baddbmm(bias, h, weight)  # [2, n, 3H]
        if gain is not None:
            recurrent = gate_norm(recurrent, gain, norm_bias)
        hidden[:, :n] = out[:, o:o + n] = gru_gates(projected[:, o:o + n], recurrent, h)[0]
    return out


def recurrence(plan: Plan, projected: torch.Tensor, hidden0: torch.Tensor, cell0: torch.Tensor | None,
               weights: LayerWeights) -> torch.Tensor:
    """The hidden states [R, H] of one recurrent layer over packed, projected inputs (see `_Recurrence`)."""
    cell0 = cell0 if cell0 is not None else hidden0.new_zeros(0)
    return _apply(_Recurrence.apply, plan, projected, hidden0, cell0, *weights)


def bidirectional_gru(plan: Plan, projected: torch.Tensor, forward: LayerWeights,
                      backward: LayerWeights) -> torch.Tensor:
    """Decoding's encoder layer: a GRU layer's forward and backward direction over packed, projected inputs
    [2, R, 3H] (the backward's mirrored) in one loop, each step's two recurrent products in one batched product
    and nothing kept for a backward pass (no autograd function: half the small operations of two `recurrence`
    calls) → the hidden states [2, R, H]."""
    return _apply(_gru_both_directions, plan, projected, *forward, *backward)


def teacher_forced(plan: Plan, gates0: torch.Tensor, hidden0: torch.Tensor, cell0: torch.Tensor | None,
                   keys: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor, query_weight: torch.Tensor,
                   energy_weight: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor,
                   layer_weights: list[LayerWeights]):
    """The attentional vectors [R, A'] of every live position, packed t-major (see `Plan`)."""
    flat = [w for weights in layer_weights for w in weights]
    cell0 = cell0 if cell0 is not None else hidden0.new_zeros(0)
    return _apply(_TeacherForced.apply, plan, gates0, hidden0, cell0, keys, memory, src_mask, query_weight, energy_weight,
                  out_weight, out_bias, *flat)
