"""The figures of the run report, drawn with matplotlib's Agg backend and returned as PNG bytes.

Each function draws one figure from plain numbers (nothing is read from disk here) on its
own :class:`matplotlib.figure.Figure` (no ``pyplot``: no global state, no display needed,
safe from threads) and returns the PNG bytes; :func:`png_data_uri` turns them into a
``data:`` URI that an ``<img>`` embeds, so the page needs no other file.

Colours: green for "after is better", red for "after is worse", grey for the base model.

Example::

    from contrastkit.diagnostics.figures import per_query_histogram, png_data_uri
    png = per_query_histogram([0.1, -0.05, 0.0, 0.2], metric="ndcg@10")
    uri = png_data_uri(png)          # "data:image/png;base64,iVBORw0..."
"""

from __future__ import annotations

import base64
import io
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["metric_bars", "training_curves", "interpolation_curve", "per_query_histogram", "phase_bars",
           "png_data_uri", "GREEN", "RED", "GREY", "BLUE"]

GREEN = "#1a7f37"
RED = "#cf222e"
GREY = "#8c959f"
BLUE = "#0969da"
_DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # no Software / date metadata: the same numbers give the same bytes
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _style(ax) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(True, axis="y", color="#d0d7de", linewidth=0.6)
    ax.set_axisbelow(True)


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes (what an ``<img src>`` embeds)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def metric_bars(before: Mapping[str, float], after: Mapping[str, float],
                intervals: Mapping[str, Tuple[float, float]], metrics: Sequence[str]) -> bytes:
    """Left: grouped bars, before (grey) and after (green when higher, red when lower), per
    metric. Right: the difference ``after - before`` per metric with its interval, against a
    line at 0 (green when the interval lies above 0, red below, grey when it holds 0).

    ``intervals[m] = (low, high)`` is the 95% interval of the paired difference
    ``after - before``; on the left it is drawn as a whisker on the *after* bar spanning
    ``before + low .. before + high`` (where after lies, with its uncertainty, measured
    from before): when the whisker stays clear of the before bar's height the interval
    excludes 0. Metrics without an interval get no whisker and a bare dot on the right.
    """
    fig = _figure(9.5, 3.4)
    ax, ax_d = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.7, 1.0]})
    x = np.arange(len(metrics), dtype=float)
    w = 0.36
    b = np.array([before[m] for m in metrics], dtype=float)
    a = np.array([after[m] for m in metrics], dtype=float)
    ax.bar(x - w / 2, b, w, color=GREY, label="before")
    colors = [GREEN if ai >= bi else RED for ai, bi in zip(a, b)]
    ax.bar(x + w / 2, a, w, color=colors, label="after")
    for i, m in enumerate(metrics):
        ax.text(x[i] - w / 2, b[i], f"{b[i]:.3f}", ha="center", va="bottom", fontsize=8, color="#57606a")
        top = a[i]
        if m in intervals:
            lo, hi = intervals[m]
            ax.errorbar([x[i] + w / 2], [a[i]], yerr=[[a[i] - (b[i] + lo)], [(b[i] + hi) - a[i]]],
                        fmt="none", ecolor="#24292f", elinewidth=1.2, capsize=5)
            top = max(top, b[i] + hi)
        ax.text(x[i] + w / 2, top, f"{a[i]:.3f}", ha="center", va="bottom", fontsize=8, color="#24292f")
    ax.set_xticks(x, list(metrics))
    ymax = float(max(np.max(a), np.max(b), *(b[i] + intervals[m][1] for i, m in enumerate(metrics)
                                             if m in intervals)))
    ax.set_ylim(0, min(1.05, ymax * 1.12) if ymax <= 1.0 else ymax * 1.12)
    ax.set_ylabel("score (test split)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=GREY, label="before"), Patch(color=GREEN, label="after (higher)"),
                       Patch(color=RED, label="after (lower)")], loc="lower left", bbox_to_anchor=(0.0, 1.0),
              ncol=3, fontsize=8, frameon=False)
    _style(ax)
    # the differences and their intervals
    y = np.arange(len(metrics), dtype=float)[::-1]
    for yi, m, ai, bi in zip(y, metrics, a, b):
        d = ai - bi
        if m in intervals:
            lo, hi = intervals[m]
            c = GREEN if lo > 0 else RED if hi < 0 else GREY
            ax_d.errorbar([d], [yi], xerr=[[d - lo], [hi - d]], fmt="o", color=c, ecolor=c, elinewidth=2,
                          capsize=4, markersize=6)
            ax_d.annotate(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]", xy=(d, yi), xytext=(0, 7), textcoords="offset points",
                          ha="center", fontsize=7.5, color="#24292f")
        else:
            ax_d.plot([d], [yi], "o", color=GREY, markersize=6)
            ax_d.annotate(f"{d:+.3f} (no interval)", xy=(d, yi), xytext=(0, 7), textcoords="offset points",
                          ha="center", fontsize=7.5, color="#57606a")
    ax_d.axvline(0.0, color="#24292f", linewidth=0.9)
    ax_d.set_yticks(y, list(metrics))
    ax_d.set_ylim(-0.6, len(metrics) - 0.4)
    lo_all = min([0.0] + [intervals[m][0] for m in metrics if m in intervals] + list(a - b))
    hi_all = max([0.0] + [intervals[m][1] for m in metrics if m in intervals] + list(a - b))
    pad = 0.25 * max(hi_all - lo_all, 1e-3)
    ax_d.set_xlim(lo_all - pad, hi_all + pad)
    ax_d.set_xlabel("after - before (95% interval)")
    ax_d.spines["top"].set_visible(False)
    ax_d.spines["right"].set_visible(False)
    ax_d.grid(True, axis="x", color="#d0d7de", linewidth=0.6)
    ax_d.set_axisbelow(True)
    return _png(fig)


def training_curves(dev_steps: Sequence[int], dev_scores: Sequence[float], metric: str,
                    best_step: Optional[int], dev_before: Optional[float],
                    train_steps: Sequence[int], train_loss: Sequence[float]) -> bytes:
    """Two panels: the dev metric over training steps (best step marked, the base model's
    dev score dashed) and the training loss over steps (raw, and a moving average when there
    are many points). Either panel may be empty (a note is drawn instead)."""
    fig = _figure(9.0, 3.3)
    ax1, ax2 = fig.subplots(1, 2)
    if len(dev_steps):
        ax1.plot(dev_steps, dev_scores, "-o", color=BLUE, markersize=4, linewidth=1.5, label=f"dev {metric}")
        if dev_before is not None:
            ax1.axhline(dev_before, color=GREY, linestyle="--", linewidth=1, label="base model")
        if best_step is not None and best_step in list(dev_steps):
            i = list(dev_steps).index(best_step)
            ax1.plot([best_step], [dev_scores[i]], marker="*", markersize=15, color=GREEN, linestyle="none",
                     label=f"best: step {best_step} ({dev_scores[i]:.4f})")
        ax1.legend(fontsize=8, frameon=True, framealpha=0.9, edgecolor="none", loc="best")
    else:
        ax1.text(0.5, 0.5, "no dev evaluations", ha="center", va="center", transform=ax1.transAxes, color=GREY)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"dev {metric}")
    ax1.set_title("dev metric", fontsize=10)
    _style(ax1)
    if len(train_steps):
        s = np.asarray(train_steps, dtype=float)
        y = np.asarray(train_loss, dtype=float)
        many = y.size >= 50
        ax2.plot(s, y, color=BLUE, linewidth=0.8, alpha=0.35 if many else 1.0, label="loss")
        if many:
            k = max(5, y.size // 25)
            ma = np.convolve(y, np.ones(k) / k, mode="valid")
            ax2.plot(s[k - 1:], ma, color=BLUE, linewidth=1.6, label=f"moving average ({k} records)")
            ax2.legend(fontsize=8, frameon=False)
    else:
        ax2.text(0.5, 0.5, "no training records", ha="center", va="center", transform=ax2.transAxes, color=GREY)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.set_title("training loss", fontsize=10)
    _style(ax2)
    return _png(fig)


def interpolation_curve(alphas: Sequence[float], scores: Sequence[float], metric: str,
                        chosen_alpha: Optional[float]) -> bytes:
    """Dev metric of ``(1 - a) * base + a * tuned`` against ``a`` (0 = base model, 1 = the
    fine-tuned model), the chosen ``a`` marked."""
    fig = _figure(6.0, 3.2)
    ax = fig.add_subplot()
    order = np.argsort(np.asarray(alphas, dtype=float), kind="stable")
    xa = np.asarray(alphas, dtype=float)[order]
    ya = np.asarray(scores, dtype=float)[order]
    ax.plot(xa, ya, "-o", color=BLUE, markersize=4, linewidth=1.5)
    if chosen_alpha is not None:
        hit = np.flatnonzero(np.isclose(xa, chosen_alpha, rtol=0, atol=1e-9))
        ax.axvline(chosen_alpha, color=GREEN, linestyle="--", linewidth=1)
        if hit.size:
            ax.plot([xa[hit[0]]], [ya[hit[0]]], marker="*", markersize=15, color=GREEN, linestyle="none")
        ax.set_title(f"chosen a = {chosen_alpha:g} (dashed)", fontsize=10, color=GREEN)
    ax.set_xlabel("a   (0 = base model, 1 = fine-tuned)")
    ax.set_ylabel(f"dev {metric}")
    _style(ax)
    return _png(fig)


def per_query_histogram(differences: Sequence[float], metric: str, tol: float = 1e-9) -> bytes:
    """Histogram of the per-query differences ``after - before`` (bins left of 0 red, right
    of 0 green, the bin holding 0 grey), with the counts improved / unchanged / worse
    (``|d| <= tol`` counts as unchanged) in the title."""
    d = np.asarray(differences, dtype=float)
    better, worse = int((d > tol).sum()), int((d < -tol).sum())
    same = int(d.size - better - worse)
    fig = _figure(7.0, 3.2)
    ax = fig.add_subplot()
    span = float(np.max(np.abs(d))) if d.size else 0.0
    span = max(span, 1e-3)
    n_bins = 41  # odd: one bin centred on 0
    edges = np.linspace(-span, span, n_bins + 1)
    counts, edges = np.histogram(d, bins=edges)
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    colors = [GREY if lo <= 0.0 <= hi else (GREEN if c > 0 else RED)
              for c, lo, hi in zip(centres, edges[:-1], edges[1:])]
    ax.bar(centres, counts, width=width * 0.95, color=colors)
    ax.axvline(0.0, color="#24292f", linewidth=0.8)
    ax.set_xlabel(f"per-query {metric} difference (after - before)")
    ax.set_ylabel("queries")
    ax.set_title(f"improved {better}   unchanged {same}   worse {worse}   (of {d.size})", fontsize=10)
    _style(ax)
    return _png(fig)


def phase_bars(phases: Dict[str, float]) -> bytes:
    """Horizontal bars of the wall time per phase (seconds), in the order given (top down)."""
    names = list(phases)
    secs = np.array([phases[n] for n in names], dtype=float)
    fig = _figure(7.0, 0.32 * len(names) + 0.8)
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, secs, color=BLUE, height=0.65)
    total = float(secs.sum()) if secs.size else 0.0
    for yi, s in zip(y, secs):
        share = "" if total <= 0 else f" ({100 * s / total:.0f}%)" if s >= 0.005 * total else " (<1%)"
        ax.text(s, yi, f" {s:.1f} s{share}", va="center", fontsize=8, color="#24292f")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(total and float(secs.max()) * 1.25, 1.0))
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(True, axis="x", color="#d0d7de", linewidth=0.6)
    ax.set_axisbelow(True)
    return _png(fig)
