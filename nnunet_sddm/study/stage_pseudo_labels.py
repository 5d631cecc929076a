"""Stage ``pseudo_labels`` (generative rows, ``generative.rows``): the pseudo-labeller
(``StudyContext.pseudo_labeller``: the first segmenter trained on the real source, first repeat;
the Baseline, or with ``generative.pseudo_labeller`` ``aug`` the nnU-Net aug segmenter, which
predicts with mirroring as its trainer allows, like ``nnUNetv2_predict``) pseudo-labels every
image of the target dataset (``imagesTr`` and ``imagesTs``; its labels are never read) into the
raw dataset ``generative.pseudo_id`` (``adaptation.pseudo_labels``: the argmax of nnU-Net's
probabilities, largest component per structure), the target half of the conditional diffusion
model's training set. Off: not part of the study."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.adaptation.pseudo_labels import NnUNetModel, pseudo_label_dataset
from nnunet_sddm.data.raw_dataset import load_cases_json
from nnunet_sddm.study.config_tree import SEGMENTERS
from nnunet_sddm.study.context import GENERATIVE_SIDES, Model, StudyContext
from nnunet_sddm.study.ownership import clean_study_outputs
from nnunet_sddm.study.stage_predict import prediction_threads
from nnunet_sddm.study.stages import Stage
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.nnunet_paths import datasets_with_id, parse_dataset_folder_name


def generative_rows(ctx: StudyContext) -> bool:
    """True when the study has the generative rows (``generative.rows``): the generative stages' ``enabled``."""
    return ctx.cfg.generative.rows


def dataset_paths(ctx: StudyContext, side: str) -> List[Path]:
    """What building the dataset of ``side`` writes: the raw dataset, its staging folder and its
    preprocessed folder (``splits_final.json``)."""
    name = ctx.dataset_name(side)
    return [ctx.folders["raw"] / name, ctx.folders["raw"] / f".{name}.partial", ctx.folders["preprocessed"] / name]


def check_free_ids(ctx: StudyContext) -> None:
    """``SDDMError`` naming the key if a generative dataset id is taken by another dataset (a user's
    dataset, or the source's or target's id)."""
    taken = {ctx.dataset_id("source"): "the source", ctx.dataset_id("target"): "the target",
             ctx.cfg.synthesis.id: "the DG dataset (synthesis.id)"}
    for side, (key, _, _) in GENERATIVE_SIDES.items():
        i, name = getattr(ctx.cfg.generative, key), ctx.dataset_name(side)
        clash = [p.name for p in datasets_with_id(i, ctx.folders["raw"]) if p.name != name]
        if clash or i in taken:
            raise SDDMError(f"generative.{key} {i} is taken ({', '.join(clash) or taken[i]}); choose another id")


def as_nnunet_model(ctx: StudyContext, m: Model) -> NnUNetModel:
    """Model ``m`` of the first repeat as the ``NnUNetModel`` of ``pseudo_label_dataset`` and
    ``mask_adherence``: the study's fold, found in the first repeat's ``nnUNet_results``."""
    return NnUNetModel(dataset=ctx.dataset_name(ctx.model_side(m)), configuration=SEGMENTERS[m.segmenter][0],
                       trainer=ctx.trainer(m.segmenter, m.kind), plans=ctx.cfg.nnunet.plans, folds=(ctx.cfg.fold,))


def run_pseudo_labels(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Pseudo-label the target images with the pseudo-labeller (a published dataset is kept on
    resume; an unfinished one continues from its finished cases)."""
    check_free_ids(ctx)
    final = ctx.raw("pseudo")
    if not (resume and (final / "dataset.json").is_file()):
        name = parse_dataset_folder_name(ctx.dataset_name("pseudo"))[1]
        with prediction_threads(), contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints every case
            pseudo_label_dataset(ctx.raw("target"), ctx.cfg.generative.pseudo_id,
                                 as_nnunet_model(ctx, ctx.pseudo_labeller()), name=name, overwrite=False,
                                 device=ctx.device, num_processes=0, progress=ctx.progress)
    records = load_cases_json(final)
    conf = [r["mean_confidence"] for r in records if r.get("mean_confidence") is not None]
    return {"dataset": final.name, "cases": len(records), "model": ctx.pseudo_labeller().key,
            "mean_confidence": round(sum(conf) / len(conf), 4) if conf else None}


def pseudo_labels_inputs(ctx: StudyContext) -> Any:
    """The pseudo-labeller (segmenter, trainer, seed, fold; its training is the upstream train
    stage; the trainer tells the Baseline from the nnU-Net aug segmenter) and the dataset id."""
    m = ctx.pseudo_labeller()
    return {"model": [m.segmenter, ctx.trainer(m.segmenter, m.kind), m.seed], "fold": ctx.cfg.fold,
            "id": ctx.cfg.generative.pseudo_id}


def pseudo_labels_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.raw("pseudo")]


def pseudo_labels_clean(ctx: StudyContext) -> None:
    clean_study_outputs(ctx, "pseudo_labels", dataset_paths(ctx, "pseudo"))


STAGE = Stage("pseudo_labels", "generative rows: the target pseudo-labelled (generative.pseudo_labeller)",
              run_pseudo_labels, pseudo_labels_inputs, pseudo_labels_outputs, ("data", "train"), pseudo_labels_clean,
              generative_rows)
