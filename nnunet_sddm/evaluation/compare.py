"""Compare evaluated approaches against their baseline: paired tests, Holm's correction, bootstrap
CIs, repeats, Table-1-style tables, missing/spurious structure counts and Fig.-7-style bar charts.

Entry names give the table rows (approach x model):

* ``"DA/2d_nnunet"``: approach ``DA``, model ``2d_nnunet`` (split at the LAST ``/``);
* ``"approach=DA,model=2d_nnunet"``: the same, explicit;
* ``"DA"``: approach ``DA`` with no model (all such rows form one group).

An entry's source is an evaluation folder, a ``per_case.csv`` or ``EvaluationResults``, or a LIST
of them: repeats of the entry (the same cases, different training seeds). Notation, per entry,
structure group s (each structure, and ``all``: one value per case, the mean over its
structures) and metric:

* x_r[c]: the value of case c in repeat r; the entry's per-case value x[c] = mean over the
  repeats with a finite x_r[c] (NaN if none); with one repeat x = x_1;
* cell mean = mean over repeats of mean_c x_r[c] (finite values); spread = std (ddof = 1) of
  those repeat means (shown as ``mean ± spread`` with >= 2 repeats).

Each candidate is compared with the baseline of the same model (or the single baseline), per
structure group and metric, on the per-case values:

* Welch's t-test over all finite values of each (unpaired; ``welch.csv``, the paper's test);
* paired by case over the cases where both are finite (candidate - baseline): paired t-test,
  Wilcoxon signed-rank test, mean difference with a seeded percentile bootstrap 95% CI
  (``statistics.paired_tests``);
* ``p_holm``: Holm-adjusted p of the marks' test (``test``), over all comparisons of ONE table
  (one structure group: every candidate x metric); ``significant``: p_holm < alpha;
* repeats: ``repeats_same_sign_significant`` = in how many of the candidate's repeats the mean
  paired change against the baseline (its repeat of the same index when the baseline has as many
  repeats, else the baseline's per-case values) has the sign of the pooled change and the
  repeat's Wilcoxon p < alpha (uncorrected).

Tables: within each model group and column the best cell mean is bold (max for DSC/IoU, min for
distances); ``†``: not significantly worse than the best row (the marks' test against the best
row, paired where the test is, uncorrected p > alpha); ``*``: p_holm < alpha against the baseline.
The NaN-policy tables (``table_finite*``) use the same marks on values where the distances of a
case-structure with exactly one empty mask are NaN instead of a penalty (derived from the
per-case rows and their empty flags, no re-evaluation); every cell shows its n.

Missing / spurious structures: per entry and structure, the number of cases where the reference
has the structure and the prediction is empty (missing) or the reverse (spurious), counted per
repeat and averaged over repeats (``all``: summed over the structures). ``nan`` where a repeat's
per_case.csv has no empty flags (written before they existed).

Outputs in ``out_dir`` (staged, then renamed; the CSV files are byte-identical for identical
inputs): ``welch.csv``; ``tests.csv``; ``structures.csv``, ``missing.md``, ``fig_missing.png``;
``table.{md,csv,tex}`` (all structures pooled) and ``table_<structure>.{md,csv,tex}``; the same as
``table_finite[_<structure>].{md,csv,tex}``; ``fig_<metric>.png`` (bars per structure: mean and
95% CI over the cases without an empty-mask penalty, penalised cases counted above the bar);
``compare.json`` (configuration and inputs).
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_sddm import __version__
from nnunet_sddm.evaluation.evaluate import EvaluationResults, load_results, nan_policy_view
from nnunet_sddm.evaluation.figures import bar_chart_ci, count_chart
from nnunet_sddm.evaluation.metrics import HIGHER_IS_BETTER, METRICS
from nnunet_sddm.evaluation.statistics import finite, holm, paired_tests, welch
from nnunet_sddm.evaluation.tables import TEST_NAMES, Cell, TableRow, records_to_csv, to_csv, to_latex, to_markdown
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import staging_dir

PathLike = Union[str, os.PathLike]
Source = Union[PathLike, EvaluationResults]
#: One source, or a list of sources: repeats of one entry.
EntrySource = Union[Source, Sequence[Source]]
Entries = Union[Mapping[str, EntrySource], Sequence[Tuple[str, EntrySource]]]
#: Tests that can drive the table marks (``compare_results(test=...)``).
TESTS = tuple(TEST_NAMES)
#: Columns of ``tests.csv`` (and keys of ``compare_results(...)["tests"]`` rows).
TEST_COLUMNS = ("candidate", "baseline", "structure", "metric", "mean_candidate", "mean_baseline",
                "n_candidate", "n_baseline", "n", "mean_diff", "ci_low", "ci_high", "t_welch", "p_welch",
                "t_ttest_rel", "p_ttest_rel", "p_wilcoxon", "test", "p_holm", "significant",
                "candidate_better", "repeats", "repeats_same_sign_significant")
#: Columns of ``structures.csv`` (keys of ``compare_results(...)["structures"]`` rows).
STRUCTURE_COLUMNS = ("entry", "approach", "model", "structure", "repeats", "n_cases", "missing", "spurious",
                     "missing_per_repeat", "spurious_per_repeat")


@dataclass
class Entry:
    """One table row: its name, approach, model and the results of its repeats (>= 1)."""

    name: str
    approach: str
    model: str
    repeats: List[EvaluationResults]

    def pooled(self, structure: str, metric: str) -> Tuple[List[str], np.ndarray]:
        """``(case ids, per-case values)``: the mean over the repeats' finite values per case (NaN
        if none), cases in order of first appearance; one repeat: its values as they are."""
        if len(self.repeats) == 1:
            r = self.repeats[0]
            return r.case_ids(structure), r.values(structure, metric)
        per: Dict[str, List[float]] = {}
        for r in self.repeats:
            for c, v in zip(r.case_ids(structure), r.values(structure, metric)):
                per.setdefault(c, [])
                if math.isfinite(v):
                    per[c].append(float(v))
        return list(per), np.array([np.mean(v) if v else math.nan for v in per.values()], dtype=np.float64)

    def penalised(self, structure: str, metric: str) -> np.ndarray:
        """Per case of ``pooled``: the value has an empty-mask penalty in at least one repeat."""
        flags: Dict[str, bool] = {}
        for r in self.repeats:
            for c, f in zip(r.case_ids(structure), r.penalised(structure, metric)):
                flags[c] = flags.get(c, False) or bool(f)
        return np.array([flags.get(c, False) for c in self.pooled(structure, metric)[0]], dtype=bool)

    def repeat_means(self, structure: str, metric: str) -> np.ndarray:
        """Mean of each repeat's finite values (NaN for a repeat without one)."""
        out = []
        for r in self.repeats:
            v = finite(r.values(structure, metric))
            out.append(float(v.mean()) if v.size else math.nan)
        return np.array(out, dtype=np.float64)

    def cell(self, structure: str, metric: str) -> Cell:
        """Table cell: mean over repeats of the repeat means, spread between them, n of the pooled
        per-case values (no marks yet)."""
        _, x = self.pooled(structure, metric)
        rm = finite(self.repeat_means(structure, metric))
        return Cell(mean=float(rm.mean()) if rm.size else math.nan, n=int(finite(x).size), n_total=int(x.size),
                    spread=float(rm.std(ddof=1)) if rm.size >= 2 else math.nan, repeats=len(self.repeats))


def _better(metric: str, change: float) -> bool:
    """Whether a change (candidate - baseline) of ``metric`` is an improvement; the direction of a
    paired test's verdict is the sign of the mean PAIRED difference, Welch's of the means."""
    return bool(change > 0) if HIGHER_IS_BETTER[metric] else bool(change < 0)


def paired_values(a: Tuple[List[str], np.ndarray], b: Tuple[List[str], np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Values of two ``(case ids, values)`` samples on their common cases, in sorted case order
    (so the pairing, and the bootstrap, do not depend on the row order of the inputs)."""
    da, db = dict(zip(*a)), dict(zip(*b))
    common = sorted(set(da) & set(db))
    return (np.array([da[c] for c in common], dtype=np.float64),
            np.array([db[c] for c in common], dtype=np.float64))


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


def _load_entry(name: str, source: EntrySource) -> Entry:
    srcs = list(source) if isinstance(source, (list, tuple)) else [source]
    if not srcs:
        raise SDDMError(f"{name}: empty list of repeats")
    approach, model = parse_entry_name(name)
    return Entry(name=name, approach=approach, model=model, repeats=[load_results(x) for x in srcs])


def _test_p(test: str, a: Tuple[List[str], np.ndarray], b: Tuple[List[str], np.ndarray]) -> float:
    """Raw p of ``test`` for sample a vs sample b (``(case ids, values)``; paired tests on the common cases)."""
    if test == "welch":
        return welch(a[1], b[1])["p"]
    pt = paired_tests(*paired_values(a, b), n_boot=0)
    return pt["p_wilcoxon"] if test == "wilcoxon" else pt["p_ttest_rel"]


def _comparisons(entries: Dict[str, Entry], pairs: Sequence[Tuple[str, str]], groups: Sequence[str],
                 alpha: float, test: str, seed: int, n_boot: int, agreement: bool = True) -> Tuple[List[dict], List[dict]]:
    """``(tests rows, welch rows)`` of every (candidate, baseline) pair, structure group and
    metric; p_holm over the rows of one structure group."""
    tests_rows, welch_rows = [], []
    for cand, base in pairs:
        c, b = entries[cand], entries[base]
        for s in groups:
            for m in METRICS:
                xc, xb = c.pooled(s, m), b.pooled(s, m)
                w = welch(xc[1], xb[1])
                mx, my = finite(xc[1]), finite(xb[1])
                mean_c = float(mx.mean()) if mx.size else math.nan
                mean_b = float(my.mean()) if my.size else math.nan
                welch_rows.append({"candidate": cand, "baseline": base, "structure": s, "metric": m,
                                   "mean_candidate": mean_c, "mean_baseline": mean_b,
                                   "n_candidate": w["n_a"], "n_baseline": w["n_b"], "t": w["t"], "p": w["p"],
                                   "significant": bool(w["p"] < alpha) if math.isfinite(w["p"]) else False,
                                   "candidate_better": _better(m, mean_c - mean_b)})
                pt = paired_tests(*paired_values(xc, xb), seed=seed, n_boot=n_boot)
                cm, bm = c.cell(s, m).mean, b.cell(s, m).mean
                agree = 0
                if agreement and math.isfinite(pt["mean_diff"]) and pt["mean_diff"] != 0:
                    same_index = len(b.repeats) == len(c.repeats)
                    for i, rep in enumerate(c.repeats):
                        ref = (b.repeats[i].case_ids(s), b.repeats[i].values(s, m)) if same_index else xb
                        pr = paired_tests(*paired_values((rep.case_ids(s), rep.values(s, m)), ref), n_boot=0)
                        if (math.isfinite(pr["mean_diff"]) and np.sign(pr["mean_diff"]) == np.sign(pt["mean_diff"])
                                and pr["p_wilcoxon"] < alpha):
                            agree += 1
                tests_rows.append({
                    "candidate": cand, "baseline": base, "structure": s, "metric": m,
                    "mean_candidate": cm, "mean_baseline": bm, "n_candidate": w["n_a"], "n_baseline": w["n_b"],
                    "n": pt["n"], "mean_diff": pt["mean_diff"], "ci_low": pt["ci_low"], "ci_high": pt["ci_high"],
                    "t_welch": w["t"], "p_welch": w["p"], "t_ttest_rel": pt["t"], "p_ttest_rel": pt["p_ttest_rel"],
                    "p_wilcoxon": pt["p_wilcoxon"], "test": test, "p_holm": math.nan, "significant": False,
                    "candidate_better": _better(m, cm - bm if test == "welch" else pt["mean_diff"]),
                    "repeats": len(c.repeats), "repeats_same_sign_significant": agree if agreement else -1})
    key = {"welch": "p_welch", "ttest_rel": "p_ttest_rel", "wilcoxon": "p_wilcoxon"}[test]
    for s in groups:
        sel = [r for r in tests_rows if r["structure"] == s]
        for r, ph in zip(sel, holm([r[key] for r in sel])):
            r["p_holm"] = float(ph)
            r["significant"] = bool(math.isfinite(ph) and ph < alpha)
    return tests_rows, welch_rows


def _tables(entries: Dict[str, Entry], groups: Sequence[str], tests_rows: Sequence[dict], alpha: float,
            test: str) -> Dict[str, List[TableRow]]:
    """Per structure group: one ``TableRow`` per entry with cells, bold, daggers and stars."""
    p_star = {(r["candidate"], r["structure"], r["metric"]): r["p_holm"] for r in tests_rows}
    tables: Dict[str, List[TableRow]] = {}
    for s in groups:
        rows = []
        for e in entries.values():
            row = TableRow(approach=e.approach, model=e.model, name=e.name)
            for m in METRICS:
                cell = e.cell(s, m)
                p = p_star.get((e.name, s, m), math.nan)
                cell.p_vs_baseline = p
                cell.sig_vs_baseline = bool(math.isfinite(p) and p < alpha)
                row.cells[m] = cell
            rows.append(row)
        for model in dict.fromkeys(e.model for e in entries.values()):
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
                    p = _test_p(test, entries[r.name].pooled(s, m), entries[best.name].pooled(s, m))
                    r.cells[m].p_vs_best = p
                    if math.isfinite(p) and p > alpha:
                        r.cells[m].mark = "ns"
        tables[s] = rows
    return tables


def structure_counts(entry: Entry) -> List[dict]:
    """Missing / spurious structure counts of one entry (rows as in ``structures.csv``): per
    structure and ``all`` (summed over structures), each repeat's count and their mean over
    repeats; NaN when a repeat has no empty flags."""
    out = []
    structures = list(dict.fromkeys(st for r in entry.repeats for st in r.structures))
    for s in structures + ["all"]:
        miss, spur, ncases = [], [], []
        for r in entry.repeats:
            sel = [x for x in r.rows if s == "all" or x["structure"] == s]
            ncases.append(len({x["case"] for x in sel}))
            if r.has_flags:
                miss.append(sum(bool(x["pred_empty"]) and not bool(x["ref_empty"]) for x in sel))
                spur.append(sum(bool(x["ref_empty"]) and not bool(x["pred_empty"]) for x in sel))
        known = len(miss) == len(entry.repeats)
        out.append({"entry": entry.name, "approach": entry.approach, "model": entry.model, "structure": s,
                    "repeats": len(entry.repeats), "n_cases": float(np.mean(ncases)),
                    "missing": float(np.mean(miss)) if known else math.nan,
                    "spurious": float(np.mean(spur)) if known else math.nan,
                    "missing_per_repeat": ";".join(map(str, miss)) if known else "",
                    "spurious_per_repeat": ";".join(map(str, spur)) if known else ""})
    return out


def missing_markdown(rows: Sequence[dict]) -> str:
    """Markdown table of ``structure_counts`` rows: entries x structures, cells ``missing / spurious``."""
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    entries = list(dict.fromkeys(r["entry"] for r in rows))
    by = {(r["entry"], r["structure"]): r for r in rows}
    multi = any(r["repeats"] > 1 for r in rows)

    def fmt(v: float) -> str:
        return "n/a" if not math.isfinite(v) else (f"{v:g}" if not multi else f"{v:.1f}")

    lines = ["**Table: missing / spurious structures: the number of cases where the reference has the structure "
             "and the prediction is empty (missing), and where the prediction has it and the reference does not "
             "(spurious)" + ("; with repeats, the mean over repeats of each repeat's count" if multi else "")
             + "; all: summed over the structures; n/a: empty flags unknown (per_case.csv from an older "
             "version).**", "", "| entry | " + " | ".join(structures) + " |", "|---" * (len(structures) + 1) + "|"]
    for e in entries:
        lines.append(f"| {e} | " + " | ".join(f"{fmt(by[e, s]['missing'])} / {fmt(by[e, s]['spurious'])}"
                                             for s in structures) + " |")
    return "\n".join(lines) + "\n"


def compare_results(baseline: Union[Entries, Tuple[str, EntrySource]], candidates: Entries,
                    out_dir: Optional[PathLike] = None, alpha: float = 0.01,
                    overwrite: bool = False, test: str = "wilcoxon", seed: int = 0,
                    n_boot: int = 10000) -> dict:
    """Tests of every candidate against its baseline, tables, counts and bar charts (see the
    module docstring).

    baseline: ``(name, source)`` or several of them (one per model); candidates: ``{name: source}``
    or ``[(name, source)]``; a source is an evaluation folder, a ``per_case.csv``, an
    ``EvaluationResults`` or a list of those (repeats). test: the test behind the table marks,
    ``"wilcoxon"`` (default), ``"ttest_rel"`` or ``"welch"`` (the paper's); seed, n_boot: the
    bootstrap of the mean paired differences. Returns ``{"welch": [...], "tests": [...],
    "structures": [...], "tables": {group: [TableRow]}, "tables_finite": {...} (empty when empty
    flags are unknown), "markdown": str}`` and, if ``out_dir`` is given, writes the files listed in
    the module docstring (refused if ``out_dir`` exists, unless ``overwrite``).
    """
    if not (0 < alpha < 1):
        raise SDDMError(f"alpha must be in (0, 1), got {alpha}")
    if test not in TESTS:
        raise SDDMError(f"test must be one of {', '.join(TESTS)}, got {test!r}")
    if n_boot < 0:
        raise SDDMError(f"n_boot must be >= 0, got {n_boot}")
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
    entries = {n: _load_entry(n, src) for n, src in bases + cands}
    base_of_model: Dict[str, str] = {}
    for n, _ in bases:
        model = entries[n].model
        if model in base_of_model:
            raise SDDMError(f"two baselines for model {model!r}: {base_of_model[model]}, {n}")
        base_of_model[model] = n
    structures = list(dict.fromkeys(s for n in names for r in entries[n].repeats for s in r.structures))
    for n in names:
        for i, r in enumerate(entries[n].repeats):
            missing = set(structures) - set(r.structures)
            if missing:
                rep = f" (repeat {i + 1})" if len(entries[n].repeats) > 1 else ""
                raise SDDMError(f"{n}{rep}: no results for structure(s) {sorted(missing)} present in other entries")
    groups = structures + ["all"]

    def baseline_for(n: str) -> str:
        model = entries[n].model
        if model in base_of_model:
            return base_of_model[model]
        if len(bases) == 1:
            return bases[0][0]
        raise SDDMError(f"{n}: no baseline with model {model!r} (baselines: {', '.join(base_of_model.values())})")

    pairs = [(n, baseline_for(n)) for n, _ in cands]
    tests_rows, welch_rows = _comparisons(entries, pairs, groups, alpha, test, seed, n_boot)
    tables = _tables(entries, groups, tests_rows, alpha, test)
    flags_known = all(r.has_flags for e in entries.values() for r in e.repeats)
    tables_finite: Dict[str, List[TableRow]] = {}
    if flags_known:
        fin = {n: Entry(e.name, e.approach, e.model, [nan_policy_view(r) for r in e.repeats])
               for n, e in entries.items()}
        fin_rows, _ = _comparisons(fin, pairs, groups, alpha, test, seed, 0, agreement=False)
        tables_finite = _tables(fin, groups, fin_rows, alpha, test)
    counts = [row for e in entries.values() for row in structure_counts(e)]

    out = {"welch": welch_rows, "tests": tests_rows, "structures": counts, "tables": tables,
           "tables_finite": tables_finite, "markdown": to_markdown(tables["all"], "all", alpha, test=test)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        with staging_dir(out_dir, overwrite=overwrite) as tmp:
            with open(tmp / "welch.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(welch_rows[0]) if welch_rows else ["candidate"])
                w.writeheader()
                for r in welch_rows:
                    w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
            (tmp / "tests.csv").write_bytes(records_to_csv(tests_rows, TEST_COLUMNS).encode())
            (tmp / "structures.csv").write_bytes(records_to_csv(counts, STRUCTURE_COLUMNS).encode())
            (tmp / "missing.md").write_text(missing_markdown(counts))
            count_chart({e: {r["structure"]: r for r in counts if r["entry"] == e and r["structure"] != "all"}
                         for e in names}, tmp / "fig_missing.png",
                        title="Missing / spurious structures (cases" + (", mean over repeats)" if any(
                            len(e.repeats) > 1 for e in entries.values()) else ")"))
            for family, tabs, finite_only in (("table", tables, False), ("table_finite", tables_finite, True)):
                for s, rows in tabs.items():
                    stem = family if s == "all" else f"{family}_{_safe(s)}"
                    (tmp / f"{stem}.md").write_text(to_markdown(rows, s, alpha, test=test, finite_only=finite_only))
                    (tmp / f"{stem}.tex").write_text(to_latex(rows, s, alpha, test=test, finite_only=finite_only))
                    (tmp / f"{stem}.csv").write_bytes(to_csv(rows).encode())
            for m in METRICS:
                samples = {n: {s: entries[n].pooled(s, m)[1] for s in structures} for n in names}
                pen = {n: {s: entries[n].penalised(s, m) for s in structures} for n in names}
                bar_chart_ci(samples, m, tmp / f"fig_{m}.png", penalised=pen)
            cfg = {"package_version": __version__, "alpha": alpha,
                   "test": "Welch's t-test (two-sided, scipy.stats.ttest_ind equal_var=False) over per-case values, "
                           "NaNs excluded (welch.csv); 'all': one value per case, the mean over its structures",
                   "marks_test": test, "marks_test_name": TEST_NAMES[test],
                   "multiple_comparisons": "Holm-Bonferroni over all comparisons of one table (structure group): "
                                           "every candidate x metric; applied to the star, not to the dagger",
                   "bootstrap": {"seed": seed, "n_boot": n_boot, "level": 0.95, "kind": "percentile"},
                   "nan_tables": bool(tables_finite),
                   "baselines": {n: _describe_sources(s) for n, s in bases},
                   "candidates": {n: _describe_sources(s) for n, s in cands},
                   "rows": {n: {"approach": entries[n].approach, "model": entries[n].model,
                                "repeats": len(entries[n].repeats)} for n in names}}
            (tmp / "compare.json").write_text(json.dumps(cfg, indent=2) + "\n")
        out["out_dir"] = out_dir
    return out


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def _describe_source(s: Source) -> str:
    if isinstance(s, EvaluationResults):
        return str(s.out_dir) if s.out_dir else "<in-memory results>"
    return str(Path(s).resolve())


def _describe_sources(s: EntrySource):
    return [_describe_source(x) for x in s] if isinstance(s, (list, tuple)) else _describe_source(s)
