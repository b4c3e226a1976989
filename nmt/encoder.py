"""encoder.py — the bidirectional recurrent encoder: embeddings, then N layers of a forward and a backward
GRU (or LSTM), concatenated.

The backward RNN reads each sentence reversed within its own length, so padding never enters either
direction. The default path packs the positions (nmt.bptt.Packing: no work on padding), projects every layer's
inputs in one matmul and runs the recurrence with hand-written backpropagation through time (nmt.bptt);
without gradients a GRU layer's two directions share one loop (bptt.bidirectional_gru). `packed=False` runs
torch's GRU / LSTM modules, which hold the weights, on the padded tensors (the form ONNX export traces); all give
the same result. Layer-normalized layers are cells (fused RNNs have no layer norm):
packed, the same hand-written loop; padded, `scan_layer_norm_gru` / `_lstm`, scripted when traced so that the
exported graph loops over any source length.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from nmt import bptt
from nmt.config import ModelConfig
from nmt.embedding import TokenEmbedding
from nmt.rnn import Cell, make_cell, reverse_padded, scan_layer_norm_gru, scan_layer_norm_lstm


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, config: ModelConfig, pad_id: int) -> None:
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, config.embed_dim, pad_id, config.dropout, config.source_word_dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = config.rnn_type == "lstm"
        self.output_size = 2 * config.encoder_hidden
        rnn_class = nn.LSTM if self.lstm else nn.GRU

        def direction(input_size: int) -> nn.Module:
            if config.layer_norm:
                return make_cell(config.rnn_type, input_size, config.encoder_hidden, layer_norm=True)
            return rnn_class(input_size, config.encoder_hidden, batch_first=True)

        self.layers = nn.ModuleList(
            nn.ModuleList([direction(size), direction(size)])  # forward, backward
            for size in [config.embed_dim] + [self.output_size] * (config.encoder_layers - 1))

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, src_mask: torch.Tensor,
                packed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """src [B, S], src_lengths [B], src_mask [B, S] → memory [B, S, 2H] (zero at padding), final [B, 2H]."""
        x = self.embed(src)  # [B, S, E]
        if packed:
            return self._packed(x, src_lengths)
        for depth, (forward_rnn, backward_rnn) in enumerate(self.layers):
            if depth:
                x = self.dropout(x)
            out_fw, last_fw = self._run(forward_rnn, x, src_lengths, src_mask)
            out_bw, last_bw = self._run(backward_rnn, reverse_padded(x, src_lengths), src_lengths, src_mask)
            x = torch.cat([out_fw, reverse_padded(out_bw, src_lengths)], dim=-1)  # [B, S, 2H]
        return x, torch.cat([last_fw, last_bw], dim=-1)  # final: [B, 2H]

    def _packed(self, x: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers over packed positions; x [B, S, E] → memory [B, S, 2H], final [B, 2H]."""
        batch, steps = x.shape[:2]
        packing = bptt.Packing(src_lengths)
        mirror, last = packing.reversed_positions(), packing.last_positions()  # [R], [B]
        plan = packing.plan(lstm=self.lstm)
        x = packing.pack(x)  # [R, E]
        for depth, (forward_rnn, backward_rnn) in enumerate(self.layers):
            if depth:
                x = self.dropout(x)
            out_fw, out_bw = self._directions(forward_rnn, backward_rnn, plan, x, x[mirror], batch)
            x = torch.cat([out_fw, out_bw[mirror]], dim=-1)  # [R, 2H]
        final = torch.cat([out_fw[last], out_bw[last]], dim=-1)  # [B, 2H]
        return packing.unpack(x, steps), final

    def _directions(self, forward_rnn: nn.Module, backward_rnn: nn.Module, plan: bptt.Plan, x: torch.Tensor,
                    mirrored: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's two directions over packed inputs [R, I] (the backward one's mirrored) → their hidden states
        [R, H]; without gradients (decoding, validation) a GRU layer's directions run in one loop."""
        (fw_inputs, fw_weights), (bw_inputs, bw_weights) = _inputs(forward_rnn, x), _inputs(backward_rnn, mirrored)
        if not self.lstm and not torch.is_grad_enabled():
            return bptt.bidirectional_gru(plan, torch.stack([fw_inputs, bw_inputs]), fw_weights, bw_weights).unbind(0)
        zeros = x.new_zeros(batch, forward_rnn.hidden_size)
        return (bptt.recurrence(plan, fw_inputs, zeros, zeros if plan.lstm else None, fw_weights),
                bptt.recurrence(plan, bw_inputs, zeros, zeros if plan.lstm else None, bw_weights))

    def _run(self, rnn: nn.Module, x: torch.Tensor, lengths: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One direction over left-aligned padded sequences → outputs [B, S, H] (zero at padding), last state
        [B, H]."""
        if isinstance(rnn, Cell):
            _, _, hh_gain, hh_bias, cell_gain, cell_bias = rnn.norms()
            projected = rnn.normalize_input(rnn.project(x))
            scan = _scan(self.lstm, scripted=torch.jit.is_tracing())
            if self.lstm:
                return scan(projected, mask, rnn.recurrent_weight, rnn.recurrent_bias, hh_gain, hh_bias, cell_gain,
                            cell_bias)
            return scan(projected, mask, rnn.recurrent_weight, hh_gain, hh_bias)
        out, _ = rnn(x)
        out = out * mask.unsqueeze(-1)
        last = out.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.size(-1))).squeeze(1)  # [B, H]
        return out, last


def _inputs(rnn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bptt.LayerWeights]:
    """One direction's projected inputs for all packed rows [R, G·H] and the weights of its recurrence."""
    if isinstance(rnn, Cell):  # layer-normalized: the input norm, like the projection, for all rows at once
        return rnn.normalize_input(rnn.project(x)), bptt.LayerWeights.of(rnn, None, None, input_norm=False)
    # torch's GRU / LSTM module
    return F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0), bptt.LayerWeights(None, rnn.weight_hh_l0, rnn.bias_hh_l0, None)


@functools.cache
def _scan(lstm: bool, scripted: bool):
    """The padded layer-normalized loop; scripted (once) for tracing, so that the ONNX graph keeps the loop."""
    scan = scan_layer_norm_lstm if lstm else scan_layer_norm_gru
    return torch.jit.script(scan) if scripted else scan
