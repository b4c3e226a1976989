"""model.py — Seq2Seq: the encoder, a bridge to the decoder's initial state, the decoder; init; the DecoderStep.

`forward` is teacher forcing for training: it returns the summed loss and NLL of the real target positions
(nmt.bptt for the loop, nmt.loss for the output layer fused with the loss); `logits` is the plain form, `step`
after `step`. `encode` + `step`
implement the `DecoderStep` interface of `nmt.search`, so the one search serves this model exactly as it serves
exported graphs. `step_tensors` is the pure-tensor step that both `step` and the ONNX export use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nmt.bptt import Packing
from nmt.config import ModelConfig
from nmt.decoder import Decoder
from nmt.encoder import Encoder
from nmt.errors import NMTError
from nmt.loss import output_loss
from nmt.search import State
from nmt.vocab import PAD_ID


class Seq2Seq(nn.Module):
    def __init__(self, config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int,
                 target_pieces: list[int] | tuple[int, ...] | None = None) -> None:
        """`target_pieces`: the source-side id of each target id (a joint vocabulary's output map), which
        model.share_embeddings needs when the target ids are not all the pieces."""
        super().__init__()
        self.config = config
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.lstm = config.rnn_type == "lstm"
        self.encoder = Encoder(src_vocab_size, config, PAD_ID)
        shared = None
        if config.share_embeddings:
            if target_pieces is None and tgt_vocab_size != src_vocab_size:
                raise NMTError("model.share_embeddings needs a joint vocabulary (vocab.joint: true)")
            rows = torch.tensor(list(target_pieces) if target_pieces is not None else range(tgt_vocab_size))
            shared = (self.encoder.embed, rows)
        self.decoder = Decoder(tgt_vocab_size, self.encoder.output_size, config, PAD_ID, shared)
        self.bridge = nn.Linear(self.encoder.output_size, config.decoder_layers * config.decoder_hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier/Glorot for weight matrices, zero biases; recurrent weights and biases U(±1/√H) (torch's
        default; model.rnn_init: xavier takes Xavier per gate and zero biases instead); LSTM forget bias 1."""
        for name, param in self.named_parameters():
            if "norm" in name:
                continue  # layer-norm gains stay 1, biases 0
            recurrent = any(key in name for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            if recurrent and self.config.rnn_init == "uniform":
                bound = 1.0 / math.sqrt(self.config.decoder_hidden if name.startswith("decoder")
                                        else self.config.encoder_hidden)
                nn.init.uniform_(param, -bound, bound)
            elif param.dim() == 1:
                nn.init.zeros_(param)
            elif recurrent:
                for chunk in param.data.chunk(4 if self.lstm else 3, dim=0):
                    nn.init.xavier_uniform_(chunk)
            else:
                nn.init.xavier_uniform_(param)
            if self.lstm and recurrent and param.dim() == 1:
                size = param.numel() // 4  # gate order i, f, g, o: the forget gate starts open
                nn.init.constant_(param[size:2 * size], 1.0 if "hh" in name else 0.0)
        with torch.no_grad():
            self.encoder.embed.weight[PAD_ID].zero_()
            self.decoder.embed.weight[PAD_ID].zero_()

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- encoding -------------------------------------------------------------------------------------------

    def encode_tensors(self, src: torch.Tensor, src_lengths: torch.Tensor,
                       packed: bool = True) -> tuple[torch.Tensor, ...]:
        """src [B, S], src_lengths [B] → memory [B, S, M], keys [B, S, A], src_mask [B, S], hidden [B, L, H],
        att_vec [B, A'] (and cell [B, L, H] for LSTMs): the initial decoder state. `packed=False` is the
        padded-tensor form the ONNX export traces (same results)."""
        src_mask = torch.arange(src.size(1), device=src.device).unsqueeze(0) < src_lengths.unsqueeze(1)  # [B, S]
        memory, final = self.encoder(src, src_lengths, src_mask, packed)
        keys = self.decoder.attention.project_keys(memory)  # [B, S, A]
        activation = torch.relu if self.config.bridge == "relu" else torch.tanh
        hidden = activation(self.bridge(final)).view(src.size(0), self.config.decoder_layers, -1)  # [B, L, H]
        hidden = hidden.to(memory.dtype)  # under autocast the bridge's product is bf16; states keep the memory's
        att_vec = memory.new_zeros(src.size(0), self.decoder.att_size)  # [B, A']
        if self.lstm:
            return memory, keys, src_mask, hidden, att_vec, torch.zeros_like(hidden)
        return memory, keys, src_mask, hidden, att_vec

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> State:
        memory, keys, src_mask, hidden, att_vec, *cell = self.encode_tensors(src, src_lengths)
        rows = {"hidden": hidden, "att_vec": att_vec}
        if cell:
            rows["cell"] = cell[0]
        return State(rows=rows, sentences={"memory": memory, "keys": keys, "src_mask": src_mask})

    # --- one decoder step -----------------------------------------------------------------------------------

    def step_tensors(self, prev_tokens: torch.Tensor, hidden: torch.Tensor, att_vec: torch.Tensor,
                     memory: torch.Tensor, keys: torch.Tensor, src_mask: torch.Tensor,
                     cell: torch.Tensor | None = None, log_softmax: bool = True) -> tuple[torch.Tensor, ...]:
        """One step for N rows → log_probs [N, V] (float32; logits with log_softmax=False), hidden [N, L, H],
        att_vec [N, A'], weights [N, S] (and cell [N, L, H] for LSTMs)."""
        layers = hidden.unbind(1)
        states = list(zip(layers, cell.unbind(1))) if cell is not None else list(layers)
        att_vec, states, weights = self.decoder.step(self.decoder.input_projection(prev_tokens, att_vec), states,
                                                     keys, memory, src_mask)
        log_probs = self.decoder.logits(att_vec)  # [N, V]
        log_probs = log_probs.to(torch.promote_types(log_probs.dtype, torch.float32))
        if log_softmax:
            log_probs = torch.log_softmax(log_probs, dim=-1)
        if cell is not None:
            return (log_probs, torch.stack([h for h, _ in states], 1), att_vec, weights,
                    torch.stack([c for _, c in states], 1))
        return log_probs, torch.stack(states, 1), att_vec, weights

    def step(self, prev_tokens: torch.Tensor, state: State, normalize: bool = True) -> tuple[torch.Tensor, State]:
        rows, sent = state.rows, state.sentences
        log_probs, hidden, att_vec, weights, *cell = self.step_tensors(
            prev_tokens, rows["hidden"], rows["att_vec"], sent["memory"], sent["keys"], sent["src_mask"],
            rows.get("cell"), log_softmax=normalize)
        new_rows = {"hidden": hidden, "att_vec": att_vec}
        if cell:
            new_rows["cell"] = cell[0]
        return log_probs, State(rows=new_rows, sentences=sent, attention=weights)

    # --- teacher forcing ------------------------------------------------------------------------------------

    def logits(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing by `step`, one position at a time: src [B, S], tgt_in [B, T] → logits [B, T, V] (the
        plain form: word-level distillation's teacher, tests)."""
        memory, keys, src_mask, hidden, att_vec, *cell = self.encode_tensors(src, src_lengths)
        logits = []
        for t in range(tgt_in.size(1)):
            log_probs, hidden, att_vec, _, *cell = self.step_tensors(tgt_in[:, t], hidden, att_vec, memory, keys,
                                                                     src_mask, *cell, log_softmax=False)
            logits.append(log_probs)
        return torch.stack(logits, dim=1)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor,
                label_smoothing: float = 0.0, soft_ids: torch.Tensor | None = None,
                soft_probs: torch.Tensor | None = None, soft_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing → (loss, nll): the label-smoothed cross-entropy and the NLL summed over the real
        (non-pad) positions of tgt_out [B, T]; optionally mixed with a soft target per position (soft_ids /
        soft_probs [B, T, k], word-level distillation) with weight soft_weight. Positions are packed by target
        length (nmt.bptt.Packing), so padding costs nothing."""
        packing = Packing((tgt_out != PAD_ID).sum(1))
        memory, keys, src_mask, hidden, _, *cell = self.encode_tensors(src, src_lengths)
        layers = hidden.unbind(1)
        states = list(zip(layers, cell[0].unbind(1))) if cell else list(layers)
        outputs = self.decoder.teacher_forced(tgt_in, packing, states, keys, memory, src_mask)  # [R, A']
        if soft_ids is not None:
            soft_ids, soft_probs = packing.pack(soft_ids), packing.pack(soft_probs)
        return output_loss(outputs, *self.decoder.output_layer(), packing.pack(tgt_out), label_smoothing, soft_ids,
                           soft_probs, soft_weight)
