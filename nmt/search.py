"""search.py — greedy search, batched beam search and forced scoring over any `DecoderStep`.

The only search loops in the project: the torch model, ONNX Runtime and TensorRT all run through here. Knows
nothing of torch modules or ONNX — only the two calls of the `DecoderStep` protocol and the reserved ids.
Scores are total log-probabilities (sum over tokens and eos), the same quantity `forced_scores` computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import nn

from nmt.vocab import BOS_ID, EOS_ID, PAD_ID

NEVER_GENERATED = (PAD_ID, BOS_ID)


@dataclass
class State:
    """Decoder state. `rows` hold one row per hypothesis (dim 0 = N = B × K, the K rows of a sentence
    adjacent); `sentences` hold one row per sentence (dim 0 = B): encoder memory, keys, source mask."""

    rows: dict[str, torch.Tensor]
    sentences: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> State:
        """Reorder hypotheses by `rows` [N'], and sentences by `sentences` [B'] when given."""
        new_rows = {k: v.index_select(0, rows) for k, v in self.rows.items()}
        if sentences is None:
            return State(new_rows, self.sentences)
        return State(new_rows, {k: v.index_select(0, sentences) for k, v in self.sentences.items()})


class DecoderStep(Protocol):
    """What a backend offers the search. Tensors are torch tensors on one device; log_probs are float32."""

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> State:
        """src [B, S] (padded, ending with eos), src_lengths [B] → the state for B rows (one per sentence)."""
        ...

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """prev_tokens [N] → log_probs [N, V] for the next token, and the new state."""
        ...


@dataclass
class Hypothesis:
    tokens: list[int]  # without bos / eos
    score: float  # total log-probability, eos included
    normalized: float  # score / length penalty: what beam search ranks by


def length_penalty(length: torch.Tensor | int, alpha: float) -> torch.Tensor | float:
    """GNMT's ((5 + |Y|) / 6) ** alpha, |Y| counting eos; alpha = 0 ranks by total log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


def max_output_lengths(src_lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """At most ceil(ratio × source pieces) output tokens before eos (never fewer than 1)."""
    return torch.ceil((src_lengths - 1).clamp(min=1).float() * ratio).long().clamp(min=1)


def _mask_log_probs(log_probs: torch.Tensor, step: int, min_len: int, force_eos: torch.Tensor) -> torch.Tensor:
    """Never pad/bos; no eos before min_len; only eos where force_eos [N] (the output reached its maximum)."""
    log_probs = log_probs.clone()
    log_probs[:, list(NEVER_GENERATED)] = -math.inf
    if step < min_len:
        log_probs[:, EOS_ID] = -math.inf
    if force_eos.any():
        eos = log_probs[:, EOS_ID].clone()
        log_probs[force_eos] = -math.inf
        log_probs[force_eos, EOS_ID] = eos[force_eos]
    return log_probs


def row_max(scores: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """scores.max(dim=-1) for [N, V], values and (first) indices, 4x faster on CPU at V = 16k: torch's max with
    indices is a slow scalar loop there, so take each block's amax, then the index within the best block."""
    rows, vocab = scores.shape
    if vocab % block:
        scores = nn.functional.pad(scores, (0, block - vocab % block), value=-math.inf)
    blocks = scores.view(rows, scores.size(1) // block, block)  # [N, V / block, block]
    best, best_block = blocks.amax(dim=-1).max(dim=-1)  # [N], [N]
    within = blocks[torch.arange(rows, device=scores.device), best_block].max(dim=-1).indices  # [N]
    return best, best_block * block + within


@torch.no_grad()
def greedy_search(decoder: DecoderStep, src: torch.Tensor, src_lengths: torch.Tensor, max_len_ratio: float = 2.0,
                  min_len: int = 0) -> list[Hypothesis]:
    """Pick the most probable token at each step; finished sentences leave the batch."""
    batch = src.size(0)
    max_lens = max_output_lengths(src_lengths, max_len_ratio)  # [B], tokens before eos
    state = decoder.encode(src, src_lengths)
    active = torch.arange(batch, device=src.device)  # [B'] original index of each row
    prev = torch.full((batch,), BOS_ID, dtype=torch.long, device=src.device)
    scores = torch.zeros(batch, device=src.device)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    results: list[Hypothesis | None] = [None] * batch
    for t in range(int(max_lens.max()) + 1):
        log_probs, state = decoder.step(prev, state)
        log_probs = _mask_log_probs(log_probs, t, min_len, max_lens[active] <= t)
        best, prev = row_max(log_probs)  # [B'], [B']
        scores = scores + best
        done = prev == EOS_ID
        for row, (index, token, finished) in enumerate(zip(active.tolist(), prev.tolist(), done.tolist())):
            if finished:
                score = float(scores[row])
                results[index] = Hypothesis(tokens[index], score, score)
            else:
                tokens[index].append(token)
        if done.all():
            break
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            active, prev, scores = active[keep], prev[keep], scores[keep]
            state = state.select(keep, keep)
    return results  # type: ignore[return-value]  # every row ends: eos is forced at its maximum length


class _GreedyStep(NamedTuple):
    """Where the greedy path goes next, per live sentence [B']: from `beam` (its slot) by `token`, to `score`."""

    on: torch.Tensor  # the greedy path is still live (it has not ended with eos)
    beam: torch.Tensor
    token: torch.Tensor
    score: torch.Tensor
    ends: torch.Tensor  # its next token is eos


def _greedy_step(log_probs: torch.Tensor, scores: torch.Tensor, greedy_slot: torch.Tensor,
                 sentence: torch.Tensor) -> _GreedyStep:
    """The greedy path's next token: the best continuation of its own beam. log_probs [B', K, V], scores [B', K],
    greedy_slot [B'] the greedy path's beam, -1 once it ended; sentence [B'] = 0..B'-1."""
    on, beam = greedy_slot >= 0, greedy_slot.clamp(min=0)
    best, token = row_max(log_probs[sentence, beam])
    return _GreedyStep(on, beam, token, scores[sentence, beam] + best, on & (token == EOS_ID))


def _keep_greedy(greedy: _GreedyStep, origin: torch.Tensor, token: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Put the greedy path's continuation in the last of the K continuing slots [B', K] (edited in place) where it
    fell out of the K best; returns its slot per sentence, -1 where it ended."""
    match = (origin == greedy.beam.unsqueeze(1)) & (token == greedy.token.unsqueeze(1))  # [B', K]
    going_on = greedy.on & ~greedy.ends
    missing = going_on & ~match.any(dim=1)
    last = origin.size(1) - 1
    if missing.any():
        origin[missing, last] = greedy.beam[missing]
        token[missing, last] = greedy.token[missing]
        scores[missing, last] = greedy.score[missing]
    return torch.where(going_on, torch.where(missing, last, match.int().argmax(1)), -1)


@torch.no_grad()
def beam_search(decoder: DecoderStep, src: torch.Tensor, src_lengths: torch.Tensor, beam_size: int = 5,
                nbest: int = 1, alpha: float = 1.0, max_len_ratio: float = 2.0,
                min_len: int = 0) -> list[list[Hypothesis]]:
    """Batched beam search: all sentences × K beams in one tensor; finished sentences leave the batch.

    At each step the 2K best continuations of a sentence are taken; an eos among its K best closes a
    hypothesis, the K best others continue. The greedy path is never pruned: when its next step falls out of
    the K best it takes the last slot, so beam search never ends below greedy search's score. A sentence is
    done when its nbest-th finished hypothesis scores at least the best live beam would if it ended now:
    exact without length penalty (scores only fall), the usual heuristic with it; at the maximum length eos
    is forced. Returns the `nbest` best finished hypotheses of each sentence, ranked by score / length penalty.
    """
    batch, k, device = src.size(0), beam_size, src.device
    max_lens = max_output_lengths(src_lengths, max_len_ratio)
    state = decoder.encode(src, src_lengths)
    state = state.select(torch.arange(batch, device=device).repeat_interleave(k))  # [B*K] rows
    active = torch.arange(batch, device=device)  # [B'] original sentence of each live sentence
    scores = torch.full((batch, k), -math.inf, device=device)
    scores[:, 0] = 0.0  # one live beam per sentence at the start
    history = torch.full((batch * k, 0), BOS_ID, dtype=torch.long, device=device)  # [B'*K, t]
    prev = torch.full((batch * k,), BOS_ID, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    greedy_slot = torch.zeros(batch, dtype=torch.long, device=device)  # [B'] beam of the greedy path, -1 once ended
    for t in range(int(max_lens.max()) + 1):
        live = active.size(0)
        log_probs, state = decoder.step(prev, state)
        vocab = log_probs.size(-1)
        force = (max_lens[active] <= t).repeat_interleave(k)
        log_probs = _mask_log_probs(log_probs, t, min_len, force)
        candidates = (scores.unsqueeze(-1) + log_probs.view(live, k, vocab)).view(live, k * vocab)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=-1)  # [B', 2K]
        origin, token = top_index // vocab, top_index % vocab  # beam within the sentence, next token
        is_eos = token == EOS_ID

        sentence = torch.arange(live, device=device)
        greedy = _greedy_step(log_probs.view(live, k, vocab), scores, greedy_slot, sentence)

        # Close hypotheses: eos among the K best candidates with a finite score, and the greedy path's eos.
        closing = is_eos & (top_scores > -math.inf)
        closing[:, k:] = False
        listed = (closing & (origin == greedy.beam.unsqueeze(1))).any(dim=1)
        ends = [(s, int(origin[s, c]), float(top_scores[s, c])) for s, c in closing.nonzero().tolist()]
        ends += [(s, int(greedy.beam[s]), float(greedy.score[s]))
                 for s in (greedy.ends & ~listed).nonzero().view(-1).tolist()]
        for s, beam, score in ends:
            tokens = history[s * k + beam].tolist()
            finished[int(active[s])].append(Hypothesis(tokens, score, score / length_penalty(len(tokens) + 1, alpha)))

        # Continue the K best non-eos candidates, keeping the greedy path in the last slot if it fell out.
        cont_scores, cont_pos = top_scores.masked_fill(is_eos, -math.inf).topk(k, dim=-1)  # [B', K]
        cont_origin, cont_token = origin.gather(1, cont_pos), token.gather(1, cont_pos)
        greedy_slot = _keep_greedy(greedy, cont_origin, cont_token, cont_scores)
        rows = (sentence.unsqueeze(1) * k + cont_origin).view(-1)  # [B'*K]
        prev = cont_token.view(-1)
        history = torch.cat([history.index_select(0, rows), prev.unsqueeze(1)], dim=1)
        scores = cont_scores
        state = state.select(rows)

        # Retire sentences that are done: no live beam can beat their nbest-th finished hypothesis.
        bound = scores.max(dim=1).values / length_penalty(t + 1, alpha)  # [B']
        done = []
        for s, index in enumerate(active.tolist()):
            ranked = sorted((h.normalized for h in finished[index]), reverse=True)
            dead = float(bound[s]) == -math.inf  # no live beam has a finite score left
            done.append(dead or (len(ranked) >= nbest and ranked[nbest - 1] >= float(bound[s])))
        done_mask = torch.tensor(done, device=device)
        if done_mask.all():
            break
        if done_mask.any():
            keep = (~done_mask).nonzero().squeeze(1)
            keep_rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            active, scores, greedy_slot = active[keep], scores[keep], greedy_slot[keep]
            prev, history = prev[keep_rows], history[keep_rows]
            state = state.select(keep_rows, keep)
    results = []
    for hyps in finished:
        ranked = sorted(hyps, key=lambda h: h.normalized, reverse=True)[:nbest]
        results.append(ranked or [Hypothesis([], -math.inf, -math.inf)])
    return results


@torch.no_grad()
def forced_scores(decoder: DecoderStep, src: torch.Tensor, src_lengths: torch.Tensor,
                  targets: list[list[int]]) -> torch.Tensor:
    """Total log-probability [B] of each target (its tokens, then eos) under the decoder, by teacher forcing."""
    device = src.device
    steps = max(len(t) for t in targets) + 1
    gold = torch.full((len(targets), steps), PAD_ID, dtype=torch.long, device=device)  # y + eos
    for i, target in enumerate(targets):
        gold[i, : len(target) + 1] = torch.tensor(list(target) + [EOS_ID], dtype=torch.long)
    state = decoder.encode(src, src_lengths)
    prev = torch.full((len(targets),), BOS_ID, dtype=torch.long, device=device)
    total = torch.zeros(len(targets), dtype=torch.float64, device=device)
    for t in range(steps):
        log_probs, state = decoder.step(prev, state)
        picked = log_probs.gather(1, gold[:, t: t + 1]).squeeze(1).double()
        total += torch.where(gold[:, t] != PAD_ID, picked, torch.zeros_like(picked))
        prev = gold[:, t]
    return total
