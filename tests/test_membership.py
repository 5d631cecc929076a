"""Membership inference: a micro model overfitted to a few slices gives them away (AUC well above
0.5), two sets of unseen slices do not; denoising errors are deterministic, batch- and
order-independent and equal their definition; grouped folds keep volumes whole; the bootstrap
CI equals a plain resampling loop; bad input -> SDDMError."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from _micro_model import micro_model_folder, one_torch_thread
from nnunet_sddm.diffusion.model_folder import EMA_FILE, load_model, save_weights
from nnunet_sddm.evaluation.membership import (cv_splits, default_timesteps, denoising_errors, membership_auc,
                                               slice_noise)
from nnunet_sddm.utilities.errors import SDDMError

SIZE = 16  # the micro model at 16 x 16: a quarter of the 32 x 32 cost, so that it can overfit in seconds


def blobs(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """``n`` images ``(n, 1, size, size)`` in [-1, 1]: three Gaussian blobs each (sd 1.5-3 px,
    centres uniform in [4, size - 4]), scaled so that the brightest pixel is 1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        img = np.zeros((size, size))
        for _ in range(3):
            cy, cx = rng.uniform(4, size - 4, 2)
            sd = rng.uniform(1.5, 3.0)
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sd ** 2))
        out[i, 0] = 2 * img / img.max() - 1
    return torch.from_numpy(out)


def overfit(folder, members: torch.Tensor, steps: int = 400, lr: float = 3e-3):
    """Adam (cosine-decayed learning rate) on the diffusion training loss of ``members`` alone at
    t drawn from the default attack timesteps (in [0.3 T, 0.6 T)); the weights are saved as the
    folder's EMA weights and reloaded."""
    model = load_model(folder)
    net, diffusion = model.model.train(), model.diffusion
    timesteps = torch.tensor(default_timesteps(diffusion.num_timesteps))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        t = timesteps[torch.randint(0, timesteps.numel(), (members.shape[0],), generator=g)]
        noise = torch.randn(members.shape, generator=g)
        loss = diffusion.training_losses(net, members, t, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    save_weights(net.state_dict(), folder / EMA_FILE)
    return load_model(folder)


@pytest.fixture(scope="module")
def overfitted(tmp_path_factory):
    """Errors of 6 member slices, 14 and 14 non-members (same distribution) under a micro model
    trained on the members only."""
    with one_torch_thread():
        folder = micro_model_folder(tmp_path_factory.mktemp("overfit"), overrides={"model.image_size": SIZE})
        members = blobs(6, seed=0)
        model = overfit(folder, members)
        errors = denoising_errors(model, torch.cat([members, blobs(14, seed=1), blobs(14, seed=2)]))
    return errors[:6], errors[6:20], errors[20:]


def test_memorised_members_are_recognised(overfitted):
    members, non_members, _ = overfitted
    assert members.mean() < 0.7 * non_members.mean()  # measured: 0.0094 vs 0.0198
    result = membership_auc(members, non_members)
    # measured 0.90 (CI 0.74-1.00); models that saw neither set score about 0.5 (next tests)
    assert result.auc > 0.8 and result.ci_low > 0.5
    assert (result.n_members, result.n_non_members, result.folds) == (6, 14, 5) and not result.grouped
    assert result.fpr[0] == result.tpr[0] == 0 and result.fpr[-1] == result.tpr[-1] == 1


def test_unseen_vs_unseen_is_chance(overfitted):
    _, non_members, others = overfitted
    result = membership_auc(others, non_members)
    assert result.ci_low < 0.5 < result.ci_high


def test_untrained_model_is_chance(tmp_path):
    with one_torch_thread():
        model = load_model(micro_model_folder(tmp_path, randomise_output=True, overrides={"model.image_size": SIZE}))
        errors = denoising_errors(model, blobs(24, seed=3), timesteps=[15, 20, 25], draws=2)
    result = membership_auc(errors[:12], errors[12:])
    assert result.ci_low < 0.5 < result.ci_high


def test_denoising_errors_deterministic_batch_and_order_independent(tmp_path):
    with one_torch_thread():
        model = load_model(micro_model_folder(tmp_path, randomise_output=True, overrides={"model.image_size": SIZE}))
        x = blobs(5, seed=4)
        assert denoising_errors(model, x).shape == (5, 8)  # the default timesteps
        a = denoising_errors(model, x, timesteps=[15, 24], draws=2, batch=32)
        b = denoising_errors(model, x, timesteps=[15, 24], draws=2, batch=1)
        again = denoising_errors(model, x, timesteps=[15, 24], draws=2, batch=32)
        reversed_ = denoising_errors(model, x.flip(0), timesteps=[15, 24], draws=2, batch=2)
        other_seed = denoising_errors(model, x, timesteps=[15, 24], draws=2, seed=1)
    assert a.shape == (5, 2) and a.dtype == np.float64
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(again, a)
    np.testing.assert_allclose(reversed_[::-1], a, rtol=0, atol=1e-6)
    assert not np.allclose(other_seed, a)


def test_denoising_errors_equal_definition_for_a_zero_network(tmp_path):
    """The untrained micro model's output layer is zero (eps_hat = 0, variance half ignored):
    each error is the mean over draws of mean(eps^2) of that slice's noise."""
    with one_torch_thread():
        model = load_model(micro_model_folder(tmp_path, overrides={"model.image_size": SIZE}))
        x = blobs(3, seed=5)
        errors = denoising_errors(model, x, timesteps=[0, 17, 49], draws=3, seed=7)
    for i in range(3):
        noise = slice_noise(x[i], 7, (3, 3, 1, SIZE, SIZE)).double()
        np.testing.assert_allclose(errors[i], (noise ** 2).mean(dim=(2, 3, 4)).mean(dim=1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_default_timesteps_in_range(T):
    ts = default_timesteps(T)
    assert len(ts) == 8 and len(set(ts)) == 8 and ts == sorted(ts)
    assert all(3 * T <= 10 * t < 6 * T for t in ts)  # 0.3 T <= t < 0.6 T, in integers
    assert default_timesteps(10) == [3, 4, 5]  # fewer integers than 8 in [3, 6): all of them
    assert default_timesteps(2) == [1] and ts[0] == 3 * T // 10


def test_groups_never_straddle_folds():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(14), rng.integers(2, 6, 14))  # 14 volumes of 2-5 slices
    labels = (groups < 6).astype(int)
    splits = cv_splits(labels, groups, 5, seed=0)
    assert len(splits) == 5
    tested = np.concatenate([test for _, test in splits])
    assert sorted(tested) == list(range(groups.size))
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])
    # the same through membership_auc, with labels that repeat across the classes
    feats = rng.normal(size=(groups.size, 3))
    g_m, g_n = groups[labels == 1], groups[labels == 0] - 6  # both start at 0: per-class labels
    result = membership_auc(feats[labels == 1], feats[labels == 0], groups_members=g_m, groups_non_members=g_n,
                            n_boot=200)
    assert result.grouped and 0 <= result.ci_low <= result.ci_high <= 1


def test_separable_features_and_bootstrap_equal_a_resampling_loop():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1.0, 1.0, (20, 2)), rng.normal(0.0, 1.0, (30, 2))
    result = membership_auc(pos, neg, n_boot=300, seed=3)
    again = membership_auc(pos, neg, n_boot=300, seed=3)
    assert (again.auc, again.ci_low, again.ci_high) == (result.auc, result.ci_low, result.ci_high)
    y = np.r_[np.ones(20), np.zeros(30)]
    assert result.auc == pytest.approx(roc_auc_score(y, result.scores), abs=1e-12)
    assert 0.7 < result.auc < 0.95
    # the bootstrap: the same multinomial draws, resampled explicitly, AUC by scikit-learn
    boot_rng = np.random.default_rng(3)
    c1 = boot_rng.multinomial(20, np.full(20, 1 / 20), size=300)
    c2 = boot_rng.multinomial(30, np.full(30, 1 / 30), size=300)
    aucs = []
    for b in range(300):
        s = np.r_[np.repeat(result.scores[:20], c1[b]), np.repeat(result.scores[20:], c2[b])]
        aucs.append(roc_auc_score(np.r_[np.ones(20), np.zeros(30)], s))
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    assert (result.ci_low, result.ci_high) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    far = membership_auc(pos + 10.0, neg, n_boot=100)
    assert far.auc == 1.0 and far.ci_low == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(members=np.zeros((4, 2)), non_members=np.zeros((9, 2))), "at least 5 slices per class"),
    (dict(members=np.zeros((9, 2)), non_members=np.zeros((9, 3))), "features"),
    (dict(members=np.zeros((9, 2)), non_members=np.zeros((9, 2)), folds=1), "folds"),
    (dict(members=np.zeros((9, 2)), non_members=np.zeros((9, 2)), n_boot=0), "n_boot"),
    (dict(members=np.full((9, 2), np.nan), non_members=np.zeros((9, 2))), "NaN"),
    (dict(members=np.zeros((9, 2)), non_members=np.zeros((9, 2)), groups_members=np.arange(9)), "both or neither"),
    (dict(members=np.zeros((9, 2)), non_members=np.zeros((9, 2)), groups_members=np.arange(9) % 4,
          groups_non_members=np.arange(9)), "at least 5 volumes"),
    (dict(members=np.zeros((9, 2)), non_members=np.zeros((9, 2)), groups_members=np.arange(8),
          groups_non_members=np.arange(9)), "groups_members: 8 labels for 9 slices"),
])
def test_membership_auc_bad_input(kwargs, match):
    with pytest.raises(SDDMError, match=match):
        membership_auc(**kwargs)


def test_denoising_errors_bad_input(tmp_path):
    model = load_model(micro_model_folder(tmp_path, overrides={"model.image_size": SIZE}))
    x = blobs(2, seed=6)
    for kwargs, match in [(dict(slices=x[0]), "slices: expected"), (dict(slices=x.repeat(1, 2, 1, 1)), "channels"),
                          (dict(slices=x * 2), r"\[-1, 1\]"), (dict(slices=x, timesteps=[50]), "timesteps"),
                          (dict(slices=x, timesteps=np.array([3, -1])), "timesteps"), (dict(slices=x, timesteps=[]), "timesteps"),
                          (dict(slices=x, draws=0), "draws"), (dict(slices=x, batch=0), "batch"),
                          (dict(slices=x, seed=-1), "seed")]:
        with pytest.raises(SDDMError, match=match):
            denoising_errors(model, **kwargs)
