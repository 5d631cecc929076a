"""Figures (matplotlib ``Figure`` objects, no display needed): Fig.-7-style bar charts of a metric
per structure with 95% confidence intervals, and a 2D scatter (t-SNE) coloured by group."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnunet_sddm.evaluation.metrics import HIGHER_IS_BETTER
from nnunet_sddm.evaluation.statistics import confidence_interval, finite
from nnunet_sddm.utilities.plotting import figure, save_figure


_HATCHES = ("", "///", "...", "xxx", "\\\\\\", "ooo")


def _bar_styles(entries: Sequence[str]) -> dict:
    """``{entry: (colour, hatch)}``: colour by the part before ``/`` and hatch by the part after
    it when that distinguishes every entry with at most 10 colours; else one colour per entry."""
    from matplotlib import colormaps

    parts = {e: e.partition("/")[::2] for e in entries}  # (approach, model); model "" without "/"
    heads = list(dict.fromkeys(h for h, _ in parts.values()))
    tails = list(dict.fromkeys(t for _, t in parts.values()))
    if len(entries) > 10 and len(heads) <= 10 and len(tails) <= len(_HATCHES):
        tab10 = colormaps["tab10"].colors
        return {e: (tab10[heads.index(h)], _HATCHES[tails.index(t)]) for e, (h, t) in parts.items()}
    cmap = colormaps["tab10" if len(entries) <= 10 else "tab20"]
    return {e: (cmap(i % cmap.N), "") for i, e in enumerate(entries)}


def bar_chart_ci(samples: Mapping[str, Mapping[str, Sequence[float]]], metric: str,
                 out_path: os.PathLike, title: str = "") -> Path:
    """Grouped bars: x = structures, one bar per entry (e.g. ``"DA/2d"``), height = mean of the
    finite values, error bar = Student-t 95% CI of the mean. Entries named ``"approach/model"`` get
    one colour per approach and one hatch per model, so that no two bars look alike. A bar with
    no finite value is marked "n/a".

    samples: ``{entry: {structure: values}}``. Written atomically as PNG; returns the path.
    """
    entries = list(samples)
    structures = list(dict.fromkeys(s for e in entries for s in samples[e]))
    width = 0.8 / max(1, len(entries))
    x = np.arange(len(structures))
    fig = figure(figsize=(max(4.0, 1.2 + 1.6 * len(structures) + 0.25 * len(entries)),
                          3.6 + 0.2 * ((len(entries) + 3) // 4)), dpi=120)
    ax = fig.subplots()
    styles = _bar_styles(entries)
    for i, e in enumerate(entries):
        means, lo, hi = [], [], []
        for s in structures:
            a = finite(samples[e].get(s, []))
            m = float(a.mean()) if a.size else np.nan
            ci = confidence_interval(a)
            means.append(m)
            lo.append(m - ci[0] if np.isfinite(ci[0]) else 0.0)
            hi.append(ci[1] - m if np.isfinite(ci[1]) else 0.0)
        colour, hatch = styles[e]
        pos = x + (i - (len(entries) - 1) / 2) * width
        ax.bar(pos, means, width, yerr=[lo, hi], capsize=3, label=e,
               color=colour, hatch=hatch, edgecolor="white" if hatch else None, linewidth=0)
        for px, m in zip(pos, means):  # no finite value (e.g. only empty predictions): say so
            if not np.isfinite(m):
                ax.text(px, 0, "n/a", rotation=90, fontsize=6, ha="center", va="bottom", color=colour)
    ax.set_xticks(x)
    ax.set_xticklabels(structures)
    unit = "" if HIGHER_IS_BETTER.get(metric, True) else " (mm)"
    arrow = "higher is better" if HIGHER_IS_BETTER.get(metric, True) else "lower is better"
    ax.set_ylabel(f"{metric}{unit}")
    ax.set_title(title or f"{metric} ({arrow}); error bars: 95% CI")
    hatched = any(h for _, h in styles.values())  # one legend column per colour (approach)
    ncol = len({c for c, _ in styles.values()}) if hatched else min(4, len(entries))
    ax.legend(fontsize=7, ncol=ncol, frameon=False, loc="upper center",
              bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    return save_figure(fig, out_path)


def scatter_2d(points: np.ndarray, groups: Sequence[str], out_path: os.PathLike, title: str = "") -> Path:
    """Scatter of ``points`` (n, 2) coloured by ``groups`` (n labels); PNG written atomically."""
    points = np.asarray(points, dtype=float)
    fig = figure(figsize=(5, 4.5), dpi=120)
    ax = fig.subplots()
    groups = np.asarray(groups)
    for g in dict.fromkeys(groups.tolist()):
        sel = groups == g
        ax.scatter(points[sel, 0], points[sel, 1], s=14, alpha=0.8, label=f"{g} (n={int(sel.sum())})")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return save_figure(fig, out_path)
