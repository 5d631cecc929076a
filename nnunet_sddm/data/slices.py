"""Model space: per-volume intensity window and square, fixed-size 2D slices.

Pipeline (docs/explanation/algorithm.md, "The data path"), for a volume ``(z, y, x)``:

1. ``IntensityWindow.fit``: the volume's 0.5th and 99.5th percentiles ``(lo, hi)``;
   ``normalize`` clips to ``[lo, hi]`` and maps linearly to ``[-1, 1]``; ``denormalize`` inverts
   the linear map (clipped values stay clipped).
2. ``SquareResize``: pad each ``(y, x)`` slice symmetrically to a square of side ``max(y, x)``
   with the background value -1, then resize to ``size x size`` (bilinear, antialiased), keeping
   the aspect ratio. ``inverse`` resizes back and crops the padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_sddm.utilities.errors import SDDMError

#: Default percentiles of the per-volume intensity window.
PERCENTILES: Tuple[float, float] = (0.5, 99.5)


def configured_percentiles(data_cfg: Optional[Mapping[str, Any]]) -> Tuple[float, float]:
    """``(lo, hi)`` percentiles of a model's ``data`` config section (``PERCENTILES`` if unset):
    training slices and adapted images must be windowed alike."""
    lo, hi = (float(x) for x in (data_cfg or {}).get("percentiles", PERCENTILES))
    return lo, hi


@dataclass(frozen=True)
class IntensityWindow:
    """Linear map between a volume's intensity window ``[lo, hi]`` and ``[-1, 1]``."""

    lo: float
    hi: float

    @classmethod
    def fit(cls, volume: np.ndarray, percentiles: Tuple[float, float] = PERCENTILES,
            name: str = "image") -> "IntensityWindow":
        """Percentile window of a whole volume; raises for non-finite or constant images."""
        v = np.asarray(volume)
        if not np.isfinite(v).all():
            raise SDDMError(f"{name}: image contains NaN or infinite values")
        lo, hi = np.percentile(v, percentiles)
        if not hi > lo:
            raise SDDMError(f"{name}: intensity range between the {percentiles[0]} and {percentiles[1]} "
                            f"percentiles is zero (constant image?)")
        return cls(float(lo), float(hi))

    def normalize(self, volume: np.ndarray) -> np.ndarray:
        """Clip to ``[lo, hi]`` and scale to ``[-1, 1]`` (float32)."""
        v = np.clip(np.asarray(volume, dtype=np.float32), self.lo, self.hi)
        return ((v - self.lo) / (self.hi - self.lo) * 2.0 - 1.0).astype(np.float32)

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """Map ``[-1, 1]`` back to ``[lo, hi]`` (float32); values outside are mapped linearly."""
        x = np.asarray(x, dtype=np.float32)
        return ((x + 1.0) * 0.5 * (self.hi - self.lo) + self.lo).astype(np.float32)


@dataclass(frozen=True)
class SquareResize:
    """Pad ``(h, w)`` slices to a centred square and resize to ``size x size``, and back."""

    height: int
    width: int
    size: int
    pad_value: float = -1.0

    @property
    def side(self) -> int:
        return max(self.height, self.width)

    def _pads(self) -> Tuple[int, int, int, int]:
        dh, dw = self.side - self.height, self.side - self.width
        return dw // 2, dw - dw // 2, dh // 2, dh - dh // 2  # left, right, top, bottom

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """``(n, h, w)`` -> ``(n, 1, size, size)`` float32, values keep their range."""
        if slices.shape[-2:] != (self.height, self.width):
            raise ValueError(f"expected slices of shape (n, {self.height}, {self.width}), got {tuple(slices.shape)}")
        x = F.pad(slices.float()[:, None], self._pads(), value=self.pad_value)
        if self.side == self.size:
            return x.contiguous()
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                             antialias=self.side > self.size)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 1, size, size)`` -> ``(n, h, w)``: resize to the padded square and crop."""
        if self.side != self.size:
            x = F.interpolate(x.float(), size=(self.side, self.side), mode="bilinear", align_corners=False,
                              antialias=self.size > self.side)
        left, right, top, bottom = self._pads()
        return x[:, 0, top:self.side - bottom, left:self.side - right].contiguous()


def volume_to_model_slices(volume: np.ndarray, size: int, window: IntensityWindow | None = None,
                           name: str = "image") -> Tuple[torch.Tensor, IntensityWindow, SquareResize]:
    """A whole volume ``(z, y, x)`` -> model-space slices ``(z, 1, size, size)`` in ``[-1, 1]``.

    Returns the slices, the intensity window and the resize (both needed to go back).
    """
    if volume.ndim != 3:
        raise SDDMError(f"{name}: expected a 3D volume (z, y, x), got shape {volume.shape}")
    window = window or IntensityWindow.fit(volume, name=name)
    resize = SquareResize(int(volume.shape[1]), int(volume.shape[2]), int(size))
    x = resize.forward(torch.from_numpy(window.normalize(volume)))
    return x.clamp_(-1.0, 1.0), window, resize


def model_slices_to_volume(x: torch.Tensor, window: IntensityWindow, resize: SquareResize) -> np.ndarray:
    """Inverse of ``volume_to_model_slices``: ``(z, 1, size, size)`` -> ``(z, y, x)`` float32 in
    the volume's original intensity units, clipped to the volume's window ``[lo, hi]``.

    The reverse steps are not clamped (the last one adds noise, guidance adds its step), so a sample
    can leave ``[-1, 1]``; the clip keeps adapted images in the intensity range of the input's
    window, as DDA clips its saved samples to ``[-1, 1]`` and as ``N = 0`` clips the input.
    """
    out = window.denormalize(resize.inverse(x.detach().cpu().float()).numpy())
    return np.clip(out, np.float32(window.lo), np.float32(window.hi))


def resize_round_trip(volume: np.ndarray, size: int, percentiles: Tuple[float, float] = PERCENTILES,
                      name: str = "image") -> np.ndarray:
    """What the model's data path alone does to a volume ``(z, y, x)``: intensity window, padding to
    a centred square, resize to ``size`` x ``size`` and back (no diffusion); float32 in the volume's
    units, its shape, clipped to its window. The loss this costs a segmenter is the floor of any
    adaptation through a ``size``-pixel model (the source round trip)."""
    window = IntensityWindow.fit(np.asarray(volume), percentiles, name=name)
    x, window, resize = volume_to_model_slices(np.asarray(volume), size, window=window, name=name)
    return model_slices_to_volume(x, window, resize)
