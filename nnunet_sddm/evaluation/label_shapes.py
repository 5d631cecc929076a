"""Shape statistics of 2D cardiac label maps, and a report comparing generated with real ones.

Notation: a slice ``L (h, w)`` of a label map, pixel spacing ``(sy, sx)`` mm, structures
``{name: value}``; LV, MYO and RV are the structures named so (case-insensitive). Per slice:

- ``area_<name>_mm2``: ``#{L = v} * sy * sx``; ``components_<name>``: connected components
  (8-connected);
- ``lv_myo_ratio`` = area(LV) / area(MYO), ``rv_lv_ratio`` = area(RV) / area(LV) (NaN when the
  denominator is 0 or a structure is not named);
- ``myo_lv_coverage``: of the pixels outside the LV that are 4-adjacent to it (the image padded with
  background, so an LV at the border is uncovered there), the fraction that is MYO (1: a closed ring);
- ``myo_encloses_lv``: 1 if every LV pixel lies in a hole of the MYO mask (4-connected holes, the
  dual of 8), else 0; ``myo_holes`` and ``myo_euler`` = components - holes of the MYO mask (a ring:
  1 hole, Euler number 0; a C-shape: 0 holes, Euler number 1).

``compare_shapes`` gives per statistic the mean and sd (ddof 1) of both sets and the two-sample
Kolmogorov-Smirnov statistic ``D = sup_t |F_gen(t) - F_real(t)|`` of the finite values (with its
asymptotic p-value, ``scipy.stats.ks_2samp``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from nnunet_sddm.data.deformation import components_and_holes
from nnunet_sddm.evaluation.io import list_cases, read_label_map
from nnunet_sddm.evaluation.statistics import finite
from nnunet_sddm.utilities.errors import SDDMError

PathLike = Union[str, os.PathLike]

_FOUR = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class ShapeStats:
    """The statistics of one slice (module docstring); ``None`` / NaN where a structure is not named."""

    areas_mm2: Dict[str, float]
    components: Dict[str, int]
    lv_myo_ratio: float
    rv_lv_ratio: float
    myo_lv_coverage: float
    myo_encloses_lv: float
    myo_holes: float
    myo_euler: float

    def row(self) -> Dict[str, float]:
        """The flat columns ``area_<name>_mm2``, ``components_<name>``, then the ring statistics."""
        out: Dict[str, float] = {f"area_{k}_mm2": float(v) for k, v in self.areas_mm2.items()}
        out.update({f"components_{k}": float(v) for k, v in self.components.items()})
        for k in ("lv_myo_ratio", "rv_lv_ratio", "myo_lv_coverage", "myo_encloses_lv", "myo_holes", "myo_euler"):
            out[k] = float(getattr(self, k))
        return out


def _named(structures: Mapping[str, int], name: str) -> Optional[int]:
    hits = [int(v) for k, v in structures.items() if k.lower() == name.lower()]
    return hits[0] if hits else None


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def slice_stats(label_map: np.ndarray, spacing_yx: Tuple[float, float], structures: Mapping[str, int]) -> ShapeStats:
    """``ShapeStats`` of one slice ``label_map (h, w)`` (integer values) of pixel spacing ``(sy, sx)`` mm."""
    lab = np.asarray(label_map)
    if lab.ndim != 2:
        raise SDDMError(f"shape statistics: expected a 2D slice (h, w), got shape {lab.shape}")
    px = float(spacing_yx[0]) * float(spacing_yx[1])
    areas = {k: float(np.count_nonzero(lab == v)) * px for k, v in structures.items()}
    comps = {k: components_and_holes(lab == v)[0] for k, v in structures.items()}
    lv, myo, rv = (_named(structures, n) for n in ("LV", "MYO", "RV"))
    nan = math.nan
    area = {v: float(np.count_nonzero(lab == v)) * px for v in (lv, myo, rv) if v is not None}
    lv_myo = _ratio(area[lv], area[myo]) if lv is not None and myo is not None else nan
    rv_lv = _ratio(area[rv], area[lv]) if rv is not None and lv is not None else nan
    coverage = encloses = holes = euler = nan
    if myo is not None:
        n_comp, n_holes = components_and_holes(lab == myo)
        holes, euler = float(n_holes), float(n_comp - n_holes)
    if lv is not None and myo is not None and (lab == lv).any():
        padded = np.pad(lab, 1, constant_values=0)
        inside = padded == lv
        ring = ndimage.binary_dilation(inside, structure=_FOUR) & ~inside
        coverage = float(np.count_nonzero(padded[ring] == myo)) / float(np.count_nonzero(ring))
        m = lab == myo
        enclosed = ndimage.binary_fill_holes(m, structure=_FOUR) & ~m
        encloses = float(bool(enclosed[lab == lv].all()))
    return ShapeStats(areas, comps, lv_myo, rv_lv, coverage, encloses, holes, euler)


@dataclass(frozen=True)
class SliceRecord:
    """One slice of a label-map file: its ``case``, slice index ``z`` and ``stats``."""

    case: str
    z: int
    stats: ShapeStats


def folder_stats(folder: PathLike, structures: Mapping[str, int], require_all: bool = True) -> List[SliceRecord]:
    """``SliceRecord`` of every slice of every label map in ``folder`` (sorted by case); with
    ``require_all`` only the slices that hold every structure (as every generated map does)."""
    files = list_cases(folder)
    if not files:
        raise SDDMError(f"{folder}: no label maps")
    out = []
    for case, path in sorted(files.items()):
        img = read_label_map(path)
        sy, sx = (float(s) for s in img.spacing[-2:])
        for z in range(img.data.shape[0]):
            sl = img.data[z]
            if require_all and any(not (sl == v).any() for v in structures.values()):
                continue
            out.append(SliceRecord(case, z, slice_stats(sl, (sy, sx), structures)))
    return out


@dataclass(frozen=True)
class StatComparison:
    """One statistic over generated and real slices: finite-value counts, means, sds, KS D and p."""

    name: str
    n_generated: int
    mean_generated: float
    sd_generated: float
    n_real: int
    mean_real: float
    sd_real: float
    ks_d: float
    ks_p: float


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample KS statistic ``sup_t |F_a(t) - F_b(t)|`` of the finite values (NaN if one is empty)."""
    x, y = np.sort(finite(a)), np.sort(finite(b))
    if not x.size or not y.size:
        return math.nan
    t = np.concatenate([x, y])
    fa = np.searchsorted(x, t, side="right") / x.size
    fb = np.searchsorted(y, t, side="right") / y.size
    return float(np.max(np.abs(fa - fb)))


def _mean_sd(x: np.ndarray) -> Tuple[float, float]:
    return (float(x.mean()) if x.size else math.nan, float(x.std(ddof=1)) if x.size > 1 else math.nan)


def compare_shapes(generated: Sequence[SliceRecord], real: Optional[Sequence[SliceRecord]]) -> List[StatComparison]:
    """Per statistic (the columns of ``ShapeStats.row``): mean/sd of both sets and the KS statistic
    (real-set fields NaN / 0 without ``real``)."""
    if not generated:
        raise SDDMError("shape comparison: no generated slices")
    names = list(generated[0].stats.row())
    out = []
    for k in names:
        g = finite([r.stats.row()[k] for r in generated])
        r = finite([s.stats.row().get(k, math.nan) for s in real]) if real else np.zeros(0)
        d, p = math.nan, math.nan
        if g.size and r.size:
            from scipy.stats import ks_2samp

            d = ks_statistic(g, r)
            p = float(ks_2samp(g, r).pvalue)
        out.append(StatComparison(k, int(g.size), *_mean_sd(g), int(r.size), *_mean_sd(r), d, p))
    return out


def stats_csv(generated: Sequence[SliceRecord], real: Optional[Sequence[SliceRecord]]) -> str:
    """Per-slice CSV: ``set`` (generated / real), ``case``, ``z`` and the statistics."""
    from nnunet_sddm.evaluation.tables import records_to_csv

    rows = [{"set": which, "case": r.case, "z": r.z, **r.stats.row()}
            for which, recs in (("generated", generated), ("real", real or [])) for r in recs]
    return records_to_csv(rows, ["set", "case", "z", *generated[0].stats.row()])


def report_markdown(comparisons: Sequence[StatComparison], generated_from: str, real_from: Optional[str]) -> str:
    """``shape_report.md``: one table row per statistic."""
    def f(v: float) -> str:
        return "" if math.isnan(v) else f"{v:.4g}"

    lines = ["# Shape statistics of generated label maps", "",
             f"Generated: `{generated_from}`, every slice (each holds every structure)."]
    if real_from:
        lines.append(f"Real: `{real_from}`, the slices of its labelsTr that hold every structure.")
    lines += ["", "Areas in mm^2; components 8-connected; `myo_lv_coverage`: fraction of the pixels around the "
              "LV that are MYO; `myo_encloses_lv`: 1 if the LV lies in a hole of the MYO; KS D: two-sample "
              "Kolmogorov-Smirnov statistic (p: its asymptotic p-value).", "",
              "| statistic | n gen | mean gen | sd gen | n real | mean real | sd real | KS D | KS p |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c.name} | {c.n_generated} | {f(c.mean_generated)} | {f(c.sd_generated)} | {c.n_real} | "
                     f"{f(c.mean_real)} | {f(c.sd_real)} | {f(c.ks_d)} | {f(c.ks_p)} |")
    return "\n".join(lines) + "\n"


def write_shape_report(out_dir: PathLike, generated: Sequence[SliceRecord], real: Optional[Sequence[SliceRecord]],
                       generated_from: str, real_from: Optional[str]) -> List[StatComparison]:
    """Write ``shape_report.md`` and ``shape_stats.csv`` (per slice) into ``out_dir``; returns the comparison."""
    from nnunet_sddm.utilities.files import write_text

    comparisons = compare_shapes(generated, real)
    write_text(report_markdown(comparisons, generated_from, real_from), Path(out_dir) / "shape_report.md")
    write_text(stats_csv(generated, real), Path(out_dir) / "shape_stats.csv")
    return comparisons
