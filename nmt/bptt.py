"""bptt.py — the teacher-forced decoder loop with hand-written backpropagation through time, for plain GRU/LSTM
cells (layer-normalized cells take the autograd loop in nmt.decoder).

Same function and gradients as running `Decoder.step` under autograd, computed with less work: rows are sorted by
target length and stored packed, t-major (step t holds its n_t live rows, as a PackedSequence does), so padding
costs nothing; the forward loop saves what backward needs; the backward loop only propagates gradients through
time, and every weight gradient is one matmul over all steps' rows at the end instead of one per step. Forward
math comes from the cells and the attention (nmt.rnn, nmt.attention); only the loops and backward live here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from nmt.attention import attend
from nmt.rnn import gru_gates, lstm_gates


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


def _gru_backward(grad_h: torch.Tensor, acts: torch.Tensor, h_prev: torch.Tensor):
    """GRU gates' backward: saved [reset, update, candidate, W_hn·h + b_hn] → d(W_ih·x), d(W_hh·h), dh_prev part."""
    reset, update, candidate, recurrent_n = acts.chunk(4, dim=1)
    grad_update = grad_h * (h_prev - candidate) * update * (1 - update)
    grad_candidate = grad_h * (1 - update) * (1 - candidate * candidate)
    grad_reset = grad_candidate * recurrent_n * reset * (1 - reset)
    grad_projected = torch.cat([grad_reset, grad_update, grad_candidate], dim=1)
    grad_recurrent = torch.cat([grad_reset, grad_update, grad_candidate * reset], dim=1)
    return grad_projected, grad_recurrent, grad_h * update


def _lstm_backward(grad_h: torch.Tensor, grad_c: torch.Tensor, acts: torch.Tensor, c_prev: torch.Tensor,
                   c: torch.Tensor):
    """LSTM gates' backward: saved activations i, f, g, o → d(gates), dc_prev."""
    i, f, g, o = acts.chunk(4, dim=1)
    tanh_c = torch.tanh(c)
    grad_c = grad_c + grad_h * o * (1 - tanh_c * tanh_c)
    grad_gates = torch.cat([grad_c * g * i * (1 - i), grad_c * c_prev * f * (1 - f), grad_c * i * (1 - g * g),
                            grad_h * tanh_c * o * (1 - o)], dim=1)
    return grad_gates, grad_c * f


def _cell_step(lstm: bool, projected: torch.Tensor, recurrent: torch.Tensor, h_prev: torch.Tensor,
               c_prev: torch.Tensor | None, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One cell update on a step's rows → new h (and c for an LSTM); writes into `acts` [n, 4H] what the backward
    needs (GRU: reset, update, candidate, W_hn·h + b_hn; LSTM: the gate activations)."""
    if lstm:
        h, c, activations = lstm_gates(projected + recurrent, c_prev)
        acts.copy_(activations)
        return h, c
    h, reset, update, candidate = gru_gates(projected, recurrent, h_prev)
    torch.cat([reset, update, candidate, recurrent.chunk(3, dim=1)[2]], dim=1, out=acts)
    return h, None


def _cell_step_backward(lstm: bool, grad_h: torch.Tensor, grad_c: torch.Tensor | None, acts: torch.Tensor,
                        h_prev: torch.Tensor, c_prev: torch.Tensor | None, c: torch.Tensor | None):
    """`_cell_step`'s backward → d(projected input), d(recurrent projection), the part of dh_prev that does not go
    through W_hh, and dc_prev (LSTM; None for a GRU)."""
    if lstm:
        grad_gates, grad_c_prev = _lstm_backward(grad_h, grad_c, acts, c_prev, c)
        return grad_gates, grad_gates, 0, grad_c_prev
    return (*_gru_backward(grad_h, acts, h_prev), None)


class _Recurrence(torch.autograd.Function):
    """One recurrent layer over packed inputs: projected inputs W_ih·x + b_ih [R, G·H] (t-major, n_t live rows
    per step), initial hidden / cell [B, H] → the hidden state of every live position [R, H]."""

    @staticmethod
    def forward(ctx, plan: Plan, projected, hidden0, cell0, w_hh, b_hh):
        size = hidden0.size(1)
        hidden = hidden0.clone()
        cell = cell0.clone() if plan.lstm else None
        new = projected.new_empty
        h_in, acts, out = new(projected.size(0), size), new(projected.size(0), 4 * size), new(projected.size(0), size)
        c_in, c_out = (new(projected.size(0), size), new(projected.size(0), size)) if plan.lstm else (None, None)
        for n, o in zip(plan.rows, plan.offsets):
            span = slice(o, o + n)
            h_in[span] = h_prev = hidden[:n]
            if plan.lstm:
                c_in[span] = cell[:n]
            h, c = _cell_step(plan.lstm, projected[span], F.linear(h_prev, w_hh, b_hh), h_prev,
                              cell[:n] if plan.lstm else None, acts[span])
            if plan.lstm:
                c_out[span] = cell[:n] = c
            out[span] = hidden[:n] = h
        ctx.plan, ctx.batch = plan, hidden0.size(0)
        ctx.save_for_backward(h_in, acts, w_hh, *((c_in, c_out) if plan.lstm else ()))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        plan = ctx.plan
        h_in, acts, w_hh, *cells = ctx.saved_tensors
        carry_h = h_in.new_zeros(ctx.batch, h_in.size(1))  # d(state) flowing back into the previous step
        carry_c = h_in.new_zeros(ctx.batch, h_in.size(1)) if plan.lstm else None
        grad_projected = h_in.new_empty(h_in.size(0), w_hh.size(0))
        grad_recurrent = torch.empty_like(grad_projected)
        for n, o in zip(reversed(plan.rows), reversed(plan.offsets)):
            span = slice(o, o + n)
            grad_h = grad_out[span] + carry_h[:n]
            cell_in, cell_out = (cells[0][span], cells[1][span]) if plan.lstm else (None, None)
            d_projected, d_recurrent, direct, d_cell = _cell_step_backward(
                plan.lstm, grad_h, carry_c[:n] if plan.lstm else None, acts[span], h_in[span], cell_in, cell_out)
            grad_projected[span], grad_recurrent[span] = d_projected, d_recurrent
            carry_h[:n] = d_recurrent @ w_hh + direct
            if plan.lstm:
                carry_c[:n] = d_cell
        return None, grad_projected, carry_h, carry_c, grad_recurrent.t() @ h_in, grad_recurrent.sum(0)


def _apply(function: type[torch.autograd.Function], plan: Plan, *tensors: torch.Tensor | None) -> torch.Tensor:
    """Run a hand-written pass; under autocast its inputs are cast to float32 first (by autograd ops, so their
    gradients come back in their own dtypes) and the loops run in float32 with autocast off."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return function.apply(plan, *tensors)
    tensors = tuple(t.float() if t is not None and t.is_floating_point() else t for t in tensors)
    with torch.autocast(device, enabled=False):
        return function.apply(plan, *tensors)


def recurrence(plan: Plan, projected: torch.Tensor, hidden0: torch.Tensor, cell0: torch.Tensor | None,
               w_hh: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
    """The hidden states [R, H] of one recurrent layer over packed, projected inputs (see `_Recurrence`)."""
    cell0 = cell0 if cell0 is not None else hidden0.new_zeros(0)
    return _apply(_Recurrence, plan, projected, hidden0, cell0, w_hh, b_hh)


class _TeacherForced(torch.autograd.Function):
    """Inputs: token gates [R, G·H] (packed), initial hidden / cell [L, B, H], keys [B, S, A], memory [B, S, M],
    source mask [B, S]; weights per layer (input weight: the feeding columns for layer 0, W_hh, b_hh, b_ih or
    None for layer 0), query weight, energy weight, attentional layer weight and bias. Output: the attentional
    vectors [R, A'], packed like the token gates."""

    @staticmethod
    def forward(ctx, plan: Plan, gates0, hidden0, cell0, keys, memory, src_mask, query_weight, energy_weight,
                out_weight, out_bias, *layer_weights):
        rows, offsets, layers = plan.rows, plan.offsets, plan.layers
        total, (batch, _, _) = gates0.size(0), keys.shape
        size = hidden0.size(-1)
        att_size = out_weight.size(0)
        new = gates0.new_empty  # packed buffers: every row is written by its step
        weights = [layer_weights[4 * l: 4 * l + 4] for l in range(layers)]  # w_in, w_hh, b_hh, b_in
        hidden = [hidden0[l].clone() for l in range(layers)]  # [B, H], rows updated in place step by step
        cell = [cell0[l].clone() for l in range(layers)] if plan.lstm else None
        h_in = [new(total, size) for _ in range(layers)]  # state entering each step (packed)
        c_in = [new(total, size) for _ in range(layers)] if plan.lstm else None
        c_out = [new(total, size) for _ in range(layers)] if plan.lstm else None
        acts = [new(total, 4 * size) for _ in range(layers)]
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
        hidden_att = new(total, keys.size(1), keys.size(-1))  # tanh(q + keys) of every step [R, S, A]
        top_context = new(total, size + memory.size(-1))  # [top hidden, context]: the attentional layer's input
        att_out = new(total, att_size)
        att_vec = gates0.new_zeros(batch, att_size)
        for t, (n, o) in enumerate(zip(rows, offsets)):
            span = slice(o, o + n)
            att_in[span] = att_vec[:n]
            x = None
            for l, (w_in, w_hh, b_hh, b_in) in enumerate(weights):
                h_prev = hidden[l][:n]
                h_in[l][span] = h_prev
                projected = torch.addmm(gates0[span], att_vec[:n], w_in.t()) if l == 0 else F.linear(x, w_in, b_in)
                if plan.lstm:
                    c_in[l][span] = cell[l][:n]
                h, c = _cell_step(plan.lstm, projected, F.linear(h_prev, w_hh, b_hh), h_prev,
                                  cell[l][:n] if plan.lstm else None, acts[l][span])
                if plan.lstm:
                    c_out[l][span] = cell[l][:n] = c
                hidden[l][:n] = h
                if l + 1 < layers:
                    x = h * masks[l + 1][span] if masks[l + 1] is not None else h
                    x_in[l + 1][span] = x
            top_context[span, :size] = h
            context, alphas[span] = attend(F.linear(h, query_weight), keys[:n], memory[:n], src_mask[:n],
                                           energy_weight, hidden_att[span].unsqueeze(1))
            top_context[span, size:] = context
            a = torch.addmm(out_bias, top_context[span], out_weight.t())
            att_out[span] = a = a.tanh_() if plan.attentional_tanh else a
            att_vec[:n] = a if feed_mask is None else a * feed_mask[span]
        ctx.plan = plan
        ctx.save_for_backward(keys, memory, query_weight, energy_weight, out_weight, att_in, hidden_att, alphas,
                              top_context, att_out, *h_in, *acts, *(x_in[1:]), *(c_in or []), *(c_out or []),
                              *[m for m in masks if m is not None], *([feed_mask] if feed_mask is not None else []),
                              *layer_weights)
        return att_out if feed_mask is None else att_out * feed_mask

    @staticmethod
    def backward(ctx, grad_out):
        plan = ctx.plan
        rows, offsets, layers = plan.rows, plan.offsets, plan.layers
        saved = list(ctx.saved_tensors)
        keys, memory, query_weight, energy_weight, out_weight, att_in, hidden_att, alphas, top_context, att_out = saved[:10]
        rest = saved[10:]
        take = lambda count: [rest.pop(0) for _ in range(count)]  # noqa: E731  (saved in this order)
        h_in, acts, x_in = take(layers), take(layers), [None] + take(layers - 1)
        c_in, c_out = (take(layers), take(layers)) if plan.lstm else (None, None)
        masks = [None] + take(layers - 1) if plan.dropout > 0 and layers > 1 else [None] * layers
        feed_mask = take(1)[0] if plan.feed_dropout > 0 else None
        weights = [rest[4 * l: 4 * l + 4] for l in range(layers)]
        batch, size = keys.size(0), h_in[0].size(1)
        total = att_out.size(0)
        new, zeros = att_out.new_empty, att_out.new_zeros  # packed gradients are written row by row; carries add up
        # d(q + keys) = (1 - u²) · d_energy · v with u = tanh(q + keys): the keys' gradient is gathered without
        # the factor v, as Σ_t d_energy - Σ_t u² · d_energy, and multiplied by v once at the end
        keys_minus, keys_plus = torch.zeros_like(keys), keys.new_zeros(keys.shape[:2])
        grad_energy = torch.zeros_like(energy_weight)
        scratch = torch.empty_like(keys)  # u² of one step
        grad_out_pre = new(total, att_out.size(1))  # d(attentional layer pre-activation)
        grad_queries = new(total, keys.size(-1))
        grad_context = new(total, memory.size(-1))
        grad_projected = [new(total, weights[0][1].size(0)) for _ in range(layers)]
        grad_recurrent = [new(total, weights[0][1].size(0)) for _ in range(layers)]
        carry_h = [zeros(batch, size) for _ in range(layers)]  # d(state) flowing back into the previous step
        carry_c = [zeros(batch, size) for _ in range(layers)] if plan.lstm else None
        carry_att = zeros(batch, att_out.size(1))  # d(attentional vector) through input feeding
        for t in reversed(range(len(rows))):
            n, o = rows[t], offsets[t]
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
            u = hidden_att[span]  # [n, S, A]
            grad_energy += d_energy.reshape(1, -1) @ u.reshape(-1, u.size(-1))
            u_squared = torch.mul(u, u, out=scratch[:n])
            keys_plus[:n] += d_energy
            keys_minus[:n].addcmul_(u_squared, d_energy.unsqueeze(2))
            d_query = (d_energy.sum(1, keepdim=True) - torch.bmm(d_energy.unsqueeze(1), u_squared).squeeze(1))
            grad_queries[span] = d_query = d_query * energy_weight  # [n, A]
            grad_h = grad_h + d_query @ query_weight + carry_h[layers - 1][:n]
            for l in reversed(range(layers)):
                w_in, w_hh, _, _ = weights[l]
                cell_in, cell_out = (c_in[l][span], c_out[l][span]) if plan.lstm else (None, None)
                d_projected, d_recurrent, direct, d_cell = _cell_step_backward(
                    plan.lstm, grad_h, carry_c[l][:n] if plan.lstm else None, acts[l][span], h_in[l][span], cell_in,
                    cell_out)
                grad_projected[l][span], grad_recurrent[l][span] = d_projected, d_recurrent
                carry_h[l][:n] = d_recurrent @ w_hh + direct
                if plan.lstm:
                    carry_c[l][:n] = d_cell
                if l == 0:
                    carry_att[:n] = d_projected @ w_in
                else:
                    grad_h = d_projected @ w_in
                    if masks[l] is not None:
                        grad_h = grad_h * masks[l][span]
                    grad_h = grad_h + carry_h[l - 1][:n]
        # Weight gradients: one matmul each over all steps' rows.
        grad_weights = []
        for l, (w_in, w_hh, b_hh, b_in) in enumerate(weights):
            inputs = att_in if l == 0 else x_in[l]
            grad_weights += [grad_projected[l].t() @ inputs, grad_recurrent[l].t() @ h_in[l],
                             grad_recurrent[l].sum(0), None if b_in is None else grad_projected[l].sum(0)]
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
        grad_hidden0 = torch.stack(carry_h)
        grad_cell0 = torch.stack(carry_c) if plan.lstm else None
        return (None, grad_projected[0], grad_hidden0, grad_cell0, grad_keys, grad_memory, None,
                grad_queries.t() @ top_context[:, :size], grad_energy, grad_out_pre.t() @ top_context,
                grad_out_pre.sum(0), *grad_weights)


def teacher_forced(plan: Plan, gates0: torch.Tensor, hidden0: torch.Tensor, cell0: torch.Tensor | None,
                   keys: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor, query_weight: torch.Tensor,
                   energy_weight: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor,
                   layer_weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]):
    """The attentional vectors [R, A'] of every live position, packed t-major (see `Plan`)."""
    flat = [w for weights in layer_weights for w in weights]
    cell0 = cell0 if cell0 is not None else hidden0.new_zeros(0)
    return _apply(_TeacherForced, plan, gates0, hidden0, cell0, keys, memory, src_mask, query_weight, energy_weight,
                  out_weight, out_bias, *flat)
