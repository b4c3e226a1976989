"""runner.py — the stage runner behind `nmt recipe`: prepare → vocab → teacher → evaluate_teacher → distill →
student → evaluate_student → [baseline → evaluate_baseline] → export → engines → translate_sample, each a small
function registered in STAGES.

A stage records the fingerprint of its inputs (config sections, upstream outputs' sizes and mtimes) in
RUN_DIR/state.json and is skipped while current, so a rerun after a kill resumes (training from last.pt). A
training stage whose only change is a raised limit (train.max_steps, train.max_epochs) trains on from the
last.pt of its finished run instead of starting over. Stages call library functions, never subprocesses; a
feature not built or not installed here is skipped, not failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any


from nmt.config import Config, config_from_dict, read_yaml
from nmt.data import write_atomic
from nmt.errors import NMTError

SPLITS = ("train", "dev", "test")
ROLES = ("teacher", "student", "baseline")  # the models a recipe may train
EVAL_BEAM = 5
SAMPLE_LINES = 5  # test sentences translated by translate_sample when the recipe lists none
CORPUS_KINDS = ("bible", "hub", "files")
MODEL_SECTIONS = {"teacher": ("data", "vocab", "model", "train", "decode"),
                  "student": ("data", "model", "train", "decode")}  # the student shares the teacher's vocab
RUNNER_SET = {"data": ("train", "dev", "test"), "train": ("out_dir",)}  # keys the runner fills in
TRAINING_LIMITS = ("train.max_steps", "train.max_epochs")  # raising one continues a finished training stage
TRAINING_FILES = ("checkpoints", "vocab", "tensorboard", "metrics.jsonl", "train.log", "config.yaml")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the recipe file -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSection:
    """Where the parallel corpus comes from: the SWORD Bible, a hub dataset, or already prepared files."""

    kind: str = ""  # bible, hub or files
    dir: str = ""  # files: a folder holding {train,dev,test}.{src_lang,tgt_lang}
    modules_dir: str = ""  # bible: the SWORD folder (default /usr/share/sword)
    name: str = ""  # hub: a dataset name, or a local folder (save_to_disk or parquet files)
    config: str = ""  # hub: the dataset's config
    src_lang: str = ""  # hub and files
    tgt_lang: str = ""
    max_train: int = 0  # hub: keep at most this many training pairs (0 = all)
    dev_split: str = "validation"  # hub: carved from train when the dataset lacks it
    test_split: str = "test"


@dataclass(frozen=True)
class EvaluateSection:
    max_sentences: int = 0  # score only the first N test sentences (0 = all)
    speed_repeats: int = 3  # decode the test sentences this many times; sentences/s is the median run's


@dataclass(frozen=True)
class ExportSection:
    model: str = "student"  # student or teacher; the teacher when no student was trained
    int8: bool = False  # also a dynamically quantized int8 copy for CPU
    tensorrt: bool = True  # build TensorRT engines when TensorRT and a CUDA device are present
    fp16: bool = False  # float16 engines


@dataclass(frozen=True)
class Recipe:
    path: Path
    run_dir: Path
    corpus: CorpusSection
    teacher: dict[str, dict[str, Any]]  # `nmt train` config sections; data splits and out_dir come from the runner
    student: dict[str, dict[str, Any]] | None
    distill: dict[str, Any]
    evaluate: EvaluateSection
    export: ExportSection
    sample: tuple[str, ...]
    baseline: bool = False  # also train the student on the original corpus, to measure what distillation adds

    def sections(self, role: str) -> dict[str, dict[str, Any]]:
        """A model's config sections; the student's (and its baseline's) are the teacher's updated key by key."""
        if role == "teacher" or self.student is None:
            return self.teacher
        names = set(self.teacher) | set(self.student)
        return {name: {**self.teacher.get(name, {}), **self.student.get(name, {})} for name in names}


RECIPE_KEYS = ("description", "run_dir", "corpus", "teacher", "student", "distill", "evaluate", "export", "sample",
               "baseline")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise NMTError(f"{where}: must be a mapping of keys, got {value!r}")
    return value


def _section(cls: type, value: Any, where: str) -> Any:
    """Build a recipe dataclass from a mapping: unknown keys and values of the wrong type are NMTErrors."""
    values = _mapping(value, where)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, item in values.items():
        if key not in defaults:
            raise NMTError(f"{where}.{key}: unknown key (valid: {', '.join(defaults)})")
        expected = type(defaults[key])
        if not isinstance(item, expected) or (expected is int and isinstance(item, bool)):
            raise NMTError(f"{where}.{key}: must be {expected.__name__}, got {item!r}")
    return cls(**values)


def _model_sections(value: Any, role: str) -> dict[str, dict[str, Any]]:
    sections = _mapping(value, role)
    for name, body in sections.items():
        if name not in MODEL_SECTIONS[role]:
            raise NMTError(f"{role}.{name}: unknown section (valid: {', '.join(MODEL_SECTIONS[role])})")
        for key in set(_mapping(body, f"{role}.{name}")) & set(RUNNER_SET.get(name, ())):
            raise NMTError(f"{role}.{name}.{key}: set by the runner from the recipe's corpus and run_dir")
    return {name: dict(body or {}) for name, body in sections.items()}


def _resolve(base: Path, value: str) -> str:
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _corpus(value: Any, base: Path) -> CorpusSection:
    corpus = _section(CorpusSection, value, "corpus")
    needed = {"bible": (), "hub": ("name", "src_lang", "tgt_lang"), "files": ("dir", "src_lang", "tgt_lang")}
    if corpus.kind not in needed:
        raise NMTError(f"corpus.kind: must be one of {', '.join(CORPUS_KINDS)}, got {corpus.kind!r}")
    for key in needed[corpus.kind]:
        if not getattr(corpus, key):
            raise NMTError(f"corpus.{key}: needed for a {corpus.kind} corpus")
    name = _resolve(base, corpus.name) if corpus.name and (base / corpus.name).exists() else corpus.name
    return dataclasses.replace(corpus, dir=_resolve(base, corpus.dir), modules_dir=_resolve(base, corpus.modules_dir),
                               name=name)


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe YAML; relative paths are relative to its folder."""
    path = Path(path).resolve()
    values = read_yaml(path, "recipe")
    for key in values:
        if key not in RECIPE_KEYS:
            raise NMTError(f"{path.name}: {key}: unknown key (valid: {', '.join(RECIPE_KEYS)})")
    if not isinstance(values.get("run_dir"), str) or not values["run_dir"]:
        raise NMTError(f"{path.name}: run_dir: needed (a folder for the corpus, models and results)")
    if "teacher" not in values:
        raise NMTError(f"{path.name}: teacher: needed (the teacher's vocab/model/train/decode sections)")
    if not isinstance(values.get("baseline", False), bool):
        raise NMTError(f"{path.name}: baseline: must be true or false")
    sample = values.get("sample") or []
    if not isinstance(sample, list) or not all(isinstance(line, str) for line in sample):
        raise NMTError(f"{path.name}: sample: must be a list of sentences")
    evaluate = _section(EvaluateSection, values.get("evaluate"), "evaluate")
    if evaluate.max_sentences < 0 or evaluate.speed_repeats < 1:
        raise NMTError("evaluate: max_sentences must be >= 0 and speed_repeats >= 1")
    export = _section(ExportSection, values.get("export"), "export")
    if export.model not in ("student", "teacher"):
        raise NMTError(f"export.model: must be student or teacher, got {export.model!r}")
    base = path.parent
    recipe = Recipe(
        path=path, run_dir=Path(_resolve(base, values["run_dir"])), corpus=_corpus(values.get("corpus"), base),
        teacher=_model_sections(values["teacher"], "teacher"),
        student=_model_sections(values["student"], "student") if values.get("student") is not None else None,
        distill=_mapping(values.get("distill"), "distill"), evaluate=evaluate,
        export=export, sample=tuple(sample), baseline=values.get("baseline", False),
    )
    run = RecipeRun(recipe)
    for role in ("teacher", "student") if recipe.student is not None else ("teacher",):
        try:
            run.config(role)
        except NMTError as err:
            raise NMTError(f"{path.name}: {role}: {err}") from None
    return recipe


# --- fingerprints and state ----------------------------------------------------------------------------------


def _file_stats(path: Path, base: Path) -> list[Any]:
    """[name, size, mtime_ns] of a file, of every file under a folder, or [name, None] when missing."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = []
    for file in files:
        name = os.path.relpath(file, base) if file.is_relative_to(base) else str(file)
        stat = file.stat() if file.exists() else None
        stats.append([name, stat.st_size, stat.st_mtime_ns] if stat else [name, None])
    return stats


def split_limits(inputs: Any, paths: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """A stage's inputs without its limits (dotted paths into them), and the limits' values."""
    if not paths or inputs is None:
        return inputs, {}
    rest, limits = json.loads(json.dumps(inputs, default=str)), {}
    for path in paths:
        *parents, key = path.split(".")
        node = rest
        for parent in parents:
            node = node[parent]
        limits[path] = node.pop(key)
    return rest, limits


def limits_raised(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether `new` allows more work than `old` and no less (0 = no limit)."""
    if set(old) != set(new) or old == new:
        return False
    return all(n == o or n == 0 or (o != 0 and n > o) for o, n in ((old[k], new[k]) for k in old))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a library function's return value."""
    return json.loads(json.dumps(value, default=str))


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class Skip(Exception):
    """A stage that cannot or need not run here (feature not built, nothing to do): recorded, not a failure."""


def optional_module(name: str, feature: str) -> ModuleType:
    """Import a module a stage needs, or Skip the stage when it (or something it imports) is not there."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise Skip(f"{feature} is not available here (no module {err.name or name})") from None


# --- the run ---------------------------------------------------------------------------------------------------


class RecipeRun:
    """A recipe's run folder: its paths, the models' configs and the stage state in state.json."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe, self.dir = recipe, recipe.run_dir
        self.state_path = self.dir / "state.json"
        self.state: dict[str, dict[str, Any]] = {}
        if self.state_path.is_file():
            self.state = json.loads(self.state_path.read_text(encoding="utf-8")).get("stages", {})
        self.resuming = False  # the stage being run continues earlier work: interrupted, or finished with lower limits
        self._configs: dict[str, Config] = {}

    # paths and configs

    def languages(self) -> tuple[str, str]:
        corpus = self.recipe.corpus
        if corpus.kind == "bible":
            from data.bible import SRC_LANG, TGT_LANG

            return SRC_LANG, TGT_LANG
        return corpus.src_lang, corpus.tgt_lang

    @property
    def corpus_dir(self) -> Path:
        return Path(self.recipe.corpus.dir) if self.recipe.corpus.kind == "files" else self.dir / "corpus"

    def corpus_file(self, split: str, side: int) -> Path:
        return self.corpus_dir / f"{split}.{self.languages()[side]}"

    def corpus_files(self) -> list[Path]:
        files = [self.corpus_file(split, side) for split in SPLITS for side in (0, 1)]
        return files if self.recipe.corpus.kind == "files" else files + [self.corpus_dir / "manifest.json"]

    @property
    def vocab_dir(self) -> Path:
        return self.dir / "vocab"

    def model_dir(self, role: str) -> Path:
        return self.dir / role

    def checkpoint(self, role: str) -> Path:
        return self.model_dir(role) / "checkpoints" / "best.pt"

    def config(self, role: str) -> Config:
        """The `nmt train` config of the teacher or the student, with the corpus and output folder filled in."""
        if role not in self._configs:
            sections = {name: dict(body) for name, body in self.recipe.sections(
                "student" if role == "baseline" else role).items()}
            sections["data"] = {**sections.get("data", {}), **{
                split: {"src": str(self.corpus_file(split, 0)), "tgt": str(self.corpus_file(split, 1))}
                for split in SPLITS}}
            sections["train"] = {**sections.get("train", {}), "out_dir": str(self.model_dir(role))}
            if role in ("student", "baseline"):
                sections["vocab"] = self.recipe.teacher.get("vocab", {})
            if role == "student":
                sections["distill"] = {**self.recipe.distill, "teacher": str(self.model_dir("teacher"))}
                if sections["train"].get("init_from") == "teacher":  # fine-tune the teacher on its own outputs
                    sections["train"]["init_from"] = str(self.checkpoint("teacher"))
            self._configs[role] = config_from_dict(sections, self.recipe.path.parent, check_files=False)
        return self._configs[role]

    def deployed_role(self) -> str:
        """The model exported and sampled: the one export.model names, if it was trained, else the teacher."""
        return self.recipe.export.model if self.status(self.recipe.export.model) == "done" else "teacher"

    # state

    def status(self, name: str) -> str | None:
        return self.state.get(name, {}).get("status")

    def result(self, name: str) -> dict[str, Any] | None:
        record = self.state.get(name, {})
        return record.get("result") if record.get("status") == "done" else None

    def record(self, name: str, **values: Any) -> None:
        self.state.setdefault(name, {}).update(values)
        _write_json(self.state_path, {"recipe": str(self.recipe.path), "stages": self.state})

    def _digest(self, value: Any) -> str:
        text = json.dumps(value, sort_keys=True, default=str).replace(str(self.dir), "<run>")
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def output_digest(self, name: str) -> str:
        """What downstream stages see of a stage: its recorded fingerprint and status, its outputs as they are now."""
        record = self.state.get(name, {})
        files = [_file_stats(path, self.dir) for path in STAGES[name].outputs(self)]
        return self._digest([record.get("fingerprint"), record.get("status"), files])

    def fingerprints(self, name: str) -> dict[str, Any]:
        """The stage's fingerprint; for a stage with limits also the fingerprint without them, and their values."""
        stage = STAGES[name]
        inputs, upstream = stage.inputs(self), {dep: self.output_digest(dep) for dep in stage.needs}
        prints: dict[str, Any] = {"fingerprint": self._digest({"inputs": inputs, "upstream": upstream})}
        if stage.limits:
            unlimited, limits = split_limits(inputs, stage.limits)
            prints.update(unlimited_fingerprint=self._digest({"inputs": unlimited, "upstream": upstream}),
                          limits=limits)
        return prints

    def finished(self, name: str) -> bool:
        """Whether the stage's last run completed and its outputs are still there."""
        return self.status(name) == "done" and all(path.exists() for path in STAGES[name].outputs(self))

    def is_current(self, name: str, fingerprint: str) -> bool:
        return self.finished(name) and self.state[name].get("fingerprint") == fingerprint

    def extends(self, name: str, prints: dict[str, Any]) -> bool:
        """Whether the stage finished before with the same inputs but lower limits (and its outputs are there)."""
        if "limits" not in prints or not self.finished(name):
            return False
        record = self.state[name]
        return (record.get("unlimited_fingerprint") == prints["unlimited_fingerprint"]
                and limits_raised(record.get("limits", {}), prints["limits"]))

    def execute(self, name: str, force: bool) -> None:
        """Run one stage unless it is current; record its fingerprint, result, status and wall time."""
        stage = STAGES[name]
        for dep in stage.needs:
            if self.status(dep) not in ("done", "skipped"):
                raise NMTError(f"stage {name} needs stage {dep}, which has not completed (run it first)")
        prints = self.fingerprints(name)
        if not force and self.is_current(name, prints["fingerprint"]):
            if any(self.state[name].get(key) != value for key, value in prints.items()):
                self.record(name, **prints)  # records from before limits were kept gain them
            say(f"[{name}] current, skipped")
            return
        previous = self.state.get(name, {})
        extending = not force and self.extends(name, prints)
        self.resuming = extending or (not force and previous.get("status") == "started"
                                      and previous.get("fingerprint") == prints["fingerprint"])
        say(f"[{name}] {'extending' if extending else 'resuming' if self.resuming else 'running'}")
        carried = previous.get("wall_s", 0.0) if self.resuming else 0.0  # the attempts this one continues count too
        self.record(name, status="started", **prints, result=None, message="", error=None, wall_s=carried)
        started = time.time() - carried
        try:
            result, status, message = _plain(stage.run(self) or {}), "done", ""
        except Skip as skip:
            result, status, message = {}, "skipped", str(skip)
            say(f"[{name}] skipped: {message}")
        except BaseException as err:
            self.record(name, error=f"{type(err).__name__}: {err}"[:500], wall_s=round(time.time() - started, 1))
            raise
        self.record(name, status=status, result=result, message=message, wall_s=round(time.time() - started, 1),
                    finished=time.strftime("%Y-%m-%d %H:%M:%S"))

    # shared by the stages

    def train(self, role: str, make_trainer: Callable[[Config, bool], Any] | None = None) -> dict[str, Any]:
        """Train a model with the run's vocabulary (or with make_trainer(config, resume)); continue from last.pt
        when the stage resumes or extends."""
        from nmt.train import Trainer
        from nmt.vocab import Vocab

        config = self.config(role)
        resume = self.resuming and (self.model_dir(role) / "checkpoints" / "last.pt").is_file()
        if not resume:
            clear_training(self.model_dir(role))
        if make_trainer is None:
            trainer = Trainer(config, resume=resume, vocab=Vocab.load(self.vocab_dir))
        else:
            trainer = make_trainer(config, resume)
        resumed_from = trainer.progress.step if resume else None
        return {**trainer.train(), "resumed_from_step": resumed_from}

    def evaluate(self, role: str, beams: tuple[int, ...]) -> dict[str, Any]:
        """Translate the test split with each beam size; BLEU/chrF, speed, parameters and checkpoint size."""
        from nmt.checkpoint import resolve_checkpoint
        from serving.backends import open_translator
        from nmt.data import read_lines
        from nmt.evaluate import corpus_scores

        sources, references = (read_lines(self.corpus_file("test", side)) for side in (0, 1))
        if self.recipe.evaluate.max_sentences:
            sources, references = (lines[: self.recipe.evaluate.max_sentences] for lines in (sources, references))
        translator = open_translator(str(self.model_dir(role)), "torch", self.config(role).train.device)
        decodes = {}
        for beam in beams:
            hypotheses, speed = timed_translation(translator, sources, beam, self.recipe.evaluate.speed_repeats)
            output = self.dir / "eval" / f"{role}.beam{beam}.{self.languages()[1]}"
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text("".join(line + "\n" for line in hypotheses), encoding="utf-8")
            scores = corpus_scores(hypotheses, [references])
            decodes[f"beam{beam}"] = {"beam_size": beam, **{k: scores[k] for k in (
                "bleu", "chrf", "bleu_signature", "chrf_signature")}, "hypotheses": output.name, **speed}
            say(f"[evaluate_{role}] beam {beam}: BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}, "
                f"{speed['sentences_per_s']:.1f} sentences/s")
        result = {"model": role, "parameters": translator.decoder.parameter_count(),
                  "checkpoint_bytes": resolve_checkpoint(self.model_dir(role)).stat().st_size,
                  "test_sentences": len(sources), "decodes": decodes}
        _write_json(self.dir / "eval" / f"{role}.json", result)
        return result

    def trains(self, role: str) -> bool:
        """Whether the recipe has this model: always a teacher; a student, and its baseline, when asked for."""
        return role == "teacher" or (self.recipe.student is not None and (role == "student" or self.recipe.baseline))

    def evaluation_inputs(self, role: str) -> Any:
        if not self.trains(role):
            return None
        config = self.config(role)
        return [dataclasses.asdict(config.decode), config.train.device, dataclasses.asdict(self.recipe.evaluate)]

    def training_inputs(self, role: str) -> Any:
        if not self.trains(role):
            return None
        values = self.config(role).to_dict()
        del values["decode"]  # decoding settings do not change a trained model
        return values


def clear_training(folder: Path) -> None:
    """Remove what a training run wrote in its folder (anything else there, such as a distilled corpus, stays)."""
    for name in TRAINING_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def timed_translation(translator: Any, lines: list[str], beam: int,
                      repeats: int = 1) -> tuple[list[str], dict[str, Any]]:
    """The best hypotheses of `lines`, and the decoding speed of the median of `repeats` identical runs (a run of
    a few seconds on a shared machine can take 1.5x as long as the next one)."""
    import torch

    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        hypotheses = [nbest[0].text for nbest in translator.translate(lines, beam_size=beam, nbest=1)]
        walls.append(max(time.perf_counter() - started, 1e-9))
    wall = sorted(walls)[len(walls) // 2]
    return hypotheses, {"wall_s": round(wall, 3), "sentences_per_s": round(len(lines) / wall, 2),
                        "runs_s": [round(w, 3) for w in walls], "threads": torch.get_num_threads(),
                        "device": str(translator.device)}


# --- the stages --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RecipeRun], dict[str, Any] | None]
    needs: tuple[str, ...]  # upstream stages; their outputs are part of this stage's fingerprint
    inputs: Callable[[RecipeRun], Any]  # JSON-able values this stage's work depends on
    outputs: Callable[[RecipeRun], list[Path]]  # files or folders that must exist for the stage to be current
    limits: tuple[str, ...]  # dotted paths into inputs: raising only these continues the finished stage


STAGES: dict[str, Stage] = {}  # in running order


def stage(name: str, needs: tuple[str, ...] = (), inputs: Callable[[RecipeRun], Any] = lambda run: None,
          outputs: Callable[[RecipeRun], list[Path]] = lambda run: [], limits: tuple[str, ...] = ()) -> Callable:
    """Register a stage function under `name`, after the stages registered before it."""

    def register(function: Callable[[RecipeRun], dict[str, Any] | None]) -> Callable:
        STAGES[name] = Stage(name, function, needs, inputs, outputs, limits)
        return function

    return register


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

        manifest = prepare_bible(run.corpus_dir, modules_dir=corpus.modules_dir or None)
    else:
        from data.hub import prepare_hub

        manifest = prepare_hub(corpus.name, corpus.config or None, corpus.src_lang, corpus.tgt_lang, run.corpus_dir,
                               max_train=corpus.max_train, dev_split=corpus.dev_split, test_split=corpus.test_split)
    return {"counts": manifest["counts"], "version": manifest["version"]}


@stage("vocab", needs=("prepare",), inputs=lambda run: dataclasses.asdict(run.config("teacher").vocab),
       outputs=lambda run: [run.vocab_dir])
def vocab(run: RecipeRun) -> dict[str, Any]:
    """The joint (or separate) SentencePiece vocabulary, trained once and shared by teacher and student."""
    from nmt.data import load_parallel
    from nmt.vocab import train_vocab

    config = run.config("teacher")
    table = load_parallel(config.data.train)
    trained = train_vocab(config.vocab, table["src"], table["tgt"])
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
    _write_json(run.dir / "eval" / "apertium.json", result)
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


@stage("evaluate_student", needs=("prepare", "student"), inputs=lambda run: run.evaluation_inputs("student"),
       outputs=lambda run: [run.dir / "eval" / "student.json"] if run.status("student") == "done" else [])
def evaluate_student(run: RecipeRun) -> dict[str, Any]:
    if run.status("student") != "done":
        raise Skip("no student was trained")
    return run.evaluate("student", (EVAL_BEAM, 1))


@stage("baseline", needs=("prepare", "vocab"), inputs=lambda run: run.training_inputs("baseline"),
       limits=TRAINING_LIMITS, outputs=lambda run: [run.checkpoint("baseline")] if run.trains("baseline") else [])
def baseline(run: RecipeRun) -> dict[str, Any]:
    """The student's model trained on the original corpus: the comparison that shows what distillation adds."""
    if not run.trains("baseline"):
        raise Skip("the recipe asks for no baseline student")
    return run.train("baseline")


@stage("evaluate_baseline", needs=("prepare", "baseline"), inputs=lambda run: run.evaluation_inputs("baseline"),
       outputs=lambda run: [run.dir / "eval" / "baseline.json"] if run.status("baseline") == "done" else [])
def evaluate_baseline(run: RecipeRun) -> dict[str, Any]:
    if run.status("baseline") != "done":
        raise Skip("no baseline student was trained")
    return run.evaluate("baseline", (EVAL_BEAM, 1))


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


# --- summary -------------------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(rows, key=lambda row: row.get("step", 0))


def plot_curves(run: RecipeRun, path: Path) -> Path | None:
    """Train loss and validation BLEU against step for each trained model, as a PNG (Agg, no display)."""
    from matplotlib.figure import Figure

    series = {role: read_metrics(run.model_dir(role) / "metrics.jsonl") for role in ROLES}
    series = {role: rows for role, rows in series.items() if rows}
    if not series:
        return None
    figure = Figure(figsize=(11, 4))
    loss_axes, bleu_axes = figure.subplots(1, 2)
    for role, rows in series.items():
        for axes, key, style in ((loss_axes, "train_loss", "-"), (bleu_axes, "valid_bleu", "o-")):
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                axes.plot(*zip(*points), style, label=role)
    for axes, title in ((loss_axes, "training loss (NLL per target token)"), (bleu_axes, "validation BLEU (greedy)")):
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def summarize(run: RecipeRun) -> dict[str, Any]:
    """summary.json, summary.md and training_curves.png in the run folder; the markdown is printed too."""
    models = {role: run.result(f"evaluate_{role}") for role in (*ROLES, "apertium")}
    exported = {name: run.result(name) for name in ("export", "engines")}
    plot = plot_curves(run, run.dir / "training_curves.png")
    stages = {name: {key: run.state[name].get(key) for key in ("status", "wall_s", "message")}
              for name in STAGES if name in run.state}
    summary = {
        "recipe": str(run.recipe.path), "run_dir": str(run.dir),
        "models": {role: result for role, result in models.items() if result},
        "exports": {name: {"model": r["model"], "bytes": r["bytes"]} for name, r in exported.items() if r},
        "stages": stages,
        "total_wall_s": round(sum(stage["wall_s"] or 0 for stage in stages.values()), 1),
        "distillation": distillation_figures(models),
        "plot": plot.name if plot else None,
    }
    _write_json(run.dir / "summary.json", summary)
    markdown = summary_markdown(summary)
    (run.dir / "summary.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return summary


def distillation_figures(models: dict[str, dict | None]) -> dict[str, float]:
    """The figures sequence-level KD is judged by: the student's greedy BLEU as a share of the teacher's beam-5 BLEU,
    its speed as a multiple of the teacher's beam 5, and the distilled student's BLEU minus its baseline's."""
    def decode(role: str, key: str) -> dict | None:
        return ((models.get(role) or {}).get("decodes") or {}).get(key)

    teacher, student = decode("teacher", "beam5"), decode("student", "beam1")
    figures = {}
    if teacher and student:
        if teacher["bleu"] > 0:
            figures["student_greedy_bleu_share_of_teacher_beam5"] = round(student["bleu"] / teacher["bleu"], 3)
        figures["student_greedy_speedup_over_teacher_beam5"] = round(
            student["sentences_per_s"] / teacher["sentences_per_s"], 2)
    for key, search in (("beam1", "greedy"), ("beam5", "beam5")):
        distilled, baseline = decode("student", key), decode("baseline", key)
        if distilled and baseline:
            figures[f"student_minus_baseline_bleu_{search}"] = round(distilled["bleu"] - baseline["bleu"], 2)
    return figures


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# {Path(summary['recipe']).stem}", "",
             "| model | search | BLEU | chrF | sentences/s | decode s | threads | parameters | checkpoint MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for role, result in summary["models"].items():
        for decode in result["decodes"].values():
            search = decode.get("search") or ("greedy" if decode["beam_size"] == 1 else f"beam {decode['beam_size']}")
            lines.append(f"| {role} | {search} | {decode['bleu']:.2f} | {decode['chrf']:.2f} | "
                         f"{decode['sentences_per_s']:.1f} | {decode['wall_s']:.1f} | {decode['threads']} | "
                         f"{result['parameters']:,} | {result['checkpoint_bytes'] / 1e6:.1f} |")
    figures = summary.get("distillation") or {}
    if figures:
        lines.append("")
    if "student_greedy_speedup_over_teacher_beam5" in figures:
        share = figures.get("student_greedy_bleu_share_of_teacher_beam5")
        lines.append(f"student greedy vs teacher beam 5: "
                     f"{'n/a' if share is None else f'{100 * share:.1f}%'} of the BLEU, "
                     f"{figures['student_greedy_speedup_over_teacher_beam5']:.2f}x the sentences/s")
    for search in ("greedy", "beam5"):
        if f"student_minus_baseline_bleu_{search}" in figures:
            lines.append(f"distilled student minus baseline, {search.replace('beam5', 'beam 5')}: "
                         f"{figures[f'student_minus_baseline_bleu_{search}']:+.2f} BLEU")
    for name, export in summary["exports"].items():
        lines.append(f"\n{name}: {export['model']}, {export['bytes'] / 1e6:.1f} MB on disk")
    lines += ["", "| stage | status | wall s | note |", "|---|---|---:|---|"]
    for name, record in summary["stages"].items():
        wall = f"{record['wall_s']:.1f}" if record.get("wall_s") is not None else ""
        lines.append(f"| {name} | {record['status']} | {wall} | {record.get('message') or ''} |")
    lines.append(f"| total | | {summary.get('total_wall_s', 0):.1f} | |")
    if summary["plot"]:
        lines += ["", f"![training curves]({summary['plot']})"]
    return "\n".join(lines) + "\n"


# --- entry point -----------------------------------------------------------------------------------------------------


def select_stages(start: str | None, end: str | None) -> list[str]:
    names = list(STAGES)
    for option, name in (("--from", start), ("--to", end)):
        if name is not None and name not in STAGES:
            raise NMTError(f"{option} {name}: unknown stage (stages: {', '.join(names)})")
    first, last = names.index(start) if start else 0, names.index(end) if end else len(names) - 1
    if first > last:
        raise NMTError(f"--from {start} comes after --to {end}")
    return names[first: last + 1]


def run_recipe(path: str | Path, start: str | None = None, end: str | None = None, force: bool = False) -> dict:
    """`nmt recipe`: run the selected stages in order, each skipped while current (all rerun with `force`);
    then write the summary. Returns the summary."""
    run = RecipeRun(load_recipe(path))
    run.dir.mkdir(parents=True, exist_ok=True)
    for name in select_stages(start, end):
        run.execute(name, force)
    return summarize(run)
