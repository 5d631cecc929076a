"""Fourier domain adaptation (FDA; Yang & Soatto, CVPR 2020): a classical alternative to SD-DM that
gives each target slice the low-frequency amplitude spectrum of a source training slice.

Notation, for one 2D slice of shape ``(H, W)``:

- ``F = fftshift(fft2(x))``, amplitude ``|F|``, phase ``angle(F)``; the zero frequency (DC) sits
  at index ``(H // 2, W // 2)``;
- ``b = floor(beta * min(H, W))`` (capped at ``(min(H, W) - 1) // 2`` so that the window is
  symmetric about DC); the window is the centred square of half-width ``b``: indices
  ``H//2 - b .. H//2 + b`` by ``W//2 - b .. W//2 + b`` (side ``2b + 1``, the DC term included),
  as in the authors' NumPy code. ``beta = 0`` swaps nothing: the identity.

Per target volume ``t`` (``(z, y, x)``, any units) and source pool (slices of the SOURCE training
volumes):

1. intensity normalisation: every volume (target and each source volume) is mapped linearly by
   its own 0.5 / 99.5 percentile window ``[lo, hi] -> [0, 1]`` (not clipped), the same window as
   SD-DM's data path (``data.slices.IntensityWindow``);
2. for each target slice ``k`` a source slice is drawn uniformly from the pool with a numpy
   Generator seeded by ``(seed, sha256(case id))``, independent of the processing order of the
   cases; the draw of slice ``k`` is the ``k``-th draw of that generator;
3. the source slice (normalised) is resampled to ``(H, W)`` (bilinear, pixel centres aligned,
   ``scipy.ndimage.map_coordinates`` order 1, edge values repeated);
4. in the window the target's amplitude is replaced by the source's, the target's phase is kept;
   inverse FFT, real part (float64);
5. the result is mapped back by the TARGET's window ``[0, 1] -> [lo, hi]`` (target units; nnU-Net
   z-scores each case, so the units only matter to readers), float32.

``BETA = 0.01`` by default: the lower end of the paper's range 0.01 - 0.09 and its best
single-scale value for segmentation adaptation; at 0.01 a 256 x 256 slice swaps a 5 x 5 window,
i.e. little more than the mean intensity and the coarsest shading.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np
from scipy import ndimage

from nnunet_sddm.data.slices import PERCENTILES, IntensityWindow
from nnunet_sddm.utilities.errors import SDDMError

#: Default low-frequency fraction (see the module docstring).
BETA = 0.01


def check_beta(beta: float) -> float:
    """``beta`` as a float in [0, 0.5); ``SDDMError`` otherwise."""
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise SDDMError(f"--beta must be a number in [0, 0.5), got {beta!r}") from None
    if not 0.0 <= b < 0.5:
        raise SDDMError(f"--beta must be in [0, 0.5) (the FDA paper uses 0.01 - 0.09), got {beta}")
    return b


def window_halfwidth(shape: Tuple[int, int], beta: float) -> int:
    """``b`` of the module docstring for a slice of ``shape (H, W)``; -1 for ``beta = 0`` (no window)."""
    beta = check_beta(beta)
    if beta == 0.0:
        return -1
    h, w = int(shape[0]), int(shape[1])
    return min(int(np.floor(beta * min(h, w))), (min(h, w) - 1) // 2)


def window_slices(shape: Tuple[int, int], beta: float) -> Tuple[slice, slice]:
    """Index slices of the window in the fftshifted ``(H, W)`` spectrum (empty for ``beta = 0``)."""
    b = window_halfwidth(shape, beta)
    ch, cw = int(shape[0]) // 2, int(shape[1]) // 2
    if b < 0:
        return slice(0, 0), slice(0, 0)
    return slice(ch - b, ch + b + 1), slice(cw - b, cw + b + 1)


def resample_slice(image: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of a 2D ``image`` to ``shape (H, W)`` (float64; pixel centres aligned,
    edges repeated); a same-shape image is returned unchanged (as float64)."""
    img = np.asarray(image, dtype=np.float64)
    if img.shape == tuple(shape):
        return img.copy()
    h, w = img.shape
    H, W = int(shape[0]), int(shape[1])
    yy = (np.arange(H, dtype=np.float64) + 0.5) * (h / H) - 0.5
    xx = (np.arange(W, dtype=np.float64) + 0.5) * (w / W) - 0.5
    grid = np.meshgrid(yy, xx, indexing="ij")
    return ndimage.map_coordinates(img, grid, order=1, mode="nearest")


def fda_slice(target: np.ndarray, source: np.ndarray, beta: float = BETA) -> np.ndarray:
    """Swap the low-frequency amplitude of 2D ``target (H, W)`` with that of ``source`` (already
    ``(H, W)``, same intensity normalisation), keep the target's phase; float64 real part.
    ``beta = 0`` returns the target unchanged."""
    t = np.asarray(target, dtype=np.float64)
    s = np.asarray(source, dtype=np.float64)
    if t.ndim != 2 or s.shape != t.shape:
        raise SDDMError(f"fda_slice: target {t.shape} and source {s.shape} must be equal 2D shapes")
    sy, sx = window_slices(t.shape, beta)
    if sy.stop == sy.start:
        return t.copy()
    ft = np.fft.fftshift(np.fft.fft2(t))
    fs = np.fft.fftshift(np.fft.fft2(s))
    amp, phase = np.abs(ft), np.angle(ft)
    amp[sy, sx] = np.abs(fs)[sy, sx]
    mixed = amp * np.exp(1j * phase)
    return np.real(np.fft.ifft2(np.fft.ifftshift(mixed)))


def case_rng(seed: int, case: str) -> np.random.Generator:
    """The Generator of one target case: seeded by ``seed`` and the SHA-256 of the case id, so the
    draws of a case do not depend on which other cases are processed, or in which order."""
    digest = hashlib.sha256(str(case).encode()).digest()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *np.frombuffer(digest[:16], dtype=np.uint32).tolist()])


@dataclass(frozen=True)
class SlicePool:
    """The source slices that FDA draws from.

    Attributes:
        names: one name per source volume (e.g. the case id), in pool order.
        counts: the number of slices ``z`` of each source volume.
        load: ``load(i) -> (z, y, x)`` array of source volume ``i`` (any units); called lazily,
            a few recent volumes are cached.

    Pool index ``j`` is slice ``k`` of volume ``i`` in the order volume 0's slices, volume 1's, ...
    """

    names: Tuple[str, ...]
    counts: Tuple[int, ...]
    load: Callable[[int], np.ndarray]
    percentiles: Tuple[float, float] = PERCENTILES

    def __post_init__(self) -> None:
        if not self.names or len(self.names) != len(self.counts) or any(int(c) < 1 for c in self.counts):
            raise SDDMError("FDA: the source pool is empty (no source volumes with slices)")
        object.__setattr__(self, "_cache", OrderedDict())

    @classmethod
    def from_arrays(cls, volumes: Dict[str, np.ndarray],
                    percentiles: Tuple[float, float] = PERCENTILES) -> "SlicePool":
        """A pool of in-memory source volumes ``{name: (z, y, x)}`` (pool order: the dict's)."""
        names = tuple(volumes)
        arrays = [np.asarray(volumes[n]) for n in names]
        for n, a in zip(names, arrays):
            if a.ndim != 3:
                raise SDDMError(f"FDA source {n}: expected a 3D volume (z, y, x), got shape {a.shape}")
        return cls(names, tuple(int(a.shape[0]) for a in arrays), lambda i: arrays[i], percentiles)

    @property
    def size(self) -> int:
        return int(sum(self.counts))

    def locate(self, j: int) -> Tuple[int, int]:
        """Pool index -> ``(volume index, slice index)``."""
        bounds = np.cumsum(self.counts)
        i = int(np.searchsorted(bounds, j, side="right"))
        return i, int(j - (bounds[i - 1] if i else 0))

    def normalised_slice(self, i: int, k: int) -> np.ndarray:
        """Slice ``k`` of source volume ``i`` mapped by its volume's window to [0, 1] (float64)."""
        cache: OrderedDict = self._cache  # type: ignore[attr-defined]
        if i not in cache:
            vol = np.asarray(self.load(i))
            if vol.ndim != 3 or vol.shape[0] != self.counts[i]:
                raise SDDMError(f"FDA source {self.names[i]}: expected {self.counts[i]} slices, got shape {vol.shape}")
            win = IntensityWindow.fit(vol, self.percentiles, name=self.names[i])
            cache[i] = (vol, win)
            while len(cache) > 4:
                cache.popitem(last=False)
        cache.move_to_end(i)
        vol, win = cache[i]
        return (np.asarray(vol[k], dtype=np.float64) - win.lo) / (win.hi - win.lo)


def choose_slices(pool: SlicePool, case: str, num_slices: int, seed: int) -> List[Tuple[int, int]]:
    """The source ``(volume index, slice index)`` of each of a target case's ``num_slices`` slices
    (uniform over the pool, the case's own Generator, see ``case_rng``)."""
    draws = case_rng(seed, case).integers(0, pool.size, size=int(num_slices))
    return [pool.locate(int(j)) for j in draws]


def fda_volume(volume: np.ndarray, pool: SlicePool, case: str, *, beta: float = BETA, seed: int = 0,
               percentiles: Tuple[float, float] = PERCENTILES) -> Tuple[np.ndarray, List[Tuple[str, int]]]:
    """FDA of one target volume ``(z, y, x)`` (any units; finite, not constant).

    Returns ``(adapted (z, y, x) float32 in the target's units, [(source name, source slice)] per
    target slice)``. ``beta = 0`` returns the volume unchanged (as float32); the source choices are
    drawn and returned all the same.
    """
    beta = check_beta(beta)
    v = np.asarray(volume)
    if v.ndim != 3:
        raise SDDMError(f"{case}: expected a 3D volume (z, y, x), got shape {v.shape}")
    win = IntensityWindow.fit(v, percentiles, name=case)
    choices = choose_slices(pool, case, v.shape[0], seed)
    record = [(pool.names[i], k) for i, k in choices]
    if beta == 0.0:
        return v.astype(np.float32), record
    out = np.empty(v.shape, dtype=np.float32)
    scale = win.hi - win.lo
    for z, (i, k) in enumerate(choices):
        t = (np.asarray(v[z], dtype=np.float64) - win.lo) / scale
        s = resample_slice(pool.normalised_slice(i, k), t.shape)
        out[z] = (fda_slice(t, s, beta) * scale + win.lo).astype(np.float32)
    return out, record


def fda_volumes(volumes: Dict[str, np.ndarray], pool: SlicePool, *, beta: float = BETA, seed: int = 0,
                percentiles: Tuple[float, float] = PERCENTILES) -> Tuple[Dict[str, np.ndarray], Dict[str, list]]:
    """``fda_volume`` of every ``{case: (z, y, x)}``: ``({case: adapted}, {case: choices})``."""
    out, choices = {}, {}
    for case, vol in volumes.items():
        out[case], choices[case] = fda_volume(vol, pool, case, beta=beta, seed=seed, percentiles=percentiles)
    return out, choices

