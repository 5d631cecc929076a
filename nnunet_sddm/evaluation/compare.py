"""Compare evaluated approaches: Welch's t-tests against the baseline, Table-1-style tables and
Fig.-7-style bar charts.

Entry names give the table rows (approach x model):

* ``"DA/2d_nnunet"``: approach ``DA``, model ``2d_nnunet`` (split at the LAST ``/``);
* ``"approach=DA,model=2d_nnunet"``: the same, explicit;
* ``"DA"``: approach ``DA`` with no model (all such rows form one group).

Each candidate is tested against the baseline with the same model (or against the single
baseline when only one is given): per structure and ``all`` (the pooled case-structure rows)
and per metric, Welch's t-test over the per-case values (NaNs, i.e. empty masks under the NaN
policy, excluded). In the tables, within each model group and column, the best mean is bold
(max for DSC/IoU, min for distances) and every other row whose values are not significantly
worse than the best row's (Welch p > ``alpha``, default 0.01, as in the paper) gets a dagger.

Outputs in ``out_dir`` (staged, then renamed): ``welch.csv``; ``table.{md,csv,tex}`` (all
structures pooled) and ``table_<structure>.{md,csv,tex}``; ``fig_<metric>.png`` (bars per
structure, 95% CI); ``compare.json`` (configuration and inputs).
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from nnunet_sddm import __version__
from nnunet_sddm.evaluation.evaluate import EvaluationResults, load_results
from nnunet_sddm.evaluation.figures import bar_chart_ci
from nnunet_sddm.evaluation.metrics import HIGHER_IS_BETTER, METRICS
from nnunet_sddm.evaluation.statistics import finite, welch
from nnunet_sddm.evaluation.tables import Cell, TableRow, to_csv, to_latex, to_markdown
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import staging_dir

PathLike = Union[str, os.PathLike]
Source = Union[PathLike, EvaluationResults]
Entries = Union[Mapping[str, Source], Sequence[Tuple[str, Source]]]


def parse_entry_name(name: str) -> Tuple[str, str]:
    """``"DA/2d"`` or ``"approach=DA,model=2d"`` -> ``("DA", "2d")``; ``"DA"`` -> ``("DA", "")``."""
    name = str(name).strip()
    if not name:
        raise SDDMError("empty entry name")
    if "approach=" in name or "model=" in name:
        parts = {k.strip(): v for k, v in (p.split("=", 1) for p in re.split(r"[,;]", name) if "=" in p)}
        unknown = set(parts) - {"approach", "model"}
        if unknown or "approach" not in parts:
            raise SDDMError(f"entry name {name!r}: expected 'approach=A,model=M'")
        return parts["approach"].strip(), parts.get("model", "").strip()
    approach, sep, model = name.rpartition("/")
    return (approach, model) if sep and approach else (name, "")


def _as_list(entries: Union[Entries, Tuple[str, Source]]) -> List[Tuple[str, Source]]:
    if isinstance(entries, tuple) and len(entries) == 2 and isinstance(entries[0], str):
        return [entries]  # a single (name, source)
    if isinstance(entries, Mapping):
        return list(entries.items())
    return [tuple(e) for e in entries]


def _samples(res: EvaluationResults, structure: str, metric: str):
    return res.values(structure, metric)


def compare_results(baseline: Union[Entries, Tuple[str, Source]], candidates: Entries,
                    out_dir: Optional[PathLike] = None, alpha: float = 0.01,
                    overwrite: bool = False) -> dict:
    """Welch's tests of every candidate against its baseline, tables and bar charts.

    baseline: ``(name, evaluation folder | per_case.csv | EvaluationResults)`` or several of
    them (one per model); candidates: ``{name: source}`` or ``[(name, source)]``.
    Returns ``{"welch": [...], "tables": {structure: [TableRow]}, "markdown": str}`` and, if
    ``out_dir`` is given, writes the files listed in the module docstring (refused if
    ``out_dir`` exists, unless ``overwrite``).
    """
    if not (0 < alpha < 1):
        raise SDDMError(f"alpha must be in (0, 1), got {alpha}")
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise SDDMError(f"{out_dir}: output folder exists (use --overwrite to replace it)")
    bases = _as_list(baseline)
    cands = _as_list(candidates)
    if not bases:
        raise SDDMError("no baseline given")
    names = [n for n, _ in bases + cands]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SDDMError(f"duplicate entry names: {', '.join(dup)}")
    results = {n: load_results(s) for n, s in bases + cands}
    parsed = {n: parse_entry_name(n) for n in names}
    base_of_model: Dict[str, str] = {}
    for n, _ in bases:
        model = parsed[n][1]
        if model in base_of_model:
            raise SDDMError(f"two baselines for model {model!r}: {base_of_model[model]}, {n}")
        base_of_model[model] = n
    structures = list(dict.fromkeys(s for n in names for s in results[n].structures))
    for n in names:
        missing = set(structures) - set(results[n].structures)
        if missing:
            raise SDDMError(f"{n}: no results for structure(s) {sorted(missing)} present in other entries")
    groups = structures + ["all"]

    def baseline_for(n: str) -> str:
        model = parsed[n][1]
        if model in base_of_model:
            return base_of_model[model]
        if len(bases) == 1:
            return bases[0][0]
        raise SDDMError(f"{n}: no baseline with model {model!r} (baselines: {', '.join(base_of_model.values())})")

    welch_rows = []
    for n, _ in cands:
        b = baseline_for(n)
        for s in groups:
            for m in METRICS:
                x, y = _samples(results[n], s, m), _samples(results[b], s, m)
                w = welch(x, y)
                mx, my = finite(x), finite(y)
                mean_c = float(mx.mean()) if mx.size else math.nan
                mean_b = float(my.mean()) if my.size else math.nan
                better = (mean_c > mean_b) if HIGHER_IS_BETTER[m] else (mean_c < mean_b)
                welch_rows.append({"candidate": n, "baseline": b, "structure": s, "metric": m,
                                   "mean_candidate": mean_c, "mean_baseline": mean_b,
                                   "n_candidate": w["n_a"], "n_baseline": w["n_b"], "t": w["t"], "p": w["p"],
                                   "significant": bool(w["p"] < alpha) if math.isfinite(w["p"]) else False,
                                   "candidate_better": bool(better)})
    p_vs_base = {(r["candidate"], r["structure"], r["metric"]): r["p"] for r in welch_rows}

    tables: Dict[str, List[TableRow]] = {}
    for s in groups:
        rows = []
        for n in names:
            a, mdl = parsed[n]
            row = TableRow(approach=a, model=mdl, name=n)
            for m in METRICS:
                raw = _samples(results[n], s, m)
                v = finite(raw)
                p = p_vs_base.get((n, s, m), math.nan)
                row.cells[m] = Cell(mean=float(v.mean()) if v.size else math.nan, p_vs_baseline=p,
                                    sig_vs_baseline=bool(math.isfinite(p) and p < alpha),
                                    n=int(v.size), n_total=int(len(raw)))
            rows.append(row)
        for model in dict.fromkeys(parsed[n][1] for n in names):
            members = [r for r in rows if r.model == model]
            for m in METRICS:
                valid = [r for r in members if math.isfinite(r.cells[m].mean)]
                if not valid:
                    continue
                key = (lambda r: r.cells[m].mean)
                best = max(valid, key=key) if HIGHER_IS_BETTER[m] else min(valid, key=key)
                best.cells[m].mark = "best"
                for r in valid:
                    if r is best:
                        continue
                    p = welch(_samples(results[r.name], s, m), _samples(results[best.name], s, m))["p"]
                    r.cells[m].p_vs_best = p
                    if math.isfinite(p) and p > alpha:
                        r.cells[m].mark = "ns"
        tables[s] = rows

    out = {"welch": welch_rows, "tables": tables, "markdown": to_markdown(tables["all"], "all", alpha)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        with staging_dir(out_dir, overwrite=overwrite) as tmp:
            with open(tmp / "welch.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(welch_rows[0]) if welch_rows else ["candidate"])
                w.writeheader()
                for r in welch_rows:
                    w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
            for s, rows in tables.items():
                stem = "table" if s == "all" else f"table_{_safe(s)}"
                (tmp / f"{stem}.md").write_text(to_markdown(rows, s, alpha))
                (tmp / f"{stem}.tex").write_text(to_latex(rows, s, alpha))
                (tmp / f"{stem}.csv").write_text(to_csv(rows))
            for m in METRICS:
                samples = {n: {s: _samples(results[n], s, m) for s in structures} for n in names}
                bar_chart_ci(samples, m, tmp / f"fig_{m}.png")
            cfg = {"package_version": __version__, "alpha": alpha, "test": "Welch's t-test (two-sided, "
                   "scipy.stats.ttest_ind equal_var=False) over per-case values, NaNs excluded; "
                   "'all': one value per case, the mean over its structures",
                   "baselines": {n: _describe_source(s) for n, s in bases},
                   "candidates": {n: _describe_source(s) for n, s in cands},
                   "rows": {n: {"approach": parsed[n][0], "model": parsed[n][1]} for n in names}}
            (tmp / "compare.json").write_text(json.dumps(cfg, indent=2) + "\n")
        out["out_dir"] = out_dir
    return out


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def _describe_source(s: Source) -> str:
    if isinstance(s, EvaluationResults):
        return str(s.out_dir) if s.out_dir else "<in-memory results>"
    return str(Path(s).resolve())
