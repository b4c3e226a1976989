"""runner.py — `nmt recipe`: run the selected stages of a recipe in order, then write the summary.

The pieces, one job each: recipe.py (the recipe file), run.py (the run folder, state.json, fingerprints, running
one stage, the stage registry), stages.py (the stage functions: prepare → vocab → teacher → evaluate_teacher →
distill → student → evaluate_student → [baseline → evaluate_baseline] → export → engines → translate_sample),
summary.py (summary.json / .md and the training curves).

A stage records the fingerprint of its inputs (config sections, upstream outputs' sizes and mtimes) in
RUN_DIR/state.json and is skipped while current, so a rerun after a kill resumes (training from last.pt). A
training stage whose only change is a raised limit (train.max_steps, train.max_epochs) trains on from the
last.pt of its finished run instead of starting over. Stages call library functions, never subprocesses; a
feature not built or not installed here is skipped, not failed.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

from nmt.errors import NMTError
from recipes import stages  # noqa: F401 — registers the stages in STAGES, in running order
from recipes.recipe import load_recipe
from recipes.run import STAGES, RecipeRun
from recipes.summary import summarize


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
    with terminate_as_interrupt():
        for name in select_stages(start, end):
            run.execute(name, force)
    return summarize(run)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, a scheduler's stop) raises KeyboardInterrupt as Ctrl-C does, so the running stage records
    its error and wall time in state.json, which the stage's next run carries on, instead of the process dying
    with no record. Training installs its own handler inside this one (save last.pt, then stop)."""

    def interrupt(signum: int, _frame) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
