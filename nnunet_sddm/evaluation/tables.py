"""Table-1-style result tables (rows = approach x model, columns DSC IoU ASD ASSD HD HD95) as
Markdown, CSV and LaTeX.

A table is a list of ``TableRow``; each cell carries its mean and a mark:
``"best"`` (bold: the best mean of its column within its model group), ``"ns"`` (not
significantly worse than the best: the table's test, p > alpha against the best row;
Markdown/LaTeX show a dagger) or ``""``; and ``sig_vs_baseline`` (an asterisk: the test's
Holm-adjusted p < alpha against the baseline of the same model); ``n`` of ``n_total`` cases had
a finite value (shown when fewer, or always with ``show_n``); with ``repeats`` >= 2 (the same
entry trained with different seeds) the mean is the mean over repeats of the per-repeat means
and ``spread`` the standard deviation between those means (ddof = 1), shown as ``0.812 ± 0.010``.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from nnunet_sddm.evaluation.metrics import HIGHER_IS_BETTER, METRICS

_DECIMALS = {"DSC": 3, "IoU": 3, "ASD": 2, "ASSD": 2, "HD": 2, "HD95": 2}
#: Tests behind the table marks (``compare_results(test=...)``) and how captions name them.
TEST_NAMES = {"wilcoxon": "two-sided Wilcoxon signed-rank test, paired by case",
              "ttest_rel": "two-sided paired t-test, paired by case",
              "welch": "Welch's t-test"}


@dataclass
class Cell:
    mean: float
    mark: str = ""              # "best", "ns" or ""
    p_vs_best: float = math.nan
    p_vs_baseline: float = math.nan
    sig_vs_baseline: bool = False
    n: int = -1                 # cases with a finite value (-1: unknown)
    n_total: int = -1           # cases in the row
    spread: float = math.nan    # std (ddof = 1) between the repeats' means (NaN: < 2 repeats)
    repeats: int = 1            # repeats (training seeds) behind the mean


@dataclass
class TableRow:
    approach: str
    model: str
    name: str
    cells: Dict[str, Cell] = field(default_factory=dict)


def caption(structure: str, alpha: float, metrics: Sequence[str] = METRICS, test: Optional[str] = None,
            finite_only: bool = False, repeats: bool = False) -> str:
    """Caption stating the structure, the direction of each metric and the marks.

    test: a ``TEST_NAMES`` key: the marks use that test and the star Holm's correction over the
    table's comparisons (None: Welch's t-test, uncorrected, the paper's marks); finite_only: the
    distances exclude cases with exactly one empty mask; repeats: some means are over repeats."""
    up = [m for m in metrics if HIGHER_IS_BETTER[m]]
    down = [m for m in metrics if not HIGHER_IS_BETTER[m]]
    what = ("Mean over cases of each case's mean over structures" if structure == "all"
            else f"{structure}: mean over cases")
    if test is None:
        marks = (f"† not significantly worse than the best (Welch's t-test p > {alpha:g}); * significantly "
                 f"different from the baseline of the same model (p < {alpha:g})")
    else:
        name = TEST_NAMES[test]
        marks = (f"† not significantly worse than the best ({name} against the best row, p > {alpha:g}, "
                 f"uncorrected); * significantly different from the baseline of the same model ({name}, "
                 f"Holm-adjusted over all comparisons of this table, p < {alpha:g})")
    nan_note = ("Distances: cases with exactly one empty mask are excluded (not penalised); "
                "(n=k/N): k of the N cases had a finite value." if finite_only
                else "(n=k/N): only k of the N cases had a finite value.")
    rep_note = (" Mean ± std: the mean over repeats (training seeds) of each repeat's mean, and the "
                "standard deviation between the repeats' means." if repeats else "")
    return (f"{what}. Higher is better for {', '.join(up)}; lower is better for {', '.join(down)} (mm). "
            f"Bold: best in its column within the same model; {marks}; {nan_note}{rep_note}")


def _value(m: str, c: Cell) -> str:
    return "n/a" if not math.isfinite(c.mean) else f"{c.mean:.{_DECIMALS[m]}f}"


def _spread(m: str, c: Cell, pm: str) -> str:
    """`` ± 0.010`` (``pm`` is the plus-minus sign) when the mean is over >= 2 repeats."""
    return f" {pm} {c.spread:.{_DECIMALS[m]}f}" if c.repeats >= 2 and math.isfinite(c.spread) else ""


def _count(c: Cell, always: bool = False) -> str:
    """`` (n=8/10)`` when some cases had no finite value (the mean and tests use fewer cases), or
    always (``always``, when n is known)."""
    return f" (n={c.n}/{c.n_total})" if 0 <= c.n and (c.n < c.n_total or always) else ""


def _marked_cells(r: TableRow, bold: Callable[[str], str], dagger: str, pm: str = "±",
                  show_n: bool = False) -> List[str]:
    """One row's metric cells: value, bold if best, ``dagger`` if not significantly worse than the
    best, ``*`` if significantly different from the baseline, the spread between repeats, then
    the count if cases were left out (or always, ``show_n``)."""
    cells = []
    for m in METRICS:
        c = r.cells[m]
        v = _value(m, c)
        if c.mark == "best":
            v = bold(v)
        elif c.mark == "ns":
            v += dagger
        if c.sig_vs_baseline:
            v += "*"
        cells.append(v + _spread(m, c, pm) + _count(c, show_n))
    return cells


def _has_repeats(rows: Sequence[TableRow]) -> bool:
    return any(c.repeats >= 2 for r in rows for c in r.cells.values())


def to_markdown(rows: Sequence[TableRow], structure: str, alpha: float, test: Optional[str] = None,
                finite_only: bool = False) -> str:
    """Markdown table with its caption (see ``caption``); ``finite_only``: every cell shows its n."""
    cap = caption(structure, alpha, test=test, finite_only=finite_only, repeats=_has_repeats(rows))
    lines = [f"**Table: {cap}**", "",
             "| approach | model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for r in rows:
        cells = _marked_cells(r, lambda v: f"**{v}**", "†", show_n=finite_only)
        lines.append(f"| {r.approach} | {r.model or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_latex(rows: Sequence[TableRow], structure: str, alpha: float, test: Optional[str] = None,
             finite_only: bool = False) -> str:
    """LaTeX table (``table`` environment) with its caption (see ``caption``)."""
    def esc(s: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#")):
            s = s.replace(a, b)
        return s

    lines = [r"\begin{table}[t]", r"\centering",
             r"\caption{" + esc(caption(structure, alpha, test=test, finite_only=finite_only,
                                         repeats=_has_repeats(rows))).replace("†", r"$^\dagger$")
             .replace("±", r"$\pm$") + "}",
             r"\begin{tabular}{ll" + "r" * len(METRICS) + "}", r"\hline",
             "Approach & Model & " + " & ".join(METRICS) + r" \\", r"\hline"]
    for r in rows:
        cells = _marked_cells(r, lambda v: r"\textbf{" + v + "}", r"$^\dagger$", r"$\pm$", finite_only)
        lines.append(f"{esc(r.approach)} & {esc(r.model or '-')} & " + " & ".join(cells) + r" \\")
    lines += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def records_to_csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """CSV of dict rows in the given column order, floats as ``repr`` (full precision, ``nan``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([repr(float(r[k])) if isinstance(r[k], float) else r[k] for k in columns])
    return buf.getvalue()


def to_csv(rows: Sequence[TableRow]) -> str:
    """Machine-readable table: per metric the mean at full precision, mark, p against the best
    row, p against the baseline (as used for the star), n, the spread between repeats (NaN with
    fewer than 2) and the number of repeats."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["name", "approach", "model"]
               + [f"{m}{suffix}" for m in METRICS
                  for suffix in ("", "_mark", "_p_vs_best", "_p_vs_baseline", "_n", "_spread", "_repeats")])
    for r in rows:
        vals = []
        for m in METRICS:
            c = r.cells[m]
            vals += [repr(c.mean), c.mark, repr(c.p_vs_best), repr(c.p_vs_baseline), c.n, repr(c.spread), c.repeats]
        w.writerow([r.name, r.approach, r.model] + vals)
    return buf.getvalue()
