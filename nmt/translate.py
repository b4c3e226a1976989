"""translate.py — raw text in, detokenized text out, over any DecoderStep backend; `nmt translate` / `nmt score`.

`Translator` owns the text side of decoding: SentencePiece encoding, splitting of over-long inputs (at sentence
punctuation, else between words, else at the piece limit; the parts' translations joined, so no text is lost),
batching by length, greedy or beam search (nmt.search), restoring input order, detokenizing. Exactly one result
per input line, whatever the line holds (an empty line gives an empty translation). Backends are built elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import select
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from nmt import parallel
from nmt.config import DecodeConfig
from nmt.data import pad, read_lines
from nmt.errors import NMTError
from nmt.search import DecoderStep, Hypothesis, beam_search, forced_attention, forced_scores, greedy_search
from nmt.vocab import EOS_ID, Vocab


SENTENCE_END = re.compile(r"(?<=[.!?;:。！？；：])\s+|(?<=[。！？])")  # where an over-long line is cut first


@dataclass
class Translation:
    text: str
    score: float
    tokens: list[int]
    # with alignments: the attention weights [target tokens, source pieces] and the pieces on its two axes
    attention: torch.Tensor | None = None
    source_pieces: list[str] | None = None
    target_pieces: list[str] | None = None

    def alignment(self) -> list[tuple[int, int]]:
        """Hard word alignment (source word, target word), words being whitespace tokens of the source and of the
        output: each target word goes to the source word with the most attention mass over its pieces."""
        if self.attention is None or not self.tokens or not self.source_pieces:
            return []
        spoken = [i for i, token in enumerate(self.tokens) if token > EOS_ID]  # what the text is made of
        if not spoken:
            return []
        source_words = torch.tensor(word_index(self.source_pieces))
        target_words = torch.tensor(word_index([self.target_pieces[i] for i in spoken]))
        by_source = torch.zeros(len(spoken), int(source_words.max()) + 1).index_add_(
            1, source_words, self.attention[spoken].float())  # [target pieces, source words]
        mass = torch.zeros(int(target_words.max()) + 1, by_source.size(1)).index_add_(0, target_words, by_source)
        return [(int(source), target) for target, source in enumerate(mass.argmax(1).tolist())]


def word_index(pieces: list[str]) -> list[int]:
    """The whitespace word each SentencePiece piece belongs to: a piece starting with ▁ starts a word."""
    index, word = [], -1
    for piece in pieces:
        word += piece.startswith("▁") or word < 0
        index.append(word)
    return index


def joined(parts: list[Translation]) -> Translation:
    """The translation of a line translated in parts: texts joined by a space, scores summed (and attention
    matrices set along the diagonal, with their pieces, where there are some)."""
    line = Translation(" ".join(p.text for p in parts if p.text), sum(p.score for p in parts),
                       [token for p in parts for token in p.tokens])
    if all(p.attention is not None for p in parts):
        line.attention = torch.block_diag(*[p.attention for p in parts])
        line.source_pieces = [piece for p in parts for piece in p.source_pieces]
        line.target_pieces = [piece for p in parts for piece in p.target_pieces]
    return line


class Translator:
    def __init__(self, decoder: DecoderStep, vocab: Vocab, decode: DecodeConfig, device: str | torch.device = "cpu"):
        self.decoder, self.vocab, self.decode, self.device = decoder, vocab, decode, torch.device(device)
        self.split = 0  # inputs longer than decode.max_input_len translated in parts so far
        self.cropped = 0  # sources cut to decode.max_input_len so far (forced scoring only)

    def _source_ids(self, lines: list[str]) -> list[list[int]]:
        """Source pieces of each line, cropped to decode.max_input_len (with eos): what scoring reads."""
        ids = self.vocab.encode_src([line.strip() for line in lines])
        limit = self.decode.max_input_len - 1  # room for eos
        for i, seq in enumerate(ids):
            if len(seq) > limit:
                ids[i] = seq[:limit]
                self.cropped += 1
        return ids

    def _parts(self, line: str, limit: int) -> list[list[int]]:
        """An over-long line's pieces in parts of at most `limit`: whole sentences packed together where they fit,
        a sentence too long by itself cut between words, a word too long by itself cut at the limit."""
        units = []
        for sentence in SENTENCE_END.split(line):
            ids = self.vocab.encode_src([sentence])[0]
            if len(ids) <= limit:
                units.append(ids)
                continue
            for word_ids in self.vocab.encode_src(sentence.split()):
                units.extend(word_ids[start: start + limit] for start in range(0, len(word_ids), limit))
        parts = [[]]
        for ids in units:
            if len(parts[-1]) + len(ids) > limit:
                parts.append([])
            parts[-1].extend(ids)
        return [part for part in parts if part]

    def _sources(self, lines: list[str]) -> tuple[list[list[int]], list[int]]:
        """The sources to search: each line's pieces, or its parts when longer than decode.max_input_len (with
        eos); and for each source the line it belongs to."""
        limit = self.decode.max_input_len - 1  # room for eos
        sources, owners = [], []
        for i, (line, ids) in enumerate(zip(lines, self.vocab.encode_src([line.strip() for line in lines]))):
            parts = [ids] if len(ids) <= limit else self._parts(line.strip(), limit)
            self.split += len(parts) > 1
            sources.extend(parts)
            owners.extend([i] * len(parts))
        return sources, owners

    @staticmethod
    def _longest_first(ids: list[list[int]]) -> list[int]:
        """Indices of the non-empty inputs, longest first (batches then pad little)."""
        return sorted((i for i, seq in enumerate(ids) if seq), key=lambda i: -len(ids[i]))

    def _batches(self, ids: list[list[int]]) -> Iterator[list[int]]:
        """Indices of non-empty inputs, longest first, in batches of decode.batch_size."""
        order = self._longest_first(ids)
        for start in range(0, len(order), self.decode.batch_size):
            yield order[start: start + self.decode.batch_size]

    def translate(self, lines: list[str], alignments: bool = False, **overrides) -> list[list[Translation]]:
        """Translate lines; `overrides` replace DecodeConfig fields (beam_size, nbest, length_penalty, ...).
        Returns `nbest` translations per line (beam 1 = greedy search); for a line translated in parts, the
        k-th translations of its parts joined. With `alignments`, each translation carries its attention
        weights and pieces (`Translation.alignment()`)."""
        decode = dataclasses.replace(self.decode, **{k: v for k, v in overrides.items() if v is not None})
        if decode.nbest > decode.beam_size:
            raise NMTError(f"--nbest {decode.nbest} is larger than --beam-size {decode.beam_size}")
        ids, owners = self._sources(lines)
        empty = [Translation("", 0.0, [])] * decode.nbest
        results: list[list[Translation]] = [empty for _ in ids]
        order = self._longest_first(ids)
        if order:  # the searches keep decode.batch_size sentences in flight, the next taking a finished one's place
            src, lengths = self._padded([ids[i] for i in order])
            if decode.beam_size == 1:
                hyps = [[h] for h in greedy_search(self.decoder, src, lengths, decode.max_len_ratio, decode.min_len,
                                                   decode.batch_size)]
            else:
                hyps = beam_search(self.decoder, src, lengths, decode.beam_size, decode.nbest, decode.length_penalty,
                                   decode.max_len_ratio, decode.min_len, decode.batch_size)
            for i, nbest in zip(order, hyps):
                results[i] = [self._text(h) for h in nbest] + [Translation("", 0.0, [])
                                                               for _ in range(decode.nbest - len(nbest))]
        if alignments:
            for batch in self._batches(ids):
                self._attend(*self._padded([ids[i] for i in batch]), [results[i] for i in batch],
                             [ids[i] for i in batch])
        if len(ids) == len(lines):
            return results
        parts: list[list[list[Translation]]] = [[] for _ in lines]
        for owner, result in zip(owners, results):
            parts[owner].append(result)
        return [[joined([part[k] for part in line]) for k in range(decode.nbest)] if len(line) > 1 else line[0]
                for line in parts]

    def _padded(self, sources: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sources → src [B, S] (each ending with eos), lengths [B], on the decoder's device."""
        src, lengths = pad(sources, suffix=EOS_ID)
        return src.to(self.device), lengths.to(self.device)

    def _text(self, hyp: Hypothesis) -> Translation:
        return Translation(self.vocab.decode_tgt(hyp.tokens), hyp.score, hyp.tokens)

    def _attend(self, src: torch.Tensor, lengths: torch.Tensor, results: list[list[Translation]],
                sources: list[list[int]]) -> None:
        """Set the attention weights of each batch sentence's translations (n-best alike), by teacher forcing
        them through the decoder (nmt.search.forced_attention)."""
        rows = torch.tensor([b for b, nbest in enumerate(results) for _ in nbest], device=src.device)
        translations = [t for nbest in results for t in nbest]
        weights = forced_attention(self.decoder, src[rows], lengths[rows], [t.tokens for t in translations])
        for (b, translation), attention in zip(zip(rows.tolist(), translations), weights):
            translation.attention = attention
            translation.source_pieces = self.vocab.src_pieces(sources[b])
            translation.target_pieces = self.vocab.tgt_pieces(translation.tokens)

    def score(self, sources: list[str], targets: list[str]) -> list[float]:
        """Forced-decoding total log-probability of each target given its source (empty source → 0.0)."""
        if len(sources) != len(targets):
            raise NMTError(f"--src has {len(sources)} lines but --tgt has {len(targets)}")
        src_ids = self._source_ids(sources)
        tgt_ids = self.vocab.encode_tgt([t.strip() for t in targets])
        scores = [0.0] * len(sources)
        for batch in self._batches(src_ids):
            totals = forced_scores(self.decoder, *self._padded([src_ids[i] for i in batch]),
                                   [tgt_ids[i] for i in batch])
            for i, total in zip(batch, totals.tolist()):
                scores[i] = total
        return scores


def format_line(translation: Translation, with_score: bool, with_alignment: bool = False) -> str:
    """One output line: [score TAB] text [ ||| Pharaoh alignment `source-target ...`]."""
    text = translation.text.replace("\n", " ").replace("\r", " ")
    if with_alignment:
        text += " ||| " + " ".join(f"{source}-{target}" for source, target in translation.alignment())
    return f"{translation.score:.4f}\t{text}" if with_score else text


def _arriving_lines(fd: int, most: int) -> Iterator[list[str]]:
    """Lines of a pipe or terminal as they arrive: once a line is complete, it and whatever else has already
    arrived (up to `most` lines) make one batch, so a pipe is translated as it is written and memory stays bounded
    whatever the input's length. Invalid UTF-8 is replaced, a final line without a newline is kept."""
    ready: list[bytes] = []  # complete lines not given out yet
    partial, ended = b"", False

    def read() -> None:
        nonlocal partial, ended
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            ended = True
            if partial:
                ready.append(partial)
            return
        *complete, partial = (partial + chunk).split(b"\n")
        ready.extend(complete)

    while True:
        while not ready and not ended:  # wait for a whole line
            read()
        while not ended and len(ready) < most and select.select([fd], [], [], 0)[0]:
            read()  # what else is there now, without waiting
        if not ready:
            return
        batch = ready[:most]
        del ready[:most]
        yield [line.rstrip(b"\r").decode("utf-8", errors="replace") for line in batch]


def _open_output(path: str | None, append: bool = False) -> TextIO:
    if path is None or path == "-":
        return sys.stdout
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a" if append else "w", encoding="utf-8")


@dataclass(frozen=True)
class LineFormat:
    """What `nmt translate` writes for each translation besides its text, and where attention plots go."""

    scores: bool = False  # the total log-probability and a tab first
    alignments: bool = False  # " ||| " and the Pharaoh word alignment after the text
    attention_plot: str | None = None  # a folder for one PNG heat map per input line (its best translation)

    @property
    def attention(self) -> bool:
        return self.alignments or self.attention_plot is not None


def run_translate(translator: Translator, input: str | None = None, output: str | None = None,
                  form: LineFormat = LineFormat(), chunk_lines: int = 10_000, **overrides) -> int:
    """Translate a file (or stdin) to a file (or stdout), one line out per line in (n lines with n-best).
    Under torchrun each rank translates a contiguous share of the input file and rank 0 writes every share's
    output in input order. Returns the number of input lines."""
    ranks = parallel.ranks()
    overrides["alignments"] = form.attention
    if input is None or input == "-":
        if ranks.world > 1:
            raise NMTError("under torchrun, give the input as a file (--input): the ranks read their shares of it")
        total = 0
        for lines in _arriving_lines(sys.stdin.fileno(), chunk_lines):
            _write(output, translator.translate(lines, **overrides), form, first_line=total)
            total += len(lines)
        if total == 0:
            _write(output, [], form, first_line=0)
        _warn_split(translator, ranks)
        return total
    if not Path(input).is_file():
        raise NMTError(f"input file not found: {input}")
    lines = read_lines(input)
    mine = ranks.share(len(lines))
    results = []
    for start in range(mine.start, mine.stop, chunk_lines):
        results.extend(translator.translate(lines[start: min(start + chunk_lines, mine.stop)], **overrides))
        if ranks.world == 1:  # one process writes as it goes
            _write(output, results, form, first_line=start)
            results = []
    if ranks.world > 1:
        results = ranks.gather(results)
        if ranks.rank == 0:
            _write(output, results, form, first_line=0)
    elif not lines:
        _write(output, [], form, first_line=0)
    _warn_split(translator, ranks)
    return len(lines)


def _warn_split(translator: Translator, ranks: parallel.Ranks) -> None:
    split = ranks.gather([translator.split])
    if split and sum(split):
        print(f"warning: {sum(split)} input line(s) longer than {translator.decode.max_input_len} pieces were "
              f"translated in parts (split at sentence ends, else between words)", file=sys.stderr)


def _write(output: str | None, results: list[list[Translation]], form: LineFormat, first_line: int) -> None:
    """Write the lines of `results` (input lines first_line, first_line + 1, ...; appending after the first)."""
    out = sys.stdout if output is None or output == "-" else _open_output(output, append=first_line > 0)
    try:
        for nbest in results:
            for translation in nbest:
                out.write(format_line(translation, form.scores, form.alignments) + "\n")
        out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if form.attention_plot is not None:
        from nmt.plots import plot_attention

        for number, nbest in enumerate(results, start=first_line + 1):
            best = nbest[0]
            if best.attention is not None and best.attention.numel():
                plot_attention(best.attention, best.source_pieces, best.target_pieces,
                               Path(form.attention_plot) / f"line-{number:06d}.png")


def run_score(translator: Translator, src: str, tgt: str, output: str | None = None) -> list[float]:
    """`nmt score`: print the forced-decoding total log-probability of each target line."""
    for path in (src, tgt):
        if not Path(path).is_file():
            raise NMTError(f"file not found: {path}")
    totals = translator.score(read_lines(src), read_lines(tgt))
    if translator.cropped:
        print(f"warning: {translator.cropped} source line(s) longer than {translator.decode.max_input_len} pieces "
              f"were scored on their first {translator.decode.max_input_len - 1}", file=sys.stderr)
    out = _open_output(output)
    try:
        for total in totals:
            out.write(f"{total:.4f}\n" if math.isfinite(total) else "-inf\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return totals
