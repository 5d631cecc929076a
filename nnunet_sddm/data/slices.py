"""Model space: per-volume intensity window and the 2D slice geometry of the diffusion model.

Pipeline (docs/explanation/algorithm.md, "The data path"), for a volume ``(z, y, x)``:

1. ``IntensityWindow.fit``: the volume's 0.5th and 99.5th percentiles ``(lo, hi)``;
   ``normalize`` clips to ``[lo, hi]`` and maps linearly to ``[-1, 1]``; ``denormalize`` inverts
   the linear map (clipped values stay clipped).
2. The slice geometry, one of two modes chosen by the model's ``data.spacing``:

   - resize mode (``data.spacing`` null, the default): ``SquareResize`` pads each ``(y, x)``
     slice symmetrically to a square of side ``max(y, x)`` with the background value -1, then
     resizes to ``size x size`` (bilinear, antialiased), keeping the aspect ratio. ``inverse``
     resizes back and crops the padding.
   - spacing mode (``data.spacing`` = s mm): ``SpacingResample`` resamples each slice from its
     in-plane spacing to s mm (bilinear, antialiased along an axis that shrinks; the field of view
     is kept, so the grid is ``round(y * sy / s) x round(x * sx / s)``), then pads it
     symmetrically with -1 to a multiple of ``multiple`` (adaptation: the UNet's downsampling
     factor and D). ``inverse`` crops the padding and resamples back to exactly ``(y, x)``.

``slice_transform`` picks the mode's transform; ``data_round_trip`` is what the data path alone
does to a volume in either mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

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


#: Accepted range of ``data.spacing`` in mm (a working spacing outside it is a typo).
SPACING_RANGE: Tuple[float, float] = (0.05, 20.0)


def check_working_spacing(value: Any, name: str = "data.spacing") -> Optional[float]:
    """``data.spacing`` checked: None (resize mode) or a finite number of mm in ``SPACING_RANGE``
    (spacing mode), returned as a float; ``SDDMError`` naming ``name`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SDDMError(f"{name}: expected null (resize mode) or the in-plane working spacing in mm "
                        f"(a number such as 1.5), got {value!r}")
    v = float(value)
    lo, hi = SPACING_RANGE
    if not math.isfinite(v) or not lo <= v <= hi:
        raise SDDMError(f"{name}: the working spacing must be a finite number of mm in [{lo:g}, {hi:g}], "
                        f"got {value!r}")
    return v


def working_spacing(data_cfg: Optional[Mapping[str, Any]]) -> Optional[float]:
    """The in-plane working spacing in mm of a model's ``data`` config section (``data.spacing``),
    or None for resize mode (also when the key is absent: models written before it existed)."""
    return check_working_spacing((data_cfg or {}).get("spacing"))


def inplane_spacing(spacing: Optional[Sequence[float]], name: str = "image") -> Tuple[float, float]:
    """``(sy, sx)`` in mm from a volume's ``(z, y, x)`` spacing (``(y, x)`` also accepted);
    ``SDDMError`` naming ``name`` when it is missing, malformed, non-finite or not positive."""
    if spacing is None:
        raise SDDMError(f"{name}: spacing mode (data.spacing of the diffusion model) needs the image's voxel "
                        f"spacing, and none was given")
    try:
        vals = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise SDDMError(f"{name}: voxel spacing {spacing!r} is not a sequence of numbers") from None
    if len(vals) not in (2, 3):
        raise SDDMError(f"{name}: expected a (z, y, x) voxel spacing, got {spacing!r}")
    sy, sx = vals[-2:]
    if not (math.isfinite(sy) and math.isfinite(sx) and sy > 0 and sx > 0):
        raise SDDMError(f"{name}: in-plane voxel spacing {(sy, sx)} mm must be finite and positive")
    return sy, sx


def resample_bilinear(x: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """``(n, c, h, w)`` -> ``(n, c, *shape)`` float32: bilinear, half-pixel aligned (each grid
    spans the same field of view), antialiased when either axis shrinks; a copy when the shape is
    unchanged."""
    x = x.float()
    if tuple(x.shape[-2:]) == tuple(shape):
        return x.contiguous()
    shrink = shape[0] < x.shape[-2] or shape[1] < x.shape[-1]
    return F.interpolate(x, size=tuple(int(s) for s in shape), mode="bilinear", align_corners=False,
                         antialias=shrink)


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
        return resample_bilinear(x, (self.size, self.size))

    def forward_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Label maps ``(n, h, w)`` -> ``(n, size, size)`` on the grid of ``forward``: padded with 0,
        nearest-neighbour resize (pixel centres, as the bilinear resize), values kept."""
        if labels.shape[-2:] != (self.height, self.width):
            raise ValueError(f"expected label maps of shape (n, {self.height}, {self.width}), got {tuple(labels.shape)}")
        x = F.pad(labels.float()[:, None], self._pads(), value=0.0)
        return F.interpolate(x, size=(self.size, self.size), mode="nearest-exact")[:, 0]

    def inverse_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Label maps ``(n, size, size)`` -> ``(n, h, w)``: nearest-neighbour resize (pixel centres,
        as ``forward_labels``) to the padded square, then the padding cropped; values kept."""
        if tuple(labels.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"expected label maps of shape (n, {self.size}, {self.size}), got {tuple(labels.shape)}")
        x = F.interpolate(labels.float()[:, None], size=(self.side, self.side), mode="nearest-exact")
        left, right, top, bottom = self._pads()
        return x[:, 0, top:self.side - bottom, left:self.side - right].contiguous()

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 1, size, size)`` -> ``(n, h, w)``: resize to the padded square and crop."""
        x = resample_bilinear(x, (self.side, self.side))
        left, right, top, bottom = self._pads()
        return x[:, 0, top:self.side - bottom, left:self.side - right].contiguous()


@dataclass(frozen=True)
class SpacingResample:
    """Spacing mode: resample ``(h, w)`` slices of in-plane spacing ``(sy, sx)`` mm to the working
    spacing ``spacing`` mm and pad them symmetrically (value ``pad_value``) to multiples of
    ``multiple``, and back.

    The resampled grid keeps the field of view: ``resampled = (round(h * sy / spacing),
    round(w * sx / spacing))`` (at least 1), so its actual spacing differs from ``spacing`` by at
    most half a pixel over the field of view. The padding is centred (``pad // 2`` before,
    the rest after), as ``SquareResize`` centres its square.
    """

    height: int
    width: int
    in_spacing: Tuple[float, float]
    spacing: float
    multiple: int = 1
    pad_value: float = -1.0

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise SDDMError(f"cannot resample a slice of shape ({self.height}, {self.width})")
        if int(self.multiple) < 1:
            raise SDDMError(f"padding multiple must be >= 1, got {self.multiple}")

    @property
    def resampled(self) -> Tuple[int, int]:
        """``(h', w')``: the slice's grid at the working spacing (before padding)."""
        sy, sx = self.in_spacing
        return (max(1, int(round(self.height * sy / self.spacing))),
                max(1, int(round(self.width * sx / self.spacing))))

    @property
    def shape(self) -> Tuple[int, int]:
        """``(H, W)``: the model-space shape, ``resampled`` rounded up to multiples of ``multiple``."""
        m = int(self.multiple)
        h, w = self.resampled
        return -(-h // m) * m, -(-w // m) * m

    def _pads(self) -> Tuple[int, int, int, int]:
        (h, w), (H, W) = self.resampled, self.shape
        dh, dw = H - h, W - w
        return dw // 2, dw - dw // 2, dh // 2, dh - dh // 2  # left, right, top, bottom

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """``(n, h, w)`` -> ``(n, 1, H, W)`` float32, values keep their range."""
        if slices.shape[-2:] != (self.height, self.width):
            raise ValueError(f"expected slices of shape (n, {self.height}, {self.width}), got {tuple(slices.shape)}")
        x = resample_bilinear(slices[:, None], self.resampled)
        pads = self._pads()
        return F.pad(x, pads, value=self.pad_value) if any(pads) else x

    def forward_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Label maps ``(n, h, w)`` -> ``(n, H, W)`` on the grid of ``forward``: nearest-neighbour
        resampling (pixel centres, ``nearest-exact``) to ``resampled``, then the same padding with 0
        (background); values kept."""
        if labels.shape[-2:] != (self.height, self.width):
            raise ValueError(f"expected label maps of shape (n, {self.height}, {self.width}), got {tuple(labels.shape)}")
        x = labels.float()[:, None]
        if tuple(x.shape[-2:]) != self.resampled:
            x = F.interpolate(x, size=self.resampled, mode="nearest-exact")
        pads = self._pads()
        return (F.pad(x, pads, value=0.0) if any(pads) else x)[:, 0].contiguous()

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 1, H, W)`` -> ``(n, h, w)``: crop the padding and resample to the original grid."""
        if tuple(x.shape[-2:]) != self.shape:
            raise ValueError(f"expected model-space slices of shape (n, 1, {self.shape[0]}, {self.shape[1]}), "
                             f"got {tuple(x.shape)}")
        left, right, top, bottom = self._pads()
        H, W = self.shape
        x = x.float()[:, :, top:H - bottom, left:W - right]
        return resample_bilinear(x, (self.height, self.width))[:, 0].contiguous()


#: The slice transform of either mode (both have ``forward`` and ``inverse``).
SliceTransform = Union[SquareResize, SpacingResample]


def slice_transform(data_cfg: Optional[Mapping[str, Any]], size: int, shape: Tuple[int, int],
                    spacing: Optional[Sequence[float]] = None, multiple: int = 1,
                    name: str = "image") -> SliceTransform:
    """The model-space transform of slices of ``shape (h, w)`` for a model with ``data`` section
    ``data_cfg`` and side ``size``: ``SquareResize`` in resize mode (``spacing``, ``multiple``
    unused); ``SpacingResample`` to ``data.spacing`` mm in spacing mode, from the volume's
    ``(z, y, x)`` spacing in mm, padded to multiples of ``multiple``."""
    s = working_spacing(data_cfg)
    h, w = int(shape[0]), int(shape[1])
    if s is None:
        return SquareResize(h, w, int(size))
    return SpacingResample(h, w, inplane_spacing(spacing, name), s, int(multiple))


def volume_to_model_slices(volume: np.ndarray, size: int, window: IntensityWindow | None = None,
                           name: str = "image", transform: Optional[SliceTransform] = None,
                           ) -> Tuple[torch.Tensor, IntensityWindow, SliceTransform]:
    """A whole volume ``(z, y, x)`` -> model-space slices in ``[-1, 1]``: ``(z, 1, size, size)``
    with the default ``SquareResize``, ``(z, 1, H, W)`` with a given ``transform`` (e.g. from
    ``slice_transform``).

    Returns the slices, the intensity window and the transform (both needed to go back).
    """
    if volume.ndim != 3:
        raise SDDMError(f"{name}: expected a 3D volume (z, y, x), got shape {volume.shape}")
    window = window or IntensityWindow.fit(volume, name=name)
    resize = transform or SquareResize(int(volume.shape[1]), int(volume.shape[2]), int(size))
    x = resize.forward(torch.from_numpy(window.normalize(volume)))
    return x.clamp_(-1.0, 1.0), window, resize


def model_slices_to_volume(x: torch.Tensor, window: IntensityWindow, resize: SliceTransform) -> np.ndarray:
    """Inverse of ``volume_to_model_slices``: ``(z, 1, H, W)`` -> ``(z, y, x)`` float32 in
    the volume's original intensity units, clipped to the volume's window ``[lo, hi]``.

    The reverse steps are not clamped (the last one adds noise, guidance adds its step), so a sample
    can leave ``[-1, 1]``; the clip keeps adapted images in the intensity range of the input's
    window, as DDA clips its saved samples to ``[-1, 1]`` and as ``N = 0`` clips the input.
    """
    out = window.denormalize(resize.inverse(x.detach().cpu().float()).numpy())
    return np.clip(out, np.float32(window.lo), np.float32(window.hi))


def data_round_trip(volume: np.ndarray, size: int, data_cfg: Optional[Mapping[str, Any]],
                    spacing: Optional[Sequence[float]] = None, name: str = "image") -> np.ndarray:
    """What the data path of a model (side ``size``, ``data`` section ``data_cfg``) alone does to a
    volume ``(z, y, x)`` of voxel spacing ``spacing`` (mm, ``(z, y, x)``; needed in spacing mode):
    the intensity window, then resize mode: padding to a centred square, resize to ``size`` x
    ``size`` and back; spacing mode: resampling to the working spacing and back (padding is
    lossless and left out). float32 in the volume's units, its shape, clipped to its window. The
    loss this costs a segmenter is the floor of any adaptation through that model (the source
    round trip)."""
    percentiles = configured_percentiles(data_cfg)
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise SDDMError(f"{name}: expected a 3D volume (z, y, x), got shape {volume.shape}")
    window = IntensityWindow.fit(volume, percentiles, name=name)
    transform = slice_transform(data_cfg, size, volume.shape[1:], spacing, name=name)
    x, window, transform = volume_to_model_slices(volume, size, window=window, name=name, transform=transform)
    return model_slices_to_volume(x, window, transform)
