"""Stage ``train``: every segmenter trained on the real and on the synthetic source
(``nnUNetv2_train`` in a subprocess; logs in ``OUT/logs/train_<kind>__<segmenter>.log``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.study import nnunet_steps
from nnunet_sddm.study.config_tree import SEGMENTERS
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.ownership import clean_study_outputs, guard_user_outputs
from nnunet_sddm.study.stages import Stage


def segmenter_inputs(ctx: StudyContext) -> Dict[str, Any]:
    """The segmenters, their trainers, the fold and the training seed (what the trained models depend on)."""
    return {"segmenters": list(ctx.cfg.segmenters), "trainers": {s: ctx.cfg.trainer(s) for s in ctx.cfg.segmenters},
            "fold": ctx.cfg.fold, "seed": ctx.cfg.seed}


def train_outputs(ctx: StudyContext) -> List[Path]:
    return [nnunet_steps.fold_folder(m, ctx.cfg.fold) / "checkpoint_final.pth" for _, _, m in ctx.segmenter_models()]


def train_clean(ctx: StudyContext) -> None:
    """Remove the study's old models; with a fold number, also claim the splits file nnU-Net
    writes when a dataset has none (an existing one is the user's: used, never deleted)."""
    clean_study_outputs(ctx, "train", [m for _, _, m in ctx.segmenter_models()])
    if ctx.cfg.fold != "all":
        splits = [ctx.folders["preprocessed"] / ctx.dataset_name(side) / "splits_final.json"
                  for side in ("source", "synthetic")]
        guard_user_outputs(ctx, "train_splits", [p for p in splits if not p.exists()])


def run_train(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Train every segmenter on the real and on the synthetic source (nnUNetv2_train)."""
    fold = ctx.cfg.fold
    result = {}
    for seg, kind, mdir in ctx.segmenter_models():
        key = f"{kind}__{seg}"
        if resume and nnunet_steps.is_trained(mdir, fold):
            ctx.log(f"[study]   {key}: trained before the interruption - kept")
            continue
        side = "source" if kind == "real" else "synthetic"
        configuration, trainer = SEGMENTERS[seg][0], ctx.cfg.trainer(seg)
        ctx.log(f"[study]   training {SEGMENTERS[seg][2]} on the {kind} source ({trainer}, {configuration}, "
                f"fold {fold})")
        cont = resume and (nnunet_steps.fold_folder(mdir, fold) / "checkpoint_latest.pth").is_file()
        seconds = nnunet_steps.train(ctx.dataset_id(side), configuration, fold, trainer, ctx.device,
                                     ctx.nnunet_env(training=True), ctx.out / "logs" / f"train_{key}.log", resume=cont)
        result[key] = {"model": str(mdir), "trainer": trainer, "seconds": round(seconds, 1)}
    return result


STAGE = Stage("train", "train every segmenter on real and synthetic source", run_train, segmenter_inputs,
              train_outputs, ("preprocess",), train_clean)
