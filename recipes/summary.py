"""summary.py — a recipe run's report: summary.json, summary.md (models × searches: BLEU, chrF, speed, size; the
distillation figures; stage times) and training_curves.png, from the results the stages recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipes.run import ROLES, STAGES, RecipeRun, write_json


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
    models = {role: run.result(f"evaluate_{role}") for role in (*ROLES, "ensemble", "apertium")}
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
    write_json(run.dir / "summary.json", summary)
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
