"""decoder.py — the recurrent decoder with Bahdanau attention and input feeding; one `step()` is all it does.

Each step reads the previous token and the previous attentional vector (input feeding), updates the GRU/LSTM
layers, attends with the top layer's state, and mixes state and context into the new attentional vector, from
which `logits` predicts the next token (optionally through the tied target embeddings).
"""

from __future__ import annotations

import torch
from torch import nn

from nmt.attention import BahdanauAttention
from nmt.config import ModelConfig
from nmt.rnn import State, hidden_of, make_cell


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, memory_size: int, config: ModelConfig, pad_id: int) -> None:
        super().__init__()
        hidden = config.decoder_hidden
        self.att_size = config.embed_dim if config.tie_embeddings else hidden
        self.embed = nn.Embedding(vocab_size, config.embed_dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(config.dropout)
        self.cells = nn.ModuleList(
            make_cell(config.rnn_type, config.embed_dim + self.att_size if layer == 0 else hidden, hidden,
                      config.layer_norm)
            for layer in range(config.decoder_layers))
        self.attention = BahdanauAttention(hidden, memory_size, config.attention_dim)
        self.att_layer = nn.Linear(hidden + memory_size, self.att_size)
        self.output = nn.Linear(self.att_size, vocab_size)
        if config.tie_embeddings:
            self.output.weight = self.embed.weight

    def step(self, prev_tokens: torch.Tensor, states: list[State], att_vec: torch.Tensor, keys: torch.Tensor,
             memory: torch.Tensor, src_mask: torch.Tensor) -> tuple[torch.Tensor, list[State], torch.Tensor]:
        """prev_tokens [N], states per layer [N, H], att_vec [N, A'] → new att_vec [N, A'], states, weights [N, S]."""
        x = torch.cat([self.dropout(self.embed(prev_tokens)), att_vec], dim=-1)  # [N, E + A']
        new_states = []
        for layer, cell in enumerate(self.cells):
            state = cell(x, states[layer])
            new_states.append(state)
            x = self.dropout(hidden_of(state)) if layer + 1 < len(self.cells) else hidden_of(state)
        context, weights = self.attention(x, keys, memory, src_mask)  # [N, M], [N, S]
        att_vec = torch.tanh(self.att_layer(torch.cat([x, context], dim=-1)))  # [N, A']
        return att_vec, new_states, weights

    def logits(self, att_vec: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(att_vec))  # [..., V]
