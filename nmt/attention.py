"""attention.py — additive (Bahdanau) attention over the encoder memory, honouring the source mask.

Keys (W_k · memory) are computed once per sentence by `project_keys`; each decoder step only projects its query.
Queries come in N = B × K rows (K hypotheses per sentence) against memory of B rows, so beams never copy memory.
"""

from __future__ import annotations

import torch
from torch import nn


class BahdanauAttention(nn.Module):
    def __init__(self, query_size: int, memory_size: int, attention_size: int) -> None:
        super().__init__()
        self.key_layer = nn.Linear(memory_size, attention_size, bias=False)
        self.query_layer = nn.Linear(query_size, attention_size, bias=False)
        self.energy_layer = nn.Linear(attention_size, 1, bias=False)

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.key_layer(memory)  # [B, S, A]

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [N, Q], keys [B, S, A], memory [B, S, M], src_mask [B, S] → context [N, M], weights [N, S]."""
        batch, steps, _ = keys.shape
        q = self.query_layer(query).view(batch, -1, 1, keys.size(-1))  # [B, K, 1, A]
        energy = self.energy_layer(torch.tanh(q + keys.unsqueeze(1))).squeeze(-1)  # [B, K, S]
        energy = energy.masked_fill(~src_mask.unsqueeze(1), torch.finfo(energy.dtype).min)
        weights = torch.softmax(energy, dim=-1)  # [B, K, S]
        context = torch.bmm(weights, memory)  # [B, K, M]
        return context.reshape(-1, memory.size(-1)), weights.reshape(-1, steps)
