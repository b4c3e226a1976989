"""decoder.py — the recurrent decoder with Bahdanau attention and input feeding; one `step()` is all it does.

Each step reads the previous token and the previous attentional vector (input feeding), updates the GRU/LSTM
layers, attends with the top layer's state, and mixes state and context into the new attentional vector, from
which `logits` predicts the next token (optionally through the tied target embeddings). The token's share of
the first layer's input projection (`token_gates`) does not depend on the recurrence: teacher forcing computes
it for all target positions in one matmul before the loop, then runs the loop with hand-written backpropagation
through time (nmt.bptt), plain or layer-normalized cells alike. Search calls `step` with the whole projection made
in one product (`input_projection`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from nmt import bptt
from nmt.attention import BahdanauAttention
from nmt.bptt import Packing
from nmt.config import ModelConfig
from nmt.embedding import SharedEmbedding, TokenEmbedding
from nmt.rnn import LSTMCell, State, hidden_of, make_cell


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, memory_size: int, config: ModelConfig, pad_id: int,
                 shared: tuple[TokenEmbedding, torch.Tensor] | None = None) -> None:
        """`shared`: the encoder's embedding and the piece of each target id, when the two sides share it."""
        super().__init__()
        hidden = config.decoder_hidden
        self.embed_dim = config.embed_dim
        self.att_size = config.embed_dim if config.tie_embeddings else hidden
        self.attentional_tanh, self.feed_dropout = config.attentional_tanh, config.feed_dropout
        if shared is None:
            self.embed = TokenEmbedding(vocab_size, config.embed_dim, pad_id, config.dropout, config.target_word_dropout)
        else:
            self.embed = SharedEmbedding(*shared, config.dropout, config.target_word_dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.cells = nn.ModuleList(
            make_cell(config.rnn_type, config.embed_dim + self.att_size if layer == 0 else hidden, hidden,
                      config.layer_norm)
            for layer in range(config.decoder_layers))
        self.attention = BahdanauAttention(hidden, memory_size, config.attention_dim)
        self.att_layer = nn.Linear(hidden + memory_size, self.att_size)
        if config.tie_embeddings and shared is not None:  # three-way: the output weight is the shared matrix too
            self.output_bias = nn.Parameter(torch.zeros(vocab_size))
        else:
            self.output = nn.Linear(self.att_size, vocab_size)
            if config.tie_embeddings:
                self.output.weight = self.embed.weight

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer's weight [V, A'] and bias [V]."""
        if hasattr(self, "output_bias"):
            return self.embed.weight, self.output_bias
        return self.output.weight, self.output.bias

    def first_input_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's input projection split into its token-embedding and input-feeding columns."""
        weight = self.cells[0].input_weight
        return weight[:, :self.embed_dim], weight[:, self.embed_dim:]

    def token_gates(self, tokens: torch.Tensor, token_weight: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [...] → the first layer's input projection of their (dropped-out) embeddings, bias included
        [..., G·H]."""
        token_weight = self.first_input_weights()[0] if token_weight is None else token_weight
        return F.linear(self.embed(tokens), token_weight, self.cells[0].input_bias)

    def input_projection(self, tokens: torch.Tensor, att_vec: torch.Tensor) -> torch.Tensor:
        """A search step's first-layer input projection [N, G·H]: the tokens' embeddings and the previous
        attentional vector (input feeding) in one product with the whole weight (teacher forcing splits it: see
        `token_gates`)."""
        return self.cells[0].project(torch.cat([self.embed(tokens), att_vec], dim=-1))

    def step(self, projected: torch.Tensor, states: list[State], keys: torch.Tensor, memory: torch.Tensor,
             src_mask: torch.Tensor) -> tuple[torch.Tensor, list[State], torch.Tensor]:
        """projected: the first layer's input projection [N, G·H] (`input_projection`, or `token_gates` plus the
        input feeding's share), states per layer [N, H] → new att_vec [N, A'], states, attention weights [N, S]."""
        x = None  # the input of layers above the first
        new_states = []
        for layer, cell in enumerate(self.cells):
            state = cell.step(projected if layer == 0 else cell.project(x), states[layer])
            new_states.append(state)
            x = self.dropout(hidden_of(state)) if layer + 1 < len(self.cells) else hidden_of(state)
        context, weights = self.attention(x, keys, memory, src_mask)  # [N, M], [N, S]
        att_vec = self.att_layer(torch.cat([x, context], dim=-1)).to(x.dtype)  # [N, A'], in the states' dtype
        return torch.tanh(att_vec) if self.attentional_tanh else att_vec, new_states, weights

    def teacher_forced(self, tgt_in: torch.Tensor, packing: Packing, states: list[State], keys: torch.Tensor,
                       memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """tgt_in [B, T] (bos + target) → the attentional vectors of its real positions, packed by `packing`
        (the target lengths), dropped out as the output layer reads them [R, A']. The first step's attentional
        vector is zero; with feed_dropout the next step is fed the same dropped-out vector."""
        token_weight, feed_weight = self.first_input_weights()
        gates = self.token_gates(packing.pack(tgt_in), token_weight)  # [R, G·H]: one matmul for all positions
        lstm = isinstance(self.cells[0], LSTMCell)
        order = packing.order
        hidden = torch.stack([hidden_of(s) for s in states]).index_select(1, order)  # [L, B, H], sorted rows
        cell = torch.stack([s[1] for s in states]).index_select(1, order) if lstm else None
        weights = [bptt.LayerWeights.of(c, feed_weight, None) if layer == 0 else
                   bptt.LayerWeights.of(c, c.input_weight, c.input_bias) for layer, c in enumerate(self.cells)]
        p = self.dropout.p if self.training else 0.0
        plan = packing.plan(lstm, len(self.cells), p, self.attentional_tanh, p if self.feed_dropout else 0.0)
        outputs = bptt.teacher_forced(plan, gates, hidden, cell, keys.index_select(0, order),
                                      memory.index_select(0, order), src_mask.index_select(0, order),
                                      self.attention.query_layer.weight, self.attention.energy_layer.weight,
                                      self.att_layer.weight, self.att_layer.bias, weights)
        return outputs if self.feed_dropout else self.dropout(outputs)

    def logits(self, att_vec: torch.Tensor) -> torch.Tensor:
        return F.linear(self.dropout(att_vec), *self.output_layer())  # [..., V]
