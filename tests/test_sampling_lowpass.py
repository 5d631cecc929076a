"""phi_D as precomputed matrices: equal to a direct 2D filter, to torch's antialiased bicubic
(inside the image, where border handling plays no role), and the border conventions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_sddm.sampling.lowpass import LowPass, keys_cubic, lowpass_matrix, resize_matrix
from nnunet_sddm.utilities.errors import SDDMError


def direct_resize_2d(img: np.ndarray, out_h: int, out_w: int, padding: str) -> np.ndarray:
    """Slow reference: every output pixel as an explicit 2D weighted sum over a padded image."""
    h, w = img.shape
    margin = 4 * max(h // out_h, w // out_w, 1) + 4
    padded = np.pad(img, margin, mode="symmetric" if padding == "reflect" else "constant")
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            total = 0.0
            sy, sx = out_h / h, out_w / w
            cy, cx = (i + 0.5) / sy - 0.5, (j + 0.5) / sx - 0.5
            ky, kx = (1 / sy if sy < 1 else 1.0), (1 / sx if sx < 1 else 1.0)
            ys = np.arange(int(np.floor(cy - 2 * ky)) - 1, int(np.ceil(cy + 2 * ky)) + 2)
            xs = np.arange(int(np.floor(cx - 2 * kx)) - 1, int(np.ceil(cx + 2 * kx)) + 2)
            wy = keys_cubic((cy - ys) / ky)
            wx = keys_cubic((cx - xs) / kx)
            for a, wa in zip(ys, wy):
                for b, wb in zip(xs, wx):
                    total += wa * wb * padded[a + margin, b + margin]
            out[i, j] = total / (wy.sum() * wx.sum())
    return out


@pytest.mark.parametrize("padding", ["reflect", "zero"])
@pytest.mark.parametrize("shape,factor", [((16, 16), 2), ((16, 24), 4), ((32, 16), 8)])
def test_matrices_equal_direct_filter(padding, shape, factor):
    rng = np.random.default_rng(0)
    img = rng.normal(size=shape)
    h, w = shape
    low = direct_resize_2d(img, h // factor, w // factor, padding)
    expected = direct_resize_2d(low, h, w, padding)
    got = LowPass(h, w, factor, padding, dtype=torch.float64)(torch.from_numpy(img)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("factor", [2, 4])
def test_interior_matches_torch_antialiased_bicubic(factor):
    """torch's antialiased bicubic uses Keys a = -0.5 and renormalises at the borders; away from
    the borders it must agree with both of our paddings."""
    x = torch.rand(1, 1, 64, 64, dtype=torch.float64)
    down = torch.from_numpy(resize_matrix(64, 64 // factor, "reflect").copy())
    ours = down @ x[0, 0] @ down.T
    ref = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)[0, 0]
    m = 3
    torch.testing.assert_close(ours[m:-m, m:-m], ref[m:-m, m:-m], atol=1e-12, rtol=0)
    low = torch.rand(1, 1, 64 // factor, 64 // factor, dtype=torch.float64)
    up = torch.from_numpy(resize_matrix(64 // factor, 64, "zero").copy())
    ours_up = up @ low[0, 0] @ up.T
    ref_up = F.interpolate(low, scale_factor=factor, mode="bicubic", antialias=True, align_corners=False)[0, 0]
    m = 3 * factor
    torch.testing.assert_close(ours_up[m:-m, m:-m], ref_up[m:-m, m:-m], atol=1e-12, rtol=0)


def test_borders_reflect_keeps_constants_zero_darkens():
    ones = torch.ones(2, 1, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(LowPass(32, 32, 4, "reflect", dtype=torch.float64)(ones), ones)
    z = LowPass(32, 32, 4, "zero", dtype=torch.float64)(ones)
    assert z[0, 0, 16, 16] == pytest.approx(1.0)
    assert z[0, 0, 0, 16] < 0.9 and z[0, 0, 0, 0] < z[0, 0, 0, 16]


def test_filter_is_a_lowpass_projection_like_operator():
    """phi_D removes the highest frequency (a checkerboard) and keeps smooth images."""
    yy, xx = np.mgrid[0:32, 0:32]
    checker = torch.from_numpy(((yy + xx) % 2 * 2 - 1).astype(np.float64))
    smooth = torch.from_numpy(np.cos(2 * np.pi * yy / 32) * np.cos(2 * np.pi * xx / 32))
    phi = LowPass(32, 32, 2, "reflect", dtype=torch.float64)
    assert phi(checker).abs().max() < 0.15  # from amplitude 1
    assert (phi(smooth) - smooth).abs().max() < 0.05
    assert np.allclose(lowpass_matrix(16, 1), np.eye(16))


def test_bad_factors():
    for bad in (0, 3, 6):
        with pytest.raises(SDDMError, match="power of 2"):
            lowpass_matrix(32, bad)
    with pytest.raises(SDDMError, match="not divisible"):
        lowpass_matrix(36, 8)
    with pytest.raises(SDDMError, match="padding"):
        resize_matrix(8, 4, "wrap")
