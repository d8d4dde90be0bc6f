"""Figures shared by the benchmarks (matplotlib, Agg backend: files, never windows)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

__all__ = ["seed_scatter", "phase_bars"]


def seed_scatter(labels: Sequence[str], points: Sequence[Sequence[float]], means: Sequence[float], *,
                 ylabel: str, title: str, path: Path, colors: Optional[Sequence[str]] = None) -> None:
    """One column per configuration: a dot per seed (spread sideways so equal values stay
    visible) and a bar at the mean; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 1), 3.6))
    for i, (pts, mean) in enumerate(zip(points, means)):
        color = colors[i] if colors else "tab:blue"
        offsets = [(j - (len(pts) - 1) / 2) * 0.08 for j in range(len(pts))]
        ax.scatter([i + o for o in offsets], list(pts), color=color, s=22, zorder=3)
        ax.hlines(mean, i - 0.3, i + 0.3, color=color, lw=2)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(list(labels), rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def phase_bars(labels: Sequence[str], seconds: Sequence[Sequence[float]], phases: Sequence[str], *, title: str,
               path: Path) -> None:
    """One horizontal bar per configuration, stacked by phase (``seconds[i][j]``: configuration
    i, phase j), its total written at the end; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 0.55 * len(labels) + 2.2))
    cmap = plt.get_cmap("tab10")
    left = [0.0] * len(labels)
    for j, phase in enumerate(phases):
        widths = [float(row[j]) for row in seconds]
        ax.barh(range(len(labels)), widths, left=left, color=cmap(j % 10), label=phase)
        left = [a + b for a, b in zip(left, widths)]
    for i, total in enumerate(left):
        ax.text(total, i, f" {total:.0f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(list(labels))
    ax.invert_yaxis()
    ax.set_xlabel("seconds (mean over seeds; the label is the sum of the phases)")
    ax.set_xlim(0, max(left + [1.0]) * 1.15)
    ax.set_title(title)
    ax.legend(ncol=min(7, len(phases)), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
