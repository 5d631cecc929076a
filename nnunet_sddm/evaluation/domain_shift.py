"""Domain shift between image sets: the 22 DSMRI features per volume (``image_features``), a
t-SNE picture coloured by domain, and a domain-separability score.

* Features: ``image_features.volume_features`` of every volume (every slice by default).
* t-SNE (scikit-learn): features z-scored per column (constant columns -> 0), 2 components,
  perplexity ``min(30, n - 1)``, PCA initialisation, fixed seed.
* Separability: a random forest (200 trees, fixed seed, classes weighted inversely to their
  size) is trained to tell the domains apart from the z-scored features; the score is its
  stratified k-fold cross-validated accuracy (k = min(5, size of the smallest domain)). With
  unequal domain sizes plain accuracy is inflated by the majority class, so the balanced
  accuracy (mean recall over domains; chance = 1 / number of domains) is reported too and is the
  headline ``separability``. With ``subject_regex`` the folds keep all volumes of a subject
  together (StratifiedGroupKFold, k = min(5, subjects of the smallest domain)): the ED and ES
  frames of one patient are near-twins and would otherwise inflate the score. Lower after
  adaptation means the domains are better aligned.

Inputs: ``{domain: source}`` where a source is a folder (every image file directly in it,
e.g. an nnU-Net ``imagesTs`` folder or an adapted-images folder) or a glob pattern (e.g.
``/data/ACDC/training/*/*_frame[0-9][0-9].nii.gz``).
Outputs in ``out_dir`` (staged, then renamed): ``features.csv`` (domain, case, file, 22
features), ``tsne.csv``, ``tsne.png``, ``separability.json`` and ``domain_shift.json``
(configuration), ``summary.md`` (per-domain feature means and the scores).
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import numpy as np

from nnunet_sddm import __version__
from nnunet_sddm.data.raw_dataset import scan_folder, split_ending
from nnunet_sddm.evaluation.figures import scatter_2d
from nnunet_sddm.evaluation.image_features import FEATURE_NAMES, select_slices, volume_features
from nnunet_sddm.evaluation.evaluate import default_num_processes, map_jobs
from nnunet_sddm.evaluation.io import read_image
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import staging_dir

PathLike = Union[str, os.PathLike]


def collect_images(source: PathLike) -> List[Path]:
    """Image files of a folder (non-recursive, hidden files skipped) or of a glob pattern."""
    s = str(source)
    if any(ch in s for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(s))]
        files = [p for p in files if p.is_file() and split_ending(p.name)[1]]
        if not files:
            raise SDDMError(f"{s}: the pattern matches no image file")
        return files
    p = Path(s)
    if not p.is_dir():
        raise SDDMError(f"{p}: not a folder (nor a glob pattern)")
    files = [f for _, _, f in scan_folder(p)]
    if not files:
        raise SDDMError(f"{p}: no image files")
    return files


def _features_of(args) -> Dict[str, float]:
    path, slices, normalization = args
    img = read_image(path, dtype=np.float64)
    if not np.isfinite(img.data).all():
        raise SDDMError(f"{path}: image contains NaN or infinite values")
    return volume_features(img.data, slices, normalization)


def _zscore(X: np.ndarray) -> np.ndarray:
    mu, sd = X.mean(0), X.std(0)
    return np.where(sd > 0, (X - mu) / np.where(sd > 0, sd, 1.0), 0.0)


def tsne_embedding(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """2D t-SNE of the z-scored rows of ``X`` (n, d), perplexity ``min(30, n - 1)``."""
    from sklearn.manifold import TSNE

    n = X.shape[0]
    if n < 3:
        raise SDDMError(f"t-SNE needs at least 3 volumes, got {n}")
    from threadpoolctl import threadpool_limits

    Z = _zscore(np.asarray(X, dtype=np.float64))
    # one thread: sklearn's OpenMP gradient is slower than serial on busy machines at these sizes
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=float(min(30, n - 1)), init="pca", learning_rate="auto",
                    random_state=seed).fit_transform(Z)


def separability(X: np.ndarray, domains: List[str], seed: int = 0, n_trees: int = 200,
                 groups: Optional[List[str]] = None) -> dict:
    """Cross-validated random-forest accuracy of telling the domains apart (module docstring).

    groups: optional subject id per volume; then folds never split a subject (ED and ES frames
    of one patient are near-twins and would otherwise inflate the score)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_validate

    y = np.asarray(domains)
    names, counts = np.unique(y, return_counts=True)
    out = {"domains": {str(n): int(c) for n, c in zip(names, counts)},
           "chance_accuracy": float(counts.max() / counts.sum()), "chance_balanced_accuracy": 1.0 / len(names),
           "grouped_by_subject": groups is not None}
    if len(names) < 2:
        raise SDDMError("separability needs at least two domains")
    if groups is not None:
        g = np.asarray(groups)
        per_domain = [len(set(g[y == n])) for n in names]
        out["subjects"] = {str(n): int(c) for n, c in zip(names, per_domain)}
        k = int(min(5, min(per_domain)))
        cv = StratifiedGroupKFold(n_splits=max(k, 2), shuffle=True, random_state=seed)
    else:
        g = None
        k = int(min(5, counts.min()))
        cv = StratifiedKFold(n_splits=max(k, 2), shuffle=True, random_state=seed)
    if k < 2:
        out.update(note="a domain has fewer than 2 volumes (subjects): no cross-validation possible",
                   accuracy=math.nan, balanced_accuracy=math.nan, separability=math.nan)
        return out
    clf = RandomForestClassifier(n_estimators=n_trees, random_state=seed, n_jobs=1, class_weight="balanced")
    sc = cross_validate(clf, _zscore(np.asarray(X, float)), y, groups=g, cv=cv,
                        scoring=("accuracy", "balanced_accuracy"))
    out.update(folds=k, n_trees=n_trees, class_weight="balanced",
               accuracy=float(sc["test_accuracy"].mean()), accuracy_std=float(sc["test_accuracy"].std()),
               balanced_accuracy=float(sc["test_balanced_accuracy"].mean()),
               balanced_accuracy_std=float(sc["test_balanced_accuracy"].std()))
    out["separability"] = out["balanced_accuracy"]
    return out


def subject_ids(cases: List[str], pattern: str) -> List[str]:
    """Subject of each case name: the first group (else the whole match) of ``pattern``
    (``re.search``); ``SDDMError`` naming the case when it does not match."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise SDDMError(f"--subject-regex {pattern!r}: {e}") from None
    out = []
    for c in cases:
        m = rx.search(c)
        if not m:
            raise SDDMError(f"{c}: --subject-regex {pattern!r} does not match this case name")
        out.append(m.group(1) if rx.groups else m.group(0))
    return out


def domain_shift(inputs: Mapping[str, PathLike], out_dir: Optional[PathLike] = None, slices: str = "all",
                 normalization: str = "percentile", num_processes: Optional[int] = None, seed: int = 0,
                 subject_regex: Optional[str] = None, n_trees: int = 200, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Features, t-SNE and separability of the image sets ``inputs = {domain: folder | glob}``.

    Returns ``{"features": [row dicts], "tsne": (n, 2) array, "separability": dict}``; writes
    the files of the module docstring to ``out_dir`` when given (refused if it exists unless
    ``overwrite``). subject_regex: extracts a subject id from each case name (file name without
    ending) for subject-grouped cross-validation. t-SNE PNGs of real data are derived images: keep them out of repositories.
    """
    if len(inputs) < 2:
        raise SDDMError("give at least two domains (-i NAME=DIR NAME=DIR ...)")
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise SDDMError(f"{out_dir}: output folder exists (use --overwrite to replace it)")
    try:
        select_slices(10, slices)
    except ValueError as e:
        raise SDDMError(f"--slices: {e}") from None
    if normalization not in ("percentile", "none"):
        raise SDDMError(f"--normalization must be 'percentile' or 'none', got {normalization!r}")
    items = [(d, f) for d, src in inputs.items() for f in collect_images(src)]
    groups = subject_ids([split_ending(f.name)[0] for _, f in items], subject_regex) if subject_regex else None
    jobs = [(f, slices, normalization) for _, f in items]
    n_proc = min(default_num_processes() if num_processes is None else max(1, int(num_processes)), len(jobs))
    feats = map_jobs(_features_of, jobs, n_proc, desc="features", unit="volume", progress=progress)
    rows = [{"domain": d, "case": split_ending(f.name)[0], "file": str(f), **ft} for (d, f), ft in zip(items, feats)]
    X = np.array([[r[k] for k in FEATURE_NAMES] for r in rows], dtype=np.float64)
    domains = [r["domain"] for r in rows]
    emb = tsne_embedding(X, seed)
    sep = separability(X, domains, seed, n_trees=n_trees, groups=None if groups is None else
                       [f"{d}:{g}" for d, g in zip(domains, groups)])
    result = {"features": rows, "tsne": emb, "separability": sep}
    if out_dir is not None:
        out_dir = Path(out_dir)
        with staging_dir(out_dir, overwrite=overwrite) as tmp:
            with open(tmp / "features.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["domain", "case", "file"] + list(FEATURE_NAMES))
                for r in rows:
                    w.writerow([r["domain"], r["case"], r["file"]] + [repr(r[k]) for k in FEATURE_NAMES])
            with open(tmp / "tsne.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["domain", "case", "tsne1", "tsne2"])
                for r, p in zip(rows, emb):
                    w.writerow([r["domain"], r["case"], repr(float(p[0])), repr(float(p[1]))])
            title = (f"t-SNE of 22 DSMRI features; RF balanced acc. {sep['separability']:.2f}"
                     if math.isfinite(sep.get("separability", math.nan)) else "t-SNE of 22 DSMRI features")
            scatter_2d(emb, domains, tmp / "tsne.png", title=title)
            (tmp / "separability.json").write_text(json.dumps(_nan_to_none(sep), indent=2) + "\n")
            cfg = {"package_version": __version__, "inputs": {k: str(v) for k, v in inputs.items()},
                   "slices": slices, "normalization": normalization, "seed": seed,
                   "subject_regex": subject_regex,
                   "tsne": {"n_components": 2, "perplexity": min(30, len(rows) - 1), "init": "pca"},
                   "features": list(FEATURE_NAMES), "n_volumes": len(rows)}
            (tmp / "domain_shift.json").write_text(json.dumps(cfg, indent=2) + "\n")
            (tmp / "summary.md").write_text(_summary_md(rows, sep))
        result["out_dir"] = out_dir
    return result


def _nan_to_none(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _summary_md(rows: List[dict], sep: dict) -> str:
    doms = list(dict.fromkeys(r["domain"] for r in rows))
    lines = ["# Domain shift", "",
             f"Volumes per domain: {sep['domains']}. Random-forest domain classification "
             f"({sep.get('folds', 'n/a')}-fold CV): balanced accuracy {sep.get('balanced_accuracy', math.nan):.3f} "
             f"(chance {sep['chance_balanced_accuracy']:.3f}), accuracy {sep.get('accuracy', math.nan):.3f} "
             f"(majority {sep['chance_accuracy']:.3f}). Lower = better aligned.", "",
             "| feature | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
    for k in FEATURE_NAMES:
        cells = [f"{np.mean([r[k] for r in rows if r['domain'] == d]):.4g}" for d in doms]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
