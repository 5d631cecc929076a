r"""Fidelity of synthetic slices: paired SSIM / MS-SSIM / PSNR, distribution distances (Frechet
distance, kernel distance) between feature sets, and the optional ImageNet networks (Inception-v3
pool features for FID/KID, LPIPS) of the quality report (``quality``).

Inputs are float arrays of 2D slices ``(N, H, W)`` in ``[0, 1]`` (the caller scales them; values
outside ``[0, 1]`` by more than 1e-6 are an error, smaller overshoots are clipped). Everything is
deterministic: the SSIM maps in float32 on the CPU (float64 convolutions are about 20 times slower
there; the values differ by about 1e-6), PSNR in float64, a seeded generator for KID, networks in
evaluation mode.

Paired metrics (slice ``y`` of the synthetic set against the real slice ``r`` it was made from),
SSIM and MS-SSIM through torchmetrics' functional API (PSNR: below), one value per slice:

* SSIM (Wang et al. 2004): Gaussian window of 11 pixels, sigma 1.5, K1 = 0.01, K2 = 0.03, data
  range 1, population (co)variances; the mean of the SSIM map over the *valid* region, i.e. the map
  without the 5-pixel border where the window overhangs the slice. This is Wang et al.'s MATLAB
  code and scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)``. torchmetrics >= 1.5 instead averages the whole map
  including the reflect-padded border (its PR #2721; < 1.5 cropped), so its scalar changes with the
  version; here the map comes from torchmetrics (``return_full_image=True``) and the border is
  cropped here, whatever the version.
* MS-SSIM, 4 scales: ``prod_{j<4} cs_j^{b_j} * SSIM_4^{b_4}``, with ``cs_j`` the mean
  contrast-structure term at scale ``j`` (torchmetrics' ``return_contrast_sensitivity``, valid
  region), ``SSIM_4`` the SSIM (as above) at the coarsest scale, 2x2 average pooling between scales
  (odd sizes floored), negative terms clamped to 0 (torchmetrics' ``normalize="relu"``; without it a
  negative term to a fractional power is NaN). Weights: Wang et al. 2003's first four
  (0.0448, 0.2856, 0.3001, 0.2363) renormalised to sum 1:
  ``b = (0.05168, 0.32949, 0.34622, 0.27261)`` (``MS_SSIM_BETAS``, full precision).
  The coarsest scale ``floor(H / 8)`` must hold one 11-pixel window, so slices must be at least
  ``MIN_SLICE_SIZE`` = 88 pixels in height and width (the report's 128 gives a 16-pixel coarsest
  scale). torchmetrics' own ``multiscale_structural_similarity_index_measure`` demands 99 for 4
  scales (``H // 9 > 10``) and, from 1.5 on, averages the padded border at the last scale; the
  composition here keeps every scale on the valid region (it differs from torchmetrics 1.9's value
  by ~1e-4 on typical slices).
* PSNR ``= 10 log10(1 / MSE)`` (data range 1); identical slices give ``inf`` (kept, not capped).
  Computed here in float64: torchmetrics' ``peak_signal_noise_ratio`` multiplies by
  ``10 / log(tensor(10.))``, a float32 constant (a relative error of ~5e-8; the values agree otherwise).

Distribution distances between feature sets ``X (n, d)``, ``Y (m, d)``:

* ``frechet_distance``: ``||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^{1/2})`` with sample
  covariances (ddof 1), ``scipy.linalg.sqrtm``. When a covariance is singular (fewer samples than
  dimensions, a constant feature) or the square root is not finite, ``eps * I`` (eps = 1e-6) is
  added to *both* covariances, in every term (so identical sets still give 0; pytorch-fid adds it
  inside the square root only). Imaginary parts of the square root up to 1e-3 (relative) are
  rounding and dropped; larger ones are an error. Round-off below 0 is returned as 0.
* ``kernel_distance`` (KID, Binkowski et al. 2018): the unbiased MMD^2 with the polynomial kernel
  ``k(x, y) = (gamma x.y + coef)^degree`` (gamma 1/d by default), averaged over ``subsets`` random
  subsets of size ``min(subset_size, n, m)`` drawn without replacement with
  ``np.random.default_rng(seed)`` (per subset: X's indices, then Y's); ``std`` is the population sd
  (ddof 0) over the subsets, as torch-fidelity and torchmetrics report it. It is a spread of
  overlapping-subset estimates, not a standard error.
* The 22 hand-crafted image features have different units: z-score every set with the *real*
  set's mean and sd (``zscore_like``) before FD/KID. Network features are used as they come.

Optional ImageNet networks. They never fail the report and never touch the network: when a
package or weight file is missing the function returns ``Unavailable(reason)`` (one line saying
why and how to enable) instead of downloading. ImageNet features are a weak proxy for MR
appearance: the networks were trained on natural colour photographs, a grey MR slice is fed as
three identical channels, and their distances say little about anatomy or MR contrast; they are
reported for comparability with the literature only.

* ``inception_features``: the 2048-d pool features of the FID Inception-v3 (torchmetrics'
  ``NoTrainInceptionV3``, the loading code of torch-fidelity, an optional package). Slices are
  quantised to uint8 ``round(255 x)`` and repeated to 3 channels, the integer input FID expects
  (the network resizes to 299 x 299 with torchmetrics' antialiased bilinear default and maps
  ``(x - 128) / 128``). Weights: the user's file (``--inception-weights FILE``), else
  torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` only if it already lies in
  ``torch.hub.get_dir()/checkpoints``. A user-given file that is missing or cannot be loaded is an
  ``SDDMError`` naming it.
* ``lpips_distances``: LPIPS (Zhang et al. 2018) with AlexNet (torchmetrics'
  ``LearnedPerceptualImagePatchSimilarity(net_type="alex")``; its linear layers ship with
  torchmetrics), per slice pair, inputs scaled to ``[-1, 1]`` and repeated to 3 channels, only if
  torchvision's ImageNet AlexNet weights ``alexnet-owt-7be5be79.pth`` already lie in
  ``torch.hub.get_dir()/checkpoints`` (torchvision then loads that file and downloads nothing).

torch and torchmetrics are imported inside the functions that need them (torchmetrics takes
seconds to import), so the distances can be used without them. torchmetrics >= 1.8: the LPIPS
metric's ``reduction="none"`` (one value per pair) is new in 1.8; the SSIM pieces used here
(``return_full_image``, ``return_contrast_sensitivity``) behave alike from 1.4 on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from nnunet_sddm.utilities.errors import SDDMError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 1.0
MS_SSIM_SCALES = 4
WANG_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_BETAS = tuple(w / sum(WANG_MS_SSIM_WEIGHTS[:MS_SSIM_SCALES]) for w in WANG_MS_SSIM_WEIGHTS[:MS_SSIM_SCALES])
#: one full window at the coarsest of the 4 scales (floor(H / 8) >= 11)
MIN_SLICE_SIZE = SSIM_WINDOW * 2 ** (MS_SSIM_SCALES - 1)
_BORDER = (SSIM_WINDOW - 1) // 2  # torchmetrics' Gaussian window for sigma 1.5: 2 * int(3.5 * 1.5 + 0.5) + 1 = 11
_RANGE_TOL = 1e-6

FRECHET_EPS = 1e-6
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class PairedMetrics:
    """Per-slice-pair values, ``(N,)`` float64 each (``psnr`` is ``inf`` for identical slices).
    ``ssim_region`` / ``psnr_region``: the same over a region given to ``paired_metrics`` (the mean of
    the SSIM map over it; NaN where it is empty), None without one."""
    ssim: np.ndarray
    ms_ssim: np.ndarray
    psnr: np.ndarray
    ssim_region: Optional[np.ndarray] = None
    psnr_region: Optional[np.ndarray] = None


@dataclass(frozen=True)
class KernelDistance:
    """KID: mean and population sd of the unbiased MMD^2 over the subsets; ``subset_size`` is the
    size actually used (``min(subset_size, n, m)``)."""
    mean: float
    std: float
    subset_size: int


@dataclass(frozen=True)
class Unavailable:
    """An optional column that was skipped: ``reason`` is one line saying why and how to enable it."""
    reason: str


# ----------------------------------------------------------------------------------------------
# input checks

def _check_slices(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3:
        raise SDDMError(f"{name}: expected 2D slices as an array (N, H, W), got shape {a.shape}")
    if a.shape[0] == 0:
        raise SDDMError(f"{name}: no slices")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise SDDMError(f"{name}: contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise SDDMError(f"{name}: values must be scaled to [0, 1], found [{lo:.6g}, {hi:.6g}]")
    return np.clip(a, 0.0, 1.0)


def _check_pair(synthetic: np.ndarray, real: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    s = _check_slices("synthetic slices", synthetic)
    r = _check_slices("real slices", real)
    if s.shape != r.shape:
        raise SDDMError(f"paired slices: synthetic {s.shape} and real {r.shape} differ in shape")
    return s, r


def _check_size(shape: Tuple[int, ...]) -> None:
    h, w = shape[-2:]
    if h < MIN_SLICE_SIZE or w < MIN_SLICE_SIZE:
        raise SDDMError(f"paired slices of {h} x {w} pixels are too small for {MS_SSIM_SCALES}-scale MS-SSIM with "
                        f"an {SSIM_WINDOW}-pixel window: the coarsest scale (1/{2 ** (MS_SSIM_SCALES - 1)}) must hold "
                        f"one window, so height and width must be at least {MIN_SLICE_SIZE}")


# ----------------------------------------------------------------------------------------------
# paired metrics

def _ssim_kwargs() -> dict:
    return dict(gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_WINDOW, data_range=DATA_RANGE,
                k1=SSIM_K1, k2=SSIM_K2, reduction="none")


def _ssim_full_maps(p, t):
    """torchmetrics' SSIM map, ``(B, 1, H, W)``, the same size as the input (reflect-padded border)."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    _, full = structural_similarity_index_measure(p, t, return_full_image=True, **_ssim_kwargs())
    return full


def _valid_mean(maps):
    b = _BORDER
    return maps[..., b:-b, b:-b].mean(dim=(1, 2, 3))


def _ms_ssim(p, t):
    import torch
    import torch.nn.functional as F
    from torchmetrics.functional.image import structural_similarity_index_measure
    out = torch.ones(p.shape[0], dtype=torch.float64)
    for j, beta in enumerate(MS_SSIM_BETAS):
        if j < MS_SSIM_SCALES - 1:
            _, cs = structural_similarity_index_measure(p, t, return_contrast_sensitivity=True, **_ssim_kwargs())
            out = out * torch.relu(cs) ** beta
            p, t = F.avg_pool2d(p, (2, 2)), F.avg_pool2d(t, (2, 2))
        else:
            out = out * torch.relu(_valid_mean(_ssim_full_maps(p, t))) ** beta
    return out


def _batches(s: np.ndarray, r: np.ndarray, batch: int):
    """``(p, t)`` float32 tensors ``(B, 1, H, W)`` of consecutive slice pairs."""
    import torch
    for i in range(0, len(s), batch):
        yield (torch.from_numpy(np.ascontiguousarray(s[i:i + batch], dtype=np.float32))[:, None],
               torch.from_numpy(np.ascontiguousarray(r[i:i + batch], dtype=np.float32))[:, None])


def _psnr(mse: np.ndarray) -> np.ndarray:
    """``10 log10(1 / MSE)`` (data range 1), ``inf`` where the MSE is 0."""
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(mse > 0, 10.0 * np.log10(DATA_RANGE ** 2 / np.where(mse > 0, mse, 1.0)), np.inf)


def paired_metrics(synthetic: np.ndarray, real: np.ndarray, *, region: Optional[np.ndarray] = None,
                   batch: int = 64) -> PairedMetrics:
    """SSIM, 4-scale MS-SSIM and PSNR of each slice pair ``(synthetic[i], real[i])`` (module header);
    with ``region`` (``(N, H, W)`` bool, e.g. the heart), also SSIM (the map's mean over the region)
    and PSNR over the region's pixels, from the same SSIM maps."""
    import torch
    s, r = _check_pair(synthetic, real)
    _check_size(s.shape)
    if region is not None and np.shape(region) != s.shape:
        raise SDDMError(f"region: shape {np.shape(region)} differs from the slices' {s.shape}")
    ssim, ms, maps = [], [], []
    with torch.inference_mode():
        for p, t in _batches(s, r, batch):
            full = _ssim_full_maps(p, t)
            ssim.append(_valid_mean(full))
            ms.append(_ms_ssim(p, t))
            if region is not None:
                maps.append(full[:, 0])
    cat = lambda xs: torch.cat(xs).to(torch.float64).numpy()  # noqa: E731
    out = dict(ssim=cat(ssim), ms_ssim=cat(ms), psnr=_psnr(((s - r) ** 2).mean(axis=(1, 2))))
    if region is not None:
        region, full_maps = np.asarray(region, dtype=bool), cat(maps)
        ssim_r, psnr_r = np.full(len(s), np.nan), np.full(len(s), np.nan)
        for i in np.flatnonzero(region.any(axis=(1, 2))):
            m = region[i]
            ssim_r[i] = float(full_maps[i][m].mean())
            psnr_r[i] = _psnr(np.mean((s[i][m] - r[i][m]) ** 2))
        out.update(ssim_region=ssim_r, psnr_region=psnr_r)
    return PairedMetrics(**out)


def ssim_maps(synthetic: np.ndarray, real: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """The SSIM map of each slice pair, ``(N, H, W)`` float64, aligned with the slices (for region
    means). Within ``(SSIM_WINDOW - 1) / 2`` = 5 pixels of the border the window overhangs the slice
    and the values depend on the reflect padding; the mean of the map without that border is
    ``paired_metrics(...).ssim``. Needs ``H, W > 5``."""
    import torch
    s, r = _check_pair(synthetic, real)
    if min(s.shape[1:]) <= _BORDER:
        raise SDDMError(f"paired slices of {s.shape[1]} x {s.shape[2]} pixels are too small for an SSIM map "
                        f"(at least {_BORDER + 1} pixels each way)")
    with torch.inference_mode():
        return torch.cat([_ssim_full_maps(p, t)[:, 0] for p, t in _batches(s, r, batch)]).to(torch.float64).numpy()


# ----------------------------------------------------------------------------------------------
# distribution distances

def _check_features(X: np.ndarray, Y: np.ndarray, what: str) -> Tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2:
        raise SDDMError(f"{what}: feature sets must be 2D arrays (n, d), got shapes {X.shape} and {Y.shape}")
    if X.shape[1] != Y.shape[1]:
        raise SDDMError(f"{what}: feature sets have {X.shape[1]} and {Y.shape[1]} dimensions")
    if len(X) < 2 or len(Y) < 2:
        raise SDDMError(f"{what}: needs at least 2 samples in each set, got {len(X)} and {len(Y)}")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise SDDMError(f"{what}: feature sets contain NaN or infinite values")
    return X, Y


def zscore_like(reference: np.ndarray, *others: np.ndarray) -> Tuple[np.ndarray, ...]:
    """``others`` z-scored with ``reference``'s per-column mean and sd (ddof 0; a zero sd counts as
    1): ``(o - mean_ref) / sd_ref`` for each of ``others``, in order (the reference itself is not
    returned; pass it again among ``others`` for its own z-scores)."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 2 or len(ref) == 0:
        raise SDDMError(f"z-scoring: the reference must be a non-empty (n, d) array, got shape {ref.shape}")
    mean = ref.mean(axis=0)
    sd = ref.std(axis=0)
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    out = []
    for o in others:
        o = np.asarray(o, dtype=np.float64)
        if o.ndim != 2 or o.shape[1] != ref.shape[1]:
            raise SDDMError(f"z-scoring: a set of shape {o.shape} does not match the reference's {ref.shape[1]} columns")
        out.append((o - mean) / sd)
    return tuple(out)


def _is_singular(S: np.ndarray) -> bool:
    w = np.linalg.eigvalsh(S)
    top = float(np.abs(w).max())
    return top == 0.0 or float(w.min()) <= top * S.shape[0] * np.finfo(np.float64).eps


def _sqrtm(A: np.ndarray) -> np.ndarray:
    from scipy.linalg import sqrtm
    return np.asarray(sqrtm(A))


def frechet_distance_gaussians(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                               eps: float = FRECHET_EPS) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})`` (singular covariances: see
    the module header)."""
    return _frechet(mu1, sigma1, mu2, sigma2, eps, None)


def _frechet(mu1, sigma1, mu2, sigma2, eps: float, singular: Optional[bool]) -> float:
    """``singular``: already known (True: a covariance of fewer than d + 1 samples), else None."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise SDDMError(f"Frechet distance: means {mu1.shape}, {mu2.shape} and covariances {s1.shape}, {s2.shape} "
                        "do not match")
    if singular or (singular is None and (_is_singular(s1) or _is_singular(s2))):
        s1 = s1 + eps * np.eye(d)
        s2 = s2 + eps * np.eye(d)
        covmean = _sqrtm(s1 @ s2)
    else:
        covmean = _sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            s1 = s1 + eps * np.eye(d)
            s2 = s2 + eps * np.eye(d)
            covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        raise SDDMError("Frechet distance: the matrix square root of the covariance product is not finite "
                        "(degenerate feature sets)")
    if np.iscomplexobj(covmean):
        scale = max(1.0, float(np.abs(covmean.real).max()))
        imag = float(np.abs(covmean.imag).max())
        if imag > 1e-3 * scale:
            raise SDDMError(f"Frechet distance: the square root of the covariance product has an imaginary part of "
                            f"{imag:.3g} (degenerate feature sets)")
        covmean = covmean.real
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def frechet_distance(X: np.ndarray, Y: np.ndarray, *, eps: float = FRECHET_EPS) -> float:
    """Frechet distance of the Gaussians fitted to feature sets ``X (n, d)`` and ``Y (m, d)``
    (sample means, covariances with ddof 1; ``n, m >= 2``)."""
    X, Y = _check_features(X, Y, "Frechet distance")
    sx = np.atleast_2d(np.cov(X, rowvar=False, ddof=1))
    sy = np.atleast_2d(np.cov(Y, rowvar=False, ddof=1))
    d = X.shape[1]
    return _frechet(X.mean(axis=0), sx, Y.mean(axis=0), sy, eps, True if min(len(X), len(Y)) <= d else None)


def _poly_kernel(A: np.ndarray, B: np.ndarray, degree: int, gamma: float, coef: float) -> np.ndarray:
    base = A @ B.T
    base *= gamma
    base += coef
    k = base.copy()
    for _ in range(degree - 1):  # integer power by products (np.power calls pow() per element)
        k *= base
    return k


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef: float) -> float:
    s = len(x)
    kxx = _poly_kernel(x, x, degree, gamma, coef)
    kyy = _poly_kernel(y, y, degree, gamma, coef)
    kxy = _poly_kernel(x, y, degree, gamma, coef)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (s * (s - 1)) - 2.0 * kxy.mean())


def kernel_distance(X: np.ndarray, Y: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                    gamma: Optional[float] = None, coef: float = 1.0, seed: int = 0) -> KernelDistance:
    """KID of feature sets ``X (n, d)`` and ``Y (m, d)`` (module header); ``n, m >= 2``."""
    X, Y = _check_features(X, Y, "kernel distance")
    if int(subsets) < 1 or int(subset_size) < 2 or int(degree) < 1:
        raise SDDMError(f"kernel distance: subsets ({subsets}) must be >= 1, subset_size ({subset_size}) >= 2 and "
                        f"degree ({degree}) >= 1")
    g = 1.0 / X.shape[1] if gamma is None else float(gamma)
    size = min(int(subset_size), len(X), len(Y))
    rng = np.random.default_rng(seed)
    values = np.empty(int(subsets))
    for k in range(int(subsets)):
        ix = rng.choice(len(X), size, replace=False)
        iy = rng.choice(len(Y), size, replace=False)
        values[k] = _unbiased_mmd2(X[ix], Y[iy], int(degree), g, float(coef))
    return KernelDistance(mean=float(values.mean()), std=float(values.std()), subset_size=size)


# ----------------------------------------------------------------------------------------------
# optional ImageNet networks

def _hub_checkpoints() -> Path:
    import torch.hub
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torch_fidelity_missing() -> Optional[str]:
    """None when torch-fidelity imports, else why not."""
    try:
        import torch_fidelity  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"{type(e).__name__}: {e}"
    return None


def _load_inception(path: Path, device: str):
    """torchmetrics' FID Inception-v3 (torch-fidelity's weights format) from ``path``, pool features."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(path))
    return net.to(device).eval()


def _inception_network(weights: Optional[PathLike], device: str):
    """The network, or ``Unavailable``; ``SDDMError`` for a user-given file that is missing or broken."""
    user = weights is not None
    if user:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise SDDMError(f"--inception-weights {path}: no such file")
    missing = _torch_fidelity_missing()
    if missing is not None:
        return Unavailable(f"Inception-v3 features skipped: they need the optional package torch-fidelity ({missing}); "
                           f"to enable, pip install torch-fidelity and give --inception-weights FILE "
                           f"(torch-fidelity's {INCEPTION_WEIGHTS_FILE}); nothing is downloaded")
    if not user:
        path = _hub_checkpoints() / INCEPTION_WEIGHTS_FILE
        if not path.is_file():
            return Unavailable(f"Inception-v3 features skipped: no --inception-weights FILE was given and "
                               f"torch-fidelity's {INCEPTION_WEIGHTS_FILE} is not in {path.parent}; nothing is "
                               "downloaded (to enable, give --inception-weights FILE or copy the file there)")
    try:
        return _load_inception(path, device)
    except Exception as e:
        if user:
            raise SDDMError(f"--inception-weights {path}: cannot be loaded as torch-fidelity's Inception-v3 weights "
                            f"({type(e).__name__}: {e})") from e
        return Unavailable(f"Inception-v3 features skipped: {path} could not be loaded ({type(e).__name__}: {e}); "
                           "give --inception-weights FILE or replace the file")


def inception_features(images: np.ndarray, weights: Optional[PathLike] = None, batch: int = 32,
                       device: str = "cpu") -> Union[np.ndarray, Unavailable]:
    """FID Inception-v3 pool features ``(N, 2048)`` float64 of slices ``(N, H, W)`` in ``[0, 1]``, or
    ``Unavailable`` (module header: uint8 input, weights, no downloads)."""
    import torch
    x = _check_slices("images", images)
    net = _inception_network(weights, device)
    if isinstance(net, Unavailable):
        return net
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            u8 = np.rint(x[i:i + batch] * 255.0).astype(np.uint8)
            t = torch.from_numpy(u8)[:, None].repeat(1, 3, 1, 1).to(device)
            f = net(t)
            if tuple(f.shape) != (len(u8), 2048):
                raise RuntimeError(f"Inception-v3 returned features of shape {tuple(f.shape)}, expected ({len(u8)}, 2048)")
            out.append(f.detach().to("cpu", torch.float64).numpy())
    return np.concatenate(out)


def _load_lpips(device: str):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    return LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=False).to(device)


def lpips_distances(synthetic: np.ndarray, real: np.ndarray, device: str = "cpu",
                    batch: int = 32) -> Union[np.ndarray, Unavailable]:
    """LPIPS (AlexNet) of each slice pair, ``(N,)`` float64 (lower is more similar), or ``Unavailable``
    when torchvision's AlexNet weights are not already in the torch hub folder (module header)."""
    s, r = _check_pair(synthetic, real)
    try:
        import torch
        import torchvision  # noqa: F401
    except Exception as e:
        return Unavailable(f"LPIPS skipped: it needs torchvision ({type(e).__name__}: {e})")
    path = _hub_checkpoints() / ALEXNET_WEIGHTS_FILE
    if not path.is_file():
        return Unavailable(f"LPIPS skipped: torchvision's ImageNet AlexNet weights {ALEXNET_WEIGHTS_FILE} are not in "
                           f"{path.parent}; nothing is downloaded (to enable, copy the file there)")
    try:
        metric = _load_lpips(device)
    except Exception as e:
        return Unavailable(f"LPIPS skipped: AlexNet could not be loaded from {path} ({type(e).__name__}: {e})")
    with torch.inference_mode():
        for i in range(0, len(s), batch):
            a = torch.from_numpy(2.0 * s[i:i + batch] - 1.0).to(torch.float32)[:, None].repeat(1, 3, 1, 1)
            b = torch.from_numpy(2.0 * r[i:i + batch] - 1.0).to(torch.float32)[:, None].repeat(1, 3, 1, 1)
            metric.update(a.to(device), b.to(device))
        values = metric.compute()
    values = values.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if values.shape != (len(s),):
        raise RuntimeError(f"LPIPS returned {values.shape} values for {len(s)} slice pairs")
    return values
