"""Table-1-style result tables (rows = approach x model, columns DSC IoU ASD ASSD HD HD95) as
Markdown, CSV and LaTeX.

A table is a list of ``TableRow``; each cell carries its mean and a mark:
``"best"`` (bold: the best mean of its column within its model group), ``"ns"`` (not
significantly worse than the best: Welch's p > alpha against the best row; Markdown/LaTeX
show a dagger) or ``""``; and ``sig_vs_baseline`` (an asterisk: Welch's p < alpha against
the baseline of the same model); ``n`` of ``n_total`` cases had a finite value (shown when fewer).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

from nnunet_sddm.evaluation.metrics import HIGHER_IS_BETTER, METRICS

_DECIMALS = {"DSC": 3, "IoU": 3, "ASD": 2, "ASSD": 2, "HD": 2, "HD95": 2}


@dataclass
class Cell:
    mean: float
    mark: str = ""              # "best", "ns" or ""
    p_vs_best: float = math.nan
    p_vs_baseline: float = math.nan
    sig_vs_baseline: bool = False
    n: int = -1                 # cases with a finite value (-1: unknown)
    n_total: int = -1           # cases in the row


@dataclass
class TableRow:
    approach: str
    model: str
    name: str
    cells: Dict[str, Cell] = field(default_factory=dict)


def caption(structure: str, alpha: float, metrics: Sequence[str] = METRICS) -> str:
    """Caption stating the structure, the direction of each metric and the marks."""
    up = [m for m in metrics if HIGHER_IS_BETTER[m]]
    down = [m for m in metrics if not HIGHER_IS_BETTER[m]]
    what = ("Mean over cases of each case's mean over structures" if structure == "all"
            else f"{structure}: mean over cases")
    return (f"{what}. Higher is better for {', '.join(up)}; lower is better for {', '.join(down)} (mm). "
            f"Bold: best in its column within the same model; † not significantly worse than the best "
            f"(Welch's t-test p > {alpha:g}); * significantly different from the baseline of the same "
            f"model (p < {alpha:g}); (n=k/N): only k of the N cases had a finite value.")


def _value(m: str, c: Cell) -> str:
    return "n/a" if not math.isfinite(c.mean) else f"{c.mean:.{_DECIMALS[m]}f}"


def _count(c: Cell) -> str:
    """`` (n=8/10)`` when some cases had no finite value (the mean and tests use fewer cases)."""
    return f" (n={c.n}/{c.n_total})" if 0 <= c.n < c.n_total else ""


def _marked_cells(r: TableRow, bold: Callable[[str], str], dagger: str) -> List[str]:
    """One row's metric cells: value, bold if best, ``dagger`` if not significantly worse than the
    best, ``*`` if significantly different from the baseline, then the count if cases were left out."""
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
        cells.append(v + _count(c))
    return cells


def to_markdown(rows: Sequence[TableRow], structure: str, alpha: float) -> str:
    lines = [f"**Table: {caption(structure, alpha)}**", "",
             "| approach | model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for r in rows:
        cells = _marked_cells(r, lambda v: f"**{v}**", "†")
        lines.append(f"| {r.approach} | {r.model or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_latex(rows: Sequence[TableRow], structure: str, alpha: float) -> str:
    def esc(s: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#")):
            s = s.replace(a, b)
        return s

    lines = [r"\begin{table}[t]", r"\centering",
             r"\caption{" + esc(caption(structure, alpha)).replace("†", r"$^\dagger$") + "}",
             r"\begin{tabular}{ll" + "r" * len(METRICS) + "}", r"\hline",
             "Approach & Model & " + " & ".join(METRICS) + r" \\", r"\hline"]
    for r in rows:
        cells = _marked_cells(r, lambda v: r"\textbf{" + v + "}", r"$^\dagger$")
        lines.append(f"{esc(r.approach)} & {esc(r.model or '-')} & " + " & ".join(cells) + r" \\")
    lines += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[TableRow]) -> str:
    """Machine-readable table: means at full precision, marks and p-values."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["name", "approach", "model"]
               + [f"{m}{suffix}" for m in METRICS for suffix in ("", "_mark", "_p_vs_best", "_p_vs_baseline", "_n")])
    for r in rows:
        vals = []
        for m in METRICS:
            c = r.cells[m]
            vals += [repr(c.mean), c.mark, repr(c.p_vs_best), repr(c.p_vs_baseline), c.n]
        w.writerow([r.name, r.approach, r.model] + vals)
    return buf.getvalue()
