"""Evaluate a folder of predicted segmentations against a folder of reference segmentations.

Files are matched by case id (file name without its ending, e.g. nnU-Net's ``CASE.nii.gz``
labels and predictions). Every case is read, checked (same shape, spacing and affine; only
label values of the map) and scored with ``metrics.case_metrics``, in parallel over cases
(worker processes). Outputs in ``out_dir`` (written into a staging folder and renamed, so a
failed run leaves nothing half-written):

* ``per_case.csv``: long format, columns ``case, structure, DSC, IoU, ASD, ASSD, HD, HD95,
  pred_empty, ref_empty`` (one row per case and structure; distances in mm; ``nan`` for
  undefined values; the flags 0/1: the structure is absent from the prediction / reference);
* ``per_slice.csv`` (per-slice mode only): ``case, slice, structure`` + the six metrics + flags;
* ``summary.json``: configuration (package version, folders, labels, prediction labels, empty
  policy, mode), missing cases, ``skipped_structures``, and per structure (and ``all``: pooled
  over all case-structure rows) the empty-mask counts and for each metric n, n_nan, mean, std,
  median and 95% CI;
* ``summary.md``: the same as a Markdown table.

Label subsets: ``prediction_labels`` names the labels the model predicts (e.g. a model trained on
a source with LV, MYO, RV evaluated on a target annotated with LV, MYO only). The evaluated
structures are those both label maps name with the same value; the others are skipped (their
values are allowed in the maps they belong to and ignored) and listed in ``skipped_structures``.
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
from nnunet_sddm.evaluation.metrics import (DISTANCE_METRICS, METRICS, EmptyPolicy, case_metrics,
                                            check_label_values)
from nnunet_sddm.evaluation.statistics import describe
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import staging_dir
from nnunet_sddm.utilities.progress import progress_bar

T = TypeVar("T")
R = TypeVar("R")

PathLike = Union[str, os.PathLike]
#: Required columns of ``per_case.csv`` (``EMPTY_FLAG_COLUMNS`` follow them; older files lack them).
PER_CASE_COLUMNS = ("case", "structure") + METRICS
#: Empty-mask flags of ``per_case.csv`` (0/1): the structure is absent from the prediction / reference.
EMPTY_FLAG_COLUMNS = ("pred_empty", "ref_empty")
#: Labels used when neither --labels nor a dataset.json is available (M&Ms convention).
DEFAULT_LABELS = {"LV": 1, "MYO": 2, "RV": 3}


@dataclass
class EvaluationResults:
    """rows: one dict per case and structure (``case``, ``structure``, metrics, empty flags);
    structures: structure names in label-map order; summary: the ``summary.json`` content;
    slice_rows: per-slice rows (per-slice mode); out_dir: where they were written (or None);
    skipped_structures: ``{name: {"value": v, "only_in": "prediction labels" | "reference labels"}}``
    (structures named by only one of the two label maps, not evaluated)."""

    rows: List[dict]
    structures: List[str]
    summary: dict = field(default_factory=dict)
    slice_rows: Optional[List[dict]] = None
    out_dir: Optional[Path] = None
    skipped_structures: Dict[str, dict] = field(default_factory=dict)

    @property
    def has_flags(self) -> bool:
        """True when every row has its empty-mask flags (``per_case.csv`` files written before the
        flags existed have none: missing/spurious counts and the NaN-policy view are then unknown)."""
        return bool(self.rows) and all("pred_empty" in r and "ref_empty" in r for r in self.rows)

    def case_ids(self, structure: str) -> List[str]:
        """Case ids in the order of ``values(structure, ...)``."""
        if structure != "all":
            return [r["case"] for r in self.rows if r["structure"] == structure]
        return list(dict.fromkeys(r["case"] for r in self.rows))

    def one_empty(self, structure: str) -> np.ndarray:
        """Per case (order of ``case_ids``): exactly one of prediction and reference is empty
        (for ``"all"``: in at least one structure of the case). Requires ``has_flags``."""
        if not self.has_flags:
            raise SDDMError("empty-mask flags unknown (per_case.csv without pred_empty, ref_empty)")
        if structure != "all":
            return np.array([bool(r["pred_empty"]) != bool(r["ref_empty"]) for r in self.rows
                             if r["structure"] == structure], dtype=bool)
        per_case: Dict[str, bool] = {}
        for r in self.rows:
            per_case[r["case"]] = per_case.get(r["case"], False) or (bool(r["pred_empty"]) != bool(r["ref_empty"]))
        return np.array(list(per_case.values()), dtype=bool)

    def penalised(self, structure: str, metric: str) -> np.ndarray:
        """Per case (order of ``values``): the value of a distance metric comes from the empty-mask
        policy (exactly one mask empty). Always False for DSC/IoU (0 is their actual value) and
        when the flags are unknown."""
        n = len(self.case_ids(structure))
        if metric not in DISTANCE_METRICS or not self.has_flags:
            return np.zeros(n, dtype=bool)
        return self.one_empty(structure)

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


def parse_label_args(items: Sequence[str], option: str = "--labels") -> Dict[str, int]:
    """``["LV=1", "MYO=2"]`` -> ``{"LV": 1, "MYO": 2}`` (``SDDMError`` naming ``option`` on
    malformed items)."""
    out: Dict[str, int] = {}
    for it in items:
        name, sep, value = str(it).partition("=")
        if not sep or not name:
            raise SDDMError(f"{option}: expected NAME=VALUE, got {it!r}")
        try:
            v = int(value)
        except ValueError:
            raise SDDMError(f"{option}: value of {name!r} must be an integer, got {value!r}") from None
        if v == 0:
            raise SDDMError(f"{option}: {name}=0 is the background, not a structure")
        if name in out or v in out.values():
            raise SDDMError(f"{option}: duplicate name or value in {it!r}")
        out[name] = v
    if not out:
        raise SDDMError(f"{option}: no structures given")
    return out


def read_dataset_json(path: Path) -> dict:
    """The JSON object of a ``dataset.json`` file; ``SDDMError`` naming it if missing or invalid."""
    if not path.is_file():
        raise SDDMError(f"{path}: dataset.json not found")
    try:
        dj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SDDMError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(dj, dict):
        raise SDDMError(f"{path}: expected a JSON object")
    return dj


def resolve_prediction_labels(prediction_labels: Optional[Union[Mapping[str, int], Sequence[str]]] = None,
                              prediction_dataset_json: Optional[PathLike] = None) -> Optional[Dict[str, int]]:
    """The model's label map: ``prediction_labels`` (mapping or ``NAME=VALUE`` strings), else the
    ``labels`` of ``prediction_dataset_json`` (the model's training dataset.json), else None
    (the predictions use the reference's labels). Both given: ``SDDMError``."""
    if prediction_labels and prediction_dataset_json:
        raise SDDMError("give the prediction labels or the prediction dataset.json, not both")
    if prediction_labels:
        if isinstance(prediction_labels, Mapping):
            lab = {str(k): int(v) for k, v in prediction_labels.items()}
            if 0 in lab.values() or len(set(lab.values())) != len(lab):
                raise SDDMError(f"prediction labels {lab}: values must be distinct and non-zero")
            return lab
        return parse_label_args(prediction_labels, "--prediction-labels")
    if prediction_dataset_json:
        p = Path(prediction_dataset_json)
        return labels_from_dataset_json(read_dataset_json(p), str(p))
    return None


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
    dj = read_dataset_json(dj_path) if dj_path is not None else None
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
                  policy: EmptyPolicy = EmptyPolicy(), per_slice: bool = False,
                  allowed: Optional[tuple] = None) -> List[dict]:
    """Read, check and score one case; rows as in ``metrics.case_metrics`` plus ``case``.

    labels: the structures scored; allowed: ``(reference values, prediction values)`` the maps
    may hold besides 0 (default: the values of ``labels``; skipped structures add theirs)."""
    ref = read_label_map(ref_path)
    pred = read_label_map(pred_path)
    check_same_geometry(ref, pred)
    ref_ok, pred_ok = allowed if allowed is not None else (tuple(labels.values()), tuple(labels.values()))
    check_label_values(ref.data, ref_ok, ref.path)
    check_label_values(pred.data, pred_ok, pred.path)
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
    """Long-format CSV of metric rows (full float precision, ``nan`` for undefined) and the
    empty-mask flags ``pred_empty, ref_empty`` (0/1)."""
    cols = (("case", "slice", "structure") + METRICS if with_slice else PER_CASE_COLUMNS) + EMPTY_FLAG_COLUMNS
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] if c in ("case", "slice", "structure") else
                        int(bool(r[c])) if c in EMPTY_FLAG_COLUMNS else _fmt(r[c]) for c in cols])


def nan_policy_view(res: EvaluationResults) -> EvaluationResults:
    """The same results with the distance metrics of every case-structure with exactly one empty
    mask set to NaN (the ``one_empty="nan"`` policy, derived from the rows and their flags, no
    re-evaluation; DSC/IoU unchanged). Requires ``res.has_flags``."""
    if not res.has_flags:
        raise SDDMError("empty-mask flags unknown (per_case.csv without pred_empty, ref_empty)")
    rows = [dict(r, **{m: math.nan for m in DISTANCE_METRICS}) if bool(r["pred_empty"]) != bool(r["ref_empty"])
            else dict(r) for r in res.rows]
    return EvaluationResults(rows=rows, structures=list(res.structures), summary=res.summary,
                             out_dir=res.out_dir, skipped_structures=dict(res.skipped_structures))


def combine_labels(reference: Mapping[str, int], prediction: Mapping[str, int]) -> tuple:
    """Structures to evaluate when the model's label map (``prediction``) and the reference's
    differ: ``(evaluated, skipped)``. evaluated: ``{name: value}`` named by both with the same
    value (reference order); skipped: ``{name: {"value", "only_in"}}`` for the others. Raises
    ``SDDMError`` for conflicting maps: one name with two values, or one value with two names."""
    ref = {str(k): int(v) for k, v in reference.items()}
    pred = {str(k): int(v) for k, v in prediction.items()}
    conflicts = [f"{n}={ref[n]} in the reference labels but {n}={pred[n]} in the prediction labels"
                 for n in ref if n in pred and ref[n] != pred[n]]
    by_value = {v: n for n, v in pred.items()}
    conflicts += [f"value {v} is {n!r} in the reference labels but {by_value[v]!r} in the prediction labels"
                  for n, v in ref.items() if v in by_value and by_value[v] != n]
    if conflicts:
        raise SDDMError("conflicting label maps: " + "; ".join(conflicts)
                        + " (the labels of the model's dataset.json must use the target's names and values)")
    evaluated = {n: v for n, v in ref.items() if pred.get(n) == v}
    if not evaluated:
        raise SDDMError(f"no structure in common: reference labels {ref}, prediction labels {pred}")
    skipped = {n: {"value": v, "only_in": "reference labels"} for n, v in ref.items() if n not in evaluated}
    skipped.update({n: {"value": v, "only_in": "prediction labels"} for n, v in pred.items() if n not in evaluated})
    return evaluated, skipped


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
    skipped = summary.get("skipped_structures") or {}
    if skipped:
        lines += ["", "Not evaluated (named by one label map only): "
                  + ", ".join(f"{n}={d['value']} ({d['only_in']})" for n, d in skipped.items())]
    return "\n".join(lines) + "\n"


def evaluate_folders(ref_dir: PathLike, pred_dir: PathLike,
                     labels: Optional[Union[Mapping[str, int], Sequence[str]]] = None,
                     dataset_json: Optional[PathLike] = None, num_processes: Optional[int] = None,
                     empty_policy: Union[EmptyPolicy, str, float] = "nan", both_empty: str = "nan",
                     per_slice: bool = False, allow_missing: bool = False,
                     out_dir: Optional[PathLike] = None, overwrite: bool = False,
                     progress: bool = True,
                     prediction_labels: Optional[Union[Mapping[str, int], Sequence[str]]] = None,
                     prediction_dataset_json: Optional[PathLike] = None) -> EvaluationResults:
    """Score every case of ``pred_dir`` against ``ref_dir`` (see the module docstring).

    labels: ``{name: value}`` or ``["LV=1", ...]`` (default: dataset.json, else LV=1 MYO=2 RV=3);
    prediction_labels / prediction_dataset_json: the labels the model predicts when they differ
    from the reference's (see ``combine_labels``; default: the same as the reference's);
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
    pred_lab = resolve_prediction_labels(prediction_labels, prediction_dataset_json)
    # nnU-Net copies the MODEL's dataset.json into its prediction folders: when the model's labels
    # are given separately, the reference's are never read from there
    search = (ref_dir, ref_dir.parent) if pred_lab is not None else (pred_dir, ref_dir, ref_dir.parent)
    ref_lab, lab_source, ending = resolve_labels(labels, dataset_json, search)
    lab, skipped = combine_labels(ref_lab, pred_lab) if pred_lab is not None else (ref_lab, {})
    allowed = (tuple(ref_lab.values()), tuple((pred_lab or ref_lab).values()))
    pairs, missing = match_cases(ref_dir, pred_dir, ending, allow_missing)
    jobs = [(c, r, p, lab, policy, per_slice, allowed) for c, r, p in pairs]
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
            "reference_labels": ref_lab, "prediction_labels": pred_lab,
            "per_slice": bool(per_slice), "empty_policy": policy.to_dict(), "connectivity": 1,
            "definitions": "medpy.metric.binary 0.5.2 (dc, jc, asd, assd, hd, hd95); spacing in mm",
            "allow_missing": bool(allow_missing),
        },
        "n_cases": len(pairs),
        "missing": missing,
        "skipped_structures": skipped,
        "structures": summarize(rows, list(lab)),
    }
    res = EvaluationResults(rows=rows, structures=list(lab), summary=summary, slice_rows=slice_rows,
                            skipped_structures=skipped)
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
        flags = set(EMPTY_FLAG_COLUMNS) <= set(reader.fieldnames)  # older files: flags unknown
        for r in reader:
            try:
                row = {"case": r["case"], "structure": r["structure"], **{m: float(r[m]) for m in METRICS}}
                if flags:
                    row.update({c: _flag(r[c]) for c in EMPTY_FLAG_COLUMNS})
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
    return EvaluationResults(rows=rows, structures=structures, summary=summary, out_dir=csv_path.parent,
                             skipped_structures=dict(summary.get("skipped_structures") or {}))


def _flag(v: str) -> bool:
    v = str(v).strip().lower()
    if v in ("1", "true"):
        return True
    if v in ("0", "false"):
        return False
    raise ValueError(f"empty flag must be 0 or 1, got {v!r}")
