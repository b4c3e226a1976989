"""search.py — greedy search, batched beam search, forced scoring and forced attention over any `DecoderStep`.

The only search loops in the project: the torch model, ONNX Runtime and TensorRT all run through here. Knows
nothing of torch modules or ONNX — only the two calls of the `DecoderStep` protocol and the reserved ids (and,
on CPU, greedy search's fused choice of token, nmt.kernels).
Scores are total log-probabilities (sum over tokens and eos), the same quantity `forced_scores` computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from nmt import kernels
from nmt.errors import NMTError
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID

NEVER_GENERATED = (PAD_ID, BOS_ID)


@dataclass
class State:
    """Decoder state. `rows` hold one row per hypothesis (dim 0 = N = B × K, the K rows of a sentence
    adjacent); `sentences` hold one row per sentence (dim 0 = B) with the source position at dim 1: encoder
    memory, keys, source mask (the searches pad that dimension with zeros / False, or cut it, when they join
    sentences encoded apart)."""

    rows: dict[str, torch.Tensor]
    sentences: dict[str, torch.Tensor] = field(default_factory=dict)
    attention: torch.Tensor | None = None  # [N, S]: the weights of the step that made this state, where given

    def select(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> State:
        """Reorder hypotheses by `rows` [N'], and sentences by `sentences` [B'] when given (the last step's
        attention is not carried: it belongs to that step)."""
        new_rows = {k: v.index_select(0, rows) for k, v in self.rows.items()}
        if sentences is None:
            return State(new_rows, self.sentences)
        return State(new_rows, {k: v.index_select(0, sentences) for k, v in self.sentences.items()})


class DecoderStep(Protocol):
    """What a backend offers the search. Tensors are torch tensors on one device; log_probs are float32."""

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> State:
        """src [B, S] (padded, ending with eos), src_lengths [B] → the state for B rows (one per sentence)."""
        ...

    def step(self, prev_tokens: torch.Tensor, state: State, normalize: bool = True) -> tuple[torch.Tensor, State]:
        """prev_tokens [N] → log_probs [N, V] for the next token, and the new state (with the step's attention
        weights [N, S] in `State.attention`, in the backend's dtype, where the backend gives them). With
        normalize=False the scores may be unnormalized, their log-softmax the log-probabilities (logits: greedy
        search skips writing the full log-softmax; a backend may return the log-probabilities anyway)."""
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


def _mask_log_probs(log_probs: torch.Tensor, early: torch.Tensor | None, force_eos: torch.Tensor) -> torch.Tensor:
    """Never pad/bos; no eos where `early` [N] (before min_len; None: nowhere); only eos where force_eos [N] (the
    output reached its maximum). In place: log_probs are the caller's (DecoderStep)."""
    log_probs[:, list(NEVER_GENERATED)] = -math.inf
    if early is not None:
        log_probs[early, EOS_ID] = -math.inf
    if force_eos.any():
        eos = log_probs[force_eos, EOS_ID]
        log_probs[force_eos] = -math.inf
        log_probs[force_eos, EOS_ID] = eos
    return log_probs


def _greedy_choice(scores: torch.Tensor, early: torch.Tensor | None,
                   force_eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's most probable allowed token (as `_mask_log_probs` allows them) of unnormalized scores [N, V], and
    its log-probability: values [N], tokens [N]. The fused kernel where it runs (it writes no log-softmax)."""
    if kernels.usable(scores):
        return kernels.greedy_choice(scores, torch.zeros_like(force_eos) if early is None else early, force_eos,
                                     NEVER_GENERATED, EOS_ID)
    return row_max(_mask_log_probs(torch.log_softmax(scores, dim=-1), early, force_eos))


def _block_maxima(scores: torch.Tensor, block: int) -> torch.Tensor:
    """[N, V] → the maximum of each run of `block` columns [N, ceil(V / block)] (the last run may be shorter),
    without a padded copy."""
    rows, vocab = scores.shape
    whole = vocab - vocab % block
    maxima = scores[:, :whole].unflatten(1, (whole // block, block)).amax(dim=-1)  # a view's reduction
    if whole < vocab:
        maxima = torch.cat([maxima, scores[:, whole:].amax(dim=-1, keepdim=True)], dim=1)
    return maxima


def _block_columns(blocks: torch.Tensor, block: int) -> torch.Tensor:
    """Block numbers [N, b] → their columns [N, b · block] (past the last column where the last block is short)."""
    return (blocks.unsqueeze(-1) * block + torch.arange(block, device=blocks.device)).flatten(1)


def row_max(scores: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """scores.max(dim=-1) for [N, V], values and (first) indices, 4x faster on CPU at V = 16k: torch's max with
    indices is a slow scalar loop there, so take each block's amax, then the index within the best block."""
    best, best_block = _block_maxima(scores, block).max(dim=-1)  # [N], [N]
    columns = _block_columns(best_block.unsqueeze(1), block).clamp(max=scores.size(1) - 1)  # [N, block]
    return best, best_block * block + scores.gather(1, columns).max(dim=-1).indices


def row_topk(scores: torch.Tensor, k: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """scores.topk(k, dim=-1) for [N, V], values and indices (order among equal values unspecified, as with
    topk), faster on CPU where V is much larger than k: the k best entries lie in the k blocks with the best
    maxima, so only those are searched."""
    vocab = scores.size(1)
    if vocab <= 4 * k * block:
        return scores.topk(min(k, vocab), dim=-1)
    columns = _block_columns(_block_maxima(scores, block).topk(k, dim=-1).indices, block)  # [N, k · block]
    window = scores.gather(1, columns.clamp(max=vocab - 1))
    if vocab % block:
        window = window.masked_fill(columns >= vocab, -math.inf)  # the short last block's missing columns
    values, where = window.topk(k, dim=-1)
    return values, columns.gather(1, where)


def _hypotheses(tokens: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor,
                normalized: torch.Tensor) -> list[list[Hypothesis]]:
    """Tensors of B sentences' hypotheses [B, H(, L)] → lists; entries of length -1 are absent (one host copy)."""
    tokens, lengths, scores, normalized = (t.tolist() for t in (tokens, lengths, scores, normalized))
    return [[Hypothesis(row[:n], s, z) for row, n, s, z in zip(*sentence) if n >= 0]
            for sentence in zip(tokens, lengths, scores, normalized)]


def _rows_of(state: State, rows: slice) -> State:
    """The state of some sentences, one row each (as `encode` gives them), as views."""
    return State({k: v[rows] for k, v in state.rows.items()}, {k: v[rows] for k, v in state.sentences.items()})


def _source_width(sentences: torch.Tensor, width: int) -> torch.Tensor:
    """A sentence tensor [B, S, ...] (the source position at dim 1, the DecoderStep contract) cut or zero-padded
    (False for masks) to S = width."""
    if sentences.size(1) >= width:
        return sentences[:, :width]
    padding = sentences.new_zeros((sentences.size(0), width - sentences.size(1), *sentences.shape[2:]))
    return torch.cat([sentences, padding], dim=1)


def _join_states(first: State, second: State, width: int) -> State:
    """Two states in one: rows after rows, sentences after sentences, padded or cut to S = width."""
    return State({k: torch.cat([v, second.rows[k]]) for k, v in first.rows.items()},
                 {k: torch.cat([_source_width(v, width), _source_width(second.sentences[k], width)])
                  for k, v in first.sentences.items()})


class _Boarding:
    """The sentences a search has still to start, in the order given (longest first keeps the padding low): encoded
    `batch_size` at a time, and handed out as places in the batch free. A search keeps its batch full this way to
    the end of the input, instead of letting each batch dwindle to its longest output (at decoding's batch sizes
    a step costs nearly as much for a few rows as for all: the weights stream from memory either way)."""

    def __init__(self, decoder: DecoderStep, src: torch.Tensor, src_lengths: torch.Tensor, batch_size: int) -> None:
        self.decoder, self.src, self.src_lengths, self.batch_size = decoder, src, src_lengths, batch_size
        self.encoded = 0  # sentences encoded so far
        self.index = torch.zeros(0, dtype=torch.long, device=src.device)  # encoded, not yet handed out
        self.state: State | None = None

    def pending(self) -> bool:
        return self.encoded < self.src.size(0) or len(self.index) > 0

    def take(self, places: int) -> tuple[torch.Tensor, State]:
        """Up to `places` sentences: their indices in src [n] and their encoded state (a row each)."""
        if not len(self.index):
            end = min(self.encoded + self.batch_size, self.src.size(0))
            self.index = torch.arange(self.encoded, end, device=self.src.device)
            width = int(self.src_lengths[self.index].max())
            self.state = self.decoder.encode(self.src[self.index, :width], self.src_lengths[self.index])
            self.encoded = end
        n = min(places, len(self.index))
        taken = self.index[:n], _rows_of(self.state, slice(0, n))
        self.index, self.state = self.index[n:], _rows_of(self.state, slice(n, None))
        return taken


def _board(boarding: _Boarding, flying: int, start, join) -> None:
    """Fill the batch (once an eighth of it is free): `start(index, state)` makes the newcomers' search rows,
    `join(rows)` adds them to the flight."""
    free = boarding.batch_size - flying
    while free >= max(1, boarding.batch_size // 8) and boarding.pending():
        index, state = boarding.take(free)
        join(start(index, state))
        free -= len(index)


@dataclass
class _Flight:
    """Sentences under greedy decoding, a row each: their index in src, last token, score, tokens so far [B'],
    and the decoder state."""

    index: torch.Tensor
    prev: torch.Tensor
    score: torch.Tensor
    position: torch.Tensor
    state: State

    @classmethod
    def start(cls, index: torch.Tensor, state: State) -> _Flight:
        zeros = torch.zeros_like(index)
        return cls(index, torch.full_like(index, BOS_ID), zeros.float(), zeros, state)

    def select(self, keep: torch.Tensor) -> _Flight:
        return _Flight(self.index[keep], self.prev[keep], self.score[keep], self.position[keep],
                       self.state.select(keep, keep))

    def join(self, other: _Flight, src_lengths: torch.Tensor) -> _Flight:
        index = torch.cat([self.index, other.index])
        return _Flight(index, torch.cat([self.prev, other.prev]), torch.cat([self.score, other.score]),
                       torch.cat([self.position, other.position]),
                       _join_states(self.state, other.state, int(src_lengths[index].max())))


@torch.no_grad()
def greedy_search(decoder: DecoderStep, src: torch.Tensor, src_lengths: torch.Tensor, max_len_ratio: float = 2.0,
                  min_len: int = 0, batch_size: int | None = None) -> list[Hypothesis]:
    """Pick the most probable token at each step, for at most `batch_size` sentences at once (default: all); a
    finished sentence leaves the batch and the next ones take the places (`_Boarding`)."""
    total, device = src.size(0), src.device
    boarding = _Boarding(decoder, src, src_lengths, batch_size or total)
    max_lens = max_output_lengths(src_lengths, max_len_ratio)  # [total], tokens before eos
    tokens = torch.full((total, int(max_lens.max()) + 1), PAD_ID, dtype=torch.long, device=device)
    lengths = torch.full((total,), -1, dtype=torch.long, device=device)  # set when a sentence ends
    final = torch.zeros(total, device=device)
    flight = _Flight.start(boarding.index, State({}, {}))  # empty

    def join(newcomers: _Flight) -> None:
        nonlocal flight
        flight = newcomers if not len(flight.index) else flight.join(newcomers, src_lengths)

    while True:
        _board(boarding, len(flight.index), _Flight.start, join)
        if not len(flight.index):
            break
        scores, flight.state = decoder.step(flight.prev, flight.state, normalize=False)
        early = flight.position < min_len if min_len else None
        best, flight.prev = _greedy_choice(scores, early, max_lens[flight.index] <= flight.position)  # [B'], [B']
        flight.score = flight.score + best
        tokens[flight.index, flight.position] = flight.prev
        done = flight.prev == EOS_ID
        if done.any():  # every row ends: eos is forced at its maximum length
            lengths[flight.index[done]], final[flight.index[done]] = flight.position[done], flight.score[done]
            flight = flight.select((~done).nonzero().squeeze(1))
        flight.position = flight.position + 1
    return [hyps[0] for hyps in _hypotheses(tokens.unsqueeze(1), lengths.unsqueeze(1), final.unsqueeze(1),
                                            final.unsqueeze(1))]


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
    origin[:, last] = torch.where(missing, greedy.beam, origin[:, last])
    token[:, last] = torch.where(missing, greedy.token, token[:, last])
    scores[:, last] = torch.where(missing, greedy.score, scores[:, last])
    return torch.where(going_on, torch.where(missing, last, match.int().argmax(1)), -1)


@dataclass
class _Finished:
    """The n best finished hypotheses of every sentence (by index in src), kept as tensors [B, nbest(, L)]:
    normalized score (what ranks them), total score, length (-1: none yet) and tokens (pad after the length)."""

    normalized: torch.Tensor
    score: torch.Tensor
    length: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def empty(cls, batch: int, nbest: int, steps: int, device: torch.device) -> _Finished:
        minus_inf = torch.full((batch, nbest), -math.inf, device=device)
        return cls(minus_inf, minus_inf.clone(), torch.full((batch, nbest), -1, dtype=torch.long, device=device),
                   torch.full((batch, nbest, steps), PAD_ID, dtype=torch.long, device=device))

    def add(self, active: torch.Tensor, closing: torch.Tensor, score: torch.Tensor, normalized: torch.Tensor,
            tokens: torch.Tensor, length: torch.Tensor) -> None:
        """Merge new hypotheses of the live sentences: closing / score / normalized [B', C], tokens [B', C, L]
        (pad after each sentence's `length` [B'], the tokens so far)."""
        normalized = torch.cat([self.normalized[active], normalized.masked_fill(~closing, -math.inf)], dim=1)
        candidates = torch.cat([self.length[active], torch.where(closing, length.unsqueeze(1), -1)], dim=1)
        # keep the best nbest; filled entries before empty ones, earlier before later on equal scores
        rank = torch.where(candidates >= 0, normalized, -math.inf)
        order = torch.sort(rank, dim=1, descending=True, stable=True).indices[:, : self.normalized.size(1)]
        all_tokens = torch.cat([self.tokens[active], tokens], dim=1)  # [B', nbest + C, L]
        self.tokens[active] = all_tokens.gather(1, order.unsqueeze(2).expand(-1, -1, all_tokens.size(2)))
        self.normalized[active] = normalized.gather(1, order)
        self.score[active] = torch.cat([self.score[active], score], dim=1).gather(1, order)
        self.length[active] = candidates.gather(1, order)

    def done(self, active: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """[B']: the sentence has all its finished hypotheses and the last of them scores at least `bound`."""
        return (self.length[active, -1] >= 0) & (self.normalized[active, -1] >= bound)

    def hypotheses(self) -> list[list[Hypothesis]]:
        return [ranked or [Hypothesis([], -math.inf, -math.inf)]
                for ranked in _hypotheses(self.tokens, self.length, self.score, self.normalized)]


class _Expansion(NamedTuple):
    """A step's 2K best continuations of each live sentence [B', 2K], and where the greedy path goes."""

    scores: torch.Tensor
    origin: torch.Tensor  # the beam (0..K-1) each continues
    token: torch.Tensor
    greedy: _GreedyStep


@dataclass
class _Beams:
    """The K hypotheses of each live sentence: its index in src [B'], its tokens so far [B'], their scores
    [B', K], tokens [B'·K, L] (pad after the position) and last tokens [B'·K], the greedy path's slot [B'] (-1
    once it ended), the decoder state."""

    k: int
    active: torch.Tensor
    position: torch.Tensor
    scores: torch.Tensor
    history: torch.Tensor
    prev: torch.Tensor
    greedy_slot: torch.Tensor
    state: State

    @classmethod
    def start(cls, index: torch.Tensor, state: State, k: int, steps: int) -> _Beams:
        batch, device = index.size(0), index.device
        scores = torch.full((batch, k), -math.inf, device=device)
        scores[:, 0] = 0.0  # one live beam per sentence at the start
        return cls(k, index, torch.zeros_like(index), scores,
                   torch.full((batch * k, steps), PAD_ID, dtype=torch.long, device=device),
                   torch.full((batch * k,), BOS_ID, dtype=torch.long, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device),
                   state.select(torch.arange(batch, device=device).repeat_interleave(k)))  # [B*K] rows

    def join(self, other: _Beams, src_lengths: torch.Tensor) -> _Beams:
        active = torch.cat([self.active, other.active])
        return _Beams(self.k, active, *(torch.cat([mine, theirs]) for mine, theirs in (
            (self.position, other.position), (self.scores, other.scores), (self.history, other.history),
            (self.prev, other.prev), (self.greedy_slot, other.greedy_slot))),
            _join_states(self.state, other.state, int(src_lengths[active].max())))

    def expand(self, log_probs: torch.Tensor) -> _Expansion:
        """log_probs [B'·K, V] → the 2K best continuations of each sentence, and the greedy path's next step."""
        live, k, vocab = self.active.size(0), self.k, log_probs.size(-1)
        # the 2K best of a sentence are among the 2K best of each of its beams: those first, then the best of them
        row_scores, row_tokens = row_topk(log_probs, 2 * k)  # [B'·K, C], C = min(2K, V)
        candidates = (self.scores.unsqueeze(-1) + row_scores.view(live, k, -1)).view(live, -1)  # [B', K·C]
        top_scores, top_index = candidates.topk(min(2 * k, candidates.size(1)), dim=-1)  # [B', 2K]
        origin = top_index // row_scores.size(1)
        token = row_tokens.view(live, -1).gather(1, top_index)
        greedy = _greedy_step(log_probs.view(live, k, vocab), self.scores, self.greedy_slot,
                              torch.arange(live, device=log_probs.device))
        return _Expansion(top_scores, origin, token, greedy)

    def close(self, top: _Expansion, finished: _Finished, alpha: float) -> None:
        """Finish hypotheses: eos among the K best continuations with a finite score, and the greedy path's
        eos when it is not among them."""
        k, greedy = self.k, top.greedy
        closing = (top.token[:, :k] == EOS_ID) & (top.scores[:, :k] > -math.inf)  # [B', K]
        listed = (closing & (top.origin[:, :k] == greedy.beam.unsqueeze(1))).any(dim=1)
        greedy_closing = (greedy.ends & ~listed).unsqueeze(1)  # [B', 1]
        if not (bool(closing.any()) or bool(greedy_closing.any())):
            return
        scores = torch.cat([top.scores[:, :k], greedy.score.unsqueeze(1)], dim=1)  # [B', K + 1]
        beams = torch.cat([top.origin[:, :k], greedy.beam.unsqueeze(1)], dim=1)
        live = torch.arange(self.active.size(0), device=beams.device).unsqueeze(1)
        tokens = self.history.view(self.active.size(0), k, -1)[live, beams]  # [B', K + 1, L]
        finished.add(self.active, torch.cat([closing, greedy_closing], dim=1), scores,
                     scores / length_penalty(self.position + 1, alpha).unsqueeze(1), tokens, self.position)

    def advance(self, top: _Expansion) -> None:
        """Continue the K best non-eos continuations, the greedy path in the last slot if it fell out of them."""
        scores, position = top.scores.masked_fill(top.token == EOS_ID, -math.inf).topk(self.k, dim=-1)  # [B', K]
        origin, token = top.origin.gather(1, position), top.token.gather(1, position)
        self.greedy_slot = _keep_greedy(top.greedy, origin, token, scores)
        live = torch.arange(self.active.size(0), device=origin.device)
        rows = (live.unsqueeze(1) * self.k + origin).view(-1)  # [B'·K]
        self.prev = token.view(-1)
        self.history = self.history.index_select(0, rows)
        at = self.position.repeat_interleave(self.k)  # [B'·K]: where each row's token goes
        self.history[torch.arange(rows.size(0), device=rows.device), at] = self.prev
        self.scores = scores
        self.state = self.state.select(rows)

    def done(self, finished: _Finished, alpha: float) -> torch.Tensor:
        """[B']: no live beam can beat the sentence's last kept finished hypothesis (or none is finite)."""
        bound = self.scores.max(dim=1).values / length_penalty(self.position + 1, alpha)  # [B']
        return (bound == -math.inf) | finished.done(self.active, bound)

    def retire(self, done: torch.Tensor) -> None:
        """Drop the sentences that are done (their rows and their part of the state)."""
        keep = (~done).nonzero().squeeze(1)
        keep_rows = (keep.unsqueeze(1) * self.k + torch.arange(self.k, device=keep.device)).view(-1)
        self.active, self.scores, self.greedy_slot = self.active[keep], self.scores[keep], self.greedy_slot[keep]
        self.position, self.prev, self.history = self.position[keep], self.prev[keep_rows], self.history[keep_rows]
        self.state = self.state.select(keep_rows, keep)


@torch.no_grad()
def beam_search(decoder: DecoderStep, src: torch.Tensor, src_lengths: torch.Tensor, beam_size: int = 5,
                nbest: int = 1, alpha: float = 1.0, max_len_ratio: float = 2.0,
                min_len: int = 0, batch_size: int | None = None) -> list[list[Hypothesis]]:
    """Batched beam search: at most `batch_size` sentences (default: all) × K beams in one tensor; a finished
    sentence leaves the batch and the next ones take the places (`_Boarding`).

    At each step the 2K best continuations of a sentence are taken; an eos among its K best closes a
    hypothesis, the K best others continue. The greedy path is never pruned: when its next step falls out of
    the K best it takes the last slot, so beam search never ends below greedy search's score. A sentence is
    done when its nbest-th finished hypothesis scores at least the best live beam would if it ended now:
    exact without length penalty (scores only fall), the usual heuristic with it; at the maximum length eos
    is forced. Returns the `nbest` best finished hypotheses of each sentence, ranked by score / length penalty.
    """
    total, device, k = src.size(0), src.device, beam_size
    boarding = _Boarding(decoder, src, src_lengths, batch_size or total)
    max_lens = max_output_lengths(src_lengths, max_len_ratio)
    steps = int(max_lens.max()) + 1
    finished = _Finished.empty(total, nbest, steps, device)
    beams = _Beams.start(boarding.index, State({}, {}), k, steps)  # empty

    def join(newcomers: _Beams) -> None:
        nonlocal beams
        beams = newcomers if not len(beams.active) else beams.join(newcomers, src_lengths)

    while True:
        _board(boarding, len(beams.active), lambda index, state: _Beams.start(index, state, k, steps), join)
        if not len(beams.active):
            break
        log_probs, beams.state = decoder.step(beams.prev, beams.state)
        at_max = (max_lens[beams.active] <= beams.position).repeat_interleave(k)
        early = (beams.position < min_len).repeat_interleave(k) if min_len else None
        top = beams.expand(_mask_log_probs(log_probs, early, at_max))
        beams.close(top, finished, alpha)
        beams.advance(top)
        done = beams.done(finished, alpha)
        if done.any():
            beams.retire(done)
        beams.position = beams.position + 1
    return finished.hypotheses()


def _forced_steps(decoder: DecoderStep, src: torch.Tensor, src_lengths: torch.Tensor,
                  targets: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor, State]]:
    """Teacher forcing of each target (its tokens, then eos): per step, the gold tokens [B] (pad once a target
    has ended), the log-probabilities [B, V] and the state the step made."""
    device = src.device
    steps = max(len(t) for t in targets) + 1
    gold = torch.full((len(targets), steps), PAD_ID, dtype=torch.long, device=device)  # y + eos
    for i, target in enumerate(targets):
        gold[i, : len(target) + 1] = torch.tensor(list(target) + [EOS_ID], dtype=torch.long)
    state = decoder.encode(src, src_lengths)
    prev = torch.full((len(targets),), BOS_ID, dtype=torch.long, device=device)
    for t in range(steps):
        log_probs, state = decoder.step(prev, state)
        yield gold[:, t], log_probs, state
        prev = gold[:, t]


@torch.no_grad()
def forced_scores(decoder: DecoderStep, src: torch.Tensor, src_lengths: torch.Tensor,
                  targets: list[list[int]]) -> torch.Tensor:
    """Total log-probability [B] of each target (its tokens, then eos) under the decoder, by teacher forcing."""
    total = torch.zeros(len(targets), dtype=torch.float64, device=src.device)
    for gold, log_probs, _ in _forced_steps(decoder, src, src_lengths, targets):
        picked = log_probs.gather(1, gold.unsqueeze(1)).squeeze(1).double()
        total += torch.where(gold != PAD_ID, picked, torch.zeros_like(picked))
    return total


@torch.no_grad()
def forced_attention(decoder: DecoderStep, src: torch.Tensor, src_lengths: torch.Tensor,
                     targets: list[list[int]]) -> list[torch.Tensor]:
    """The decoder's attention weights while it produces each target, by teacher forcing the target through the
    same DecoderStep (the path the search took, so the weights the search saw): one [len(target), S_i] tensor per
    target, a row per target token and a column per source token (eos rows and columns left out)."""
    if not targets:
        return []
    weights = []
    for _, _, state in _forced_steps(decoder, src, src_lengths, targets):
        if state.attention is None:
            raise NMTError("this backend's decoder step gives no attention weights (needed for alignments)")
        weights.append(state.attention.float())
    attention = torch.stack(weights, dim=1).cpu()  # [B, T + 1, S]
    return [attention[i, : len(target), : int(length) - 1]
            for i, (target, length) in enumerate(zip(targets, src_lengths.tolist()))]
