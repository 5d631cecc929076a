"""Console scripts: ``nnUNetv2_sddm_evaluate``, ``nnUNetv2_sddm_compare``,
``nnUNetv2_sddm_domain_shift``, ``nnUNetv2_sddm_quality``, ``nnUNetv2_sddm_mask_adherence`` (argument parsing
only; the work is in ``nnunet_sddm.evaluation``)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import List, Optional

from nnunet_sddm.utilities.errors import SDDMError, cli_entry


def _name_dir(item: str, last: bool = False) -> tuple:
    name, sep, path = item.rpartition("=") if last else item.partition("=")
    if not sep or not name or not path:
        raise SDDMError(f"expected NAME=DIR, got {item!r}")
    return name, path


def _entries(items: List[str]) -> List[tuple]:
    """``NAME=DIR`` items -> ``[(name, dir)]``, a name given several times -> ``(name, [dirs])`` (repeats)."""
    grouped: dict = {}
    for it in items:
        name, path = _name_dir(it, last=True)
        grouped.setdefault(name, []).append(path)
    return [(n, ps[0] if len(ps) == 1 else ps) for n, ps in grouped.items()]


@cli_entry
def evaluate_main(argv: Optional[List[str]] = None) -> int:
    from nnunet_sddm.evaluation.evaluate import evaluate_folders

    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_evaluate",
        description="DSC, IoU, ASD, ASSD, HD, HD95 (MedPy-identical, mm) per case and structure.")
    p.add_argument("-ref", required=True, help="folder of reference segmentations (CASE.nii.gz)")
    p.add_argument("-pred", required=True, help="folder of predicted segmentations (same file names)")
    p.add_argument("-o", dest="out", default=None,
                   help="output folder (default: PRED/sddm_evaluation); refused if it exists unless --overwrite")
    p.add_argument("-djfile", default=None,
                   help="dataset.json giving the labels and file ending (default: PRED/dataset.json if present)")
    p.add_argument("--labels", nargs="+", default=None, metavar="NAME=VALUE",
                   help="structures to evaluate, e.g. LV=1 MYO=2 RV=3 (overrides dataset.json)")
    p.add_argument("--prediction-labels", nargs="+", default=None, metavar="NAME=VALUE",
                   help="labels the model predicts when they differ from the reference's (e.g. LV=1 MYO=2 RV=3 "
                        "for a source-trained model on a target with LV=1 MYO=2): the structures both name with "
                        "the same value are evaluated, the others skipped (listed in summary.json); conflicting "
                        "maps are refused")
    p.add_argument("-pred-djfile", dest="pred_djfile", default=None,
                   help="dataset.json of the model's training data, giving the prediction labels "
                        "(instead of --prediction-labels)")
    p.add_argument("-np", dest="num_processes", type=int, default=None, help="worker processes (default: CPUs, max 8)")
    p.add_argument("--empty-policy", default="nan",
                   help="distances when exactly one mask is empty: nan (default), diagonal (image diagonal in mm) "
                        "or a number of mm")
    p.add_argument("--both-empty", default="nan", choices=("nan", "perfect"),
                   help="all metrics when both masks are empty: nan (default, not counted) or perfect (1/0)")
    p.add_argument("--per-slice", action="store_true",
                   help="evaluate every 2D slice and average per case (also writes per_slice.csv)")
    p.add_argument("--allow-missing", action="store_true",
                   help="evaluate the common cases when some are missing on either side (listed in summary.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    out = a.out or str(Path(a.pred) / "sddm_evaluation")
    res = evaluate_folders(a.ref, a.pred, labels=a.labels, dataset_json=a.djfile, num_processes=a.num_processes,
                           empty_policy=a.empty_policy, both_empty=a.both_empty, per_slice=a.per_slice,
                           allow_missing=a.allow_missing, out_dir=out, overwrite=a.overwrite,
                           progress=not a.quiet, prediction_labels=a.prediction_labels,
                           prediction_dataset_json=a.pred_djfile)
    allm = res.summary["structures"]["all"]["metrics"]
    print(f"{res.summary['n_cases']} cases -> {out}")
    if res.skipped_structures:
        print("not evaluated (named by one label map only): "
              + ", ".join(f"{n}={d['value']} ({d['only_in']})" for n, d in res.skipped_structures.items()))
    print("  ".join(f"{m} {allm[m]['mean']:.4g}" for m in allm if allm[m]["n"]))
    return 0


@cli_entry
def compare_main(argv: Optional[List[str]] = None) -> int:
    from nnunet_sddm.evaluation.compare import compare_results

    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_compare",
        description="Paired tests (Wilcoxon, paired t) with Holm's correction, bootstrap CIs of the paired "
                    "differences and Welch's t-tests against the baseline; Table-1-style tables (Markdown, CSV, LaTeX), "
                    "missing/spurious structure counts and bar charts with 95% CIs. NAME is APPROACH/MODEL (e.g. "
                    "DA/2d_nnunet), 'approach=DA,model=2d_nnunet', or just APPROACH; DIR is an nnUNetv2_sddm_evaluate "
                    "output folder (or its per_case.csv). The same NAME given several times: repeats of that entry "
                    "(e.g. training seeds, evaluated on the same cases).")
    p.add_argument("--baseline", nargs="+", required=True, metavar="NAME=DIR",
                   help="baseline results; one per model when several models are compared")
    p.add_argument("--candidates", nargs="+", required=True, metavar="NAME=DIR", help="approaches to compare")
    p.add_argument("-o", dest="out", required=True, help="output folder (refused if it exists unless --overwrite)")
    p.add_argument("--alpha", type=float, default=0.01,
                   help="significance level: p < alpha differs from the baseline; p > alpha is 'not significantly "
                        "worse than the best' (default 0.01, as in the paper)")
    p.add_argument("--test", default="wilcoxon", choices=("wilcoxon", "ttest_rel", "welch"),
                   help="test behind the table marks (star: vs the baseline, Holm-adjusted; dagger: vs the best row): "
                        "wilcoxon (default, paired signed-rank), ttest_rel (paired t) or welch (the paper's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap CIs of the paired differences")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a = p.parse_args(argv)
    res = compare_results(_entries(a.baseline), _entries(a.candidates), out_dir=a.out, alpha=a.alpha,
                          overwrite=a.overwrite, test=a.test, seed=a.seed, n_boot=a.n_boot)
    print(res["markdown"])
    print(f"written to {a.out}")
    return 0


@cli_entry
def domain_shift_main(argv: Optional[List[str]] = None) -> int:
    from nnunet_sddm.evaluation.domain_shift import domain_shift

    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_domain_shift",
        description="22 DSMRI image features per volume, t-SNE coloured by domain and a random-forest "
                    "domain-separability score.")
    p.add_argument("-i", dest="inputs", nargs="+", required=True, metavar="NAME=DIR",
                   help="domains: NAME=FOLDER (every image file in it) or NAME='GLOB' (quoted pattern)")
    p.add_argument("-o", dest="out", required=True, help="output folder (refused if it exists unless --overwrite)")
    p.add_argument("--slices", default="all",
                   help="slices per volume: all (default) or central:PERCENT[:STEP] (DSMRI-like)")
    p.add_argument("--normalization", default="percentile", choices=("percentile", "none"),
                   help="per-volume intensity scaling before the features: percentile (0.5-99.5 -> [0, 1], default) "
                        "or none (raw, as DSMRI)")
    p.add_argument("-np", dest="num_processes", type=int, default=None, help="worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of t-SNE and the random forest")
    p.add_argument("--trees", type=int, default=200, help="trees of the random forest (default 200)")
    p.add_argument("--subject-regex", default=None,
                   help="regex giving the subject of a case name (first group or whole match), e.g. "
                        "'^(patient\\d+|[A-Z0-9]{6})_': cross-validation folds then keep a subject's volumes together")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    inputs = {}
    for item in a.inputs:
        name, path = _name_dir(item)
        if name in inputs:
            raise SDDMError(f"-i: domain {name!r} given twice")
        inputs[name] = path
    res = domain_shift(inputs, a.out, slices=a.slices, normalization=a.normalization,
                       num_processes=a.num_processes, seed=a.seed, subject_regex=a.subject_regex,
                       n_trees=a.trees, overwrite=a.overwrite, progress=not a.quiet)
    sep = res["separability"]
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in sep.items()}, indent=2))
    print(f"written to {a.out}")
    return 0


@cli_entry
def quality_main(argv: Optional[List[str]] = None) -> int:
    from nnunet_sddm.evaluation.quality import QualitySettings, quality_report
    from nnunet_sddm.evaluation.quality_slices import image_set

    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_quality",
        description="Quality report of a synthetic or adapted image set: fidelity (paired SSIM/MS-SSIM/PSNR, "
                    "Frechet and kernel distances), privacy (nearest-neighbour copies and memorisation, membership "
                    "inference against the diffusion model) and utility (measured by nnUNetv2_sddm_study). Each set "
                    "is an nnU-Net raw dataset (its imagesTr/labelsTr) or a folder of CASE_0000 images (labels "
                    "from the sibling labels* folder). Writes OUT/quality.md, CSVs and figures.")
    p.add_argument("-s", dest="synthetic", required=True, help="the synthetic or adapted images")
    p.add_argument("-r", dest="real", required=True,
                   help="the real images they were made from (pairs by cases.json source_case or by case name)")
    p.add_argument("--train", default=None, help="the diffusion model's training images (privacy: members)")
    p.add_argument("--heldout", default=None,
                   help="real images of the training domain the model never saw (membership non-members, and "
                        "the false-positive rate of the copy flags)")
    p.add_argument("-m", dest="model", default=None,
                   help="diffusion model folder (or DATASET[:PRESET]) for membership inference; needs --train and "
                        "--heldout")
    p.add_argument("-o", dest="out", required=True, help="output folder (refused if it exists unless --overwrite)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="FID Inception-v3 weights (torch-fidelity's pt_inception-2015-12-05 file; needs the "
                        "torch-fidelity package); without them that column is skipped")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice of the report (default 0)")
    p.add_argument("-device", default="auto",
                   help="auto (default: CUDA, then MPS, then the CPU), cpu, cuda or mps: where the diffusion model "
                        "(membership inference) and the optional ImageNet networks run")
    p.add_argument("-np", dest="num_processes", type=int, default=None,
                   help="worker processes for the image features (default: CPUs, max 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    from nnunet_sddm.evaluation.evaluate import default_num_processes
    from nnunet_sddm.utilities.devices import resolve_device

    sets = {k: image_set(v, opt) if v is not None else None for k, v, opt in
            (("synthetic", a.synthetic, "-s"), ("real", a.real, "-r"), ("train", a.train, "--train"),
             ("heldout", a.heldout, "--heldout"))}
    if a.inception_weights is not None and not Path(a.inception_weights).is_file():
        raise SDDMError(f"--inception-weights {a.inception_weights}: file not found")
    settings = QualitySettings(seed=a.seed, inception_weights=a.inception_weights,
                               device=str(resolve_device(a.device)))
    summary = quality_report(sets["synthetic"], sets["real"], a.out, train=sets["train"], heldout=sets["heldout"],
                             model_dir=a.model, settings=settings,
                             num_processes=a.num_processes or default_num_processes(),
                             overwrite=a.overwrite, progress=not a.quiet)
    print((Path(a.out) / "quality.md").read_text())
    print(f"written to {a.out}")
    return 0


@cli_entry
def mask_adherence_main(argv: Optional[List[str]] = None) -> int:
    from nnunet_sddm.cli.prediction import add_nnunet_model_arguments, nnunet_model_from_args

    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_mask_adherence", allow_abbrev=False,
        description="Mask adherence of generated image-label pairs: an nnU-Net trained on real data of the "
                    "generated domain segments every generated image, and the Dice against the label map it was "
                    "generated from is reported per structure (adherence.json, adherence.csv, adherence.md).")
    p.add_argument("-s", required=True,
                   help="raw dataset of generated pairs (id, DatasetXXX_Name or folder; its imagesTr and labelsTr)")
    add_nnunet_model_arguments(p)  # the segmenter
    p.add_argument("-o", dest="out", required=True, help="output folder (refused if it exists unless --overwrite)")
    p.add_argument("-np", dest="num_processes", type=int, default=0,
                   help="nnU-Net's preprocessing/export processes and the evaluation's (default 0: none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    from nnunet_sddm.evaluation.mask_adherence import mask_adherence

    if a.num_processes < 0:
        raise SDDMError(f"-np must be >= 0, got {a.num_processes}")
    model = nnunet_model_from_args(a)
    mask_adherence(a.s, model, a.out, device=a.device, num_processes=a.num_processes, overwrite=a.overwrite,
                   progress=not a.quiet)
    print((Path(a.out) / "adherence.md").read_text())
    print(f"written to {a.out}")
    return 0
