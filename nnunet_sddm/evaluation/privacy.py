"""Nearest-neighbour privacy checks of synthetic images against their training set.

Notation: queries ``q_i`` (synthetic slices or their features, ``i = 1..n``) and reference rows
``r_j`` (training slices, ``j = 1..m``) are vectors of dimension ``P`` (a flattened 128 x 128
slice scaled to [0, 1] has P = 16384; z-scored image features have P = 22).

* Distances: Euclidean, ``d(q, r) = ||q - r||_2``; with ``rms=True`` the root-mean-square
  difference ``||q - r||_2 / sqrt(P)``, in intensity units for [0, 1] images (the pixel-space
  convention of the report: independent of the image size).
  ``d1_i <= d2_i <= ...`` are the distances of ``q_i`` to its nearest reference rows.
  They are found with chunked matrix products in float64,
  ``d^2 = |q|^2 + |r|^2 - 2 q.r^T`` (negatives from rounding clipped to 0), ``argpartition`` and a
  sort; the distances of the k rows found are then recomputed directly as ``||q - r||`` so that an
  exact duplicate has distance exactly 0 (the expansion leaves rounding noise of about
  ``1e-8 |q|^2`` in ``d^2``, which would make the ratio below of two duplicates arbitrary).
* Nearest-neighbour distance ratio ``NNDR_i = d1_i / d2_i`` in [0, 1]. A query much closer to
  one training row than to any other (small NNDR) has memorised that row. ``d2 = 0`` implies
  ``d1 = 0``: the query is an exact copy of two (identical) training rows, memorised by any
  standard, so ``NNDR = 0`` there.
* Copy threshold (pixel space, [0, 1] images): ``tau`` is calibrated on near-duplicates:
  ``u = min(n_pairs, m)`` reference rows drawn without replacement (seeded), each perturbed as
  ``r~ = clip(r + e, 0, 1)``, ``e ~ N(0, noise_sd^2 I)``; ``tau = max_j RMS(r~_j - r_j)``, the
  largest RMS distance of a near-duplicate to its original. A query is a likely copy when
  ``d1 <= tau`` (inclusive: every calibration near-duplicate, whose nearest reference row is at
  most as far as its original, is flagged). For noise_sd = 0.02 and P = 16384, ``tau`` is about
  0.02, i.e. 2% of the intensity range per pixel.
* Memorised: ``NNDR < nndr_limit`` (default 0.6, strict).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nnunet_sddm.utilities.errors import SDDMError


@dataclass(frozen=True)
class Neighbours:
    """The ``k`` nearest reference rows of each query.

    ``distance``: ``(n, k)`` float64, ascending along each row (RMS units when ``rms``);
    ``index``: ``(n, k)`` int64 row indices into the reference matrix; ``rms``: whether
    ``distance`` is ``||q - r|| / sqrt(P)`` rather than ``||q - r||``."""

    distance: np.ndarray
    index: np.ndarray
    rms: bool = False

    @property
    def nndr(self) -> np.ndarray:
        """``(n,)`` float64 ``d1 / d2`` in [0, 1], 0 where ``d2 == 0`` (exact duplicates)."""
        return nndr(self)


@dataclass(frozen=True)
class PrivacyFlags:
    """Per-query flags and their fractions (see the module docstring).

    ``likely_copy``: ``(n,)`` bool, ``d1 <= copy_threshold``; ``memorised``: ``(n,)`` bool,
    ``NNDR < nndr_limit``; ``nndr``: ``(n,)`` float64; ``copy_fraction``, ``memorised_fraction``:
    fractions of the queries in [0, 1] (NaN with no queries)."""

    likely_copy: np.ndarray
    memorised: np.ndarray
    nndr: np.ndarray
    copy_fraction: float
    memorised_fraction: float
    copy_threshold: float
    nndr_limit: float


def _matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise SDDMError(f"{name}: expected a 2-D matrix (rows, features), got shape {a.shape}")
    if a.shape[1] < 1:
        raise SDDMError(f"{name}: has no feature columns (shape {a.shape})")
    if not np.isfinite(a).all():
        raise SDDMError(f"{name}: contains NaN or infinite values")
    return a


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray, k: int = 2, chunk: int = 1024,
                       *, rms: bool = False) -> Neighbours:
    """The ``k`` nearest rows of ``reference`` ``(m, P)`` to each row of ``queries`` ``(n, P)``.

    Euclidean distance (RMS distance ``||q - r|| / sqrt(P)`` with ``rms=True``), computed in
    float64 over chunks of ``chunk`` queries (working memory about ``16 chunk (m + P)`` bytes).
    Returns ``Neighbours`` with ``distance`` ascending ``(n, k)`` and ``index`` ``(n, k)``;
    ties are broken arbitrarily. ``SDDMError`` for non-2-D or non-finite input, different ``P``,
    ``k < 1``, ``m < k`` or ``chunk < 1``."""
    q = _matrix(queries, "queries")
    r = _matrix(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise SDDMError(f"queries have {q.shape[1]} features per row but reference has {r.shape[1]}")
    k, chunk = int(k), int(chunk)
    if k < 1:
        raise SDDMError(f"k: must be >= 1, got {k}")
    if chunk < 1:
        raise SDDMError(f"chunk: must be >= 1, got {chunk}")
    n, m = q.shape[0], r.shape[0]
    if m < k:
        raise SDDMError(f"reference: has {m} rows, fewer than the k = {k} neighbours asked for")

    distance = np.empty((n, k), dtype=np.float64)
    index = np.empty((n, k), dtype=np.int64)
    r_sq = np.einsum("ij,ij->i", r, r)
    for start in range(0, n, chunk):
        qc = q[start:start + chunk]
        d2 = np.einsum("ij,ij->i", qc, qc)[:, None] + r_sq[None, :] - 2.0 * (qc @ r.T)
        np.maximum(d2, 0.0, out=d2)
        idx = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < m else np.tile(np.arange(m), (qc.shape[0], 1))
        # exact distances of the k candidates (one pass per neighbour rank, vectorised over rows)
        exact = np.empty(idx.shape, dtype=np.float64)
        for j in range(k):
            diff = qc - r[idx[:, j]]
            exact[:, j] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        order = np.argsort(exact, axis=1, kind="stable")
        distance[start:start + chunk] = np.take_along_axis(exact, order, axis=1)
        index[start:start + chunk] = np.take_along_axis(idx, order, axis=1)
    if rms:
        distance /= math.sqrt(q.shape[1])
    return Neighbours(distance=distance, index=index, rms=bool(rms))


def nndr(neighbours: Neighbours) -> np.ndarray:
    """Nearest-neighbour distance ratio ``d1 / d2`` per query, ``(n,)`` float64 in [0, 1];
    0 where ``d2 == 0`` (then ``d1 == 0``: an exact copy of two training rows). Needs k >= 2."""
    d = np.asarray(neighbours.distance, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] < 2:
        raise SDDMError(f"neighbours: NNDR needs the 2 nearest neighbours (k >= 2), got distances of shape {d.shape}")
    d1, d2 = d[:, 0], d[:, 1]
    out = np.zeros(d.shape[0], dtype=np.float64)
    np.divide(d1, d2, out=out, where=d2 > 0)
    return out


def copy_threshold(reference: np.ndarray, *, noise_sd: float = 0.02, n_pairs: int = 256, seed: int = 0) -> float:
    """The RMS-distance threshold ``tau`` below which a synthetic slice counts as a copy.

    ``reference``: ``(m, P)`` training slices, flattened, in [0, 1]. ``u = min(n_pairs, m)`` rows
    drawn without replacement with ``default_rng(seed)``, each given additive Gaussian noise of
    sd ``noise_sd`` (intensity units) and clipped to [0, 1]; returns the largest RMS distance of
    such a near-duplicate to its original (compare with ``nearest_neighbours(..., rms=True)``).
    Deterministic for a given ``seed``."""
    r = _matrix(reference, "reference")
    if r.shape[0] < 1:
        raise SDDMError("reference: has no rows")
    if r.min() < 0.0 or r.max() > 1.0:
        raise SDDMError(f"reference: values must lie in [0, 1], got [{r.min():.4g}, {r.max():.4g}]")
    if not (math.isfinite(noise_sd) and noise_sd > 0):
        raise SDDMError(f"noise_sd: must be a positive number, got {noise_sd}")
    if int(n_pairs) < 1:
        raise SDDMError(f"n_pairs: must be >= 1, got {n_pairs}")
    rng = np.random.default_rng(seed)
    rows = rng.choice(r.shape[0], size=min(int(n_pairs), r.shape[0]), replace=False)
    original = r[np.sort(rows)]
    noisy = np.clip(original + rng.normal(0.0, float(noise_sd), size=original.shape), 0.0, 1.0)
    rms = np.sqrt(np.mean((noisy - original) ** 2, axis=1))
    return float(rms.max())


def privacy_flags(neighbours: Neighbours, copy_threshold: float, nndr_limit: float = 0.6) -> PrivacyFlags:
    """Likely copies (``d1 <= copy_threshold``, in the units of ``neighbours.distance``: RMS for
    the calibrated pixel-space threshold) and memorised queries (``d1 / d2 < nndr_limit``,
    ``nndr_limit`` in (0, 1]). ``neighbours`` needs k >= 2."""
    tau = float(copy_threshold)
    if not (math.isfinite(tau) and tau >= 0):
        raise SDDMError(f"copy_threshold: must be a finite number >= 0, got {copy_threshold}")
    limit = float(nndr_limit)
    if not 0.0 < limit <= 1.0:
        raise SDDMError(f"nndr_limit: must lie in (0, 1], got {nndr_limit}")
    ratio = nndr(neighbours)
    copy = np.asarray(neighbours.distance, dtype=np.float64)[:, 0] <= tau
    memorised = ratio < limit
    n = ratio.shape[0]
    return PrivacyFlags(likely_copy=copy, memorised=memorised, nndr=ratio,
                        copy_fraction=float(copy.mean()) if n else math.nan,
                        memorised_fraction=float(memorised.mean()) if n else math.nan,
                        copy_threshold=tau, nndr_limit=limit)
