"""phi_D: the linear low-pass filter of the guided sampler (docs/explanation/algorithm.md).

    phi_D(x) = up_D(down_D(x))

``down_D`` resizes by ``1/D`` with the antialiased Keys cubic kernel (a = -0.5, support widened by
``D``, weights ``(1/D) k(x/D)``), ``up_D`` resizes back by ``D`` with the plain Keys cubic kernel.
Sample centres are half-pixel aligned: output ``i`` sits at input coordinate
``(i + 0.5) / scale - 0.5``. Weights are normalised to sum to 1 over the kernel's whole support.

Both resizes are linear and separable, so for an image ``x`` of shape ``(H, W)``

    phi_D(x) = P_H @ x @ P_W^T,    P_L = U_L @ S_L   (L x L)

with ``S_L`` (L/D x L) the downsampling and ``U_L`` (L x L/D) the upsampling matrix of one axis.
The matrices are built once per ``(L, D, padding)`` (cached) and applied with two matmuls.

Borders (``padding``):
- ``"reflect"`` (project default): samples outside the image are the symmetric mirror image
  (edge sample repeated, as ILVR's resizer does), so a constant image stays constant.
- ``"zero"`` (DDA's reference behaviour): samples outside the image are zero, so the filter
  darkens towards -1 ... 0 at the borders.
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import numpy as np
import torch

from nnunet_sddm.utilities.errors import SDDMError

PADDINGS = ("reflect", "zero")


def keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel k(x) (support |x| < 2), ``a = -0.5`` as in bicubic resizers."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    x2, x3 = x * x, x * x * x
    near = (a + 2.0) * x3 - (a + 3.0) * x2 + 1.0
    far = a * x3 - 5.0 * a * x2 + 8.0 * a * x - 4.0 * a
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def _source_index(j: np.ndarray, length: int, padding: str) -> np.ndarray:
    """Map (possibly out-of-range) sample indices into ``[0, length)``; -1 marks a zero sample."""
    if padding == "reflect":
        period = 2 * length
        j = np.mod(j, period)
        return np.where(j >= length, period - 1 - j, j)
    return np.where((j >= 0) & (j < length), j, -1)


@functools.lru_cache(maxsize=64)
def resize_matrix(in_length: int, out_length: int, padding: str = "reflect") -> np.ndarray:
    """The ``(out_length, in_length)`` float64 matrix of a 1D Keys-cubic resize.

    Downsampling (``out < in``) is antialiased (kernel stretched by ``in/out``); upsampling is
    plain cubic interpolation. Read-only (cached): copy before modifying.
    """
    if padding not in PADDINGS:
        raise SDDMError(f"low-pass padding must be one of {PADDINGS}, got {padding!r}")
    if in_length < 1 or out_length < 1:
        raise SDDMError(f"cannot resize length {in_length} to {out_length}")
    scale = out_length / in_length
    stretch = 1.0 / scale if scale < 1.0 else 1.0  # antialiasing widens the kernel
    radius = 2.0 * stretch
    centres = (np.arange(out_length) + 0.5) / scale - 0.5
    first = np.floor(centres - radius).astype(np.int64)
    taps = int(np.ceil(2.0 * radius)) + 2
    j = first[:, None] + np.arange(taps)[None, :]                  # (out, taps) sample indices
    w = keys_cubic((centres[:, None] - j) / stretch) / stretch      # (out, taps)
    w /= w.sum(axis=1, keepdims=True)
    src = _source_index(j, in_length, padding)
    m = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_length)[:, None], j.shape)
    keep = src >= 0
    np.add.at(m, (rows[keep], src[keep]), w[keep])
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=64)
def lowpass_matrix(length: int, factor: int, padding: str = "reflect") -> np.ndarray:
    """``P_L = U_L @ S_L``: the ``(L, L)`` float64 matrix of phi_D along one axis of length L."""
    if factor < 1 or factor & (factor - 1):
        raise SDDMError(f"low-pass factor D must be a power of 2, got {factor}")
    if length % factor:
        raise SDDMError(f"image side {length} is not divisible by the low-pass factor D={factor}")
    if factor == 1:
        m = np.eye(length)
    else:
        low = length // factor
        m = resize_matrix(low, length, padding) @ resize_matrix(length, low, padding)
    m.setflags(write=False)
    return m


class LowPass:
    """phi_D for ``(..., H, W)`` tensors as ``P_H @ x @ P_W^T`` with matrices on one device/dtype.

    Build it once per sampling run; ``LowPass.get`` caches instances per
    ``(H, W, D, padding, device, dtype)``.
    """

    _cache: Dict[Tuple, "LowPass"] = {}

    def __init__(self, height: int, width: int, factor: int, padding: str = "reflect",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.height, self.width, self.factor, self.padding = int(height), int(width), int(factor), padding
        self.p_h = torch.as_tensor(lowpass_matrix(self.height, self.factor, padding).copy(), dtype=dtype, device=device)
        self.p_w_t = torch.as_tensor(lowpass_matrix(self.width, self.factor, padding).T.copy(), dtype=dtype,
                                     device=device)

    @classmethod
    def get(cls, height: int, width: int, factor: int, padding: str = "reflect",
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "LowPass":
        key = (int(height), int(width), int(factor), padding, str(torch.device(device)), dtype)
        if key not in cls._cache:
            cls._cache[key] = cls(height, width, factor, padding, device, dtype)
        return cls._cache[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """phi_D(x) for ``x`` of shape ``(..., H, W)``; same shape, the matrices' dtype."""
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"LowPass built for {self.height}x{self.width}, got {tuple(x.shape)}")
        return torch.matmul(torch.matmul(self.p_h, x.to(self.p_h.dtype)), self.p_w_t)
