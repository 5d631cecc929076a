r"""The quality report of a synthetic or adapted image set (``nnUNetv2_sddm_quality``): fidelity,
privacy and utility (docs/explanation/quality.md).

Sets (``quality_slices``: nnU-Net raw datasets or image folders, every slice at the report scale):
``Y`` synthetic (``-s``), ``R`` real (``-r``: the images ``Y`` was made from, and the reference of
fidelity), optionally ``T`` the diffusion model's training set (``--train``) and ``H`` held-out
real images of ``T``'s domain (``--heldout``); ``phi`` the 22 image features, z-scored with the
mean and sd of ``T`` (of ``R`` without ``T``) for the distances, of ``T`` for the neighbours.

Fidelity
* paired (slice ``y`` of ``Y`` and the slice ``r`` of ``R`` it was made from): SSIM, MS-SSIM
  (4 scales), PSNR (``fidelity.paired_metrics``); on the heart region ``M`` (the label map of
  ``r``): SSIM = mean of the SSIM map over ``M``, PSNR over the pixels of ``M``; LPIPS when its
  network weights are at hand;
* distribution: Frechet distance ``FD`` and kernel distance ``KID`` between feature sets, in the
  network-free space ``phi`` and (with weights) the Inception-v3 pool space, for the pairs
  ``(Y, R)``, ``(Y, T)``, and the real references ``(R, T)`` and ``(H, T)`` (what two real
  samples give).

Privacy (``Y`` against ``T``; and ``H`` against ``T``, the false-positive rate of the flags)
* nearest-neighbour distances ``d1 <= d2`` of each slice to ``T``: RMS pixel distance at the report
  scale and Euclidean distance in the ``phi`` space z-scored with ``T``; ``NNDR = d1 / d2``;
* flags: likely copy (pixel ``d1`` below the threshold of near-duplicates, ``privacy.copy_threshold``),
  memorised (``NNDR < 0.6``); constant (blank) slices of either set are left out;
* membership inference (with ``-m`` and ``--heldout``): the model's denoising error at several
  ``t`` in ``[0.3 T, 0.6 T)`` for ``T``'s slices (members) and ``H``'s (non-members), a
  cross-validated logistic regression grouped by subject, ROC-AUC with a bootstrap 95% CI.

Utility: the study's rows (a segmenter trained on ``Y``, or applied to it), given as text by the
study; the command alone cannot train segmenters and says so.

Outputs in ``out_dir`` (staged, then renamed): ``quality.md``, ``quality.json`` (inputs, settings,
seeds, the summary figures), ``paired.csv``, ``distances.csv``, ``privacy.csv``,
``membership.csv``, ``nearest_neighbours.png``, ``roc.png``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nnunet_sddm import __version__
from nnunet_sddm.diffusion.model_folder import LoadedModel, load_model, resolve_model_dir
from nnunet_sddm.diffusion.slice_dataset import crop_batch, volume_model_slices
from nnunet_sddm.evaluation import fidelity, membership, privacy
from nnunet_sddm.evaluation.figures import image_pairs, roc_curve_figure
from nnunet_sddm.evaluation.image_features import FEATURE_NAMES
from nnunet_sddm.evaluation.tables import records_to_csv
from nnunet_sddm.evaluation.quality_slices import (HEART_MARGIN, REPORT_SIZE, ImageSet, ReportSlices, load_report_slices,
                                                   pair_slices, slice_feature_matrix)
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import staging_dir

PathLike = Union[str, os.PathLike]

#: NNDR below which a slice counts as memorised.
NNDR_LIMIT = 0.6
#: Synthetic slices shown in the nearest-neighbour figure.
FIGURE_PAIRS = 6


@dataclass(frozen=True)
class QualitySettings:
    """Settings of a report (all recorded in ``quality.json``).

    seed: seeds the copy threshold, KID subsets, noise of the membership features, folds and
    bootstraps; folds: at most this many cross-validation folds (fewer when a class has fewer
    subjects); size: report scale in pixels; mia_timesteps / mia_draws: number of ``t`` values in
    ``[0.3 T, 0.6 T)`` (``membership.default_timesteps``) and noise draws per ``t``; n_boot: bootstrap
    resamples of the membership AUC; kid_subsets: KID subsets; inception_weights: the FID
    Inception weights file (optional); device: where networks run."""

    seed: int = 0
    size: int = REPORT_SIZE
    mia_timesteps: int = 4
    mia_draws: int = 2
    folds: int = 5
    n_boot: int = 1000
    kid_subsets: int = 100
    copy_noise_sd: float = 0.02
    inception_weights: Optional[str] = None
    device: str = "cpu"


@dataclass
class ReportCache:
    """Slices and features of image sets already read (keyed by folder), shared by the reports of
    one study so that the training and held-out sets are read once; the membership result per
    model folder likewise."""

    slices: Dict[str, Tuple[ReportSlices, np.ndarray]] = field(default_factory=dict)
    membership: Dict[str, Tuple["membership.MembershipResult", List[dict], dict]] = field(default_factory=dict)


def _key(images: ImageSet, settings: QualitySettings) -> str:
    return f"{settings.size}|" + "|".join(str(Path(c.image).resolve()) for c in images.cases)


def _read(images: ImageSet, settings: QualitySettings, cache: ReportCache, num_processes: int,
          progress: bool) -> Tuple[ReportSlices, np.ndarray]:
    key = _key(images, settings)
    if key not in cache.slices:
        s = load_report_slices(images, settings.size, progress)
        cache.slices[key] = (s, slice_feature_matrix(s, num_processes, progress))
    s, f = cache.slices[key]
    return dataclasses.replace(s, name=images.name), f


def model_space(images: ImageSet, model: LoadedModel) -> Tuple[torch.Tensor, List[Tuple[str, str, int]]]:
    """Every slice of ``images`` in ``model``'s space, ``(N, 1, S, S)`` in ``[-1, 1]`` (spacing-mode
    slices centre-cropped or padded with the background value to ``S``), and ``(case, subject, z)``
    of each slice."""
    size = model.image_size
    chunks, where = [], []
    for c in images.cases:
        x = volume_model_slices(c.image, size, model.data_config)
        hw = np.asarray(x.shape[-2:], dtype=np.int64)
        if tuple(hw) != (size, size):  # centred: the crop's offset, or minus the padding before the slice
            offset = np.where(hw >= size, (hw - size) // 2, -((size - hw) // 2))
            n = x.shape[0]
            x = crop_batch(x, np.tile(hw, (n, 1)), np.arange(n), np.tile(offset, (n, 1)), size)
        chunks.append(x)
        where += [(c.case, c.subject, z) for z in range(x.shape[0])]
    return torch.cat(chunks), where


def membership_inference(model_dir: PathLike, members: ImageSet, non_members: ImageSet,
                         settings: QualitySettings) -> Tuple["membership.MembershipResult", List[dict], dict]:
    """Membership inference against the diffusion model in ``model_dir`` (module docstring).
    Returns the result, one row per slice (members first: case, subject, z, member, out-of-fold
    score, the error at each ``t``) and the settings used (``timesteps``, ``T``)."""
    model = load_model(model_dir, device=settings.device)
    from nnunet_sddm.diffusion.conditioning import require_unconditional

    require_unconditional(model.config, model.model_dir, "membership inference")
    T = model.diffusion.num_timesteps
    ts = membership.default_timesteps(T, settings.mia_timesteps)
    xm, wm = model_space(members, model)
    xn, wn = model_space(non_members, model)
    fm, fn = (membership.denoising_errors(model, x.to(settings.device), timesteps=ts, draws=settings.mia_draws,
                                          seed=settings.seed) for x in (xm, xn))
    gm, gn = [w[1] for w in wm], [w[1] for w in wn]
    folds = min(settings.folds, len(set(gm)), len(set(gn)))
    if folds < 2:
        raise SDDMError(f"membership inference needs at least 2 subjects among the members ({members.folder}: "
                        f"{len(set(gm))}) and the non-members ({non_members.folder}: {len(set(gn))})")
    result = membership.membership_auc(fm, fn, groups_members=gm, groups_non_members=gn, folds=folds,
                                       n_boot=settings.n_boot, seed=settings.seed)
    rows = [{"case": c, "subject": g, "z": z, "member": int(k < len(wm)), "score": float(score),
             **{f"err_t{t}": float(v) for t, v in zip(ts, feats)}}
            for k, ((c, g, z), score, feats) in enumerate(zip(wm + wn, result.scores, np.concatenate([fm, fn])))]
    return result, rows, {"timesteps": ts, "T": T}


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def quality_report(synthetic: ImageSet, real: ImageSet, out_dir: PathLike, *, train: Optional[ImageSet] = None,
                   heldout: Optional[ImageSet] = None, model_dir: Optional[PathLike] = None,
                   settings: QualitySettings = QualitySettings(), utility: Optional[str] = None,
                   title: Optional[str] = None, membership_skipped: Optional[str] = None,
                   cache: Optional[ReportCache] = None, num_processes: int = 1, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Write the quality report of ``synthetic`` against ``real`` (and ``train``, ``heldout``,
    the diffusion model ``model_dir``) to ``out_dir`` (module docstring); returns the summary that
    ``quality.json`` holds. ``utility``: Markdown of the study's utility rows (None: the command
    alone says how to measure it); ``membership_skipped``: why there is no membership inference
    (without ``model_dir``; None: the command's hint). Refuses an existing ``out_dir`` unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SDDMError(f"{out_dir}: output folder exists (use --overwrite to replace it)")
    if model_dir is not None and (train is None or heldout is None):
        raise SDDMError("-m: membership inference needs both --train (members) and --heldout (non-members)")
    if heldout is not None and train is None:
        raise SDDMError("--heldout: held-out images are compared with the training set; give --train too")
    if model_dir is not None:
        model_dir = resolve_model_dir(model_dir)
    cache = cache if cache is not None else ReportCache()
    Y, fY = _read(synthetic, settings, cache, num_processes, progress)
    R, fR = _read(real, settings, cache, num_processes, progress)
    Tset = _read(train, settings, cache, num_processes, progress) if train is not None else None
    Hset = _read(heldout, settings, cache, num_processes, progress) if heldout is not None else None
    for option, S in (("-s", Y), ("-r", R), ("--train", Tset and Tset[0]), ("--heldout", Hset and Hset[0])):
        if S is not None and len(S) < 2:
            raise SDDMError(f"{option}: {len(S)} slice(s); the report needs at least 2 per set")
    same_rt = Tset is not None and _key(real, settings) == _key(train, settings)
    summary: dict = {"package_version": __version__, "title": title,
                     "inputs": {"synthetic": str(synthetic.folder), "real": str(real.folder),
                                "train": None if train is None else str(train.folder),
                                "heldout": None if heldout is None else str(heldout.folder),
                                "model": None if model_dir is None else str(model_dir)},
                     "settings": asdict(settings), "features": list(FEATURE_NAMES),
                     "membership_skipped": membership_skipped,
                     "slices": {"synthetic": len(Y), "real": len(R), "train": None if Tset is None else len(Tset[0]),
                                "heldout": None if Hset is None else len(Hset[0])}}
    lines: List[str] = []

    # ---- fidelity: paired
    pairs = pair_slices(Y, R)
    i_syn, i_real = pairs.synthetic, pairs.real
    paired_rows: List[dict] = []
    if len(pairs):
        ys, rs = Y.images[i_syn], R.images[i_real]
        pm = fidelity.paired_metrics(ys, rs, region=None if R.heart is None else R.heart[i_real])
        ssim_h, psnr_h = ((pm.ssim_region, pm.psnr_region) if R.heart is not None
                          else (np.full(len(pairs), np.nan),) * 2)
        lp = fidelity.lpips_distances(ys, rs, device=settings.device)
        lp_values = None if isinstance(lp, fidelity.Unavailable) else lp
        for k, (a, b) in enumerate(zip(i_syn, i_real)):
            paired_rows.append({"case": Y.case[a], "z": int(Y.z[a]), "real_case": R.case[b],
                                "ssim": pm.ssim[k], "ms_ssim": pm.ms_ssim[k], "psnr": pm.psnr[k],
                                "ssim_heart": ssim_h[k], "psnr_heart": psnr_h[k],
                                "lpips": math.nan if lp_values is None else float(lp_values[k])})
        summary["paired"] = {"pairs": len(pairs), "unpaired": int(len(Y) - len(pairs)),
                             "by_provenance": pairs.by_provenance, "by_name": pairs.by_name,
                             "real_labelled": R.heart is not None,
                             **{k: _stats([r[k] for r in paired_rows])
                                for k in ("ssim", "ms_ssim", "psnr", "ssim_heart", "psnr_heart", "lpips")},
                             "lpips_unavailable": None if lp_values is not None else lp.reason}
    else:
        summary["paired"] = {"pairs": 0, "unpaired": len(Y), "by_provenance": 0, "by_name": 0}

    # ---- fidelity: distributions
    dist_rows: List[dict] = []
    # (a set compared with itself says nothing: with -r = --train only the rows against the training set)
    comparisons: List[Tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    if not same_rt:
        comparisons.append(("synthetic vs real", Y.images, R.images, fY, fR))
    if Tset is not None:
        comparisons.append(("synthetic vs train", Y.images, Tset[0].images, fY, Tset[1]))
        if not same_rt:
            comparisons.append(("real vs train", R.images, Tset[0].images, fR, Tset[1]))
        if Hset is not None:
            comparisons.append(("held-out vs train", Hset[0].images, Tset[0].images, Hset[1], Tset[1]))
    inception: Dict[str, object] = {}
    incep_reason = None
    for key, imgs in (("synthetic", Y.images), ("real", None if same_rt else R.images),
                      ("train", None if Tset is None else Tset[0].images),
                      ("heldout", None if Hset is None else Hset[0].images)):
        if imgs is None or incep_reason is not None:
            continue
        feats = fidelity.inception_features(imgs, weights=settings.inception_weights, device=settings.device)
        if isinstance(feats, fidelity.Unavailable):
            incep_reason = feats.reason
            inception = {}
        else:
            inception[key] = feats
    names = {"synthetic vs real": ("synthetic", "real"), "synthetic vs train": ("synthetic", "train"),
             "real vs train": ("real", "train"), "held-out vs train": ("heldout", "train")}
    fZ = Tset[1] if Tset is not None else fR  # one scale for every row (and every report of one study)
    summary["zscore_reference"] = "train" if Tset is not None else "real"
    for label, _a, _b, fa, fb in comparisons:
        za, zb = fidelity.zscore_like(fZ, fa, fb)
        kid = fidelity.kernel_distance(za, zb, subsets=settings.kid_subsets, seed=settings.seed)
        row = {"comparison": label, "space": "image features (22)", "n_a": len(fa), "n_b": len(fb),
               "frechet": fidelity.frechet_distance(za, zb), "kid": kid.mean, "kid_sd": kid.std}
        dist_rows.append(row)
        a, b = names[label]
        if a in inception and b in inception:
            kid_i = fidelity.kernel_distance(inception[a], inception[b], subsets=settings.kid_subsets, seed=settings.seed)
            dist_rows.append({"comparison": label, "space": "Inception-v3 pool (2048)", "n_a": len(fa), "n_b": len(fb),
                              "frechet": fidelity.frechet_distance(inception[a], inception[b]),
                              "kid": kid_i.mean, "kid_sd": kid_i.std})
    summary["distances"] = dist_rows
    summary["real_is_train"] = same_rt
    summary["inception_unavailable"] = incep_reason

    # ---- privacy: nearest neighbours in the training set
    priv_rows: List[dict] = []
    nn_figure = None
    if Tset is not None:
        T_all, fT_all = Tset
        keep_t = _informative(T_all.images)
        T_s, fT = _subset(T_all, keep_t), fT_all[keep_t]
        threshold = privacy.copy_threshold(_flat(T_s.images), noise_sd=settings.copy_noise_sd, seed=settings.seed)
        summary["privacy"] = {"copy_threshold_rms": threshold, "nndr_limit": NNDR_LIMIT,
                              "train_blank": int((~keep_t).sum())}
        for role, S_all, fS_all in (("synthetic", Y, fY), ("heldout", Hset[0] if Hset else None,
                                                           Hset[1] if Hset else None)):
            if S_all is None:
                continue
            keep = _informative(S_all.images)
            S, fS = _subset(S_all, keep), fS_all[keep]
            if len(S) == 0:
                summary["privacy"][role] = {"slices": 0, "blank": int((~keep).sum())}
                continue
            nb_pix = privacy.nearest_neighbours(_flat(S.images), _flat(T_s.images), k=2, rms=True)
            zT, zS = fidelity.zscore_like(fT, fT, fS)
            nb_feat = privacy.nearest_neighbours(zS, zT, k=2)
            fl_pix = privacy.privacy_flags(nb_pix, threshold, nndr_limit=NNDR_LIMIT)
            nnd_f = privacy.nndr(nb_feat)
            memorised_f = nnd_f < NNDR_LIMIT
            summary["privacy"][role] = {
                "slices": len(S), "blank": int((~keep).sum()), "d1_rms_median": float(np.median(nb_pix.distance[:, 0])),
                "nndr_pixel_median": float(np.median(fl_pix.nndr)),
                "likely_copy": fl_pix.copy_fraction, "memorised_pixel": fl_pix.memorised_fraction,
                "d1_feature_median": float(np.median(nb_feat.distance[:, 0])),
                "nndr_feature_median": float(np.median(nnd_f)), "memorised_feature": float(memorised_f.mean())}
            trained = set(T_s.case.tolist())
            made_from = [i for i in range(len(S)) if S.source_case[i] in trained]
            if role == "synthetic" and made_from:
                own = [(S.source_case[i], int(S.z[i])) == (T_s.case[nb_pix.index[i, 0]], int(T_s.z[nb_pix.index[i, 0]]))
                       for i in made_from]
                summary["privacy"][role]["made_from_training"] = len(made_from)
                summary["privacy"][role]["nearest_is_source"] = float(np.mean(own))
            if role == "synthetic":
                nnd_p = fl_pix.nndr
                for i in range(len(S)):
                    j = int(nb_pix.index[i, 0])
                    priv_rows.append({"case": S.case[i], "z": int(S.z[i]), "nearest_case": T_s.case[j],
                                      "nearest_z": int(T_s.z[j]), "d1_rms": nb_pix.distance[i, 0],
                                      "d2_rms": nb_pix.distance[i, 1], "nndr_pixel": nnd_p[i],
                                      "likely_copy": bool(fl_pix.likely_copy[i]),
                                      "memorised_pixel": bool(fl_pix.memorised[i]),
                                      "d1_feature": nb_feat.distance[i, 0], "nndr_feature": nnd_f[i],
                                      "memorised_feature": bool(memorised_f[i])})
                order = np.argsort(nb_pix.distance[:, 0], kind="stable")[:FIGURE_PAIRS]
                nn_figure = (S.images[order], T_s.images[nb_pix.index[order, 0]],
                             [f"{S.case[i]} z{S.z[i]}\nd1 {nb_pix.distance[i, 0]:.3f}" for i in order],
                             [f"{T_s.case[nb_pix.index[i, 0]]} z{T_s.z[nb_pix.index[i, 0]]}" for i in order])

    # ---- privacy: membership inference
    mia_rows: List[dict] = []
    mia = None
    if model_dir is not None:
        mkey = f"{Path(model_dir).resolve()}|{_key(train, settings)}|{_key(heldout, settings)}"
        if mkey not in cache.membership:
            cache.membership[mkey] = membership_inference(model_dir, train, heldout, settings)
        mia, mia_rows, info = cache.membership[mkey]
        summary["membership"] = {"auc": mia.auc, "ci_low": mia.ci_low, "ci_high": mia.ci_high,
                                 "members": mia.n_members, "non_members": mia.n_non_members, "folds": mia.folds,
                                 **info}

    # ---- write
    with staging_dir(out_dir, overwrite=overwrite) as tmp:
        _csv(tmp / "paired.csv", paired_rows, ["case", "z", "real_case", "ssim", "ms_ssim", "psnr",
                                                     "ssim_heart", "psnr_heart", "lpips"])
        _csv(tmp / "distances.csv", dist_rows, ["comparison", "space", "n_a", "n_b", "frechet", "kid", "kid_sd"])
        _csv(tmp / "privacy.csv", priv_rows, ["case", "z", "nearest_case", "nearest_z", "d1_rms", "d2_rms",
                                                    "nndr_pixel", "likely_copy", "memorised_pixel", "d1_feature",
                                                    "nndr_feature", "memorised_feature"])
        _csv(tmp / "membership.csv", mia_rows, list(mia_rows[0]) if mia_rows else ["member"])
        if nn_figure is not None:
            image_pairs(nn_figure[0], nn_figure[1], nn_figure[2], nn_figure[3], tmp / "nearest_neighbours.png",
                        row_labels=("synthetic", "nearest training slice"))
        if mia is not None:
            roc_curve_figure(mia.fpr, mia.tpr, tmp / "roc.png",
                             title=f"membership inference: AUC {mia.auc:.3f} [{mia.ci_low:.3f}, {mia.ci_high:.3f}]")
        (tmp / "quality.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
        (tmp / "quality.md").write_text(report_markdown(summary, utility))
    return summary


def _informative(images: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the slices that are not constant (a blank slice equals every other blank slice:
    it would count as a copy and as memorised)."""
    flat = images.reshape(len(images), -1)
    return flat.max(axis=1) > flat.min(axis=1)


def _subset(slices: ReportSlices, keep: np.ndarray) -> ReportSlices:
    return dataclasses.replace(slices, images=slices.images[keep],
                               heart=None if slices.heart is None else slices.heart[keep], case=slices.case[keep],
                               subject=slices.subject[keep], source_case=slices.source_case[keep], z=slices.z[keep])


def _flat(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float64).reshape(len(images), -1)


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    fin = v[np.isfinite(v)]
    return {"n": int(v.size), "inf": int(np.isinf(v).sum()),
            "mean": float(fin.mean()) if fin.size else (math.inf if v.size else math.nan),
            "sd": float(fin.std(ddof=1)) if fin.size > 1 else math.nan,
            "median": float(np.median(v)) if v.size else math.nan}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        x = float(obj)
        return x if math.isfinite(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _csv(path: Path, rows: List[dict], columns: List[str]) -> None:
    path.write_bytes(records_to_csv(rows, columns).encode())


def report_markdown(summary: dict, utility: Optional[str] = None) -> str:
    """``quality.md`` from a report's summary (``quality.json``'s content)."""
    s = summary["settings"]
    n = summary["slices"]
    inp = summary["inputs"]
    out = [f"# Quality report{': ' + summary['title'] if summary.get('title') else ''}", "",
           f"- synthetic (`-s`): `{inp['synthetic']}` ({n['synthetic']} slices)",
           f"- real (`-r`): `{inp['real']}` ({n['real']} slices)"]
    if inp["train"]:
        out.append(f"- training set of the diffusion model (`--train`): `{inp['train']}` ({n['train']} slices)")
    if inp["heldout"]:
        out.append(f"- held-out real images of that domain (`--heldout`): `{inp['heldout']}` ({n['heldout']} slices)")
    if inp["model"]:
        out.append(f"- diffusion model (`-m`): `{inp['model']}`")
    out += ["", f"Scale: every volume clipped to its 0.5th-99.5th intensity percentiles and scaled to [0, 1]; every "
            f"slice padded to a centred square and resized to {s['size']} x {s['size']} px (bilinear). "
            f"Heart region: label > 0 dilated by {HEART_MARGIN} px. Seed {s['seed']}.", ""]

    out += ["## Fidelity", "", "### Paired (a synthetic slice against the real slice it was made from)", ""]
    p = summary["paired"]
    if not p["pairs"]:
        out += ["No pairs: neither `cases.json` provenance (`source_case`) nor identical case names link the "
                "synthetic set to the real one.", ""]
    else:
        how = [f"{p['by_provenance']} by `cases.json` provenance"] if p["by_provenance"] else []
        how += [f"{p['by_name']} by identical case names and slice counts"] if p["by_name"] else []
        out += [f"{p['pairs']} pairs ({'; '.join(how)}; {p['unpaired']} synthetic slices without a partner). Mean ± "
                "sd over slices (median in brackets); PSNR in dB, data range 1; identical slices have PSNR inf, "
                f"counted apart. Heart region: the {p['ssim_heart']['n']} pairs whose real slice shows a heart.", ""]
        if p["by_name"]:
            out += ["Pairs by name assume that a synthetic case was made from the real case of the same name (as "
                    "`nnUNetv2_sddm_adapt` names its outputs); for unrelated sets that happen to share names the "
                    "paired numbers are meaningless.", ""]
        out += [
                "| region | SSIM | MS-SSIM (4 scales) | PSNR | LPIPS |", "|---|---|---|---|---|"]
        out.append(f"| whole slice | {_cell(p['ssim'])} | {_cell(p['ms_ssim'])} | {_cell(p['psnr'], 2)} | "
                   f"{_cell(p['lpips']) if p['lpips']['n'] else 'skipped'} |")
        out.append(f"| heart region | {_cell(p['ssim_heart'])} | not defined for a region | "
                   f"{_cell(p['psnr_heart'], 2)} | |")
        out.append("")
        if p.get("lpips_unavailable"):
            out += [p["lpips_unavailable"], ""]
        if not p["ssim_heart"]["n"]:
            out += ["Heart region: " + ("no paired real slice shows a heart in its label map." if p.get("real_labelled")
                                        else "the real set has no label maps."), ""]
    out += ["### Distributions", "",
            "Fréchet distance (FD) and kernel distance (KID: unbiased MMD², cubic polynomial kernel, mean ± sd over "
            f"{s['kid_subsets']} subsets of min(1000, n_a, n_b) slices; sd 0 when that is both whole sets) between "
            "slice feature sets. The 22 image features are z-scored with the mean and sd of the "
            + ("training set (`--train`)" if summary.get("zscore_reference") == "train" else "real set (`-r`)")
            + ". Rows between two real sets are the reference: unseen real images of the training domain "
            "(held-out vs train) are as close to it as a synthetic set of that domain can be expected to come."
            + (" The real set is the training set here, so only the rows against the training set are shown."
               if summary.get("real_is_train") else ""), "", "| comparison | feature space | n | FD | KID |", "|---|---|---|---|---|"]
    for r in summary["distances"]:
        out.append(f"| {r['comparison']} | {r['space']} | {r['n_a']} / {r['n_b']} | {_fmt(r['frechet'])} | "
                   f"{_fmt(r['kid'], 4)} ± {_fmt(r['kid_sd'], 4)} |")
    out.append("")
    if summary.get("inception_unavailable"):
        out += [summary["inception_unavailable"], ""]
    elif any(r["space"].startswith("Inception") for r in summary["distances"]):
        out += ["FD in the 2048-dimensional Inception space is biased upwards for sets of fewer than a few "
                "thousand slices and is not comparable across set sizes; KID is unbiased.", ""]
    out += ["ImageNet networks (Inception, LPIPS) were trained on photographs: their features are a weak proxy "
            "for the appearance of MR images; the 22 image features need no network.", ""]

    out += ["## Privacy", ""]
    pr = summary.get("privacy")
    if pr is None:
        out += [summary.get("membership_skipped") if summary.get("membership_skipped") and not inp["train"]
                else "Not measured: give the diffusion model's training set (`--train`).", ""]
    else:
        out += [f"Nearest neighbours in the training set: d1 <= d2, RMS pixel distance at the report scale and "
                f"Euclidean distance of the z-scored image features; NNDR = d1 / d2. Likely copy: pixel d1 below "
                f"{pr['copy_threshold_rms']:.4f}, the largest distance of a training slice to itself with Gaussian "
                f"noise of sd {s['copy_noise_sd']} added (a near-duplicate). Memorised: NNDR < {pr['nndr_limit']}. "
                "Held-out real slices were never trained on: their flags are the false-positive rate. Constant "
                "(blank) slices are left out: a blank slice equals every other one.", "",
                "| slices | n | median d1 (pixel) | likely copies | median NNDR (pixel) | memorised (pixel) | "
                "median d1 (features) | median NNDR (features) | memorised (features) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for role, label in (("synthetic", "synthetic"), ("heldout", "held-out (real, not trained on)")):
            if role in pr and pr[role]["slices"]:
                r = pr[role]
                out.append(f"| {label} | {r['slices']} | {r['d1_rms_median']:.4f} | {100 * r['likely_copy']:.1f}% | "
                           f"{r['nndr_pixel_median']:.3f} | {100 * r['memorised_pixel']:.1f}% | "
                           f"{r['d1_feature_median']:.3f} | {r['nndr_feature_median']:.3f} | "
                           f"{100 * r['memorised_feature']:.1f}% |")
        if "nearest_is_source" in pr.get("synthetic", {}):
            out += ["", f"{pr['synthetic']['made_from_training']} synthetic slices were made from training slices "
                    f"(`cases.json` provenance): for {100 * pr['synthetic']['nearest_is_source']:.1f}% of them the "
                    "nearest training slice is the one "
                    "it was made from. Closeness to that slice is by design (a restyled copy keeps its anatomy); the "
                    "copy flag asks whether the restyling changed it by more than faint noise would."]
        out += ["", "`nearest_neighbours.png`: the synthetic slices closest to a training slice (top) above that "
                "training slice (bottom).", ""]
    m = summary.get("membership")
    out += ["### Membership inference against the diffusion model", ""]
    if m is None:
        out += [summary.get("membership_skipped") or "Not measured: give the model (`-m`), its training set "
                "(`--train`) and held-out images (`--heldout`).", ""]
    else:
        out += [f"Features: the model's noise-prediction error at t = {', '.join(str(t) for t in m['timesteps'])} "
                f"(of T = {m['T']}), {s['mia_draws']} noise draws each; classifier: logistic regression, "
                f"{m['folds']}-fold cross-validation grouped by subject; members: {m['members']} training slices, "
                f"non-members: {m['non_members']} held-out slices.", "",
                f"**ROC-AUC {m['auc']:.3f} (bootstrap 95% CI {m['ci_low']:.3f} to {m['ci_high']:.3f})**; 0.5 means "
                "the model's errors do not tell its training slices from unseen ones (no measurable leakage), 1.0 "
                "a model that memorised them. `roc.png`: the ROC curve.", ""]
    out += ["## Utility", ""]
    out += [utility.rstrip() if utility else
            "Not measured by this command: utility is a segmenter trained on (or applied to) the synthetic data "
            "and tested on real images; `nnUNetv2_sddm_study` measures it and writes it here.", ""]
    return "\n".join(out) + "\n"


def _cell(st: dict, digits: int = 3) -> str:
    if not st["n"]:
        return "n/a"
    if st["inf"] == st["n"]:
        return f"inf (all {st['n']})"
    text = f"{_fmt(st['mean'], digits)} ± {_fmt(st['sd'], digits)} ({_fmt(st['median'], digits)})"
    return text + (f", {st['inf']} inf" if st["inf"] else "")
