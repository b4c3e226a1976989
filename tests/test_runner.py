"""Tests for the recipe runner (recipes/runner.py, run.py, stages.py, summary.py): stages run once, are skipped
while current, rerun when their inputs change, resume after a kill; features not built are skipped; the summary
files and the plot are written."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import shutil
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml

from nmt.distill import student_trainer
from nmt.errors import NMTError
from nmt.train import Trainer
from recipes.runner import STAGES, load_recipe, run_recipe, select_stages
from recipes.run import RecipeRun
from conftest import TINY_MODEL

OPTIONAL_MODULES = ("nmt.distill", "serving.export", "onnxruntime")


def recipe_values(corpus: Path) -> dict:
    return {
        "description": "toy reversal task",
        "run_dir": "run",
        "corpus": {"kind": "files", "dir": str(corpus), "src_lang": "src", "tgt_lang": "tgt"},
        "teacher": {
            "vocab": {"size": 20},
            "model": dict(TINY_MODEL),
            "train": {"batch_tokens": 1000, "lr": 0.004, "max_steps": 20, "valid_every": 10, "log_every": 5,
                      "label_smoothing": 0.0, "progress": False},
            "decode": {"batch_size": 50},
        },
        "student": {"model": {"embed_dim": 16, "encoder_hidden": 32, "decoder_hidden": 32, "attention_dim": 16},
                    "train": {"max_steps": 10}},
        "evaluate": {"max_sentences": 40},
    }


def write_recipe(folder: Path, values: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def hide_optional_modules(patch: pytest.MonkeyPatch) -> None:
    """Make distillation and export look unbuilt, whatever exists in the working tree."""
    for name in OPTIONAL_MODULES:
        patch.setitem(sys.modules, name, None)


def stage_lines(text: str) -> dict[str, str]:
    """{stage: what the runner said first about it}: 'current, skipped', 'running', 'resuming'."""
    said = {}
    for line in text.splitlines():
        if line.startswith("[") and "]" in line:
            name, _, rest = line[1:].partition("] ")
            said.setdefault(name, rest)
    return said


def state_of(folder: Path) -> dict:
    return json.loads((folder / "run" / "state.json").read_text())["stages"]


@pytest.fixture(scope="module")
def finished_run(toy_corpus, tmp_path_factory) -> Path:
    """A toy recipe run once end to end (distillation and export hidden); tests work on copies."""
    folder = tmp_path_factory.mktemp("recipe")
    write_recipe(folder, recipe_values(toy_corpus))
    with pytest.MonkeyPatch.context() as patch:
        hide_optional_modules(patch)
        run_recipe(folder / "recipe.yaml")
    return folder


@pytest.fixture
def run_copy(finished_run, tmp_path, monkeypatch) -> Path:
    hide_optional_modules(monkeypatch)
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    return copy


def test_first_run_runs_every_stage_and_skips_unbuilt_features(finished_run):
    state = state_of(finished_run)
    assert list(state) == list(STAGES)
    done = {"prepare", "vocab", "teacher", "evaluate_teacher", "student", "evaluate_student", "evaluate_ensemble",
            "translate_sample"}
    assert {name for name, record in state.items() if record["status"] == "done"} == done
    assert "nmt.distill" in state["distill"]["message"]
    assert "serving.export" in state["export"]["message"]
    assert state["engines"]["status"] == "skipped"
    assert state["baseline"]["status"] == state["evaluate_baseline"]["status"] == "skipped"
    assert state["student"]["result"]["distilled"] is False
    assert sorted(p.name for p in (finished_run / "run" / "vocab").iterdir()) == ["spm.model"]


def test_summary_files_and_plot_are_written(finished_run):
    run = finished_run / "run"
    summary = json.loads((run / "summary.json").read_text())
    teacher, student = summary["models"]["teacher"], summary["models"]["student"]
    assert set(teacher["decodes"]) == {"beam5"} and set(student["decodes"]) == {"beam5", "beam1"}
    assert teacher["parameters"] > student["parameters"] > 0
    assert teacher["checkpoint_bytes"] > 0 and teacher["test_sentences"] == 40
    speed = student["decodes"]["beam1"]
    assert speed["sentences_per_s"] > 0 and speed["threads"] >= 1
    assert len(speed["runs_s"]) == 3 and speed["wall_s"] == sorted(speed["runs_s"])[1]  # the median of 3 decodes
    assert 0 <= teacher["decodes"]["beam5"]["bleu"] <= 100
    assert len((run / "eval" / "student.beam1.tgt").read_text().splitlines()) == 40
    assert summary["stages"]["teacher"]["wall_s"] > 0
    assert summary["total_wall_s"] == pytest.approx(sum(s["wall_s"] or 0 for s in summary["stages"].values()), abs=1)
    speedup = summary["distillation"]["student_greedy_speedup_over_teacher_beam5"]
    assert speedup == pytest.approx(speed["sentences_per_s"] / teacher["decodes"]["beam5"]["sentences_per_s"], rel=0.01)
    markdown = (run / "summary.md").read_text()
    assert "| teacher | beam 5 |" in markdown and "| student | greedy |" in markdown
    assert "student greedy vs teacher beam 5:" in markdown and "| total |" in markdown
    assert (run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((run / "sample.txt").read_text().splitlines()) == 5
    plots = sorted((run / "attention").glob("*.png"))  # one per sample line that gave output tokens
    assert plots and {p.name for p in plots} <= {f"sample-{i:02d}.png" for i in range(1, 6)}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_the_ensemble_of_teacher_and_student_is_evaluated_beside_them(finished_run, toy_corpus):
    from serving.backends import open_translator

    run = finished_run / "run"
    models = json.loads((run / "summary.json").read_text())["models"]
    ensemble = models["ensemble"]
    assert ensemble["members"] == ["teacher", "student"] and set(ensemble["decodes"]) == {"beam5"}
    assert ensemble["parameters"] == models["teacher"]["parameters"] + models["student"]["parameters"]
    assert len(ensemble["decodes"]["beam5"]["runs_s"]) == 1  # decoded once: its speed is no deployment's
    sources = (toy_corpus / "test.src").read_text().splitlines()[:40]  # evaluate.max_sentences
    translator = open_translator([str(run / "teacher"), str(run / "student")])
    expected = [nbest[0].text for nbest in translator.translate(sources, beam_size=5)]
    assert (run / "eval" / "ensemble.beam5.tgt").read_text().splitlines() == expected
    assert "| ensemble | beam 5 |" in (run / "summary.md").read_text()


def test_rerun_skips_every_current_stage(run_copy, monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "train", lambda self: pytest.fail("a current stage trained again"))
    before = state_of(run_copy)
    run_recipe(run_copy / "recipe.yaml")
    said = stage_lines(capsys.readouterr().err)
    unbuilt = {"distill", "export", "engines", "baseline", "evaluate_baseline", "evaluate_apertium"}  # skipped: checked again
    assert {name for name, what in said.items() if what == "current, skipped"} == set(STAGES) - unbuilt
    after = state_of(run_copy)
    assert all(after[name]["fingerprint"] == before[name]["fingerprint"] for name in STAGES)


def test_baseline_student_is_trained_on_the_original_corpus_and_reported(run_copy, toy_corpus, capsys):
    values = recipe_values(toy_corpus)
    values["baseline"] = True
    write_recipe(run_copy, values)
    run_recipe(run_copy / "recipe.yaml")
    said = stage_lines(capsys.readouterr().err)
    assert said["baseline"] == said["evaluate_baseline"] == said["evaluate_ensemble"] == "running"
    assert said["teacher"] == said["student"] == "current, skipped"
    run = run_copy / "run"
    baseline = json.loads((run / "summary.json").read_text())["models"]["baseline"]
    assert set(baseline["decodes"]) == {"beam5", "beam1"}
    assert baseline["parameters"] == json.loads((run / "summary.json").read_text())["models"]["student"]["parameters"]
    assert (run / "baseline" / "checkpoints" / "best.pt").is_file()
    assert json.loads((run / "summary.json").read_text())["models"]["ensemble"]["members"] == [
        "teacher", "student", "baseline"]
    assert "| baseline | greedy |" in (run / "summary.md").read_text()
    figures = json.loads((run / "summary.json").read_text())["distillation"]
    student = json.loads((run / "summary.json").read_text())["models"]["student"]
    assert figures["student_minus_baseline_bleu_greedy"] == pytest.approx(
        student["decodes"]["beam1"]["bleu"] - baseline["decodes"]["beam1"]["bleu"], abs=0.01)


def test_changed_student_config_reruns_only_affected_stages(run_copy, toy_corpus, capsys):
    values = recipe_values(toy_corpus)
    values["student"]["train"]["lr"] = 0.003
    write_recipe(run_copy, values)
    run_recipe(run_copy / "recipe.yaml")
    said = stage_lines(capsys.readouterr().err)
    current = {name for name, what in said.items() if what == "current, skipped"}
    assert current == {"prepare", "vocab", "teacher", "evaluate_teacher"}
    assert said["student"] == "running"
    result = state_of(run_copy)["student"]["result"]
    assert result["steps"] == 10 and result["resumed_from_step"] is None


def test_raised_step_limit_extends_the_finished_training(run_copy, toy_corpus, capsys):
    before = state_of(run_copy)["student"]
    values = recipe_values(toy_corpus)
    values["student"]["train"]["max_steps"] = 14
    write_recipe(run_copy, values)
    run_recipe(run_copy / "recipe.yaml")
    said = stage_lines(capsys.readouterr().err)
    assert said["student"] == "extending" and said["evaluate_student"] == "running"
    record = state_of(run_copy)["student"]
    assert record["result"]["resumed_from_step"] == 10 and record["result"]["steps"] == 14
    assert record["limits"] == {"train.max_steps": 14, "train.max_epochs": 20}
    assert record["wall_s"] >= before["wall_s"]  # the run it extends counts too
    metrics = [json.loads(line) for line in (run_copy / "run" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "valid_bleu" in m] == [10, 14]

    values["student"]["train"]["max_steps"] = 12  # fewer steps than trained: start over
    write_recipe(run_copy, values)
    run_recipe(run_copy / "recipe.yaml", end="student")
    assert stage_lines(capsys.readouterr().err)["student"] == "running"
    assert state_of(run_copy)["student"]["result"]["resumed_from_step"] is None


def test_records_without_limits_gain_them_when_current(run_copy, toy_corpus, monkeypatch, capsys):
    """A run folder from before limits were recorded: stages stay current, then a raised limit extends."""
    state = json.loads((run_copy / "run" / "state.json").read_text())
    for record in state["stages"].values():
        for key in ("unlimited_fingerprint", "limits"):
            record.pop(key, None)
    (run_copy / "run" / "state.json").write_text(json.dumps(state))
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train", lambda self: pytest.fail("a current stage trained again"))
        run_recipe(run_copy / "recipe.yaml", end="student")
    said = stage_lines(capsys.readouterr().err)
    assert said["teacher"] == said["student"] == "current, skipped"
    assert state_of(run_copy)["teacher"]["limits"] == {"train.max_steps": 20, "train.max_epochs": 20}
    values = recipe_values(toy_corpus)
    values["teacher"]["train"]["max_steps"] = 30
    write_recipe(run_copy, values)
    run_recipe(run_copy / "recipe.yaml", end="teacher")
    assert stage_lines(capsys.readouterr().err)["teacher"] == "extending"
    assert state_of(run_copy)["teacher"]["result"]["steps"] == 30


def test_changed_decoding_reruns_only_evaluation(run_copy, toy_corpus, monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "train", lambda self: pytest.fail("decoding settings retrained a model"))
    values = recipe_values(toy_corpus)
    values["teacher"]["decode"]["length_penalty"] = 0.6  # the student inherits the teacher's decoding
    write_recipe(run_copy, values)
    run_recipe(run_copy / "recipe.yaml", end="evaluate_student")
    said = stage_lines(capsys.readouterr().err)
    assert said["evaluate_teacher"] == said["evaluate_student"] == "running"
    assert said["teacher"] == said["student"] == "current, skipped"


def test_killed_teacher_resumes_from_last_checkpoint(toy_corpus, tmp_path, monkeypatch):
    hide_optional_modules(monkeypatch)
    recipe = write_recipe(tmp_path, recipe_values(toy_corpus))
    original_step = Trainer.step

    def dies_at_step_15(self, batch):
        if self.progress.step == 15:
            raise RuntimeError("killed")
        return original_step(self, batch)

    monkeypatch.setattr(Trainer, "step", dies_at_step_15)
    with pytest.raises(RuntimeError, match="killed"):
        run_recipe(recipe, end="teacher")
    record = state_of(tmp_path)["teacher"]
    assert record["status"] == "started" and "killed" in record["error"] and record["wall_s"] > 0
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    state["stages"]["teacher"]["wall_s"] = 1000.0  # as if the killed attempt had trained for a long time
    (tmp_path / "run" / "state.json").write_text(json.dumps(state))
    monkeypatch.setattr(Trainer, "step", original_step)
    run_recipe(recipe, end="teacher")
    record = state_of(tmp_path)["teacher"]
    assert record["result"]["resumed_from_step"] == 10 and record["result"]["steps"] == 20
    assert 1000 < record["wall_s"] < 1100  # the killed attempt's time counts
    metrics = [json.loads(line) for line in (tmp_path / "run" / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "valid_bleu" in m] == [10, 20]


def test_a_terminated_stage_records_its_time_and_its_rerun_carries_it(run_copy, monkeypatch):
    evaluate = STAGES["evaluate_teacher"]

    def terminated(run):
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises in here
        pytest.fail("SIGTERM did not stop the stage")

    monkeypatch.setitem(STAGES, "evaluate_teacher", dataclasses.replace(evaluate, run=terminated))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        run_recipe(run_copy / "recipe.yaml", start="evaluate_teacher", end="evaluate_teacher", force=True)
    assert signal.getsignal(signal.SIGTERM) == handler  # the runner's handler is gone again
    killed = state_of(run_copy)["evaluate_teacher"]
    assert killed["status"] == "started" and killed["error"].startswith("KeyboardInterrupt")
    assert 0.3 <= killed["wall_s"] < 5
    monkeypatch.setitem(STAGES, "evaluate_teacher", evaluate)
    run_recipe(run_copy / "recipe.yaml", start="evaluate_teacher", end="evaluate_teacher")
    record = state_of(run_copy)["evaluate_teacher"]
    assert record["status"] == "done" and record["wall_s"] >= killed["wall_s"]  # the killed attempt's time counts


def test_built_distillation_and_export_are_called(run_copy, toy_corpus, monkeypatch, capsys):
    calls = []

    def distill_corpus(config):
        """Like nmt.distill's, without the teacher's time: the corpus goes to STUDENT/distill/."""
        calls.append(("distill", config.distill.teacher))
        files = config.distilled_corpus()
        Path(files.src).parent.mkdir(parents=True)
        shutil.copy(toy_corpus / "train.src", files.src)
        shutil.copy(toy_corpus / "train.tgt", files.tgt)
        return {"distilled_pairs": 3000}

    def trainer(config, resume):
        calls.append(("student", config.distill.teacher))
        return student_trainer(config, resume)

    def run_export(model, out, tensorrt=False, fp16=False, int8=False):
        calls.append(("export", Path(model).name, tensorrt))
        Path(out).mkdir(parents=True)
        (Path(out) / "model.json").write_text("{}")

    monkeypatch.setitem(sys.modules, "nmt.distill", types.SimpleNamespace(distill_corpus=distill_corpus,
                                                                       student_trainer=trainer))
    monkeypatch.setitem(sys.modules, "serving.export", types.SimpleNamespace(run_export=run_export))
    run_recipe(run_copy / "recipe.yaml")
    teacher_dir = str(run_copy / "run" / "teacher")
    assert calls == [("distill", teacher_dir), ("student", teacher_dir), ("export", "student", False)]
    state = state_of(run_copy)
    assert state["distill"]["result"] == {"distilled_pairs": 3000}
    assert state["student"]["result"]["distilled"] is True
    assert state["export"]["result"]["model"] == "student" and state["export"]["result"]["bytes"] == 2
    assert state["translate_sample"]["result"]["backend"] == "torch"  # onnxruntime stays hidden
    capsys.readouterr()
    run_recipe(run_copy / "recipe.yaml")
    said = stage_lines(capsys.readouterr().err)
    assert {name for name, what in said.items() if what != "current, skipped"} == {
        "engines", "baseline", "evaluate_baseline", "evaluate_apertium"}  # skipped stages are checked again
    assert len(calls) == 3


def test_recipe_mistakes_are_one_line_errors(toy_corpus, tmp_path):
    values = recipe_values(toy_corpus)
    values["teacher"]["data"] = {"train": {"src": "x", "tgt": "y"}}
    with pytest.raises(NMTError, match="teacher.data.train: set by the runner"):
        load_recipe(write_recipe(tmp_path, values))
    values = recipe_values(toy_corpus)
    values["teacher"]["model"]["hidden"] = 3
    with pytest.raises(NMTError, match="teacher: model.hidden: unknown key"):
        load_recipe(write_recipe(tmp_path, values))
    values = recipe_values(toy_corpus)
    values["corpus"]["kind"] = "ftp"
    with pytest.raises(NMTError, match="corpus.kind"):
        load_recipe(write_recipe(tmp_path, values))
    values = recipe_values(toy_corpus)
    values["evaluate"]["speed_repeats"] = 0
    with pytest.raises(NMTError, match="speed_repeats >= 1"):
        load_recipe(write_recipe(tmp_path, values))
    values = recipe_values(toy_corpus)
    values["corpus"]["extra_targets"] = ["engKJV2006eb"]
    with pytest.raises(NMTError, match="corpus.extra_targets: only a bible corpus"):
        load_recipe(write_recipe(tmp_path, values))
    values["corpus"] = {"kind": "bible", "extra_targets": "engKJV2006eb"}
    with pytest.raises(NMTError, match="corpus.extra_targets: must be a list of names"):
        load_recipe(write_recipe(tmp_path, values))
    with pytest.raises(NMTError, match="--from bake: unknown stage"):
        select_stages("bake", None)
    assert select_stages("student", "export") == ["student", "evaluate_student", "baseline", "evaluate_baseline",
                                                  "evaluate_ensemble", "export"]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.teacher["model"] and recipe.student is not None
    assert recipe.corpus.kind in ("bible", "hub")


def test_apertium_is_scored_beside_the_models_on_the_same_test_sentences(toy_corpus, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "dev", "test"):
        shutil.copy(toy_corpus / f"{split}.src", corpus / f"{split}.es")
        shutil.copy(toy_corpus / f"{split}.tgt", corpus / f"{split}.en")
    bin_dir = tmp_path / "bin"  # a stand-in for Debian's apertium: reverses each line's words, as the toy task
    bin_dir.mkdir()
    (bin_dir / "apertium").write_text(f"#!{sys.executable}\nimport sys\nassert sys.argv[1:] == ['-u', 'spa-eng']\n"
                                      "for line in sys.stdin:\n    print(' '.join(reversed(line.split())))\n")
    (bin_dir / "apertium").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    values = recipe_values(corpus)
    values["corpus"] = {"kind": "files", "dir": str(corpus), "src_lang": "es", "tgt_lang": "en"}
    path = write_recipe(tmp_path / "recipe", values)
    run_recipe(path, end="prepare")
    summary = run_recipe(path, start="evaluate_apertium", end="evaluate_apertium")
    apertium = summary["models"]["apertium"]
    assert apertium["test_sentences"] == 40 and apertium["decodes"]["rules"]["bleu"] == 100.0
    assert "| apertium | rules | 100.00 |" in (tmp_path / "recipe" / "run" / "summary.md").read_text()
    monkeypatch.setenv("PATH", "/nonexistent")
    state = json.loads((tmp_path / "recipe" / "run" / "state.json").read_text())["stages"]
    assert state["evaluate_apertium"]["status"] == "done"
    run_recipe(path, start="evaluate_apertium", end="evaluate_apertium", force=True)
    state = json.loads((tmp_path / "recipe" / "run" / "state.json").read_text())["stages"]
    assert state["evaluate_apertium"]["status"] == "skipped" and "not installed" in state["evaluate_apertium"]["message"]


def test_student_fine_tuned_from_the_teacher_starts_from_its_weights(run_copy, toy_corpus):
    values = recipe_values(toy_corpus)
    values["student"] = {"train": {"init_from": "teacher", "lr": 1e-9, "max_steps": 1, "valid_every": 1}}
    write_recipe(run_copy, values)
    run_recipe(run_copy / "recipe.yaml")
    load = lambda role: torch.load(run_copy / "run" / role / "checkpoints" / "best.pt", weights_only=True)["model"]
    teacher, student = load("teacher"), load("student")
    assert teacher.keys() == student.keys()
    for name in teacher:
        torch.testing.assert_close(student[name], teacher[name], atol=1e-6, rtol=0)
    values["student"] = {"model": {"decoder_hidden": 48}, "train": {"init_from": "teacher", "max_steps": 2}}
    write_recipe(run_copy, values)
    with pytest.raises(NMTError, match="init_from: .* another shape"):
        run_recipe(run_copy / "recipe.yaml")


def test_a_second_reference_trains_the_teacher_only_tagged_and_leaves_old_fingerprints_alone(toy_corpus, tmp_path):
    values = recipe_values(toy_corpus)
    values["corpus"] = {"kind": "bible", "extra_targets": ["engKJV2006eb"]}
    run = RecipeRun(load_recipe(write_recipe(tmp_path, values)))
    (extra,) = run.config("teacher").data.extra_train
    assert extra.src_prefix == "<engKJV2006eb>"
    assert (extra.src, extra.tgt) == tuple(str(run.corpus_dir / f"train-engKJV2006eb.{lang}") for lang in ("es", "en"))
    assert run.config("student").data.extra_train == ()
    assert run.corpus_dir / "train-engKJV2006eb.en" in run.corpus_files()
    # a key added later, at its default, leaves the fingerprints recorded before it unchanged
    assert run._digest({"kind": "bible", "extra_targets": []}) == run._digest({"kind": "bible"})
    assert run._digest({"kind": "bible", "extra_targets": ["engKJV2006eb"]}) != run._digest({"kind": "bible"})
