"""Membership inference against a diffusion model: can its denoising errors tell its training
slices from other slices of the same distribution?

A diffusion model that memorised its training slices predicts their noise better than that of
unseen slices (the loss-based attacks of Matsumoto et al. 2023, "Membership inference attacks
against diffusion models", and Duan et al. 2023, "Are diffusion models vulnerable to membership
inference attacks?"). Notation as in
``diffusion.gaussian_diffusion``: chain indices ``t = 0 .. T-1``, slices ``x_0`` in [-1, 1].

* Features: for each slice and each ``t`` of a set of timesteps (default: 8 evenly spaced
  integers in ``[0.3 T, 0.6 T)``, where the error is informative: at small t the noise is too
  small to matter, at large t the image barely does),
  ``e_t(x_0) = 1/D sum_{d=1..D} mean_pixels (eps_d - eps_hat(x_t^d, t))^2`` with
  ``x_t^d = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_d`` and ``D = draws`` noise draws
  ``eps_d ~ N(0, I)``. ``eps_hat`` is the network's noise prediction (the mean half of its
  output for a learned-variance model; converted from its x_0 prediction for an x_0-predicting
  model). The noise of each slice comes from its own CPU ``torch.Generator``, seeded with a
  64-bit BLAKE2b hash of ``seed`` and the slice's float32 pixels: a slice gets the same noise
  whatever the batch size, its position or the device, and different slices get independent
  noise. (A seed from the slice's index instead would give slice ``i`` of the members and slice
  ``i`` of the non-members the same noise; the shared noise then dominates both features and
  the cross-validated attack below scores such twins with opposite labels: an untrained model
  gave AUCs near 0.05 instead of 0.5.)
* Attack: logistic regression on the standardised features (a scikit-learn Pipeline) predicts
  membership (1 = training slice); every slice is scored by a model fitted on the other folds
  (out-of-fold scores, k-fold cross-validation stratified by membership). The score is the ROC
  AUC of the out-of-fold scores: 0.5 = no leak, 1 = every training slice recognised.
  With ``groups`` (the volume each slice came from), the folds keep every volume's slices
  together (StratifiedGroupKFold): neighbouring slices of one volume are near-twins, so a volume
  split across train and test folds would let the classifier recognise the volume rather than
  membership and inflate the AUC. Group labels are per class (a label that occurs among members
  and non-members names two different volumes).
* 95% CI: percentile bootstrap over ``n_boot`` resamples with ``default_rng(seed)``; each
  resample draws the members and the non-members (their slices, or their groups with all
  their slices) with replacement, separately, and re-evaluates the AUC of the fixed
  out-of-fold scores.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnunet_sddm.diffusion.gaussian_diffusion import mean_flat
from nnunet_sddm.diffusion.model_folder import LoadedModel
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.progress import progress_bar



@dataclass(frozen=True)
class MembershipResult:
    """Out-of-fold membership-inference ROC of a logistic regression on denoising errors.

    ``auc`` in [0, 1] (0.5 = chance) with its bootstrap 95% percentile CI ``ci_low``,
    ``ci_high``; ``fpr``, ``tpr``: the ROC curve (``sklearn.metrics.roc_curve``); ``scores``:
    ``(n_members + n_non_members,)`` out-of-fold membership probabilities, members first;
    ``folds``: cross-validation folds; ``grouped``: whether folds and bootstrap used groups."""

    auc: float
    ci_low: float
    ci_high: float
    fpr: np.ndarray
    tpr: np.ndarray
    scores: np.ndarray
    n_members: int
    n_non_members: int
    folds: int
    grouped: bool


# ----------------------------------------------------------------------------- features
def default_timesteps(num_timesteps: int, n: int = 8) -> List[int]:
    """``n`` evenly spaced integers in ``[ceil(0.3 T), ceil(0.6 T))`` (all of them if that range
    holds fewer than ``n``). ``SDDMError`` if the range is empty (T < 3)."""
    lo, hi = -(-3 * num_timesteps // 10), -(-6 * num_timesteps // 10)  # exact integer ceilings
    if hi <= lo:
        raise SDDMError(f"a chain of {num_timesteps} steps has no timestep in [0.3 T, 0.6 T)")
    if hi - lo <= n:
        return list(range(lo, hi))
    return [lo + (i * (hi - lo)) // n for i in range(n)]


def slice_noise(x0: torch.Tensor, seed: int, shape: Tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of ``shape`` (CPU, float32) for the slice ``x0`` ``(C, S, S)``,
    from a generator seeded with the BLAKE2b-64 hash of ``seed`` and ``x0``'s float32 bytes."""
    pixels = x0.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.blake2b(int(seed).to_bytes(8, "little") + pixels, digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    return torch.randn(shape, generator=g)


@torch.no_grad()
def denoising_errors(model: LoadedModel, slices: torch.Tensor, *, timesteps: Optional[Sequence[int]] = None,
                     draws: int = 4, seed: int = 0, batch: int = 32, progress: bool = False) -> np.ndarray:
    """The model's mean squared noise-prediction error per slice and timestep.

    ``slices``: ``(n, C, S, S)`` in the model's [-1, 1] intensity space (C = the model's input
    channels). ``timesteps``: chain indices in ``[0, T)`` (default ``default_timesteps(T)``).
    Each error is the mean over ``draws`` noise draws of ``mean((eps - eps_hat)^2)`` (see the
    module docstring; noise seeded per slice from ``seed`` and the slice's pixels).
    ``batch``: slices per network call; ``progress``: a progress bar over the batches.
    Runs under ``torch.no_grad`` with the network in eval mode, on the network's device.
    Returns ``(n, len(timesteps))`` float64."""
    diffusion = model.diffusion
    T = diffusion.num_timesteps
    ts = default_timesteps(T) if timesteps is None else [int(t) for t in timesteps]
    if not ts or any(not 0 <= t < T for t in ts):
        raise SDDMError(f"timesteps: need at least one, each in [0, {T}), got {ts}")
    if not isinstance(slices, torch.Tensor) or slices.ndim != 4:
        raise SDDMError(f"slices: expected a tensor (n, C, S, S), got "
                        f"{tuple(slices.shape) if hasattr(slices, 'shape') else type(slices).__name__}")
    n, C = int(slices.shape[0]), int(slices.shape[1])
    if C != model.in_channels:
        raise SDDMError(f"slices: have {C} channels, the model takes {model.in_channels}")
    if n and not torch.isfinite(slices).all():
        raise SDDMError("slices: contain NaN or infinite values")
    if n and (slices.min() < -1.0 - 1e-5 or slices.max() > 1.0 + 1e-5):
        raise SDDMError(f"slices: values must lie in the model's [-1, 1] range, got "
                        f"[{float(slices.min()):.4g}, {float(slices.max()):.4g}]")
    if int(draws) < 1:
        raise SDDMError(f"draws: must be >= 1, got {draws}")
    if int(batch) < 1:
        raise SDDMError(f"batch: must be >= 1, got {batch}")
    if int(seed) < 0:
        raise SDDMError(f"seed: must be >= 0, got {seed}")
    draws, batch, seed = int(draws), int(batch), int(seed)

    net = model.model.eval()
    device = next(net.parameters()).device
    errors = np.zeros((n, len(ts)), dtype=np.float64)
    starts = range(0, n, batch)
    for start in progress_bar(starts, desc="denoising errors", disable=not progress, leave=False):
        x0 = slices[start:start + batch].to(device=device, dtype=torch.float32)
        b = x0.shape[0]
        noise = torch.stack([slice_noise(x, seed, (len(ts), draws) + tuple(x0.shape[1:]))
                             for x in x0], dim=0)  # (b, len(ts), draws, C, S, S)
        for j, t in enumerate(ts):
            tt = torch.full((b,), t, dtype=torch.long, device=device)
            for d in range(draws):
                eps = noise[:, j, d].to(device)
                x_t = diffusion.q_sample(x0, tt, noise=eps)
                out = net(x_t, diffusion.model_timesteps(tt))
                if diffusion.learns_variance:
                    if out.shape[1] != 2 * C:
                        raise SDDMError(f"a learned-variance model must output {2 * C} channels, got {out.shape[1]}")
                    out = out[:, :C]
                out = out.float()
                eps_hat = out if diffusion.model_mean_type == "epsilon" else \
                    diffusion.predict_eps_from_xstart(x_t, tt, out)
                errors[start:start + b, j] += mean_flat((eps - eps_hat) ** 2).double().cpu().numpy()
    return errors / draws


# ----------------------------------------------------------------------------- attack
def _features(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[1] < 1:
        raise SDDMError(f"{name}: expected a matrix (slices, features), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise SDDMError(f"{name}: contains NaN or infinite values")
    return a


def _groups(g, n: int, name: str) -> np.ndarray:
    a = np.asarray(g).reshape(-1)
    if a.shape[0] != n:
        raise SDDMError(f"{name}: {a.shape[0]} labels for {n} slices")
    _, inverse = np.unique(a.astype(str), return_inverse=True)
    return inverse.astype(np.int64)


def cv_splits(labels: np.ndarray, groups: Optional[np.ndarray], folds: int,
              seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` index arrays of the stratified cross-validation ``membership_auc`` uses.

    ``labels``: ``(N,)`` 0/1; ``groups``: ``(N,)`` int labels (one per volume, unique across
    classes) or None. StratifiedGroupKFold with groups, else StratifiedKFold; both shuffled with
    ``random_state=seed``."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    if groups is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(labels.shape[0]), labels))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(labels.shape[0]), labels, groups))


def _pair_matrix(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``W_ij = 1[s_i > s_j] + 0.5 1[s_i == s_j]``: the AUC is the mean of W over all pairs."""
    return (pos[:, None] > neg[None, :]).astype(np.float64) + 0.5 * (pos[:, None] == neg[None, :])


def membership_auc(members: np.ndarray, non_members: np.ndarray, *, groups_members: Optional[Sequence] = None,
                   groups_non_members: Optional[Sequence] = None, folds: int = 5, n_boot: int = 1000,
                   seed: int = 0) -> MembershipResult:
    """Cross-validated membership-inference AUC of a logistic regression on per-slice features.

    ``members`` ``(n1, f)``: features of training slices (e.g. ``denoising_errors``);
    ``non_members`` ``(n2, f)``: of other slices of the same distribution. ``groups_*``: the
    volume of each slice (give both or neither). ``folds`` >= 2, each class needs at least
    ``folds`` slices (groups with ``groups_*``); ``n_boot`` >= 1 bootstrap resamples. Seeded
    (folds, bootstrap) by ``seed``; deterministic."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score, roc_curve
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pos, neg = _features(members, "members"), _features(non_members, "non_members")
    if pos.shape[1] != neg.shape[1]:
        raise SDDMError(f"members have {pos.shape[1]} features per slice, non_members {neg.shape[1]}")
    folds, n_boot, seed = int(folds), int(n_boot), int(seed)
    if folds < 2:
        raise SDDMError(f"folds: must be >= 2, got {folds}")
    if n_boot < 1:
        raise SDDMError(f"n_boot: must be >= 1, got {n_boot}")
    if (groups_members is None) != (groups_non_members is None):
        raise SDDMError("groups_members and groups_non_members: give both or neither")
    n1, n2 = pos.shape[0], neg.shape[0]
    grouped = groups_members is not None
    if grouped:
        g1 = _groups(groups_members, n1, "groups_members")
        g2 = _groups(groups_non_members, n2, "groups_non_members")
        k1, k2 = int(g1.max(initial=-1)) + 1, int(g2.max(initial=-1)) + 1
        if min(k1, k2) < folds:
            raise SDDMError(f"{folds}-fold cross-validation needs at least {folds} volumes (groups) per class, "
                            f"got {k1} among members and {k2} among non_members: lower folds or add volumes")
        groups = np.concatenate([g1, g2 + k1])
    else:
        groups = None
        if min(n1, n2) < folds:
            raise SDDMError(f"{folds}-fold cross-validation needs at least {folds} slices per class, "
                            f"got {n1} members and {n2} non_members: lower folds or add slices")

    x = np.vstack([pos, neg])
    y = np.concatenate([np.ones(n1, dtype=np.int64), np.zeros(n2, dtype=np.int64)])
    scores = np.empty(n1 + n2, dtype=np.float64)
    for train, test in cv_splits(y, groups, folds, seed):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        clf.fit(x[train], y[train])
        scores[test] = clf.predict_proba(x[test])[:, 1]
    auc = float(roc_auc_score(y, scores))
    fpr, tpr, _ = roc_curve(y, scores)

    # bootstrap: per resample, multiplicities of members (c1) and non-members (c2);
    # AUC_b = c1^T W c2 / (sum c1 sum c2)
    rng = np.random.default_rng(seed)
    if grouped:
        c1 = rng.multinomial(k1, np.full(k1, 1.0 / k1), size=n_boot)[:, g1]
        c2 = rng.multinomial(k2, np.full(k2, 1.0 / k2), size=n_boot)[:, g2]
    else:
        c1 = rng.multinomial(n1, np.full(n1, 1.0 / n1), size=n_boot)
        c2 = rng.multinomial(n2, np.full(n2, 1.0 / n2), size=n_boot)
    c1, c2 = c1.astype(np.float64), c2.astype(np.float64)
    w = _pair_matrix(scores[:n1], scores[n1:])
    boot = ((c1 @ w) * c2).sum(axis=1) / (c1.sum(axis=1) * c2.sum(axis=1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return MembershipResult(auc=auc, ci_low=float(lo), ci_high=float(hi), fpr=fpr, tpr=tpr, scores=scores,
                            n_members=n1, n_non_members=n2, folds=folds, grouped=grouped)
