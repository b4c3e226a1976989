"""encoder.py — the bidirectional recurrent encoder: embeddings, N layers of BiGRU (or BiLSTM) over packed sequences.

Returns per-position states (the attention memory) and the last layer's final forward/backward states. With
layer normalization the layers are unrolled cell by cell (cuDNN's fused RNNs have no layer norm).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.config import ModelConfig
from nmt.rnn import make_cell, run_cell


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, config: ModelConfig, pad_id: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.embed_dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(config.dropout)
        self.layer_norm = config.layer_norm
        self.output_size = 2 * config.encoder_hidden
        if config.layer_norm:
            self.cells = nn.ModuleList(
                make_cell(config.rnn_type, config.embed_dim if layer == 0 else self.output_size,
                          config.encoder_hidden, layer_norm=True)
                for layer in range(config.encoder_layers) for _ in range(2))
        else:
            rnn = nn.LSTM if config.rnn_type == "lstm" else nn.GRU
            self.rnn = rnn(config.embed_dim, config.encoder_hidden, num_layers=config.encoder_layers,
                           batch_first=True, bidirectional=True,
                           dropout=config.dropout if config.encoder_layers > 1 else 0.0)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src [B, S], src_lengths [B], src_mask [B, S] → memory [B, S, 2H], final state [B, 2H]."""
        x = self.dropout(self.embed(src))  # [B, S, E]
        if self.layer_norm:
            return self._unrolled(x, src_mask)
        packed = pack_padded_sequence(x, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self.rnn(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))  # [B, S, 2H]
        h_n = final[0] if isinstance(final, tuple) else final  # [layers * 2, B, H]
        return memory, torch.cat([h_n[-2], h_n[-1]], dim=-1)  # [B, 2H]

    def _unrolled(self, x: torch.Tensor, src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in range(len(self.cells) // 2):
            if layer:
                x = self.dropout(x)
            forward, h_fw = run_cell(self.cells[2 * layer], x, src_mask, reverse=False)
            backward, h_bw = run_cell(self.cells[2 * layer + 1], x, src_mask, reverse=True)
            x = torch.cat([forward, backward], dim=-1)  # [B, S, 2H]
        return x, torch.cat([h_fw, h_bw], dim=-1)
