"""recipe.py — the recipe file (`nmt recipe RECIPE.yaml`): its sections as frozen dataclasses, read and checked by
`load_recipe` (unknown keys, wrong types, missing corpus or teacher are one NMTError line). Knows nothing of stages
or run folders.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nmt.config import read_yaml
from nmt.errors import NMTError

CORPUS_KINDS = ("bible", "hub", "files")
MODEL_SECTIONS = {"teacher": ("data", "vocab", "model", "train", "decode"),
                  "student": ("data", "model", "train", "decode")}  # the student shares the teacher's vocab
RUNNER_SET = {"data": ("train", "extra_train", "dev", "test"), "train": ("out_dir",)}  # keys the runner fills in


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
    # bible: further English Bibles (SWORD modules, e.g. engKJV2006eb) as second references of the training books;
    # the teacher trains on them too, their sources tagged <module> so that untagged input keeps the main style
    extra_targets: tuple[str, ...] = ()


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
    values = dict(_mapping(value, where))
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, item in values.items():
        if key not in defaults:
            raise NMTError(f"{where}.{key}: unknown key (valid: {', '.join(defaults)})")
        expected = type(defaults[key])
        if expected is tuple:  # a list of names in YAML
            if not isinstance(item, list) or not all(isinstance(name, str) and name for name in item):
                raise NMTError(f"{where}.{key}: must be a list of names, got {item!r}")
            values[key] = tuple(item)
        elif not isinstance(item, expected) or (expected is int and isinstance(item, bool)):
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
    if corpus.extra_targets and corpus.kind != "bible":
        raise NMTError(f"corpus.extra_targets: only a bible corpus has them, not a {corpus.kind} corpus")
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
    from recipes.run import RecipeRun  # the models' configs are checked as the run will build them

    run = RecipeRun(recipe)
    for role in ("teacher", "student") if recipe.student is not None else ("teacher",):
        try:
            run.config(role)
        except NMTError as err:
            raise NMTError(f"{path.name}: {role}: {err}") from None
    return recipe
