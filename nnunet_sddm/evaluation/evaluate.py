"""Evaluate a folder of predicted segmentations against a folder of reference segmentations.

Files are matched by case id (file name without its ending, e.g. nnU-Net's ``CASE.nii.gz``
labels and predictions). Every case is read, checked (same shape, spacing and affine; only
label values of the map) and scored with ``metrics.case_metrics``, in parallel over cases
(worker processes). Outputs in ``out_dir`` (written into a staging folder and renamed, so a
failed run leaves nothing half-written):

* ``per_case.csv``: long format, columns ``case, structure, DSC, IoU, ASD, ASSD, HD, HD95``
  (one row per case and structure; distances in mm; ``nan`` for undefined values);
* ``per_slice.csv`` (per-slice mode only): ``case, slice, structure`` + the six metrics;
* ``summary.json``: configuration (package version, folders, labels, empty policy, mode),
  missing cases, and per structure (and ``all``: pooled over all case-structure rows) the
  empty-mask counts and for each metric n, n_nan, mean, std, median and 95% CI;
* ``summary.md``: the same as a Markdown table.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, TypeVar, Union

import numpy as np

from nnunet_sddm import __version__
from nnunet_sddm.evaluation.io import (check_same_geometry, labels_from_dataset_json, list_cases,
                                       read_label_map)
from nnunet_sddm.evaluation.metrics import METRICS, EmptyPolicy, case_metrics, check_label_values
from nnunet_sddm.evaluation.statistics import describe
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import staging_dir
from nnunet_sddm.utilities.progress import progress_bar

T = TypeVar("T")
R = TypeVar("R")

PathLike = Union[str, os.PathLike]
#: Columns of ``per_case.csv``.
PER_CASE_COLUMNS = ("case", "structure") + METRICS
#: Labels used when neither --labels nor a dataset.json is available (M&Ms convention).
DEFAULT_LABELS = {"LV": 1, "MYO": 2, "RV": 3}


@dataclass
class EvaluationResults:
    """rows: one dict per case and structure (``case``, ``structure``, metrics, empty flags);
    structures: structure names in label-map order; summary: the ``summary.json`` content;
    slice_rows: per-slice rows (per-slice mode); out_dir: where they were written (or None)."""

    rows: List[dict]
    structures: List[str]
    summary: dict = field(default_factory=dict)
    slice_rows: Optional[List[dict]] = None
    out_dir: Optional[Path] = None

    def values(self, structure: str, metric: str) -> np.ndarray:
        """Per-case values of one metric for one structure, NaNs kept, in row order.

        ``"all"``: one value per CASE, the mean over its structures' finite values (NaN if none),
        so that tests over "all" count each case once (the structures of a case are not
        independent samples)."""
        if structure != "all":
            return np.array([r[metric] for r in self.rows if r["structure"] == structure], dtype=np.float64)
        per_case: Dict[str, List[float]] = {}
        for r in self.rows:
            per_case.setdefault(r["case"], []).append(float(r[metric]))
        return np.array([np.mean(f) if (f := [v for v in vals if np.isfinite(v)]) else np.nan
                         for vals in per_case.values()], dtype=np.float64)


def default_num_processes() -> int:
    """Worker processes used by default: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def parse_label_args(items: Sequence[str]) -> Dict[str, int]:
    """``["LV=1", "MYO=2"]`` -> ``{"LV": 1, "MYO": 2}`` (``SDDMError`` on malformed items)."""
    out: Dict[str, int] = {}
    for it in items:
        name, sep, value = str(it).partition("=")
        if not sep or not name:
            raise SDDMError(f"--labels: expected NAME=VALUE, got {it!r}")
        try:
            v = int(value)
        except ValueError:
            raise SDDMError(f"--labels: value of {name!r} must be an integer, got {value!r}") from None
        if v == 0:
            raise SDDMError(f"--labels: {name}=0 is the background, not a structure")
        if name in out or v in out.values():
            raise SDDMError(f"--labels: duplicate name or value in {it!r}")
        out[name] = v
    if not out:
        raise SDDMError("--labels: no structures given")
    return out


def resolve_labels(labels: Optional[Union[Mapping[str, int], Sequence[str]]] = None,
                   dataset_json: Optional[PathLike] = None,
                   search_dirs: Iterable[PathLike] = ()) -> tuple:
    """Structures to evaluate and where they came from: ``(labels, source, file_ending)``.

    Priority: explicit ``labels`` (mapping or ``NAME=VALUE`` strings) > ``dataset_json`` >
    a ``dataset.json`` in one of ``search_dirs`` (nnU-Net copies it into prediction folders) >
    ``DEFAULT_LABELS``. ``file_ending`` is the dataset.json's ``file_ending`` if one was read.
    """
    dj_path = Path(dataset_json) if dataset_json else None
    if dj_path is None:
        dj_path = next((Path(d) / "dataset.json" for d in search_dirs if (Path(d) / "dataset.json").is_file()),
                       None)
    dj = None
    if dj_path is not None:
        if not dj_path.is_file():
            raise SDDMError(f"{dj_path}: dataset.json not found")
        try:
            dj = json.loads(dj_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SDDMError(f"{dj_path}: not valid JSON ({e})") from None
        if not isinstance(dj, dict):
            raise SDDMError(f"{dj_path}: expected a JSON object")
    ending = dj.get("file_ending") if dj else None
    if labels:
        lab = dict(labels) if isinstance(labels, Mapping) else parse_label_args(labels)
        lab = {str(k): int(v) for k, v in lab.items()}
        if 0 in lab.values() or len(set(lab.values())) != len(lab):
            raise SDDMError(f"labels {lab}: values must be distinct and non-zero (0 is the background)")
        return lab, "labels argument", ending
    if dj is not None:
        return labels_from_dataset_json(dj, str(dj_path)), str(dj_path), ending
    return dict(DEFAULT_LABELS), "default (LV=1 MYO=2 RV=3)", None


def match_cases(ref_dir: PathLike, pred_dir: PathLike, file_ending: Optional[str] = None,
                allow_missing: bool = False) -> tuple:
    """Pair reference and prediction files by case id.

    Returns ``(pairs, missing)``: pairs ``[(case, ref_path, pred_path)]`` sorted by case and
    ``missing = {"in_prediction": [...], "in_reference": [...]}``. Missing cases on either side
    raise ``SDDMError`` listing them unless ``allow_missing``.
    """
    refs = list_cases(ref_dir, file_ending)
    preds = list_cases(pred_dir, file_ending)
    if not refs:
        raise SDDMError(f"{ref_dir}: no reference segmentations found")
    if not preds:
        raise SDDMError(f"{pred_dir}: no predicted segmentations found")
    missing = {"in_prediction": sorted(set(refs) - set(preds)),
               "in_reference": sorted(set(preds) - set(refs))}
    common = sorted(set(refs) & set(preds))
    if (missing["in_prediction"] or missing["in_reference"]) and not allow_missing:
        parts = []
        if missing["in_prediction"]:
            parts.append(f"{len(missing['in_prediction'])} case(s) missing in {pred_dir}: "
                         f"{', '.join(missing['in_prediction'][:20])}")
        if missing["in_reference"]:
            parts.append(f"{len(missing['in_reference'])} case(s) missing in {ref_dir}: "
                         f"{', '.join(missing['in_reference'][:20])}")
        raise SDDMError("; ".join(parts) + " (use --allow-missing to evaluate the common cases only)")
    if not common:
        raise SDDMError(f"no case is present in both {ref_dir} and {pred_dir}")
    return [(c, refs[c], preds[c]) for c in common], missing


def evaluate_case(case: str, ref_path: PathLike, pred_path: PathLike, labels: Mapping[str, int],
                  policy: EmptyPolicy = EmptyPolicy(), per_slice: bool = False) -> List[dict]:
    """Read, check and score one case; rows as in ``metrics.case_metrics`` plus ``case``."""
    ref = read_label_map(ref_path)
    pred = read_label_map(pred_path)
    check_same_geometry(ref, pred)
    check_label_values(ref.data, labels.values(), ref.path)
    check_label_values(pred.data, labels.values(), pred.path)
    rows = case_metrics(pred.data, ref.data, labels, ref.spacing, policy, per_slice)
    for r in rows:
        r["case"] = case
    return rows


def _mp_context():
    """'fork' on Linux (workers start instantly and callers need no ``__main__`` guard; the
    workers only use numpy/scipy/nibabel), 'spawn' elsewhere."""
    return get_context("fork" if sys.platform.startswith("linux") else "spawn")


def map_jobs(fn: Callable[[T], R], jobs: Sequence[T], num_processes: int, *, desc: str, unit: str,
             progress: bool = True, chunksize: int = 1) -> List[R]:
    """``[fn(j) for j in jobs]`` in order, in this process (``num_processes`` <= 1) or in a pool of
    ``num_processes`` workers (``_mp_context``; ``fn`` must be picklable), with a progress bar."""
    bar = dict(total=len(jobs), desc=desc, unit=unit, disable=not progress)
    if num_processes <= 1:
        return [fn(j) for j in progress_bar(jobs, **bar)]
    with ProcessPoolExecutor(num_processes, mp_context=_mp_context()) as ex:
        return list(progress_bar(ex.map(fn, jobs, chunksize=chunksize), **bar))


def _evaluate_case_star(args):
    return evaluate_case(*args)


def summarize(rows: Sequence[dict], structures: Sequence[str]) -> Dict[str, dict]:
    """Per structure (and ``all``, pooled): empty-mask counts and ``describe`` of each metric."""
    out = {}
    for s in list(structures) + ["all"]:
        sel = [r for r in rows if s == "all" or r["structure"] == s]
        out[s] = {
            "n_rows": len(sel),
            "empty": {
                "pred_empty": sum(bool(r["pred_empty"]) and not bool(r["ref_empty"]) for r in sel),
                "ref_empty": sum(bool(r["ref_empty"]) and not bool(r["pred_empty"]) for r in sel),
                "both_empty": sum(bool(r["ref_empty"]) and bool(r["pred_empty"]) for r in sel),
            },
            "metrics": {m: describe([r[m] for r in sel]) for m in METRICS},
        }
    return out


def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else repr(float(v))


def write_per_case_csv(rows: Sequence[dict], path: Path, with_slice: bool = False) -> None:
    """Long-format CSV of metric rows (full float precision, ``nan`` for undefined)."""
    cols = ("case", "slice", "structure") + METRICS if with_slice else PER_CASE_COLUMNS
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] if c in ("case", "slice", "structure") else _fmt(r[c]) for c in cols])


def summary_markdown(summary: dict) -> str:
    """Markdown rendering of ``summary.json``: mean +- std [95% CI] (n) per structure and metric."""
    cfg = summary["config"]
    lines = [f"# Evaluation: {cfg['pred_dir']}", "",
             f"Reference: `{cfg['ref_dir']}`; {summary['n_cases']} cases; labels {cfg['labels']} "
             f"({cfg['labels_source']}); mode: {'per 2D slice' if cfg['per_slice'] else '3D'}; "
             f"empty-mask policy: one empty -> {cfg['empty_policy']['one_empty']}, both empty -> "
             f"{cfg['empty_policy']['both_empty']}. Distances in mm. DSC, IoU: higher is better; "
             f"ASD, ASSD, HD, HD95: lower is better.", "",
             "| structure | " + " | ".join(METRICS) + " | pred empty | ref empty | both empty |",
             "|---" * (len(METRICS) + 4) + "|"]
    for s, d in summary["structures"].items():
        cells = []
        for m in METRICS:
            st = d["metrics"][m]
            if st["n"] == 0:
                cells.append("n/a")
                continue
            ci = (f" [{st['ci95_low']:.3g}, {st['ci95_high']:.3g}]" if math.isfinite(st["ci95_low"]) else "")
            std = f" ± {st['std']:.3g}" if math.isfinite(st["std"]) else ""
            cells.append(f"{st['mean']:.4g}{std}{ci} (n={st['n']})")
        e = d["empty"]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {e['pred_empty']} | {e['ref_empty']} | {e['both_empty']} |")
    miss = summary["missing"]
    if miss["in_prediction"] or miss["in_reference"]:
        lines += ["", f"Missing in prediction ({len(miss['in_prediction'])}): {', '.join(miss['in_prediction'])}",
                  f"Missing in reference ({len(miss['in_reference'])}): {', '.join(miss['in_reference'])}"]
    return "\n".join(lines) + "\n"


def evaluate_folders(ref_dir: PathLike, pred_dir: PathLike,
                     labels: Optional[Union[Mapping[str, int], Sequence[str]]] = None,
                     dataset_json: Optional[PathLike] = None, num_processes: Optional[int] = None,
                     empty_policy: Union[EmptyPolicy, str, float] = "nan", both_empty: str = "nan",
                     per_slice: bool = False, allow_missing: bool = False,
                     out_dir: Optional[PathLike] = None, overwrite: bool = False,
                     progress: bool = True) -> EvaluationResults:
    """Score every case of ``pred_dir`` against ``ref_dir`` (see the module docstring).

    labels: ``{name: value}`` or ``["LV=1", ...]`` (default: dataset.json, else LV=1 MYO=2 RV=3);
    empty_policy: an ``EmptyPolicy`` or its ``one_empty`` value (``"nan"``, ``"diagonal"``, mm);
    out_dir: write the outputs there (refused if it exists, unless ``overwrite``); None: only
    return the results. Raises ``SDDMError`` for bad input (see ``match_cases``, ``evaluate_case``).
    """
    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    for d, what in ((ref_dir, "reference"), (pred_dir, "prediction")):
        if not d.is_dir():
            raise SDDMError(f"{d}: {what} folder does not exist")
    policy = empty_policy if isinstance(empty_policy, EmptyPolicy) else EmptyPolicy(empty_policy, both_empty)
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise SDDMError(f"{out_dir}: output folder exists (use --overwrite to replace it)")
    lab, lab_source, ending = resolve_labels(labels, dataset_json, (pred_dir, ref_dir, ref_dir.parent))
    pairs, missing = match_cases(ref_dir, pred_dir, ending, allow_missing)
    jobs = [(c, r, p, lab, policy, per_slice) for c, r, p in pairs]
    n_proc = default_num_processes() if num_processes is None else max(1, int(num_processes))
    n_proc = min(n_proc, len(jobs))
    per_case = map_jobs(_evaluate_case_star, jobs, n_proc, desc="evaluate", unit="case", progress=progress,
                        chunksize=max(1, len(jobs) // (8 * max(n_proc, 1))))
    rows = [r for case_rows in per_case for r in case_rows]
    slice_rows = None
    if per_slice:
        slice_rows = [dict(s, case=r["case"], structure=r["structure"]) for r in rows for s in r.pop("slices")]
    summary = {
        "config": {
            "package_version": __version__,
            "ref_dir": str(ref_dir.resolve()), "pred_dir": str(pred_dir.resolve()),
            "labels": lab, "labels_source": lab_source, "file_ending": ending,
            "per_slice": bool(per_slice), "empty_policy": policy.to_dict(), "connectivity": 1,
            "definitions": "medpy.metric.binary 0.5.2 (dc, jc, asd, assd, hd, hd95); spacing in mm",
            "allow_missing": bool(allow_missing),
        },
        "n_cases": len(pairs),
        "missing": missing,
        "structures": summarize(rows, list(lab)),
    }
    res = EvaluationResults(rows=rows, structures=list(lab), summary=summary, slice_rows=slice_rows)
    if out_dir is not None:
        out_dir = Path(out_dir)
        with staging_dir(out_dir, overwrite=overwrite) as tmp:
            write_per_case_csv(rows, tmp / "per_case.csv")
            if slice_rows is not None:
                write_per_case_csv(slice_rows, tmp / "per_slice.csv", with_slice=True)
            with open(tmp / "summary.json", "w") as f:
                json.dump(_json_safe(summary), f, indent=2)
                f.write("\n")
            (tmp / "summary.md").write_text(summary_markdown(summary))
        res.out_dir = out_dir
    return res


def _json_safe(obj):
    """NaN/inf -> None so that summary.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def load_results(source: Union[PathLike, EvaluationResults]) -> EvaluationResults:
    """Results from an evaluation folder (with ``per_case.csv``), a ``per_case.csv`` file, or an
    ``EvaluationResults`` (returned as is). Structures keep their order of appearance."""
    if isinstance(source, EvaluationResults):
        return source
    p = Path(source)
    csv_path = p / "per_case.csv" if p.is_dir() else p
    if not csv_path.is_file():
        raise SDDMError(f"{p}: no per_case.csv (run nnUNetv2_sddm_evaluate first)")
    rows, structures = [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(PER_CASE_COLUMNS) <= set(reader.fieldnames):
            raise SDDMError(f"{csv_path}: expected columns {', '.join(PER_CASE_COLUMNS)}")
        for r in reader:
            try:
                row = {"case": r["case"], "structure": r["structure"], **{m: float(r[m]) for m in METRICS}}
            except ValueError as e:
                raise SDDMError(f"{csv_path}: bad number in row {r} ({e})") from None
            rows.append(row)
            if row["structure"] not in structures:
                structures.append(row["structure"])
    if not rows:
        raise SDDMError(f"{csv_path}: no rows")
    summary = {}
    sj = csv_path.parent / "summary.json"
    if sj.is_file():
        try:
            summary = json.loads(sj.read_text())
        except json.JSONDecodeError:
            summary = {}
    return EvaluationResults(rows=rows, structures=structures, summary=summary, out_dir=csv_path.parent)
