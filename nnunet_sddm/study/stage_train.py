"""Stage ``train``: every segmenter the table's rows need, for every repeat's seed: trained on the
real source without augmentation, on the synthetic source (DG), and on the real source with
nnU-Net's standard augmentation (the ``nnU-Net aug`` row); ``nnUNetv2_train`` in a subprocess
with the study's plans (``-p``: ``nnunet_steps.plans_name`` of ``nnunet.spacing``), logs in
``OUT/logs/train_<kind>__<segmenter>__seed<S>.log``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.study import nnunet_steps
from nnunet_sddm.study.config_tree import SEGMENTERS
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.ownership import clean_study_outputs, guard_user_outputs
from nnunet_sddm.study.stages import Stage

_TRAINED_ON = {"real": "the real source", "synthetic": "the synthetic source",
               "real_aug": "the real source with nnU-Net's augmentation"}


def segmenter_inputs(ctx: StudyContext) -> Dict[str, Any]:
    """The trained models and what they depend on: segmenters, trainers, kinds, fold and seeds."""
    return {"models": [[m.segmenter, m.kind, m.seed, ctx.cfg.trainer(m.segmenter, m.kind == "real_aug")]
                       for m in ctx.models()], "fold": ctx.cfg.fold}


def train_outputs(ctx: StudyContext) -> List[Path]:
    return [nnunet_steps.fold_folder(m.folder, ctx.cfg.fold) / "checkpoint_final.pth" for m in ctx.models()]


def train_clean(ctx: StudyContext) -> None:
    """Remove the study's old models; with a fold number, also claim the splits file nnU-Net
    writes when a dataset has none (an existing one is the user's: used, never deleted)."""
    clean_study_outputs(ctx, "train", [m.folder for m in ctx.models()])
    if ctx.cfg.fold != "all":
        splits = [ctx.folders["preprocessed"] / ctx.dataset_name(side) / "splits_final.json"
                  for side in ("source", "synthetic")]
        guard_user_outputs(ctx, "train_splits", [p for p in splits if not p.exists()])


def run_train(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Train every model of ``ctx.models()`` (nnUNetv2_train)."""
    fold = ctx.cfg.fold
    result = {}
    for m in ctx.models():
        if resume and nnunet_steps.is_trained(m.folder, fold):
            ctx.log(f"[study]   {m.key}: trained before the interruption - kept")
            continue
        configuration, trainer = SEGMENTERS[m.segmenter][0], ctx.cfg.trainer(m.segmenter, m.kind == "real_aug")
        ctx.log(f"[study]   training {SEGMENTERS[m.segmenter][2]} on {_TRAINED_ON[m.kind]} ({trainer}, "
                f"{configuration}, fold {fold}, seed {m.seed})")
        cont = resume and (nnunet_steps.fold_folder(m.folder, fold) / "checkpoint_latest.pth").is_file()
        seconds = nnunet_steps.train(ctx.dataset_id(ctx.model_side(m)), configuration, fold, trainer, ctx.device,
                                     ctx.nnunet_env(training=True, seed=m.seed),
                                     ctx.out / "logs" / f"train_{m.key}.log", resume=cont,
                                     plans=ctx.cfg.nnunet.plans)
        result[m.key] = {"model": str(m.folder), "trainer": trainer, "seconds": round(seconds, 1)}
    return result


STAGE = Stage("train", "train every segmenter (real, synthetic, augmented; every seed)", run_train,
              segmenter_inputs, train_outputs, ("preprocess",), train_clean)
