"""plots.py — attention heat maps as PNG files: source pieces along the x axis, output pieces down the y axis.

`nmt translate --attention-plot DIR` and the recipes' sample stage draw with it; matplotlib is imported here only
(its object API, no global pyplot state, so it is safe in threads and needs no display).
"""

from __future__ import annotations

from pathlib import Path

import torch


def plot_attention(attention: torch.Tensor, source_pieces: list[str], target_pieces: list[str],
                   path: str | Path) -> Path:
    """Write the heat map of `attention` [target pieces, source pieces] to `path` (PNG); returns the path."""
    from matplotlib.figure import Figure

    rows, columns = attention.shape
    figure = Figure(figsize=(max(3.0, 0.32 * columns + 1.5), max(2.5, 0.32 * rows + 1.2)), dpi=100)
    axes = figure.add_subplot()
    axes.imshow(attention.float().numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto",
                interpolation="nearest")
    axes.set_xticks(range(columns), source_pieces, rotation=90, fontsize=8)
    axes.set_yticks(range(rows), target_pieces, fontsize=8)
    axes.set_xlabel("source pieces")
    axes.set_ylabel("output pieces")
    axes.tick_params(length=0)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
