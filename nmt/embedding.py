"""embedding.py — token embeddings with their dropout: of units (dropout) and of whole positions (word dropout,
Nematus' dropout_source / dropout_target: a dropped position's embedding is all zeros, the others are scaled by
1 / (1 - p)). `TokenEmbedding` is an nn.Embedding (saved and tied as any); `SharedEmbedding` is the decoder's
view of the encoder's matrix for a joint vocabulary (model.share_embeddings): target id t is piece rows[t].
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _dropped(x: torch.Tensor, word_dropout: float, dropout: nn.Dropout, training: bool) -> torch.Tensor:
    if training and word_dropout > 0:
        keep = 1.0 - word_dropout
        x = x * torch.empty(x.shape[:-1] + (1,), device=x.device, dtype=x.dtype).bernoulli_(keep).div_(keep)
    return dropout(x)


class TokenEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, dim: int, pad_id: int, dropout: float, word_dropout: float) -> None:
        super().__init__(vocab_size, dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        self.word_dropout = word_dropout

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] → embeddings [..., E]."""
        return _dropped(super().forward(tokens), self.word_dropout, self.dropout, self.training)


class SharedEmbedding(nn.Module):
    def __init__(self, source: TokenEmbedding, rows: torch.Tensor, dropout: float, word_dropout: float) -> None:
        super().__init__()
        self.source = source  # the encoder's embedding: one parameter for both sides
        self.register_buffer("rows", rows)  # [V_target] piece of each target id
        self.dropout = nn.Dropout(dropout)
        self.word_dropout = word_dropout

    @property
    def weight(self) -> torch.Tensor:
        """The target ids' rows of the shared matrix [V_target, E] (a new tensor; gradients reach the source)."""
        return self.source.weight.index_select(0, self.rows)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(self.rows[tokens], self.source.weight, padding_idx=self.source.padding_idx)
        return _dropped(x, self.word_dropout, self.dropout, self.training)
