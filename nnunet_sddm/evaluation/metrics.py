"""The paper's six segmentation metrics per structure, identical to ``medpy.metric.binary``.

For a predicted mask P and a reference mask R (booleans, same shape, voxel spacing s in mm, array
axis order) with surface-distance sets d(P->R) and d(R->P) (see ``surface.py``):

    DSC  = 2 |P & R| / (|P| + |R|)                       (medpy ``dc``)
    IoU  = |P & R| / |P | R|                             (medpy ``jc``)
    ASD  = mean d(P->R)                                   (medpy ``asd(P, R)``: one direction)
    ASSD = mean of the concatenation [d(P->R), d(R->P)]   (medpy 0.5.2 ``assd``)
    HD   = max(max d(P->R), max d(R->P))                  (medpy ``hd``)
    HD95 = 95th percentile (numpy linear interpolation) of [d(P->R), d(R->P)]   (medpy ``hd95``)

Note: MedPy 0.5.2's ASSD is the mean over the pooled distances of both directions, not the
mean of the two directed ASDs (older MedPy versions); the pooled mean is what is computed here.

Empty masks (MedPy raises for the surface metrics) follow an explicit ``EmptyPolicy``:

* one mask empty (prediction empty and reference not, or the reverse): DSC = IoU = 0 (MedPy's
  value) and the four distances are NaN (``one_empty="nan"``, default), the image diagonal in mm
  (``"diagonal"``) or a fixed number of mm;
* both empty (structure absent in both): all six metrics NaN (``both_empty="nan"``, default:
  the case does not count for that structure) or a perfect score (``"perfect"``: DSC = IoU = 1,
  distances 0; MedPy 0.5.2 returns NaN for DSC/IoU here under numpy 2, 1 under older numpy).

Per-slice mode evaluates every 2D slice ``[k]`` along axis 0 (the through-plane axis of a
short-axis stack) with the in-plane spacing and 2D connectivity, applies the same empty policy
per slice, and aggregates a case's value as the mean over its slices with a finite value
(so with the default policy: the slices where the structure appears in the reference and/or the
prediction, with one-empty slices contributing DSC = IoU = 0 and no distances).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Sequence, Union

import numpy as np

from nnunet_sddm.evaluation.surface import surface_distances
from nnunet_sddm.utilities.errors import SDDMError

#: Column order of every metrics table.
METRICS = ("DSC", "IoU", "ASD", "ASSD", "HD", "HD95")
#: True where a larger value is better.
HIGHER_IS_BETTER = {"DSC": True, "IoU": True, "ASD": False, "ASSD": False, "HD": False, "HD95": False}
DISTANCE_METRICS = ("ASD", "ASSD", "HD", "HD95")


@dataclass(frozen=True)
class EmptyPolicy:
    """What the distance metrics are when a mask is empty (see the module docstring).

    one_empty: ``"nan"``, ``"diagonal"`` (image diagonal in mm) or a penalty in mm (float).
    both_empty: ``"nan"`` or ``"perfect"``.
    """

    one_empty: Union[str, float] = "nan"
    both_empty: str = "nan"

    def __post_init__(self):
        if isinstance(self.one_empty, str) and self.one_empty not in ("nan", "diagonal"):
            try:
                object.__setattr__(self, "one_empty", float(self.one_empty))
            except ValueError:
                raise SDDMError(f"empty policy: one_empty must be 'nan', 'diagonal' or a number of mm, "
                                f"got {self.one_empty!r}") from None
        if not isinstance(self.one_empty, str) and not (float(self.one_empty) >= 0):
            raise SDDMError(f"empty policy: penalty must be >= 0 mm, got {self.one_empty}")
        if self.both_empty not in ("nan", "perfect"):
            raise SDDMError(f"empty policy: both_empty must be 'nan' or 'perfect', got {self.both_empty!r}")

    def penalty(self, shape: Sequence[int], spacing: Sequence[float]) -> float:
        """Distance value for one empty mask (mm)."""
        if self.one_empty == "nan":
            return math.nan
        if self.one_empty == "diagonal":
            return float(np.sqrt(np.sum((np.asarray(shape, float) * np.asarray(spacing, float)) ** 2)))
        return float(self.one_empty)

    def to_dict(self) -> dict:
        return asdict(self)


def structure_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                      policy: EmptyPolicy = EmptyPolicy()) -> Dict[str, float]:
    """DSC, IoU, ASD, ASSD, HD, HD95 (mm) of boolean masks ``pred`` and ``ref`` (same shape,
    any ndim, ``spacing`` per array axis). Also returns ``pred_empty``/``ref_empty`` flags."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    n_p, n_r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    out: Dict[str, float] = {"pred_empty": n_p == 0, "ref_empty": n_r == 0}
    if n_p == 0 and n_r == 0:
        v = policy.both_empty == "perfect"
        out.update({"DSC": 1.0 if v else math.nan, "IoU": 1.0 if v else math.nan})
        out.update({m: 0.0 if v else math.nan for m in DISTANCE_METRICS})
        return out
    inter = int(np.count_nonzero(pred & ref))
    out["DSC"] = 2.0 * inter / float(n_p + n_r)
    out["IoU"] = inter / float(n_p + n_r - inter)
    if n_p == 0 or n_r == 0:
        pen = policy.penalty(pred.shape, spacing)
        out.update({m: pen for m in DISTANCE_METRICS})
        return out
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    both = np.concatenate([d_pr, d_rp])
    out["ASD"] = float(d_pr.mean())
    out["ASSD"] = float(both.mean())
    out["HD"] = float(max(d_pr.max(), d_rp.max()))
    out["HD95"] = float(np.percentile(both, 95))
    return out


def check_label_values(seg: np.ndarray, allowed: Sequence[int], path: object) -> None:
    """Raise ``SDDMError`` if ``seg`` holds values other than 0 and ``allowed``."""
    present = np.unique(seg)
    bad = sorted(set(int(v) for v in present) - {0} - set(int(a) for a in allowed))
    if bad:
        raise SDDMError(f"{path}: label values {bad} are not in the label map "
                        f"{sorted(int(a) for a in allowed)} (use -djfile or --labels)")


def case_metrics(pred: np.ndarray, ref: np.ndarray, labels: Mapping[str, int],
                 spacing: Sequence[float], policy: EmptyPolicy = EmptyPolicy(),
                 per_slice: bool = False) -> List[dict]:
    """Metrics of one case for every structure.

    pred, ref: integer label maps ``(z, y, x)``; labels: ``{structure: value}``; spacing in
    array order (mm). Returns one dict per structure with ``structure``, the six metrics and
    the empty flags; with ``per_slice`` each dict also has ``slices``: the per-slice dicts
    (``slice`` index added) and the metrics are their means over finite values.
    """
    rows = []
    for name, value in labels.items():
        p, r = pred == value, ref == value
        if not per_slice:
            row = structure_metrics(p, r, spacing, policy)
        else:
            slices = []
            for k in range(p.shape[0]):
                s = structure_metrics(p[k], r[k], spacing[1:], policy)
                s["slice"] = k
                slices.append(s)
            row = {"pred_empty": not p.any(), "ref_empty": not r.any()}
            for m in METRICS:
                vals = np.array([s[m] for s in slices], dtype=float)
                vals = vals[np.isfinite(vals)]
                row[m] = float(vals.mean()) if vals.size else math.nan
            row["slices"] = slices
        row["structure"] = name
        rows.append(row)
    return rows
