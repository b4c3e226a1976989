"""run.py — a recipe's run folder and the stage registry: paths, the models' configs, state.json with each stage's
fingerprint (config sections, upstream outputs' sizes and mtimes), status, result and wall time; running one stage
(`RecipeRun.execute`: skipped while current, resumed after a kill, extended when only a limit was raised); what
the stages share (training, evaluation, timed decoding). The stages themselves are in stages.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from nmt.config import Config, config_from_dict
from nmt.atomic import write_atomic
from nmt.errors import NMTError

if TYPE_CHECKING:
    from recipes.recipe import Recipe

SPLITS = ("train", "dev", "test")
ROLES = ("teacher", "student", "baseline")  # the models a recipe may train
TRAINING_LIMITS = ("train.max_steps", "train.max_epochs")  # raising one continues a finished training stage
TRAINING_FILES = ("checkpoints", "vocab", "tensorboard", "metrics.jsonl", "train.log", "config.yaml")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


# Keys added after runs were recorded, with their defaults: a fingerprint holds them only when set, so that a run
# from before them stays current.
LATE_KEYS = {"extra_targets": [], "extra_train": [], "src_prefix": ""}


def _without_late_defaults(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_late_defaults(item) for key, item in value.items()
                if not (key in LATE_KEYS and item == LATE_KEYS[key])}
    if isinstance(value, list):
        return [_without_late_defaults(item) for item in value]
    return value


def write_json(path: Path, value: Any) -> None:
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

    def extra_splits(self) -> list[str]:
        """The splits of the training books' further references (corpus.extra_targets), for the teacher."""
        from data.bible import extra_split

        return [extra_split(module) for module in self.recipe.corpus.extra_targets]

    def corpus_files(self) -> list[Path]:
        files = [self.corpus_file(split, side) for split in (*SPLITS, *self.extra_splits()) for side in (0, 1)]
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
            if role == "teacher" and self.recipe.corpus.extra_targets:
                sections["data"]["extra_train"] = [
                    {"src": str(self.corpus_file(split, 0)), "tgt": str(self.corpus_file(split, 1)),
                     "src_prefix": f"<{module}>"}
                    for split, module in zip(self.extra_splits(), self.recipe.corpus.extra_targets)]
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
        write_json(self.state_path, {"recipe": str(self.recipe.path), "stages": self.state})

    def _digest(self, value: Any) -> str:
        text = json.dumps(_without_late_defaults(_plain(value)), sort_keys=True).replace(str(self.dir), "<run>")
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

    def evaluate(self, role: str, beams: tuple[int, ...], members: tuple[str, ...] = (),
                 repeats: int = 0) -> dict[str, Any]:
        """Translate the test split with each beam size; BLEU/chrF, speed, parameters and checkpoint size. `role`
        names the model, or, with `members` (trained roles), their ensemble; `repeats` (default
        evaluate.speed_repeats) is how many times each search decodes the split for its speed."""
        from nmt.checkpoint import resolve_checkpoint
        from serving.backends import open_translator
        from nmt.data import read_lines
        from nmt.evaluate import corpus_scores

        members = members or (role,)
        sources, references = (read_lines(self.corpus_file("test", side)) for side in (0, 1))
        if self.recipe.evaluate.max_sentences:
            sources, references = (lines[: self.recipe.evaluate.max_sentences] for lines in (sources, references))
        translator = open_translator([str(self.model_dir(member)) for member in members], "torch",
                                     self.config(members[0]).train.device)
        decodes = {}
        for beam in beams:
            hypotheses, speed = timed_translation(translator, sources, beam,
                                                  repeats or self.recipe.evaluate.speed_repeats)
            output = self.dir / "eval" / f"{role}.beam{beam}.{self.languages()[1]}"
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text("".join(line + "\n" for line in hypotheses), encoding="utf-8")
            scores = corpus_scores(hypotheses, [references])
            decodes[f"beam{beam}"] = {"beam_size": beam, **{k: scores[k] for k in (
                "bleu", "chrf", "bleu_signature", "chrf_signature")}, "hypotheses": output.name, **speed}
            say(f"[evaluate_{role}] beam {beam}: BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}, "
                f"{speed['sentences_per_s']:.1f} sentences/s")
        result = {"model": role, "parameters": translator.decoder.parameter_count(),
                  "checkpoint_bytes": sum(resolve_checkpoint(self.model_dir(member)).stat().st_size
                                          for member in members),
                  "test_sentences": len(sources), "decodes": decodes,
                  **({"members": list(members)} if members != (role,) else {})}
        write_json(self.dir / "eval" / f"{role}.json", result)
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
