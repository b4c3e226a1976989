"""Knowledge distillation on the toy task: the distilled corpus, the student, resumable shards, word-level KD."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import toy_config
from nmt.checkpoint import load_model
from nmt.distill import run_distill
from nmt.errors import NMTError
from nmt.evaluate import bleu
from nmt.translate import Translator

STUDENT = {"embed_dim": 16, "encoder_hidden": 32, "decoder_hidden": 48, "attention_dim": 16, "dropout": 0.0}


def student_config(toy_corpus: Path, toy_run: Path, out: Path, **distill):
    return toy_config(toy_corpus, out, model=STUDENT, train={"max_steps": 500, "lr": 0.005},
                      distill={"teacher": str(toy_run), "beam_size": 3, "shard_size": 700, **distill})


@pytest.fixture(scope="module")
def distilled(toy_corpus, toy_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "run"
    return out, run_distill(config=student_config(toy_corpus, toy_run, out))


def test_distilled_corpus_equals_the_teachers_translations(distilled, toy_corpus, toy_run):
    out, summary = distilled
    sources = (toy_corpus / "train.src").read_text().splitlines()
    assert (out / "distill/train.src").read_text().splitlines() == sources
    model, vocab, config = load_model(toy_run)
    teacher = Translator(model, vocab, config.decode)
    targets = (out / "distill/train.tgt").read_text().splitlines()
    assert len(targets) == len(sources) == summary["distilled_pairs"]
    for i in range(0, len(sources), 150):
        assert targets[i] == teacher.translate([sources[i]], beam_size=3)[0][0].text
    assert len(list((out / "distill/shards").glob("shard-*.txt"))) == 5


def test_student_trained_on_the_distilled_corpus_learns_the_task(distilled, toy_corpus):
    out, summary = distilled
    student, vocab, config = load_model(out)
    teacher_params = summary["student"]["parameters"]
    assert teacher_params == student.parameter_count()
    src = (toy_corpus / "test.src").read_text().splitlines()
    ref = (toy_corpus / "test.tgt").read_text().splitlines()
    hyps = [n[0].text for n in Translator(student, vocab, config.decode).translate(src, beam_size=1)]
    assert bleu(hyps, ref) >= 80.0
    assert (out / "vocab/spm.model").read_bytes() == vocab.src_model  # the teacher's vocabulary


def test_killed_distillation_resumes_without_redoing_finished_shards(toy_corpus, toy_run, tmp_path):
    config = student_config(toy_corpus, toy_run, tmp_path / "run", shard_size=1000)
    run_distill(config=config, corpus_only=True)
    shards = sorted((tmp_path / "run/distill/shards").glob("shard-*.txt"))
    assert len(shards) == 3
    # Simulate a kill during shard 2: it is gone (or half-written to its temporary name), the others stay.
    kept = {p: p.stat().st_mtime_ns for p in shards[:2]}
    shards[2].unlink()
    (shards[2].parent / f".{shards[2].name}.tmp").write_text("partial\n")
    run_distill(config=config, corpus_only=True)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())
    assert len(shards[2].read_text().splitlines()) == 1000
    assert len((tmp_path / "run/distill/train.tgt").read_text().splitlines()) == 3000


def test_sources_the_students_length_filter_drops_are_not_translated(toy_corpus, toy_run, tmp_path):
    config = student_config(toy_corpus, toy_run, tmp_path / "run")
    _, vocab, _ = load_model(toy_run)
    sources = (toy_corpus / "train.src").read_text().splitlines()
    pieces = [len(ids) for ids in vocab.encode_src(sources)]
    limit = sorted(pieces)[len(pieces) // 2]  # about half the sources are longer
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, max_len=limit))
    summary = run_distill(config=config, corpus_only=True)
    kept = [s for s, n in zip(sources, pieces) if n <= limit]
    assert 0 < len(kept) < len(sources)
    assert (tmp_path / "run/distill/train.src").read_text().splitlines() == kept
    assert len((tmp_path / "run/distill/train.tgt").read_text().splitlines()) == len(kept)
    assert summary["distilled_pairs"] == len(kept) and summary["sources_too_short_or_long"] == len(sources) - len(kept)


def test_seq_inter_and_keep_original_build_the_corpus_from_n_best_and_references(toy_corpus, toy_run, tmp_path):
    config = student_config(toy_corpus, toy_run, tmp_path / "run", seq_inter=True, nbest=3, keep_original=True)
    summary = run_distill(config=config, corpus_only=True)
    assert summary["distilled_pairs"] == 6000
    targets = (tmp_path / "run/distill/train.tgt").read_text().splitlines()
    refs = (toy_corpus / "train.tgt").read_text().splitlines()
    assert targets[3000:] == refs
    assert bleu(targets[:3000], refs) >= 90.0  # closest-to-reference picks from a good teacher's n-best


def test_word_level_kd_trains_a_student_with_the_teachers_distribution(toy_corpus, toy_run, tmp_path):
    config = toy_config(toy_corpus, tmp_path / "run", model=STUDENT, train={"max_steps": 40, "valid_every": 20},
                        distill={"teacher": str(toy_run), "word_kd_weight": 0.5, "word_kd_topk": 4})
    summary = run_distill(config=config)
    assert summary["student"]["steps"] == 40
    losses = [line for line in (tmp_path / "run/train.log").read_text().splitlines() if "validation at" in line]
    assert len(losses) == 2


def test_distill_without_a_teacher_is_a_one_line_error(toy_corpus, tmp_path):
    with pytest.raises(NMTError, match="distill.teacher"):
        run_distill(config=toy_config(toy_corpus, tmp_path / "run"))


def test_distillation_under_torchrun_writes_one_process_s_corpus(distilled, toy_corpus, toy_run, tmp_path):
    import yaml

    from test_cli import torchrun

    config = student_config(toy_corpus, toy_run, tmp_path / "run")
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(config.to_dict()))
    result = torchrun("distill", "student.yaml", "--corpus-only", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    single, _ = distilled
    for name in ("train.src", "train.tgt"):
        assert (tmp_path / "run/distill" / name).read_text() == (single / "distill" / name).read_text()


def test_a_teacher_ensemble_of_one_model_twice_distils_that_model_s_corpus(distilled, toy_corpus, toy_run, tmp_path):
    config = student_config(toy_corpus, toy_run, tmp_path / "run", ensemble=[str(toy_run)])
    run_distill(config=config, corpus_only=True)
    single, _ = distilled
    assert (tmp_path / "run/distill/train.tgt").read_text() == (single / "distill/train.tgt").read_text()


def test_the_teachers_decode_with_prepacked_products(toy_corpus, toy_run, tmp_path):
    import torch

    from nmt.distill import _teachers
    from nmt.inference import packed_linear

    if packed_linear(torch.zeros(4, 4), None) is None:
        pytest.skip("this torch has no oneDNN linear")
    ensemble = _teachers(student_config(toy_corpus, toy_run, tmp_path / "run", ensemble=[str(toy_run)]))[0]
    assert [member.decoder.logits.__name__ for member in ensemble.members] == ["packed_product"] * 2
