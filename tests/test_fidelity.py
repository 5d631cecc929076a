"""evaluation.fidelity: paired SSIM / MS-SSIM / PSNR (against scikit-image and a numpy reference of
the 4-scale MS-SSIM), Frechet distance (closed forms), KID (exact on 1-D data, Gaussian closed form,
seeds) and the optional networks (no weights -> Unavailable, no network access; the loading
decisions; LPIPS on a stand-in AlexNet file; Inception with torch-fidelity when it is installed)."""
from __future__ import annotations

import socket

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from nnunet_sddm.evaluation import fidelity
from nnunet_sddm.evaluation.fidelity import (KernelDistance, Unavailable, frechet_distance, frechet_distance_gaussians,
                                             inception_features, kernel_distance, lpips_distances, paired_metrics,
                                             ssim_maps, zscore_like)
from nnunet_sddm.utilities.errors import SDDMError


def smooth_slices(n, size=128, seed=0):
    """Smooth random images in [0, 1] (blobs with edges, not noise)."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.random((n, size, size)), (0, 4, 4))
    x = (x - x.min(axis=(1, 2), keepdims=True)) / np.ptp(x, axis=(1, 2), keepdims=True)
    return np.clip(1.4 * x - 0.2, 0, 1)


def noisy(x, sd=0.05, seed=1):
    return np.clip(x + sd * np.random.default_rng(seed).standard_normal(x.shape), 0, 1)


# ---------------------------------------------------------------------------------------------- paired

def test_identical_slices_give_ssim_1_ms_ssim_1_psnr_inf():
    x = smooth_slices(3)
    m = paired_metrics(x, x)
    for v in (m.ssim, m.ms_ssim, m.psnr):
        assert v.shape == (3,) and v.dtype == np.float64
    assert np.allclose(m.ssim, 1.0, atol=1e-6)
    assert np.allclose(m.ms_ssim, 1.0, atol=1e-6)
    assert np.all(np.isposinf(m.psnr))


def test_noisy_copy_psnr_by_hand_and_ssim_below_1():
    x = smooth_slices(3)
    y = noisy(x)
    m = paired_metrics(y, x, batch=2)               # batches of 2 and 1
    assert np.all(m.ssim < 0.99) and np.all(m.ms_ssim < 0.999)
    mse = ((y - x) ** 2).mean(axis=(1, 2))
    assert np.all(np.isfinite(m.psnr))
    assert np.allclose(m.psnr, 10 * np.log10(1 / mse), rtol=0, atol=1e-6)
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio
    tm = peak_signal_noise_ratio(torch.from_numpy(y)[:, None], torch.from_numpy(x)[:, None], data_range=1.0,
                                 reduction="none", dim=(1, 2, 3)).numpy()
    assert np.allclose(m.psnr, tm, rtol=1e-6, atol=0)  # torchmetrics' value up to its float32 log(10)
    # more noise -> lower everything
    m2 = paired_metrics(noisy(x, sd=0.15), x)
    assert np.all(m2.ssim < m.ssim) and np.all(m2.ms_ssim < m.ms_ssim) and np.all(m2.psnr < m.psnr)


def test_ssim_is_scikit_image_gaussian_convention():
    from skimage.metrics import structural_similarity
    x = smooth_slices(2, seed=3)
    y = noisy(x, sd=0.1, seed=4)
    m = paired_metrics(y, x)
    ref = [structural_similarity(y[i], x[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0) for i in range(2)]
    assert np.allclose(m.ssim, ref, rtol=0, atol=1e-5)  # float32 maps (a convention change moves it ~5e-3)


def _reference_ms_ssim(x, y):
    """Wang et al.'s MS-SSIM, 4 scales, every scale on the valid region, numpy/scipy only."""
    w = np.array([0.0448, 0.2856, 0.3001, 0.2363])
    w = w / w.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = 1.0
    for j in range(4):
        g = lambda a: gaussian_filter(a, 1.5, truncate=3.5, mode="reflect")  # noqa: E731  (11 taps)
        mx, my = g(x), g(y)
        sxx, syy, sxy = g(x * x) - mx ** 2, g(y * y) - my ** 2, g(x * y) - mx * my
        cs = (2 * sxy + c2) / (sxx + syy + c2)
        lum = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
        v = (cs if j < 3 else lum * cs)[5:-5, 5:-5].mean()
        out *= max(v, 0.0) ** w[j]
        h, wd = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
        x = x[:h, :wd].reshape(h // 2, 2, wd // 2, 2).mean(axis=(1, 3))
        y = y[:h, :wd].reshape(h // 2, 2, wd // 2, 2).mean(axis=(1, 3))
    return out


def test_ms_ssim_is_the_4_scale_wang_product():
    assert np.allclose(fidelity.MS_SSIM_BETAS, (0.05168, 0.32949, 0.34622, 0.27261), atol=5e-6)
    assert sum(fidelity.MS_SSIM_BETAS) == pytest.approx(1.0, abs=1e-12)
    x = smooth_slices(2, seed=5)
    y = noisy(np.roll(x, 3, axis=2), sd=0.1, seed=6)  # shifted + noisy: every scale below 1
    m = paired_metrics(y, x)
    ref = [_reference_ms_ssim(y[i], x[i]) for i in range(2)]
    assert np.all(np.asarray(ref) < 0.95)
    assert np.allclose(m.ms_ssim, ref, rtol=0, atol=2e-5)  # float32 maps
    # odd size: pooling floors (101 -> 50 -> 25 -> 12)
    x, y = x[:, :101, :99], y[:, :101, :99]
    assert np.allclose(paired_metrics(y, x).ms_ssim, [_reference_ms_ssim(y[i], x[i]) for i in range(2)], atol=1e-6)


def test_ssim_maps_align_with_slices_and_average_to_ssim():
    x = smooth_slices(3)
    y = noisy(x)
    maps = ssim_maps(y, x, batch=2)
    assert maps.shape == x.shape and maps.dtype == np.float64
    assert np.allclose(maps[:, 5:-5, 5:-5].mean(axis=(1, 2)), paired_metrics(y, x).ssim, atol=1e-6)
    assert np.allclose(ssim_maps(x, x), 1.0, atol=1e-6)
    # a local change shows where it is
    z = x.copy()
    z[:, 60:70, 60:70] = 1 - z[:, 60:70, 60:70]
    m = ssim_maps(z, x)
    assert np.all(m[:, 64, 64] < 0.9) and np.allclose(m[:, 20, 20], 1.0, atol=1e-6)


def test_minimum_size_and_bad_inputs_raise():
    assert fidelity.MIN_SLICE_SIZE == 88
    x = smooth_slices(2, size=88)
    assert np.all(np.isfinite(paired_metrics(noisy(x), x).ms_ssim))  # one window at 11 x 11
    with pytest.raises(SDDMError, match="at least 88"):
        paired_metrics(x[:, :87], x[:, :87])
    with pytest.raises(SDDMError, match="at least 88"):
        paired_metrics(x[:, :, :87], x[:, :, :87])
    with pytest.raises(SDDMError, match="differ in shape"):
        paired_metrics(x, x[:1])
    with pytest.raises(SDDMError, match="differ in shape"):
        lpips_distances(x, x[:, :80])
    with pytest.raises(SDDMError, match=r"\(N, H, W\)"):
        paired_metrics(x[0], x[0])
    with pytest.raises(SDDMError, match=r"\[0, 1\]"):
        paired_metrics(x * 2, x)
    with pytest.raises(SDDMError, match="NaN"):
        paired_metrics(np.full_like(x, np.nan), x)


# ---------------------------------------------------------------------------------------------- Frechet

def test_frechet_identical_sets_are_zero_also_when_singular():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5))
    assert abs(frechet_distance(X, X)) < 1e-8
    S = rng.normal(size=(10, 22))                    # n < d, and a constant column
    S[:, 3] = 1.5
    assert abs(frechet_distance(S, S)) < 1e-8
    assert frechet_distance(S, S + 0.5) == pytest.approx(22 * 0.25, rel=1e-6)  # a shift: ||dmu||^2


def test_frechet_gaussians_diagonal_is_the_hand_formula():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.25, 0.5])
    fd = frechet_distance_gaussians(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2))
    assert fd == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2), abs=1e-10)


def test_frechet_gaussians_full_covariances_by_eigenvalues():
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    S1, S2 = A @ A.T + 0.1 * np.eye(5), B @ B.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    w, V = np.linalg.eigh(S1)
    r1 = V @ np.diag(np.sqrt(w)) @ V.T               # Tr (S1 S2)^1/2 = Tr (r1 S2 r1)^1/2
    tr = np.sum(np.sqrt(np.linalg.eigvalsh(r1 @ S2 @ r1)))
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * tr
    assert frechet_distance_gaussians(mu1, S1, mu2, S2) == pytest.approx(ref, rel=1e-9)


def test_frechet_of_large_samples_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 0.0, 2.5])
    S1 = np.array([[1.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 0.5]])
    S2 = np.array([[2.0, -0.4, 0.2], [-0.4, 1.0, 0.0], [0.2, 0.0, 1.5]])
    X = rng.multivariate_normal(mu1, S1, size=20000)
    Y = rng.multivariate_normal(mu2, S2, size=20000)
    exact = frechet_distance_gaussians(mu1, S1, mu2, S2)
    assert exact > 1.0
    assert frechet_distance(X, Y) == pytest.approx(exact, rel=0.05)
    # the sample version is the closed form at the sample mean and covariance (ddof 1)
    x, y = X[:7], Y[:9]
    assert frechet_distance(x, y) == pytest.approx(
        frechet_distance_gaussians(x.mean(0), np.cov(x.T, ddof=1), y.mean(0), np.cov(y.T, ddof=1)), abs=1e-10)
    assert frechet_distance(x, y) != pytest.approx(
        frechet_distance_gaussians(x.mean(0), np.cov(x.T, ddof=0), y.mean(0), np.cov(y.T, ddof=0)), abs=1e-6)


def test_frechet_and_kid_reject_bad_sets():
    X = np.zeros((5, 3))
    for fn in (frechet_distance, kernel_distance):
        with pytest.raises(SDDMError, match="dimensions"):
            fn(X, np.zeros((5, 4)))
        with pytest.raises(SDDMError, match="at least 2"):
            fn(X, np.zeros((1, 3)))
        with pytest.raises(SDDMError, match="2D"):
            fn(X[0], X[0])


# ---------------------------------------------------------------------------------------------- KID

def _phi(x):
    """Feature map of (x y + 1)^3 in 1-D: (x^3, sqrt3 x^2, sqrt3 x, 1)."""
    return np.stack([x ** 3, np.sqrt(3) * x ** 2, np.sqrt(3) * x, np.ones_like(x)], axis=1)


def test_kid_is_the_unbiased_mmd2_exactly_on_the_whole_sets():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, 300), rng.normal(0.3, 1.2, 300)
    px, py = _phi(x), _phi(y)
    n = len(x)
    sx, sy = px.sum(0), py.sum(0)
    exact = ((sx @ sx - (px * px).sum()) / (n * (n - 1)) + (sy @ sy - (py * py).sum()) / (n * (n - 1))
             - 2 * (sx @ sy) / n ** 2)
    # subset_size >= n: every subset is a permutation of the whole set, the U-statistic is the same
    k = kernel_distance(x[:, None], y[:, None], subsets=3, subset_size=5000, gamma=1.0, coef=1.0, degree=3)
    assert isinstance(k, KernelDistance) and k.subset_size == 300
    assert k.mean == pytest.approx(exact, rel=1e-9)
    assert k.std < 1e-9 * abs(exact)


def test_kid_default_gamma_is_one_over_d():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(200, 4)), rng.normal(0.2, 1, size=(200, 4))
    a = kernel_distance(X, Y, subsets=5, subset_size=100, seed=3)
    b = kernel_distance(X / 2, Y / 2, subsets=5, subset_size=100, seed=3, gamma=1.0)  # (x.y / 4 + 1)^3
    assert a.mean == pytest.approx(b.mean, rel=1e-12) and a.mean > 0


def _gaussian_moments(mu, sd):
    return mu, mu ** 2 + sd ** 2, mu ** 3 + 3 * mu * sd ** 2


def test_kid_matches_the_gaussian_closed_form():
    # E (x y + 1)^3 = E x^3 E y^3 + 3 E x^2 E y^2 + 3 E x E y + 1 for independent x, y
    (ax, bx, cx), (ay, by, cy) = _gaussian_moments(0.0, 0.5), _gaussian_moments(0.5, 0.6)
    e = lambda p, q: p[2] * q[2] + 3 * p[1] * q[1] + 3 * p[0] * q[0] + 1  # noqa: E731
    mx, my = (ax, bx, cx), (ay, by, cy)
    mmd2 = e(mx, mx) + e(my, my) - 2 * e(mx, my)
    rng = np.random.default_rng(7)
    n, size, subsets = 10000, 500, 50
    X, Y = rng.normal(0.0, 0.5, (n, 1)), rng.normal(0.5, 0.6, (n, 1))
    k = kernel_distance(X, Y, subsets=subsets, subset_size=size, gamma=1.0, coef=1.0, degree=3, seed=0)
    # error of the mean: subset sampling (std / sqrt(subsets)) plus the finite sets themselves (the
    # subsets share them; a non-degenerate U-statistic's variance scales as 1 / n: std^2 size / n)
    tol = 4 * k.std * np.sqrt(1 / subsets + size / n)
    assert tol < 0.25 * mmd2                          # the bound is tight enough to mean something
    assert abs(k.mean - mmd2) < tol


def test_kid_of_one_distribution_is_about_zero_and_seeded():
    rng = np.random.default_rng(8)
    X, Y = rng.normal(size=(4000, 3)), rng.normal(size=(4000, 3))
    k = kernel_distance(X, Y, subsets=50, subset_size=400, seed=1)
    assert k.std > 0
    assert abs(k.mean) < 3 * k.std / np.sqrt(50)
    shifted = kernel_distance(X, Y + 0.5, subsets=50, subset_size=400, seed=1)
    assert shifted.mean > 10 * shifted.std / np.sqrt(50)
    assert kernel_distance(X, Y, subsets=50, subset_size=400, seed=1) == k       # same seed, same numbers
    assert kernel_distance(X, Y, subsets=50, subset_size=400, seed=2) != k


def test_zscore_like_uses_the_reference_statistics():
    ref = np.array([[1.0, 5.0], [3.0, 5.0]])         # column 2 constant: sd counts as 1
    a, b = zscore_like(ref, ref, np.array([[2.0, 7.0]]))
    assert np.allclose(a, [[-1, 0], [1, 0]])
    assert np.allclose(b, [[0, 2]])
    assert len(zscore_like(ref, ref)) == 1
    with pytest.raises(SDDMError, match="columns"):
        zscore_like(ref, np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------- networks

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub folder for the test (restored afterwards)."""
    import torch.hub
    monkeypatch.setattr(torch.hub, "_hub_dir", getattr(torch.hub, "_hub_dir", None), raising=False)
    d = tmp_path / "hub"
    d.mkdir()
    torch.hub.set_dir(str(d))
    assert fidelity._hub_checkpoints() == d / "checkpoints"
    return d


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection is recorded (and fails)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_networks_without_weights_are_unavailable_without_downloading(hub, no_network):
    x = smooth_slices(2)
    inc = inception_features(x)
    assert isinstance(inc, Unavailable) and inc.reason.strip() and "\n" not in inc.reason
    assert "--inception-weights" in inc.reason and "torch-fidelity" in inc.reason
    lp = lpips_distances(x, noisy(x))
    assert isinstance(lp, Unavailable) and fidelity.ALEXNET_WEIGHTS_FILE in lp.reason and "\n" not in lp.reason
    assert no_network == []
    assert not (hub / "checkpoints").exists() or not any((hub / "checkpoints").iterdir())


class _FakeInception:
    """Records its inputs; 2048 features = per-channel means repeated."""

    def __init__(self):
        self.inputs = []

    def __call__(self, t):
        import torch
        self.inputs.append(t.clone())
        return t.to(torch.float32).mean(dim=(2, 3))[:, :1].repeat(1, 2048)


def test_inception_weight_decisions(hub, no_network, monkeypatch, tmp_path):
    x = smooth_slices(3, size=32)
    calls = []
    fake = _FakeInception()

    def loader(path, device):
        calls.append(path)
        return fake

    monkeypatch.setattr(fidelity, "_torch_fidelity_missing", lambda: None)
    monkeypatch.setattr(fidelity, "_load_inception", loader)
    # no weights anywhere -> Unavailable naming the standard file, nothing loaded
    r = inception_features(x)
    assert isinstance(r, Unavailable) and fidelity.INCEPTION_WEIGHTS_FILE in r.reason and calls == []
    # the standard file in the hub's checkpoints -> loaded from there
    (hub / "checkpoints").mkdir()
    std = hub / "checkpoints" / fidelity.INCEPTION_WEIGHTS_FILE
    std.write_bytes(b"stand-in")
    f = inception_features(x, batch=2)
    assert calls == [std]
    assert isinstance(f, np.ndarray) and f.shape == (3, 2048) and f.dtype == np.float64
    t = np.concatenate([i.numpy() for i in fake.inputs])
    assert [len(i) for i in fake.inputs] == [2, 1] and t.dtype == np.uint8 and t.shape == (3, 3, 32, 32)
    assert np.array_equal(t[:, 0], np.rint(x * 255)) and np.array_equal(t[:, 0], t[:, 2])
    assert np.allclose(f[:, 0], np.rint(x * 255).mean(axis=(1, 2)), atol=1e-3)
    # a user file wins over the hub
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"stand-in")
    inception_features(x, weights=str(mine))
    assert calls[-1] == mine
    # a user file that is missing or cannot be loaded: an error naming it
    with pytest.raises(SDDMError, match="absent.pth: no such file"):
        inception_features(x, weights=tmp_path / "absent.pth")

    def broken(path, device):
        raise RuntimeError("bad archive")

    monkeypatch.setattr(fidelity, "_load_inception", broken)
    with pytest.raises(SDDMError, match=r"mine\.pth: cannot be loaded.*bad archive"):
        inception_features(x, weights=mine)
    # the hub's file broken: skipped, not an error
    r = inception_features(x)
    assert isinstance(r, Unavailable) and str(std) in r.reason and "bad archive" in r.reason
    # torch-fidelity missing: skipped even with a user file (which must still exist)
    monkeypatch.setattr(fidelity, "_torch_fidelity_missing", lambda: "ModuleNotFoundError: no torch_fidelity")
    r = inception_features(x, weights=mine)
    assert isinstance(r, Unavailable) and "pip install torch-fidelity" in r.reason
    with pytest.raises(SDDMError, match="no such file"):
        inception_features(x, weights=tmp_path / "absent.pth")
    assert no_network == []


def test_inception_real_network_with_random_weights(hub, no_network, tmp_path, monkeypatch):
    """torch-fidelity's real loading code on a stand-in weights file (random Inception weights);
    skipped where the optional torch-fidelity is not installed."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    import torch
    torch.manual_seed(0)
    with monkeypatch.context() as m:                 # build it with the weight loading skipped
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        m.setattr(torch, "load", lambda *a, **k: {})
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    weights = tmp_path / "inception.pth"
    torch.save(model.state_dict(), weights)
    x = smooth_slices(2, size=64)
    a = inception_features(x, weights=weights)
    b = inception_features(x, weights=str(weights), batch=1)
    assert isinstance(a, np.ndarray) and a.shape == (2, 2048) and np.isfinite(a).all() and a.std() > 0
    assert np.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert no_network == []


def test_lpips_with_a_stand_in_alexnet_file(hub, no_network):
    """torchvision loads the AlexNet file from the hub folder (random convolution weights; the unused
    classifier as zero-stride tensors, to keep the file small) and LPIPS runs per pair."""
    import torch
    import torchvision
    torch.manual_seed(0)
    sd = torchvision.models.alexnet(weights=None).state_dict()
    sd = {k: (v if k.startswith("features.") else torch.zeros(()).expand(v.shape)) for k, v in sd.items()}
    (hub / "checkpoints").mkdir()
    torch.save(sd, hub / "checkpoints" / fidelity.ALEXNET_WEIGHTS_FILE)
    x = smooth_slices(3)
    y = noisy(x, sd=0.1)
    d = lpips_distances(y, x, batch=2)
    assert isinstance(d, np.ndarray) and d.shape == (3,) and d.dtype == np.float64
    assert np.all(d > 0)
    assert np.allclose(lpips_distances(x, x), 0.0, atol=1e-7)
    assert np.allclose(lpips_distances(y, x, batch=3), d, rtol=1e-5)
    assert np.all(lpips_distances(noisy(x, sd=0.3), x) > d)
    assert no_network == []


def test_region_metrics_come_from_the_same_ssim_maps():
    x = smooth_slices(3, seed=7)
    y = noisy(x, sd=0.05, seed=8)
    region = np.zeros(x.shape, bool)
    region[0] = True                       # the whole slice
    region[1, 40:70, 50:90] = True         # a box
    m = paired_metrics(y, x, region=region)
    maps = ssim_maps(y, x)
    assert m.ssim_region[0] == pytest.approx(maps[0].mean(), abs=1e-12)
    assert m.ssim_region[1] == pytest.approx(maps[1][40:70, 50:90].mean(), abs=1e-12)
    mse = ((y[1, 40:70, 50:90] - x[1, 40:70, 50:90]) ** 2).mean()
    assert m.psnr_region[1] == pytest.approx(10 * np.log10(1 / mse), abs=1e-9)
    assert np.isnan(m.ssim_region[2]) and np.isnan(m.psnr_region[2])  # empty region
    assert np.array_equal(m.ssim, paired_metrics(y, x).ssim) and paired_metrics(y, x).ssim_region is None
    assert np.all(np.isposinf(paired_metrics(x, x, region=region).psnr_region[:2]))
    with pytest.raises(SDDMError, match="region"):
        paired_metrics(y, x, region=region[:, :10])
