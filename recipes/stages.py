"""stages.py — the stages of a recipe, in running order: prepare → vocab → teacher → evaluate_teacher →
evaluate_apertium → distill → student → evaluate_student → [baseline → evaluate_baseline] → evaluate_ensemble →
export → engines → translate_sample. Each is one small function registered with `@stage` (its upstream stages,
the inputs its fingerprint covers, the outputs that must exist); it calls library functions, never subprocesses
(Apertium aside), and raises Skip for a feature not built or not installed here. Adding a stage is one function
here."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from nmt.errors import NMTError
from recipes.run import (ROLES, SPLITS, TRAINING_LIMITS, RecipeRun, Skip, folder_bytes, optional_module, say, stage,
                         write_json)

EVAL_BEAM = 5
SAMPLE_LINES = 5  # test sentences translated by translate_sample when the recipe lists none


def _preparer_version(kind: str) -> str:
    if kind == "files":
        return ""
    return importlib.import_module(f"data.{kind}").PREPARATION_VERSION


@stage("prepare", inputs=lambda run: [dataclasses.asdict(run.recipe.corpus),
                                      _preparer_version(run.recipe.corpus.kind)],
       outputs=lambda run: run.corpus_files())
def prepare(run: RecipeRun) -> dict[str, Any]:
    corpus = run.recipe.corpus
    if corpus.kind == "files":
        from nmt.data import check_utf8

        missing = [path for path in run.corpus_files() if not path.is_file()]
        if missing:
            raise NMTError(f"corpus.dir: file not found: {missing[0]}")
        return {"counts": {split: check_utf8(run.corpus_file(split, 0)) for split in SPLITS}}
    if corpus.kind == "bible":
        from data.bible import prepare_bible

        manifest = prepare_bible(run.corpus_dir, modules_dir=corpus.modules_dir or None,
                                 extra_tgt_modules=corpus.extra_targets)
    else:
        from data.hub import prepare_hub

        manifest = prepare_hub(corpus.name, corpus.config or None, corpus.src_lang, corpus.tgt_lang, run.corpus_dir,
                               max_train=corpus.max_train, dev_split=corpus.dev_split, test_split=corpus.test_split)
    return {"counts": manifest["counts"], "version": manifest["version"]}


@stage("vocab", needs=("prepare",), inputs=lambda run: dataclasses.asdict(run.config("teacher").vocab),
       outputs=lambda run: [run.vocab_dir])
def vocab(run: RecipeRun) -> dict[str, Any]:
    """The joint (or separate) SentencePiece vocabulary, trained once and shared by teacher and student."""
    from nmt.data import load_training, source_tags
    from nmt.vocab import train_vocab

    config = run.config("teacher")
    table = load_training(config.data)
    trained = train_vocab(config.vocab, table["src"], table["tgt"], source_tags(config.data))
    shutil.rmtree(run.vocab_dir, ignore_errors=True)
    files = trained.save(run.vocab_dir)
    return {"pieces": {"src": trained.src_size, "tgt": trained.tgt_size}, "files": [f.name for f in files]}


@stage("teacher", needs=("prepare", "vocab"), inputs=lambda run: run.training_inputs("teacher"),
       limits=TRAINING_LIMITS, outputs=lambda run: [run.checkpoint("teacher")])
def teacher(run: RecipeRun) -> dict[str, Any]:
    return run.train("teacher")


@stage("evaluate_teacher", needs=("prepare", "teacher"), inputs=lambda run: run.evaluation_inputs("teacher"),
       outputs=lambda run: [run.dir / "eval" / "teacher.json"])
def evaluate_teacher(run: RecipeRun) -> dict[str, Any]:
    return run.evaluate("teacher", (EVAL_BEAM,))


APERTIUM_CODES = {"ca": "cat", "de": "deu", "en": "eng", "es": "spa", "eu": "eus", "fr": "fra", "gl": "glg",
                  "it": "ita", "nl": "nld", "pt": "por", "ro": "ron"}  # ISO 639-1 → Apertium's language codes


def apertium_pair(run: RecipeRun) -> str | None:
    """Apertium's name of the recipe's language pair (spa-eng for es → en), or None without codes for them."""
    src, tgt = (APERTIUM_CODES.get(lang) for lang in run.languages())
    return f"{src}-{tgt}" if src and tgt else None


@stage("evaluate_apertium", needs=("prepare",), inputs=lambda run: [apertium_pair(run),
                                                                    dataclasses.asdict(run.recipe.evaluate)],
       outputs=lambda run: [run.dir / "eval" / "apertium.json"] if run.status("evaluate_apertium") == "done" else [])
def evaluate_apertium(run: RecipeRun) -> dict[str, Any]:
    """The rule-based Apertium on the same test sentences, scored the same way: a baseline beside the models
    (Debian: apt-get install apertium apertium-eng-spa; skipped when it is not installed)."""
    from nmt.data import read_lines
    from nmt.evaluate import corpus_scores

    pair = apertium_pair(run)
    if shutil.which("apertium") is None or pair is None:
        raise Skip("Apertium is not installed (apt-get install apertium apertium-eng-spa)" if pair else
                   f"Apertium has no codes for {'-'.join(run.languages())} here")
    sources, references = (read_lines(run.corpus_file("test", side)) for side in (0, 1))
    if run.recipe.evaluate.max_sentences:
        sources, references = (lines[: run.recipe.evaluate.max_sentences] for lines in (sources, references))
    began = time.perf_counter()
    done = subprocess.run(["apertium", "-u", pair], input="".join(line + "\n" for line in sources),
                          capture_output=True, text=True, encoding="utf-8")
    wall = max(time.perf_counter() - began, 1e-9)
    hypotheses = done.stdout.splitlines()
    if done.returncode != 0 or len(hypotheses) != len(sources):
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise Skip(f"apertium -u {pair} failed ({reason}; {len(hypotheses)} lines for {len(sources)})")
    output = run.dir / "eval" / f"apertium.{run.languages()[1]}"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(line + "\n" for line in hypotheses), encoding="utf-8")
    scores = corpus_scores(hypotheses, [references])
    say(f"[evaluate_apertium] {pair}: BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}")
    decode = {"search": "rules", **{k: scores[k] for k in ("bleu", "chrf", "bleu_signature", "chrf_signature")},
              "hypotheses": output.name, "wall_s": round(wall, 3), "sentences_per_s": round(len(sources) / wall, 2),
              "threads": 1}
    result = {"model": f"apertium {pair}", "parameters": 0, "checkpoint_bytes": 0, "test_sentences": len(sources),
              "decodes": {"rules": decode}}
    write_json(run.dir / "eval" / "apertium.json", result)
    return result


def _distill_inputs(run: RecipeRun) -> Any:
    """What the distilled corpus depends on (besides the teacher): the training data, the student's length filter
    (sources it drops are not translated) and the distill section."""
    if run.recipe.student is None:
        return None
    config = run.config("student")
    return [dataclasses.asdict(config.data.train), config.data.min_len, config.data.max_len,
            dataclasses.asdict(config.distill)]


def _distill_outputs(run: RecipeRun) -> list[Path]:
    """The distilled corpus, where the student's config puts it."""
    if run.recipe.student is None:
        return []
    spec = run.config("student").distilled_corpus()
    return [Path(spec.src), Path(spec.tgt)]


@stage("distill", needs=("prepare", "vocab", "teacher"), inputs=_distill_inputs,
       outputs=_distill_outputs)
def distill(run: RecipeRun) -> dict[str, Any]:
    """The teacher's translations of the training sources (nmt.distill writes them in STUDENT/distill/)."""
    if run.recipe.student is None:
        raise Skip("the recipe has no student")
    module = optional_module("nmt.distill", "sequence-level distillation")
    if not run.resuming:  # shards of an interrupted attempt with the same inputs are kept, others are stale
        shutil.rmtree(_distill_outputs(run)[0].parent, ignore_errors=True)
    return module.distill_corpus(run.config("student"))


@stage("student", needs=("prepare", "vocab", "distill"), inputs=lambda run: run.training_inputs("student"),
       limits=TRAINING_LIMITS, outputs=lambda run: [run.checkpoint("student")])
def student(run: RecipeRun) -> dict[str, Any]:
    """The student on the distilled corpus; on the original corpus when distillation is not available."""
    if run.recipe.student is None:
        raise Skip("the recipe has no student")
    if run.status("distill") != "done":
        say("[student] no distilled corpus (see the distill stage): training on the original corpus")
        return {**run.train("student"), "distilled": False}
    # the distill stage wrote the corpus: rewriting it here would change that stage's outputs and fingerprint
    student_trainer = importlib.import_module("nmt.distill").student_trainer
    return {**run.train("student", student_trainer), "distilled": True}


def _evaluation_of(role: str, what: str) -> None:
    """Register `evaluate_<role>` for a model that may not have been trained (`what` names it in the skip): beam
    and greedy search on the test split, skipped when its training stage did not run."""

    @stage(f"evaluate_{role}", needs=("prepare", role), inputs=lambda run: run.evaluation_inputs(role),
           outputs=lambda run: [run.dir / "eval" / f"{role}.json"] if run.status(role) == "done" else [])
    def evaluate(run: RecipeRun) -> dict[str, Any]:
        if run.status(role) != "done":
            raise Skip(f"no {what} was trained")
        return run.evaluate(role, (EVAL_BEAM, 1))


_evaluation_of("student", "student")


@stage("baseline", needs=("prepare", "vocab"), inputs=lambda run: run.training_inputs("baseline"),
       limits=TRAINING_LIMITS, outputs=lambda run: [run.checkpoint("baseline")] if run.trains("baseline") else [])
def baseline(run: RecipeRun) -> dict[str, Any]:
    """The student's model trained on the original corpus: the comparison that shows what distillation adds."""
    if not run.trains("baseline"):
        raise Skip("the recipe asks for no baseline student")
    return run.train("baseline")


_evaluation_of("baseline", "baseline student")


def ensemble_members(run: RecipeRun) -> tuple[str, ...]:
    """The models the ensemble joins: the teacher and each student trained beside it."""
    return tuple(role for role in ROLES if run.trains(role) and run.status(role) == "done")


@stage("evaluate_ensemble", needs=("prepare", "teacher", "student", "baseline"),
       inputs=lambda run: [run.evaluation_inputs("teacher"), ensemble_members(run)],
       outputs=lambda run: [run.dir / "eval" / "ensemble.json"] if run.status("evaluate_ensemble") == "done" else [])
def evaluate_ensemble(run: RecipeRun) -> dict[str, Any]:
    """The teacher and its students as one model (their log-probabilities averaged inside one beam search,
    nmt.ensemble), beam 5, beside the single models; decoded once, as its speed is no deployment's."""
    members = ensemble_members(run)
    if len(members) < 2:
        raise Skip("no student was trained to join the teacher in an ensemble")
    return run.evaluate("ensemble", (EVAL_BEAM,), members, repeats=1)


@stage("export", needs=("teacher", "student"), inputs=lambda run: dataclasses.asdict(run.recipe.export),
       outputs=lambda run: [run.dir / "export"])
def export(run: RecipeRun) -> dict[str, Any]:
    """ONNX graphs (encoder + decoder step) of the deployed model, for ONNX Runtime on CPU."""
    module = optional_module("serving.export", "ONNX export")
    role, out = run.deployed_role(), run.dir / "export"
    shutil.rmtree(out, ignore_errors=True)
    result = module.run_export(str(run.model_dir(role)), str(out), tensorrt=False, fp16=False,
                               int8=run.recipe.export.int8)
    return {"model": role, "bytes": folder_bytes(out), "result": result}


@stage("engines", needs=("teacher", "student"), inputs=lambda run: dataclasses.asdict(run.recipe.export),
       outputs=lambda run: [run.dir / "engines"])
def engines(run: RecipeRun) -> dict[str, Any]:
    """TensorRT engine plans of the deployed model, where TensorRT and a CUDA device are present."""
    import torch

    if not run.recipe.export.tensorrt:
        raise Skip("export.tensorrt is false")
    if importlib.util.find_spec("tensorrt") is None:
        raise Skip("TensorRT is not installed")
    if not torch.cuda.is_available():
        raise Skip("TensorRT engines need a CUDA device")
    module = optional_module("serving.export", "TensorRT engine building")
    role, out = run.deployed_role(), run.dir / "engines"
    shutil.rmtree(out, ignore_errors=True)
    result = module.run_export(str(run.model_dir(role)), str(out), tensorrt=True, fp16=run.recipe.export.fp16)
    return {"model": role, "bytes": folder_bytes(out), "result": result}


def _sample_model(run: RecipeRun) -> tuple[str, str]:
    """(model, backend): the ONNX export under ONNX Runtime when both exist, else the deployed torch model."""
    if run.status("export") == "done" and importlib.util.find_spec("onnxruntime"):
        return str(run.dir / "export"), "onnxruntime"
    return str(run.model_dir(run.deployed_role())), "torch"


@stage("translate_sample", needs=("export", "teacher", "student"), inputs=lambda run: list(run.recipe.sample),
       outputs=lambda run: [run.dir / "sample.txt", run.dir / "attention"])
def translate_sample(run: RecipeRun) -> dict[str, Any]:
    """A smoke test of the deployed model: a few sentences through the deployment backend, with the attention
    map of each (attention/sample-NN.png)."""
    from serving.backends import open_translator
    from nmt.data import read_lines
    from nmt.plots import plot_attention

    lines = list(run.recipe.sample) or read_lines(run.corpus_file("test", 0))[:SAMPLE_LINES]
    model, backend = _sample_model(run)
    translator = open_translator(model, backend, "cpu")
    best = [nbest[0] for nbest in translator.translate(lines, alignments=True, beam_size=EVAL_BEAM)]
    outputs = [translation.text for translation in best]
    (run.dir / "sample.txt").write_text("".join(f"{s}\t{t}\n" for s, t in zip(lines, outputs)), encoding="utf-8")
    (run.dir / "attention").mkdir(exist_ok=True)
    for number, (source, translation) in enumerate(zip(lines, best), start=1):
        say(f"  {source}\n  → {translation.text}")
        if translation.attention is not None and translation.attention.numel():
            plot_attention(translation.attention, translation.source_pieces, translation.target_pieces,
                           run.dir / "attention" / f"sample-{number:02d}.png")
    return {"backend": backend, "model": os.path.relpath(model, run.dir), "translations": list(zip(lines, outputs))}
