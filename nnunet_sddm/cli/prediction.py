"""``nnUNetv2_sddm_predict``: ``nnUNetv2_predict`` on SD-DM-adapted inputs, and ``nnUNetv2_sddm_pseudo_label``:
pseudo-labelled target datasets (argument parsing only)."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from nnunet_sddm.cli.adaptation import (add_method_arguments, add_sampler_arguments, check_method_options,
                                        explicit_options, sampler_settings)
from nnunet_sddm.utilities.errors import cli_entry


def _env_int(name: str, default: int) -> int:
    """nnU-Net's defaults for -npp / -nps (``nnUNet_npp`` / ``nnUNet_nps``, else 3)."""
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_predict", allow_abbrev=False,
        description="nnUNetv2_predict with SD-DM test-time adaptation: every input image is first adapted "
                    "to the source domain by the diffusion model (-m), then segmented by the nnU-Net model "
                    "(-d/-tr/-p/-c/-f). All nnUNetv2_predict arguments keep their names, defaults and meaning. "
                    "--method histmatch / fda adapt with a classical method fitted on --source instead.")
    g = p.add_argument_group("nnUNetv2_predict arguments")
    g.add_argument("-i", required=True, help="input folder of nnU-Net-named images (CASE_0000.nii.gz, ...)")
    g.add_argument("-o", required=True, help="output folder (created if missing); segmentations are named CASE")
    g.add_argument("-d", required=True, help="dataset of the nnU-Net model: id or DatasetXXX_Name")
    g.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    g.add_argument("-tr", default="nnUNetTrainer", help="trainer class used for training (default: nnUNetTrainer)")
    g.add_argument("-c", required=True, help="nnU-Net configuration, e.g. 2d or 3d_fullres")
    g.add_argument("-f", nargs="+", default=("0", "1", "2", "3", "4"),
                   help="folds to use (integers or 'all'; default: 0 1 2 3 4)")
    g.add_argument("-step_size", type=float, default=0.5, help="sliding-window step size (default: 0.5)")
    g.add_argument("--disable_tta", action="store_true", help="disable mirroring test-time augmentation")
    g.add_argument("--verbose", action="store_true", help="talk a lot")
    g.add_argument("--save_probabilities", action="store_true",
                   help="also export the class probabilities (.npz + .pkl), as nnUNetv2_predict")
    g.add_argument("--continue_prediction", action="store_true",
                   help="skip cases whose outputs exist (resume an interrupted run)")
    g.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    g.add_argument("-npp", type=int, default=_env_int("nnUNet_npp", 3),
                   help="preprocessing processes (default 3; adapted cases are preprocessed in the main "
                        "process, next to the diffusion model); -npp 0 -nps 0 = no worker processes")
    g.add_argument("-nps", type=int, default=_env_int("nnUNet_nps", 3),
                   help="segmentation export processes (default 3)")
    g.add_argument("-prev_stage_predictions", default=None, help="previous stage's predictions (cascade)")
    g.add_argument("-num_parts", type=int, default=1, help="number of parallel calls splitting the cases")
    g.add_argument("-part_id", type=int, default=0, help="which part this call is (0 .. num_parts-1)")
    g.add_argument("-device", "--device", default="cuda",
                   help="cuda, cpu or mps (default: cuda), for nnU-Net and the diffusion model")
    g.add_argument("--disable_progress_bar", action="store_true", help="no progress bars")
    g.add_argument("--not_on_device", action="store_true",
                   help="keep nnU-Net's sliding-window results on the CPU (large cases)")

    s = p.add_argument_group("adaptation (as nnUNetv2_sddm_adapt)")
    s.add_argument("-m", "--model", default=None,
                   help="diffusion model folder or DATASET[:PRESET] (--method sddm, required there)")
    s.add_argument("--save-adapted", default=None, metavar="DIR",
                   help="also write the adapted images here (nnU-Net names, the input's geometry)")
    s.add_argument("--ensemble-original", action="store_true",
                   help="average the class probabilities of the adapted and the original input")
    s.add_argument("--postprocess", choices=("lcc",), default=None,
                   help="lcc: keep the largest connected component (3D, 26-connected) of each label in the "
                        "segmentations written, other voxels of that label become background; with "
                        "--save_probabilities the probabilities are left as predicted (default: none)")
    add_method_arguments(p)
    add_sampler_arguments(p, device=False)  # -N 0 = no adaptation: exactly the stock prediction
    return p


@cli_entry
def predict_main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``nnUNetv2_sddm_predict``."""
    a, given = explicit_options(build_parser(), argv)
    check_method_options(a.method, given, a.model is not None, a.source is not None, sampler_device=False)
    from nnunet_sddm.adaptation.predictor import sddm_predict

    summary = sddm_predict(
        a.i, a.o, a.d, a.c, a.model, sampler_settings(a) if a.method == "sddm" else None, plans=a.p, trainer=a.tr, folds=a.f, checkpoint=a.chk,
        step_size=a.step_size, disable_tta=a.disable_tta, verbose=a.verbose,
        save_probabilities=a.save_probabilities, continue_prediction=a.continue_prediction,
        num_processes_preprocessing=a.npp, num_processes_segmentation_export=a.nps,
        prev_stage_predictions=a.prev_stage_predictions, num_parts=a.num_parts, part_id=a.part_id,
        device=a.device, disable_progress_bar=a.disable_progress_bar, not_on_device=a.not_on_device,
        batch_size=a.batch_size, amp=a.amp, save_adapted=a.save_adapted, ensemble_original=a.ensemble_original,
        method=a.method, source=a.source, beta=a.beta, seed=a.seed, postprocess=a.postprocess)
    print(f"nnUNetv2_sddm_predict: {len(summary['predicted'])} case(s) predicted, "
          f"{len(summary['skipped'])} skipped (already done), {summary['seconds']:.1f} s -> {a.o}")
    return 0



def add_nnunet_model_arguments(p: argparse.ArgumentParser) -> None:
    """The trained nnU-Net of ``nnUNetv2_sddm_pseudo_label`` and ``nnUNetv2_sddm_mask_adherence``
    (``-d -c -tr -p -f -chk``, ``nnUNetv2_predict``'s names; folds and checkpoints are averaged)."""
    p.add_argument("-d", required=True, help="dataset of the nnU-Net model: id or DatasetXXX_Name")
    p.add_argument("-c", required=True, help="nnU-Net configuration, e.g. 2d")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer class used for training (default: nnUNetTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-f", nargs="+", default=("0", "1", "2", "3", "4"),
                   help="folds whose class probabilities are averaged (integers or 'all'; default: 0 1 2 3 4)")
    p.add_argument("-chk", nargs="+", default=("checkpoint_final.pth",),
                   help="checkpoint name(s); several are averaged with the folds (default: checkpoint_final.pth)")
    p.add_argument("-device", "--device", default="cuda", help="cuda, cpu or mps (default: cuda)")


def nnunet_model_from_args(a: argparse.Namespace):
    """The ``NnUNetModel`` of :func:`add_nnunet_model_arguments`' options (``SDDMError`` for a bad -device)."""
    from nnunet_sddm.adaptation.predictor import NNUNET_DEVICES
    from nnunet_sddm.adaptation.pseudo_labels import NnUNetModel
    from nnunet_sddm.utilities.errors import SDDMError

    if a.device not in NNUNET_DEVICES:
        raise SDDMError(f"-device must be one of {', '.join(NNUNET_DEVICES)}, got {a.device!r}")
    return NnUNetModel(a.d, a.c, trainer=a.tr, plans=a.p, folds=tuple(a.f), checkpoints=tuple(a.chk))


def build_pseudo_label_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_pseudo_label", allow_abbrev=False,
        description="Pseudo-label target images with a trained nnU-Net and write them as a new nnU-Net raw "
                    "dataset (imagesTr: byte copies of the images, labelsTr: the pseudo-labels, dataset.json with "
                    "the model's labels, cases.json with per-case confidence). The class probabilities of every "
                    "fold and checkpoint are averaged, the largest connected component of each structure is kept, "
                    "and with --threshold low-confidence voxels get nnU-Net's ignore label.")
    p.add_argument("-i", required=True,
                   help="target images: a raw dataset (id, DatasetXXX_Name or folder; all images of imagesTr and "
                        "imagesTs) or a folder of nnU-Net-named images (CASE_0000.nii.gz)")
    p.add_argument("-o", required=True, type=int, help="id of the new dataset in nnUNet_raw")
    add_nnunet_model_arguments(p)
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="voxels whose highest class probability is below P (0 < P <= 1) get the ignore label "
                        "(dataset.json label 'ignore' = max label + 1), left out of nnU-Net's training loss; "
                        "default: no ignore label")
    p.add_argument("--name", default=None,
                   help="name of the new dataset (default: <target name or folder>PseudoLabel)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the new id")
    p.add_argument("-np", type=int, default=_env_int("nnUNet_npp", 3),
                   help="nnU-Net's preprocessing and export processes (default 3); 0 = no worker processes")
    p.add_argument("--disable_progress_bar", action="store_true", help="no progress bars")
    return p


@cli_entry
def pseudo_label_main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``nnUNetv2_sddm_pseudo_label``."""
    a = build_pseudo_label_parser().parse_args(argv)
    from nnunet_sddm.adaptation.pseudo_labels import pseudo_label_dataset

    model = nnunet_model_from_args(a)
    out = pseudo_label_dataset(a.i, a.o, model, threshold=a.threshold, name=a.name, overwrite=a.overwrite,
                               device=a.device, num_processes=a.np, progress=not a.disable_progress_bar)
    print(f"nnUNetv2_sddm_pseudo_label: wrote {out}")
    return 0


if __name__ == "__main__":
    predict_main()
