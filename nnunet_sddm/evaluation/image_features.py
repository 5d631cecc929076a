r"""The 22 image-quality features of DSMRI (Kushol et al., derived from MRQy, Sadri et al. 2020)
that SD-DM's paper feeds to t-SNE (see docs/explanation/metrics.md), per 2D slice and per volume.

Per slice ``I`` (2D, after the volume-level intensity normalisation below):

Foreground (MRQy): ``h = 255 * equalize_hist(I)``; ``o_I = I > otsu(I)``, ``o_h = h > otsu(h)``;
``w_1 = mean(o_I)``, ``w_2 = mean(o_h)``; mask ``M = convex_hull(w_1 I + w_2 h > otsu(w_1 I + w_2 h))``.
``F = M * I`` (the slice with the background zeroed), ``B = (1 - M) * I``, ``f = I[M]``,
``b = I[~M]``. If the hull is empty or covers the whole slice, ``f`` is the whole slice and
``b`` is empty (statistics of an empty set are 0).

Spatial (on ``f``, ``b``, ``F``, ``B``):
 1. MEAN  = mean(f)
 2. RNG   = max(f) - min(f)
 3. VAR   = var(f)
 4. CV    = 100 std(f) / mean(f)                           (coefficient of variation, %)
 5. PSNR  = 20 log10(max(F) / sqrt(mean((F - med5(F))^2)))  (med5: 5x5 median filter of F)
 6. SNR1  = std(f) / std(b)
 7. SNR2  = mean(P_F) / std(b)                             (P_X: 5x5 patch centred on argmax X)
 8. CNR   = mean(P_F - P_B) / std(P_B)
 9. CJV   = (std(f) + std(b)) / |mean(f) - mean(b)|
10. EFC   = sum(x log x) / (n (1/sqrt n) log(1/sqrt n)),  x = F / sqrt(sum F^2), n pixels, 0 log 0 = 0
Frequency (``|.|``: magnitude of the 2D DFT):
11. SNRF  = 10 log10(mean(P[P >= mean P]) / mean(P[P < mean P])),  P = |DFT(F)|^2
12. HFR   = mean(sqrt(|DFT(F * K_hp)|)),  K_hp = [[-1,-1,-1],[-1,8,-1],[-1,-1,-1]] ('same' convolution)
13. LFR   = mean(sqrt(|DFT(F * K_lp)|)),  K_lp = [[1,2,1],[2,4,2],[1,2,1]] / 16
Wavelet (2D ``coif4`` decomposition of F, symmetric extension, maximal level
``floor(log2(min(H, W) / 23))`` as PyWavelets' ``wavedec2``; ``C_0`` = approximation,
``C_1..C_L`` = the detail triples; L + 1 groups):
14. WQS   = sum over all coefficients of c   (DSMRI's sum |c| cos(angle c) for real c)
15. WCE   = (1 / (L + 1)) sum_groups sum |c|
16. WCS   = (1 / (L + 1)) sum_groups #{c in group : |c| < mean_group |c|}
Texture (grey-level co-occurrence matrix of F rescaled to 0..255, 256 levels, symmetric,
normalised, distances 1, 2, 3, angles 0, 45, 90, 135 degrees; scikit-image
``graycomatrix``/``graycoprops``; each feature is the mean over the 12 matrices):
17. Contrast  18. Correlation  19. Energy  20. Homogeneity  21. Dissimilarity  22. ASM

Per volume: the mean over slices (every slice by default; DSMRI used every 5th slice of a central
fraction, too sparse for 8-12-slice cine stacks), skipping constant slices as DSMRI does unless
every slice is constant.

Fixes of DSMRI's quirks (documented deviations):
* intensity scaling: each volume is first clipped to its 0.5-99.5th percentiles and scaled to
  [0, 1] (``normalization="percentile"``, default), so that features compare appearance rather
  than the scanner's arbitrary intensity unit (nnU-Net z-scores every case anyway);
  ``normalization="none"`` keeps the raw intensities as DSMRI does;
* GLCM: DSMRI casts raw intensities to uint8 (values wrap modulo 256); here F is min-max
  rescaled to 0..255 first;
* PSNR: DSMRI compares F with the median filter of F / max(F) (different scales); here both
  are on the same scale;
* SNR2/CNR patches: DSMRI's patch is offset by the padding; here it is centred on the maximum;
* EFC: DSMRI adds 1e16 inside the logarithm (meant as 1e-16) and flips the sign; here
  ``0 log 0 = 0`` and the MRIQC sign (EFC in [0, 1]);
* undefined values are made finite: a ratio with a zero denominator is 0, PSNR and SNRF are
  capped at 120 dB, so constant or empty slices give finite features.
The coif4 filter is the published 24-tap Coiflet (the decomposition low-pass of PyWavelets'
``coif4``); the high-pass is its quadrature mirror ``g[k] = (-1)^(k+1) h[L-1-k]``.
"""
from __future__ import annotations

import functools
from typing import Dict, List

import numpy as np
from scipy import ndimage

#: Feature names in DSMRI's order.
FEATURE_NAMES = ("MEAN", "RNG", "VAR", "CV", "PSNR", "SNR1", "SNR2", "CNR", "CJV", "EFC",
                 "SNRF", "HFR", "LFR", "WQS", "WCE", "WCS",
                 "Contrast", "Correlation", "Energy", "Homogeneity", "Dissimilarity", "ASM")

#: coif4 decomposition low-pass filter (24 taps; Daubechies' Coiflet of order 4, orthonormal).
COIF4_DEC_LO = np.array([
    -1.7849850030882614e-06, -3.2596802368833675e-06, 3.1229875865345646e-05, 6.2339034461007128e-05,
    -2.5997455248771324e-04, -5.8902075624433831e-04, 1.2665619292989445e-03, 3.7514361572784571e-03,
    -5.6582866866107199e-03, -1.5211731527946259e-02, 2.5082261844864097e-02, 3.9334427123337491e-02,
    -9.6220442033987982e-02, -6.6627474263425038e-02, 4.3438605649146850e-01, 7.8223893092049901e-01,
    4.1530840703043026e-01, -5.6077313316754807e-02, -8.1266699680878754e-02, 2.6682300156053072e-02,
    1.6068943964776348e-02, -7.3461663276420935e-03, -1.6294920126017326e-03, 8.9231366858231456e-04])
COIF4_DEC_HI = np.array([(-1) ** (k + 1) * COIF4_DEC_LO[len(COIF4_DEC_LO) - 1 - k]
                         for k in range(len(COIF4_DEC_LO))])

_DB_CAP = 120.0
_HP = np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], dtype=np.float64)
_LP = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64) / 16.0


# ----------------------------------------------------------------------------- helpers
def _ratio(num: float, den: float) -> float:
    """num / den, 0 when the denominator is (numerically) zero."""
    return float(num / den) if abs(den) > 1e-12 * max(1.0, abs(num)) else 0.0


def _db(ratio_num: float, ratio_den: float, scale: float) -> float:
    """scale * log10(num / den) capped at 120 dB; 0 when num <= 0."""
    if ratio_num <= 0:
        return 0.0
    if ratio_den <= ratio_num * 10 ** (-_DB_CAP / scale):
        return _DB_CAP
    return float(scale * np.log10(ratio_num / ratio_den))


def _conv_same(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2D convolution, output the size of ``img``, zeros outside (``convolve2d(..., 'same')``)."""
    return ndimage.convolve(img, kernel, mode="constant", cval=0.0)


def _stats(a: np.ndarray) -> tuple:
    return (float(a.mean()), float(a.std())) if a.size else (0.0, 0.0)


def _patch(img: np.ndarray, size: int = 5) -> np.ndarray:
    """size x size patch centred on the (first) maximum of img, zero-padded at the borders."""
    h = size // 2
    i, j = np.unravel_index(int(np.argmax(img)), img.shape)
    padded = np.pad(img, h)
    return padded[i:i + size, j:j + size]


def dwt_axis(x: np.ndarray, filt: np.ndarray, axis: int) -> np.ndarray:
    """One decimated filtering step along ``axis`` with symmetric (half-sample) extension,
    PyWavelets' convention: ``y[o] = sum_j filt[j] x[2o + 1 - j]``, ``o < (N + L - 1) // 2``."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    n, L = x.shape[-1], len(filt)
    pad = [(0, 0)] * (x.ndim - 1) + [(L - 1, L - 1)]
    xp = np.pad(x, pad, mode="symmetric")
    n_out = (n + L - 1) // 2
    idx = 2 * np.arange(n_out)[:, None] + 1 - np.arange(L)[None, :] + (L - 1)
    y = xp[..., idx] @ filt
    return np.moveaxis(y, -1, axis)


def wavedec2(img: np.ndarray, lo: np.ndarray = COIF4_DEC_LO, hi: np.ndarray = COIF4_DEC_HI,
             level: int = None) -> List:
    """Multilevel 2D discrete wavelet decomposition ``[cA_L, (cH_L, cV_L, cD_L), ..., (.._1)]``.

    Default level: ``floor(log2(min(shape) / (len(lo) - 1)))`` (0 for tiny images)."""
    img = np.asarray(img, dtype=np.float64)
    if level is None:
        m = min(img.shape)
        level = int(np.floor(np.log2(m / (len(lo) - 1)))) if m >= len(lo) - 1 else 0
    details = []
    a = img
    for _ in range(max(0, level)):
        l0, h0 = dwt_axis(a, lo, 0), dwt_axis(a, hi, 0)
        a = dwt_axis(l0, lo, 1)
        details.append((dwt_axis(h0, lo, 1), dwt_axis(l0, hi, 1), dwt_axis(h0, hi, 1)))
    return [a] + details[::-1]


def foreground_mask(img: np.ndarray) -> np.ndarray:
    """MRQy's foreground: convex hull of an Otsu threshold of a mix of the image and its
    histogram-equalised version. All True when no proper foreground/background split exists."""
    from skimage.exposure import equalize_hist
    from skimage.filters import threshold_otsu
    from skimage.morphology import convex_hull_image

    img = np.asarray(img, dtype=np.float64)
    if img.max() <= img.min():
        return np.ones(img.shape, dtype=bool)
    h = equalize_hist(img) * 255.0
    w1 = float(np.mean(img > threshold_otsu(img)))
    w2 = float(np.mean(h > threshold_otsu(h))) if h.max() > h.min() else 0.0
    mix = w1 * img + w2 * h
    if mix.max() <= mix.min():
        return np.ones(img.shape, dtype=bool)
    ots = mix > threshold_otsu(mix)
    if not ots.any():
        return np.ones(img.shape, dtype=bool)
    hull = convex_hull_image(ots)
    if not hull.any() or hull.all():
        return np.ones(img.shape, dtype=bool)
    return hull


@functools.lru_cache(maxsize=1)
def _glcm_weights() -> np.ndarray:
    """(8, 256^2) weights: d^2, |d|, 1/(1+d^2), i, j, i^2, j^2, i*j for grey levels (i, j)."""
    i, j = np.meshgrid(np.arange(256.0), np.arange(256.0), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    d = i - j
    return np.stack([d ** 2, np.abs(d), 1.0 / (1.0 + d ** 2), i, j, i ** 2, j ** 2, i * j])


def glcm_features(F: np.ndarray) -> Dict[str, float]:
    """The six GLCM features of ``F`` after min-max rescaling to 0..255 (means over 3 distances
    x 4 angles). The matrices come from ``skimage.feature.graycomatrix``; the properties are
    ``graycoprops``' formulas evaluated in one vectorised pass (equal to ``graycoprops``, which
    is about 10x slower on 256-level matrices): with ``P`` normalised and ``d = i - j``,
    contrast = sum P d^2, dissimilarity = sum P |d|, homogeneity = sum P / (1 + d^2),
    ASM = sum P^2, energy = sqrt(ASM), correlation = sum P (i - mu_i)(j - mu_j) / (s_i s_j)
    (1 when a standard deviation is below 1e-15)."""
    from skimage.feature import graycomatrix

    lo, hi = float(F.min()), float(F.max())
    g = np.zeros(F.shape, np.uint8) if hi <= lo else np.rint((F - lo) / (hi - lo) * 255).astype(np.uint8)
    P = graycomatrix(g, distances=[1, 2, 3], angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=256,
                     symmetric=True, normed=True).astype(np.float64)
    P = P.reshape(256 * 256, -1)                      # (levels^2, n_distances * n_angles)
    contrast, dissim, homog, mu_i, mu_j, e_ii, e_jj, e_ij = _glcm_weights() @ P
    asm = np.einsum("kn,kn->n", P, P)
    s_i = np.sqrt(np.clip(e_ii - mu_i ** 2, 0, None))
    s_j = np.sqrt(np.clip(e_jj - mu_j ** 2, 0, None))
    flat = (s_i < 1e-15) | (s_j < 1e-15)
    corr = np.where(flat, 1.0, (e_ij - mu_i * mu_j) / np.where(flat, 1.0, s_i * s_j))
    out = {"Contrast": contrast, "Correlation": corr, "Energy": np.sqrt(asm),
           "Homogeneity": homog, "Dissimilarity": dissim, "ASM": asm}
    return {k: float(np.mean(v)) for k, v in out.items()}


# ----------------------------------------------------------------------------- features
def slice_features(img: np.ndarray) -> Dict[str, float]:
    """The 22 features (module docstring) of one 2D slice; every value is finite."""
    I = np.asarray(img, dtype=np.float64)
    if I.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {I.shape}")
    M = foreground_mask(I)
    F = np.where(M, I, 0.0)
    B = np.where(M, 0.0, I)
    f, b = I[M], I[~M]
    mf, sf = _stats(f)
    mb, sb = _stats(b)
    out: Dict[str, float] = {}
    out["MEAN"] = mf
    out["RNG"] = float(np.ptp(f)) if f.size else 0.0
    out["VAR"] = sf ** 2
    out["CV"] = 100.0 * _ratio(sf, mf)
    rmse = float(np.sqrt(np.mean((F - ndimage.median_filter(F, size=5, mode="nearest")) ** 2)))
    out["PSNR"] = _db(float(F.max()), rmse, 20.0)
    out["SNR1"] = _ratio(sf, sb)
    pf, pb = _patch(F), _patch(B)
    out["SNR2"] = _ratio(float(pf.mean()), sb)
    out["CNR"] = _ratio(float((pf - pb).mean()), float(pb.std()))
    out["CJV"] = _ratio(sf + sb, abs(mf - mb))
    n = F.size
    efc_max = n * (1.0 / np.sqrt(n)) * np.log(1.0 / np.sqrt(n))
    bmax = float(np.sqrt(np.sum(F ** 2)))
    if bmax > 0 and efc_max != 0:
        x = np.abs(F) / bmax
        xlogx = np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)
        out["EFC"] = float(xlogx.sum() / efc_max)
    else:
        out["EFC"] = 0.0
    P = np.abs(np.fft.fft2(F)) ** 2
    thr = P.mean()
    sig, noise = P[P >= thr], P[P < thr]
    out["SNRF"] = _db(float(sig.mean()) if sig.size else 0.0, float(noise.mean()) if noise.size else 0.0, 10.0)
    out["HFR"] = float(np.sqrt(np.abs(np.fft.fft2(_conv_same(F, _HP)))).mean())
    out["LFR"] = float(np.sqrt(np.abs(np.fft.fft2(_conv_same(F, _LP)))).mean())
    groups = [np.asarray(c) if not isinstance(c, tuple) else np.stack(c) for c in wavedec2(F)]
    out["WQS"] = float(sum(g.sum() for g in groups))
    out["WCE"] = float(sum(np.abs(g).sum() for g in groups) / len(groups))
    out["WCS"] = float(sum(np.count_nonzero(np.abs(g) < np.abs(g).mean()) for g in groups) / len(groups))
    out.update(glcm_features(F))
    return {k: float(out[k]) for k in FEATURE_NAMES}


def normalize_volume(data: np.ndarray, mode: str = "percentile") -> np.ndarray:
    """``"percentile"``: clip to the 0.5-99.5th percentiles and scale to [0, 1] (zeros for a
    constant volume); ``"none"``: unchanged (float64)."""
    v = np.asarray(data, dtype=np.float64)
    if mode == "none":
        return v
    if mode != "percentile":
        raise ValueError(f"normalization must be 'percentile' or 'none', got {mode!r}")
    lo, hi = np.percentile(v, [0.5, 99.5])
    if hi <= lo:
        return np.zeros_like(v)
    return (np.clip(v, lo, hi) - lo) / (hi - lo)


def select_slices(n: int, slices: str = "all") -> List[int]:
    """Slice indices: ``"all"``, or ``"central:P[:S]"`` (DSMRI: the central P percent, every
    S-th slice, S default 1)."""
    if slices == "all":
        return list(range(n))
    parts = str(slices).split(":")
    if parts[0] != "central" or len(parts) not in (2, 3):
        raise ValueError(f"slices must be 'all' or 'central:PERCENT[:STEP]', got {slices!r}")
    pct = float(parts[1])
    step = int(parts[2]) if len(parts) == 3 else 1
    if not (0 < pct <= 100) or step < 1:
        raise ValueError(f"slices {slices!r}: need 0 < PERCENT <= 100 and STEP >= 1")
    start = int(0.005 * n * (100 - pct))
    stop = max(start + 1, int(0.005 * n * (100 + pct)))
    return list(range(start, min(stop, n), step))


def volume_features(data: np.ndarray, slices: str = "all", normalization: str = "percentile") -> Dict[str, float]:
    """Mean of ``slice_features`` over the selected slices of a ``(z, y, x)`` volume (constant
    slices skipped unless all are constant). Every value is finite."""
    v = normalize_volume(data, normalization)
    if v.ndim != 3:
        raise ValueError(f"expected a 3D volume (z, y, x), got shape {v.shape}")
    idx = select_slices(v.shape[0], slices)
    use = [k for k in idx if v[k].max() > v[k].min()] or idx
    rows = [slice_features(v[k]) for k in use]
    return {name: float(np.mean([r[name] for r in rows])) for name in FEATURE_NAMES}
