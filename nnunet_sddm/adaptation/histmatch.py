"""Histogram standardisation (Nyul & Udupa, 1999; Nyul, Udupa & Zhang, 2000): a classical
alternative to SD-DM that maps a target image's intensity histogram onto the source's.

Notation (one volume ``v``, shape ``(z, y, x)``, any intensity units):

- foreground ``F(v)``: the voxels with ``v > mean(v)`` (the mean over the whole volume), Nyul's
  own foreground rule that drops the dark background of MR images;
- percentiles ``p = (p_1, ..., p_L)`` (default 1, 10, 20, ..., 90, 99, so L = 11); the volume's
  landmarks ``m_i(v)``: the ``p_i``-th percentile of ``F(v)`` (numpy's linear interpolation), with
  ``p_low = m_1`` and ``p_high = m_L`` the end landmarks;
- standard scale ``[s1, s2]`` (default [0, 100]).

Fitting (``fit_standard``) on the SOURCE training volumes ``v_1 .. v_n``:

1. each volume's landmarks are mapped linearly so that ``p_low -> s1`` and ``p_high -> s2``:
   ``m'_i(v_j) = s1 + (m_i(v_j) - p_low(v_j)) / (p_high(v_j) - p_low(v_j)) * (s2 - s1)``;
2. the standard-scale landmarks are the means ``mu_i = mean_j m'_i(v_j)`` (``mu_1 = s1``,
   ``mu_L = s2``);
3. back into SOURCE units: ``[s1, s2]`` is mapped linearly onto ``[mean_j p_low(v_j),
   mean_j p_high(v_j)]``, giving the standard's ``landmarks`` ``L_i``.

Applying (``apply_standard``) to a volume ``t``: the piecewise-linear map with knots
``m_i(t) -> L_i``, extended beyond ``m_1(t)`` and ``m_L(t)`` by the straight lines of the first
and last segment. A target image thus gets the source training set's intensity distribution, in
source units. The map is monotone non-decreasing; an affine intensity change of the target
(``a * t + b``, ``a > 0``) does not change the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Sequence, Tuple

import numpy as np

from nnunet_sddm.utilities.errors import SDDMError

#: Default landmark percentiles (Nyul's decile landmarks with the 1st and 99th as end points).
PERCENTILES: Tuple[float, ...] = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)

#: Default standard scale ``[s1, s2]`` (only an intermediate: results are in source units).
SCALE: Tuple[float, float] = (0.0, 100.0)

#: The foreground rule, as recorded in ``HistogramStandard.foreground``.
FOREGROUND = "voxels above the volume mean"


def _check_percentiles(percentiles: Sequence[float]) -> Tuple[float, ...]:
    p = tuple(float(x) for x in percentiles)
    if len(p) < 2 or any(not 0 <= x <= 100 for x in p) or any(b <= a for a, b in zip(p, p[1:])):
        raise SDDMError(f"histogram landmarks: percentiles must be >= 2 strictly increasing values in "
                        f"[0, 100], got {list(percentiles)}")
    return p


def foreground(volume: np.ndarray, name: str = "volume") -> np.ndarray:
    """The foreground voxels of ``volume`` (1D float64): the finite volume's voxels above its mean.
    ``SDDMError`` for empty, non-finite or constant volumes (no voxel above the mean)."""
    v = np.asarray(volume, dtype=np.float64)
    if v.size == 0:
        raise SDDMError(f"{name}: empty image")
    if not np.isfinite(v).all():
        raise SDDMError(f"{name}: image contains NaN or infinite values")
    fg = v[v > v.mean()]
    if fg.size == 0:
        raise SDDMError(f"{name}: constant image (no voxel above the mean intensity), histogram "
                        f"standardisation is undefined")
    return fg


def volume_landmarks(volume: np.ndarray, percentiles: Sequence[float] = PERCENTILES,
                     name: str = "volume") -> np.ndarray:
    """The landmarks ``m_i`` of one volume (float64, length ``len(percentiles)``, non-decreasing):
    the percentiles of its foreground (voxels above the mean). ``SDDMError`` if the foreground's
    end landmarks coincide (too few distinct intensities)."""
    p = _check_percentiles(percentiles)
    m = np.percentile(foreground(volume, name), p)
    if not m[-1] > m[0]:
        raise SDDMError(f"{name}: the {p[0]:g}th and {p[-1]:g}th percentiles of the foreground are equal "
                        f"({m[0]:g}); histogram standardisation needs a range of intensities")
    return m


@dataclass(frozen=True)
class HistogramStandard:
    """A fitted histogram standard.

    Attributes:
        percentiles: the landmark percentiles ``p_i`` (increasing, in [0, 100]).
        landmarks: ``L_i``, the standard landmarks in SOURCE intensity units (non-decreasing).
        scale: the intermediate standard scale ``[s1, s2]``.
        scale_landmarks: ``mu_i``, the standard landmarks on ``[s1, s2]``.
        num_volumes: how many source volumes were fitted.
        foreground: the foreground rule (``FOREGROUND``).
    """

    percentiles: Tuple[float, ...]
    landmarks: Tuple[float, ...]
    scale: Tuple[float, float] = SCALE
    scale_landmarks: Tuple[float, ...] = ()
    num_volumes: int = 0
    foreground: str = FOREGROUND

    def __post_init__(self) -> None:
        _check_percentiles(self.percentiles)
        if len(self.landmarks) != len(self.percentiles):
            raise SDDMError(f"histogram standard: {len(self.landmarks)} landmarks for "
                            f"{len(self.percentiles)} percentiles")
        lm = np.asarray(self.landmarks, dtype=np.float64)
        if not np.isfinite(lm).all() or np.any(np.diff(lm) < 0) or not lm[-1] > lm[0]:
            raise SDDMError(f"histogram standard: landmarks must be finite, non-decreasing and not all "
                            f"equal, got {list(self.landmarks)}")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form (``from_dict`` inverts it exactly)."""
        return {"percentiles": list(self.percentiles), "landmarks": list(self.landmarks),
                "scale": list(self.scale), "scale_landmarks": list(self.scale_landmarks),
                "num_volumes": int(self.num_volumes), "foreground": self.foreground}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "HistogramStandard":
        try:
            return cls(percentiles=tuple(float(x) for x in d["percentiles"]),
                       landmarks=tuple(float(x) for x in d["landmarks"]),
                       scale=tuple(float(x) for x in d.get("scale", SCALE)),  # type: ignore[arg-type]
                       scale_landmarks=tuple(float(x) for x in d.get("scale_landmarks", ())),
                       num_volumes=int(d.get("num_volumes", 0)), foreground=str(d.get("foreground", FOREGROUND)))
        except (KeyError, TypeError, ValueError) as e:
            raise SDDMError(f"histogram standard: invalid record ({type(e).__name__}: {e})") from None


def fit_standard(volumes: Iterable[np.ndarray], percentiles: Sequence[float] = PERCENTILES,
                 scale: Tuple[float, float] = SCALE, names: Iterable[str] = ()) -> HistogramStandard:
    """Fit the standard on source volumes (see the module docstring).

    Args:
        volumes: source training volumes, any shape and units (consumed once, one at a time, so a
            generator of file reads keeps memory bounded).
        percentiles: landmark percentiles, strictly increasing in [0, 100].
        scale: the standard scale ``[s1, s2]``, ``s2 > s1`` (the result does not depend on it
            beyond float rounding).
        names: names of the volumes for error messages (e.g. their files).

    ``SDDMError`` for no volumes, or a constant / non-finite one (named).
    """
    p = _check_percentiles(percentiles)
    s1, s2 = float(scale[0]), float(scale[1])
    if not s2 > s1:
        raise SDDMError(f"histogram standard: scale must have s2 > s1, got {scale}")
    name_iter = iter(names)
    mapped, lows, highs = [], [], []
    for k, v in enumerate(volumes):
        name = next(name_iter, f"source volume {k}")
        m = volume_landmarks(v, p, name)
        mapped.append(s1 + (m - m[0]) / (m[-1] - m[0]) * (s2 - s1))
        lows.append(m[0])
        highs.append(m[-1])
    if not mapped:
        raise SDDMError("histogram standard: no source volumes to fit")
    mu = np.mean(np.stack(mapped), axis=0)
    lo, hi = float(np.mean(lows)), float(np.mean(highs))
    landmarks = lo + (mu - s1) / (s2 - s1) * (hi - lo)
    landmarks = np.maximum.accumulate(landmarks)  # guard the order against rounding
    return HistogramStandard(percentiles=p, landmarks=tuple(float(x) for x in landmarks), scale=(s1, s2),
                             scale_landmarks=tuple(float(x) for x in mu), num_volumes=len(mapped))


def _end_slope(x0: float, x1: float, y0: float, y1: float, overall: float) -> float:
    return (y1 - y0) / (x1 - x0) if x1 > x0 else overall


def apply_standard(volume: np.ndarray, standard: HistogramStandard, name: str = "volume") -> np.ndarray:
    """Map ``volume`` (any shape and units) onto ``standard``: float32, same shape, source units.

    Piecewise linear between the volume's own landmarks (percentiles of its foreground, the
    standard's percentiles) and ``standard.landmarks``; beyond the end landmarks the first and
    last segments are extended linearly (a zero-width end segment takes the slope between the end
    landmarks). Monotone non-decreasing in the input intensity. ``SDDMError`` for empty,
    non-finite or constant volumes.
    """
    v = np.asarray(volume, dtype=np.float64)
    xs = volume_landmarks(v, standard.percentiles, name)
    ys = np.asarray(standard.landmarks, dtype=np.float64)
    overall = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
    left = _end_slope(xs[0], xs[1], ys[0], ys[1], overall)
    right = _end_slope(xs[-2], xs[-1], ys[-2], ys[-1], overall)
    out = np.interp(v, xs, ys)
    below, above = v < xs[0], v > xs[-1]
    out[below] = ys[0] + (v[below] - xs[0]) * left
    out[above] = ys[-1] + (v[above] - xs[-1]) * right
    return out.astype(np.float32)
