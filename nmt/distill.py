"""distill.py — knowledge distillation from a teacher to a (smaller) student; `nmt distill`.

Sequence-level KD (Kim & Rush 2016): the teacher translates the training sources that the student's length filter
keeps with beam search, in shards written atomically (a kill loses at most one shard), and the student trains on
those translations, optionally with the original pairs too, or with the n-best hypothesis closest to the reference
(Seq-Inter).
Word-level KD optionally adds cross-entropy to the teacher's top-k distribution per target token.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import sacrebleu
import torch

from nmt import parallel
from nmt.checkpoint import load_model
from nmt.config import Config, load_config
from nmt.atomic import write_atomic
from nmt.data import Batch, load_parallel, rejection
from nmt.ensemble import combine
from nmt.errors import NMTError
from nmt.inference import decoding_step
from nmt.model import Seq2Seq
from nmt.search import DecoderStep
from nmt.train import Trainer
from nmt.translate import Translator
from nmt.vocab import Vocab


def _write_lines(path: Path, lines: list[str]) -> None:
    write_atomic(path, "".join(line + "\n" for line in lines).encode("utf-8"))


def _closest_to_reference(candidates: list[str], reference: str) -> str:
    """Seq-Inter: the candidate with the highest sentence BLEU to the reference (first on ties)."""
    scores = [sacrebleu.sentence_bleu(c, [reference]).score for c in candidates]
    return candidates[scores.index(max(scores))]


def translate_shards(translator: Translator, sources: list[str], references: list[str], folder: Path,
                     config: Config, log=print) -> list[str]:
    """Translate `sources` shard by shard into `folder/shard-NNNNN.txt`, skipping shards already written;
    returns the distilled targets, one per source line. Under torchrun each rank translates a contiguous share
    of the shards, then every rank reads them all in order."""
    d = config.distill
    ranks = parallel.ranks()
    folder.mkdir(parents=True, exist_ok=True)
    nbest = d.nbest if d.seq_inter else 1
    starts = range(0, len(sources), d.shard_size)

    def written(number: int) -> list[str] | None:
        shard = folder / f"shard-{number:05d}.txt"
        if shard.is_file():
            lines = shard.read_text(encoding="utf-8").split("\n")[:-1]
            if len(lines) == len(sources[starts[number]: starts[number] + d.shard_size]):
                return lines
        return None

    for number in ranks.share(len(starts)):
        if written(number) is not None:
            continue
        start, began = starts[number], time.time()
        chunk = sources[start: start + d.shard_size]
        results = translator.translate(chunk, beam_size=d.beam_size, nbest=nbest)
        if d.seq_inter:
            lines = [_closest_to_reference([t.text for t in n], ref)
                     for n, ref in zip(results, references[start: start + d.shard_size])]
        else:
            lines = [n[0].text for n in results]
        _write_lines(folder / f"shard-{number:05d}.txt", lines)
        log(f"distill: shard {number} ({len(chunk)} lines) in {time.time() - began:.1f} s "
            f"({len(chunk) / max(time.time() - began, 1e-9):.1f} sentences/s)")
    ranks.barrier()
    return [line for number in range(len(starts)) for line in written(number)]


def teacher_soft_targets(teacher: Seq2Seq, topk: int):
    """The Trainer's soft targets for word-level KD: the teacher's renormalized top-k distribution per target
    position, teacher forced on the reference: (ids, probabilities) [B, T, k]."""

    @torch.no_grad()
    def soft_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        top_logits, top_ids = teacher.logits(batch.src, batch.src_lengths, batch.tgt_in).float().topk(topk, dim=-1)
        return top_ids, torch.softmax(top_logits, dim=-1)

    return soft_targets


def _teacher(config: Config) -> tuple[Seq2Seq, Vocab, Config, torch.device]:
    """The teacher that config.distill names: model, vocabulary, config, and the device it was loaded on."""
    if not config.distill.teacher:
        raise NMTError("distill.teacher: name the teacher's run folder or checkpoint")
    device = parallel.device_for(config.train.device, parallel.ranks().local_rank, "train.device",
                                 "use --set train.device=cpu")
    return (*load_model(config.distill.teacher, device), device)


def _teachers(config: Config) -> tuple[DecoderStep, Vocab, Config, torch.device]:
    """The teacher, or the ensemble of it and distill.ensemble's models (the first one's decode settings), made
    ready for decoding only (prepacked products on CPU: the same translations, faster)."""
    teacher, vocab, teacher_config, device = _teacher(config)
    members = [("distill.teacher", decoding_step(teacher, device), vocab)]
    for path in config.distill.ensemble:
        model, other, _ = load_model(path, device)
        members.append((f"distill.ensemble {path}", decoding_step(model, device), other))
    return (*combine(members), teacher_config, device)


def distill_corpus(config: Config) -> dict[str, Any]:
    """Translate the training source with the teacher (resumable shards) and write the distilled corpus."""
    if config.data.train is None:
        raise NMTError("data.train: the training corpus to distil is needed")
    teacher, vocab, teacher_config, device = _teachers(config)
    files = config.distilled_corpus()
    folder = Path(files.src).parent
    table = load_parallel(config.data.train)
    # a source the student's length filter drops whatever the teacher writes is not worth translating
    all_sources, all_references = list(table["src"]), list(table["tgt"])
    pieces = [len(ids) for ids in vocab.encode_src([line.strip() for line in all_sources])]
    kept = [i for i, n in enumerate(pieces) if rejection(n, n, config.data) is None]
    sources, references = [all_sources[i] for i in kept], [all_references[i] for i in kept]
    began = time.time()
    translator = Translator(teacher, vocab, teacher_config.decode, device)
    targets = translate_shards(translator, sources, references, folder / "shards", config)
    summary = {"distilled_pairs": len(sources) * (2 if config.distill.keep_original else 1),
               "sources_too_short_or_long": len(pieces) - len(kept),
               "teacher": config.distill.teacher, "translate_s": round(time.time() - began, 1)}
    ranks = parallel.ranks()
    if ranks.rank == 0:  # the others wait for the corpus at the barrier
        src_lines, tgt_lines = list(sources), list(targets)
        if config.distill.keep_original:
            src_lines += sources
            tgt_lines += references
        _write_lines(Path(files.src), [s.replace("\n", " ") for s in src_lines])
        _write_lines(Path(files.tgt), tgt_lines)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    ranks.barrier()
    return summary


def student_trainer(config: Config, resume: bool = False) -> Trainer:
    """A Trainer for the student on the distilled corpus, in the teacher's vocabulary, with word-level KD from
    the teacher when distill.word_kd_weight > 0."""
    teacher, vocab, _, _ = _teacher(config)
    student_config = dataclasses.replace(config, data=dataclasses.replace(config.data, train=config.distilled_corpus()))
    trainer = Trainer(student_config, resume=resume, vocab=vocab)
    if config.distill.word_kd_weight > 0:
        trainer.soft_targets = teacher_soft_targets(teacher.train(False), config.distill.word_kd_topk)
        trainer.soft_target_weight = config.distill.word_kd_weight
    return trainer


def run_distill(config_path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                corpus_only: bool = False, config: Config | None = None) -> dict[str, Any]:
    """`nmt distill`: write the distilled corpus, then train the student on it (resuming if it was stopped)."""
    config = config or load_config(config_path, overrides)
    try:
        summary: dict[str, Any] = distill_corpus(config)
        if not corpus_only:
            resume = (Path(config.train.out_dir) / "checkpoints" / "last.pt").is_file()
            summary["student"] = student_trainer(config, resume).train()
        return summary
    finally:
        parallel.finish()
