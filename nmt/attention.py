"""attention.py — additive (Bahdanau) attention over the encoder memory, honouring the source mask.

Keys (W_k · memory) are computed once per sentence by `project_keys`; each decoder step only projects its query.
Queries come in N = B × K rows (K hypotheses per sentence) against memory of B rows, so beams never copy memory.
On CPU the energies come from a fused kernel (nmt.kernels) where nothing needs their gradient or traces them.
"""

from __future__ import annotations

import torch
from torch import nn

from nmt import kernels


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
        """query [N, Q], keys [B, S, A], memory [B, S, M], src_mask [B, S] → context [N, M], weights [N, S]. Where
        no gradient is needed and nothing traces the graph (decoding), the energies come from the fused kernel."""
        projected = self.query_layer(query)
        traced = (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
                  or torch.compiler.is_compiling())  # a graph cannot hold the ctypes call
        fused = not torch.is_grad_enabled() and not traced and kernels.usable(keys)  # bf16 queries: cast in attend
        return attend(projected, keys, memory, src_mask, self.energy_layer.weight,
                      src_lengths=src_mask.sum(1) if fused else None)


def attend(projected_query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
           energy_weight: torch.Tensor, hidden_out: torch.Tensor | None = None,
           src_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of projected queries [N, A] (N = B × K rows) → context [N, M], weights [N, S]:
    energies v · tanh(q + keys), masked, softmax over the source, weighted sum of the memory. The energies are
    computed in the keys' dtype: by the fused kernel (nmt.kernels) when `src_lengths` [B] (the mask's lengths)
    is given, which the caller does only where `kernels.usable`; else eagerly, and then `hidden_out`
    [B, K, S, A], when given, receives tanh(q + keys) (a buffer reused across steps)."""
    batch, steps, size = keys.shape
    if src_lengths is not None:
        energy = kernels.attention_energies(projected_query.to(keys.dtype), keys,
                                            energy_weight.view(-1).to(keys.dtype), src_lengths)
        energy = energy.view(batch, -1, steps)  # masked already
    else:
        q = projected_query.view(batch, -1, 1, size).to(keys.dtype)  # [B, K, 1, A]
        # in place: a fresh [B, K, S, A] tensor per step costs more in page faults than its tanh on CPU
        hidden = torch.add(q, keys.unsqueeze(1), out=hidden_out).tanh_()
        # mv, not matmul: under autocast float32 keys keep the energies float32 (bf16 tanh is 5x slower on CPU)
        energy = torch.mv(hidden.view(-1, size), energy_weight.view(-1).to(hidden.dtype)).view(batch, -1, steps)
        energy = energy.masked_fill(~src_mask.unsqueeze(1), torch.finfo(energy.dtype).min)
    weights = torch.softmax(energy, dim=-1)  # [B, K, S]
    context = torch.bmm(weights, memory)  # [B, K, M]
    return context.reshape(-1, memory.size(-1)), weights.reshape(-1, steps)
