"""encoder.py — the bidirectional recurrent encoder: embeddings, then N layers of a forward and a backward
GRU (or LSTM), concatenated.

The backward RNN reads each sentence reversed within its own length, so padding never enters either
direction. Training packs the sequences (no work on padding); `packed=False` runs the same weights on the
padded tensors (the form ONNX export traces); both give the same result. With layer normalization the layers
are unrolled cell by cell (fused cuDNN RNNs have no layer norm).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.config import ModelConfig
from nmt.rnn import make_cell, reverse_padded, run_cell


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, config: ModelConfig, pad_id: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.embed_dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(config.dropout)
        self.layer_norm = config.layer_norm
        self.output_size = 2 * config.encoder_hidden
        rnn_class = nn.LSTM if config.rnn_type == "lstm" else nn.GRU

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
        x = self.dropout(self.embed(src))  # [B, S, E]
        for depth, (forward_rnn, backward_rnn) in enumerate(self.layers):
            if depth:
                x = self.dropout(x)
            out_fw, last_fw = self._run(forward_rnn, x, src_lengths, src_mask, packed)
            out_bw, last_bw = self._run(backward_rnn, reverse_padded(x, src_lengths), src_lengths, src_mask, packed)
            x = torch.cat([out_fw, reverse_padded(out_bw, src_lengths)], dim=-1)  # [B, S, 2H]
        return x, torch.cat([last_fw, last_bw], dim=-1)  # final: [B, 2H]

    def _run(self, rnn: nn.Module, x: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor,
             packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One direction over left-aligned sequences → outputs [B, S, H] (zero at padding), last state [B, H]."""
        if self.layer_norm:
            return run_cell(rnn, x, mask)
        if packed:
            sequence = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, final = rnn(sequence)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
            h_n = final[0] if isinstance(final, tuple) else final  # [1, B, H]
            return out, h_n[0]
        out, _ = rnn(x)
        out = out * mask.unsqueeze(-1)
        last = out.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.size(-1))).squeeze(1)  # [B, H]
        return out, last
