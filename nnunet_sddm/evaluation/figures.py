"""Figures (matplotlib ``Figure`` objects, no display needed): Fig.-7-style bar charts of a metric
per structure with 95% confidence intervals (clipped to the metric's valid range; empty-mask
penalties counted above the bar instead of averaged in), bar charts of counts (missing and
spurious structures), a 2D scatter (t-SNE) coloured by group, the quality report's figures
(image pairs side by side, a ROC curve) and a grid of label maps and images (generated pairs)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

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


#: Valid range of each metric's values: CIs are clipped to it.
VALID_RANGE = {"DSC": (0.0, 1.0), "IoU": (0.0, 1.0), "ASD": (0.0, np.inf), "ASSD": (0.0, np.inf),
               "HD": (0.0, np.inf), "HD95": (0.0, np.inf)}


def bar_stats(values: Sequence[float], penalised: Optional[Sequence[bool]] = None,
              valid_range: tuple = (-np.inf, np.inf)) -> dict:
    """What one bar shows: ``mean`` and Student-t 95% CI (``ci_low``, ``ci_high``, clipped to
    ``valid_range``) over the finite values whose ``penalised`` flag is False, their count ``n``
    and the number ``n_penalised`` of penalised values (left out of the bar)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    pen = np.zeros(v.shape, bool) if penalised is None else np.asarray(penalised, dtype=bool).reshape(-1)
    if pen.shape != v.shape:
        raise ValueError(f"penalised flags ({pen.size}) and values ({v.size}) differ in length")
    a = finite(v[~pen])
    m = float(a.mean()) if a.size else np.nan
    lo, hi = confidence_interval(a)
    if np.isfinite(lo):
        lo, hi = float(np.clip(lo, *valid_range)), float(np.clip(hi, *valid_range))
    # a one-empty case counts as penalised only where it has a value (under the NaN policy it has none)
    return {"mean": m, "ci_low": lo, "ci_high": hi, "n": int(a.size), "n_penalised": int((pen & np.isfinite(v)).sum())}


def bar_chart_ci(samples: Mapping[str, Mapping[str, Sequence[float]]], metric: str,
                 out_path: os.PathLike, title: str = "",
                 penalised: Optional[Mapping[str, Mapping[str, Sequence[bool]]]] = None) -> Path:
    """Grouped bars: x = structures, one bar per entry (e.g. ``"DA/2d"``), height = mean of the
    finite values, error bar = Student-t 95% CI of the mean, clipped to the metric's valid range
    (``VALID_RANGE``: DSC/IoU in [0, 1], distances >= 0). Entries named ``"approach/model"`` get
    one colour per approach and one hatch per model, so that no two bars look alike. A bar with
    no finite value is marked "n/a".

    samples: ``{entry: {structure: values}}``; penalised: the same shape, True where a value is
    an empty-mask penalty (``EvaluationResults.penalised``): such values are left out of the bar
    and its CI, and their count is written above the bar (``"k pen."``), so that a few huge
    penalties do not hide the other cases. Written atomically as PNG; returns the path.
    """
    entries = list(samples)
    structures = list(dict.fromkeys(s for e in entries for s in samples[e]))
    width = 0.8 / max(1, len(entries))
    x = np.arange(len(structures))
    fig = figure(figsize=(max(4.0, 1.2 + 1.6 * len(structures) + 0.25 * len(entries)),
                          3.6 + 0.2 * ((len(entries) + 3) // 4)), dpi=120)
    ax = fig.subplots()
    styles = _bar_styles(entries)
    rng = VALID_RANGE.get(metric, (-np.inf, np.inf))
    any_pen = False
    notes = []  # (x, top, text, colour): written once the y-range is known
    for i, e in enumerate(entries):
        means, lo, hi, tops, pens = [], [], [], [], []
        for s in structures:
            flags = None if penalised is None else (penalised.get(e) or {}).get(s)
            st = bar_stats(samples[e].get(s, []), flags, rng)
            m = st["mean"]
            means.append(m)
            lo.append(m - st["ci_low"] if np.isfinite(st["ci_low"]) else 0.0)
            hi.append(st["ci_high"] - m if np.isfinite(st["ci_high"]) else 0.0)
            tops.append(st["ci_high"] if np.isfinite(st["ci_high"]) else (m if np.isfinite(m) else 0.0))
            pens.append(st["n_penalised"])
        colour, hatch = styles[e]
        pos = x + (i - (len(entries) - 1) / 2) * width
        ax.bar(pos, means, width, yerr=[lo, hi], capsize=3, label=e,
               color=colour, hatch=hatch, edgecolor="white" if hatch else None, linewidth=0)
        for px, m, top, k in zip(pos, means, tops, pens):
            if not np.isfinite(m):  # no finite value (e.g. only empty predictions): say so
                ax.text(px, 0, "n/a", rotation=90, fontsize=6, ha="center", va="bottom", color=colour)
            if k:
                any_pen = True
                notes.append((px, top, f"{k} pen.", colour))
    ymax = max([t for _, t, _, _ in notes] + [ax.get_ylim()[1]])
    for px, top, text, colour in notes:
        ax.text(px, top + 0.01 * ymax, text, rotation=90, fontsize=7, ha="center", va="bottom", color=colour)
    if notes:
        ax.set_ylim(top=ymax * 1.12)
    ax.set_xticks(x)
    ax.set_xticklabels(structures)
    unit = "" if HIGHER_IS_BETTER.get(metric, True) else " (mm)"
    arrow = "higher is better" if HIGHER_IS_BETTER.get(metric, True) else "lower is better"
    ax.set_ylabel(f"{metric}{unit}")
    pen_note = "\nk pen.: k cases with an empty-mask penalty, left out of the bar" if any_pen else ""
    ax.set_title((title or f"{metric} ({arrow}); error bars: 95% CI") + pen_note, fontsize=9 if any_pen else None)
    hatched = any(h for _, h in styles.values())  # one legend column per colour (approach)
    ncol = len({c for c, _ in styles.values()}) if hatched else min(4, len(entries))
    ax.legend(fontsize=7, ncol=ncol, frameon=False, loc="upper center",
              bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    return save_figure(fig, out_path)


def count_chart(counts: Mapping[str, Mapping[str, Mapping[str, float]]], out_path: os.PathLike,
                kinds: Sequence[str] = ("missing", "spurious"), title: str = "") -> Path:
    """One panel per kind (e.g. missing, spurious structures), grouped bars x = structure, one
    bar per entry (styles as in ``bar_chart_ci``), height = the count (NaN: "n/a").

    counts: ``{entry: {structure: {kind: count}}}``. Written atomically as PNG; returns the path."""
    entries = list(counts)
    structures = list(dict.fromkeys(s for e in entries for s in counts[e]))
    width = 0.8 / max(1, len(entries))
    x = np.arange(len(structures))
    fig = figure(figsize=(max(4.0, 1.2 + 1.6 * len(structures) + 0.25 * len(entries)) * len(kinds) * 0.8,
                          3.6 + 0.2 * ((len(entries) + 3) // 4)), dpi=120)
    axes = np.atleast_1d(fig.subplots(1, len(kinds), sharey=True))
    styles = _bar_styles(entries)
    for ax, kind in zip(axes, kinds):
        for i, e in enumerate(entries):
            vals = [float(counts[e].get(s, {}).get(kind, np.nan)) for s in structures]
            colour, hatch = styles[e]
            pos = x + (i - (len(entries) - 1) / 2) * width
            ax.bar(pos, vals, width, label=e, color=colour, hatch=hatch,
                   edgecolor="white" if hatch else None, linewidth=0)
            for px, v in zip(pos, vals):
                ax.text(px, v if np.isfinite(v) else 0, f"{v:g}" if np.isfinite(v) else "n/a", fontsize=6,
                        ha="center", va="bottom", color=colour, rotation=0 if np.isfinite(v) else 90)
        ax.set_xticks(x)
        ax.set_xticklabels(structures)
        ax.set_title(kind)
    axes[0].set_ylabel("cases")
    if title:
        fig.suptitle(title, fontsize=10)
    hatched = any(h for _, h in styles.values())
    ncol = len({c for c, _ in styles.values()}) if hatched else min(4, len(entries))
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, ncol=ncol, frameon=False,
               loc="lower center")
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(entries) - 1) // max(ncol, 1)), 1, 1))
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


def image_pairs(top: np.ndarray, bottom: np.ndarray, titles_top: Sequence[str], titles_bottom: Sequence[str],
                out_path: os.PathLike, row_labels: Sequence[str] = ("", "")) -> Path:
    """Two rows of grey images, column ``i`` showing ``top[i]`` above ``bottom[i]`` (each
    ``(n, h, w)`` in ``[0, 1]``, shown on that fixed range); PNG written atomically."""
    top, bottom = np.asarray(top), np.asarray(bottom)
    if top.shape != bottom.shape or top.ndim != 3 or top.shape[0] == 0:
        raise ValueError(f"expected two equal non-empty (n, h, w) stacks, got {top.shape} and {bottom.shape}")
    n = top.shape[0]
    fig = figure(figsize=(2.0 * n, 4.4), dpi=110)
    axes = np.asarray(fig.subplots(2, n, squeeze=False))
    for i in range(n):
        for r, (img, title) in enumerate(((top[i], titles_top[i]), (bottom[i], titles_bottom[i]))):
            ax = axes[r, i]
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and row_labels[r]:
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_path)


def label_image_grid(panels: Sequence[Sequence[np.ndarray]], kinds: Sequence[str], column_titles: Sequence[str],
                     row_titles: Sequence[str], out_path: os.PathLike, label_values: Sequence[int],
                     label_names: Optional[Sequence[str]] = None, title: str = "") -> Path:
    """A grid of 2D panels, row ``r`` column ``c`` showing ``panels[r][c]`` (``(h, w)``; rows may
    differ in size). ``kinds[c]`` is ``"labels"`` (an integer map: background 0 and unlisted values
    black, label ``label_values[i]`` in the i-th non-grey colour of tab10 from red on, a legend with
    ``label_names``) or ``"image"`` (grey, shown on the fixed range [0, 1]). PNG written atomically."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n_rows, n_cols = len(panels), len(kinds)
    if n_rows == 0 or any(len(row) != n_cols for row in panels):
        raise ValueError(f"expected a non-empty grid with {n_cols} panels per row")
    if len(column_titles) != n_cols or len(row_titles) != n_rows or set(kinds) - {"labels", "image"}:
        raise ValueError("one title per column and row, kinds 'labels' or 'image'")
    values = [int(v) for v in label_values]
    if label_names is not None and len(label_names) != len(values):
        raise ValueError(f"{len(label_names)} label names for {len(values)} label values")
    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]  # 7: grey, like the images
    colours = [(0.0, 0.0, 0.0)] + [palette[(3 + i) % len(palette)] for i in range(len(values))]
    cmap = ListedColormap(colours)
    fig = figure(figsize=(2.0 * n_cols, 2.0 * n_rows + 0.6), dpi=110)
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    for r, row in enumerate(panels):
        for c, (panel, kind) in enumerate(zip(row, kinds)):
            ax, a = axes[r, c], np.asarray(panel)
            if kind == "labels":
                index = np.zeros(a.shape, np.int64)  # 0: background and any other value
                for i, v in enumerate(values):
                    index[np.rint(a) == v] = i + 1
                ax.imshow(index, cmap=cmap, vmin=0, vmax=len(values), interpolation="nearest")
            else:
                ax.imshow(a, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_titles[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(row_titles[r], fontsize=8)
    names = list(label_names) if label_names is not None else [str(v) for v in values]
    fig.legend(handles=[Patch(color=colours[i + 1], label=names[i]) for i in range(len(values))],
               loc="lower center", ncol=len(values), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, out_path)


def roc_curve_figure(fpr: np.ndarray, tpr: np.ndarray, out_path: os.PathLike, title: str = "") -> Path:
    """A ROC curve (false- against true-positive rate) with the chance diagonal; PNG written atomically."""
    fig = figure(figsize=(4.2, 4.0), dpi=120)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    ax.plot(np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float), color="C0", linewidth=1.6, label="classifier")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, out_path)
