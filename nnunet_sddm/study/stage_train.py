"""Stage ``train``: every segmenter the table's rows need, for every repeat's seed: trained on the
real source without augmentation, on the synthetic source (DG), and on the real source with
nnU-Net's standard augmentation (the ``nnU-Net aug`` row); ``nnUNetv2_train`` in a subprocess
with the study's plans (``-p``: ``nnunet_steps.plans_name`` of ``nnunet.spacing``), logs in
``OUT/logs/train_<kind>__<segmenter>__seed<S>.log``. The segmenters of the generative rows are
trained later, by ``generative_train``, with the same code (``train_models``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from nnunet_sddm.study import nnunet_steps
from nnunet_sddm.study.config_tree import GENERATIVE_KINDS, SEGMENTERS
from nnunet_sddm.study.context import Model, StudyContext
from nnunet_sddm.study.ownership import clean_study_outputs, guard_user_outputs
from nnunet_sddm.study.stages import Stage

_TRAINED_ON = {"real": "the real source", "synthetic": "the synthetic source",
               "real_aug": "the real source with nnU-Net's augmentation",
               "uda_syn": "the real source plus the generated target-style pairs",
               "gen_only": "the generated target-style pairs", "oracle": "the target's labelled cases"}


def segmenter_inputs(ctx: StudyContext, models: Optional[Sequence[Model]] = None) -> Dict[str, Any]:
    """The trained models (default: every model of the rows) and what they depend on: segmenters,
    trainers, kinds, fold and seeds."""
    models = ctx.models() if models is None else models
    return {"models": [[m.segmenter, m.kind, m.seed, ctx.trainer(m.segmenter, m.kind)]
                       for m in models], "fold": ctx.cfg.fold}


def first_models(ctx: StudyContext) -> List[Model]:
    """The models of this stage: every model but those of the generative rows."""
    return ctx.models([k for k in ctx.cfg.kinds() if k not in GENERATIVE_KINDS])


def model_outputs(ctx: StudyContext, models: Sequence[Model]) -> List[Path]:
    """The final checkpoint of every model of ``models``."""
    return [nnunet_steps.fold_folder(m.folder, ctx.cfg.fold) / "checkpoint_final.pth" for m in models]


def clean_models(ctx: StudyContext, stage: str, models: Sequence[Model], sides: Sequence[str]) -> None:
    """Remove the study's old ``models`` (``stage``'s); with a fold number, also claim the splits
    file nnU-Net writes when a dataset of ``sides`` has none (an existing one is the user's: used,
    never deleted)."""
    clean_study_outputs(ctx, stage, [m.folder for m in models])
    if ctx.cfg.fold != "all":
        splits = [ctx.folders["preprocessed"] / ctx.dataset_name(side) / "splits_final.json" for side in sides]
        guard_user_outputs(ctx, f"{stage}_splits", [p for p in splits if not p.exists()])


def train_models(ctx: StudyContext, models: Sequence[Model], resume: bool) -> Dict[str, Any]:
    """Train every model of ``models`` (nnUNetv2_train); resuming keeps finished models and
    continues an interrupted one from its latest checkpoint."""
    fold = ctx.cfg.fold
    result = {}
    for m in models:
        if resume and nnunet_steps.is_trained(m.folder, fold):
            ctx.log(f"[study]   {m.key}: trained before the interruption - kept")
            continue
        configuration, trainer = SEGMENTERS[m.segmenter][0], ctx.trainer(m.segmenter, m.kind)
        ctx.log(f"[study]   training {SEGMENTERS[m.segmenter][2]} on {_TRAINED_ON[m.kind]} ({trainer}, "
                f"{configuration}, fold {fold}, seed {m.seed})")
        cont = resume and (nnunet_steps.fold_folder(m.folder, fold) / "checkpoint_latest.pth").is_file()
        seconds = nnunet_steps.train(ctx.dataset_id(ctx.model_side(m)), configuration, fold, trainer, ctx.device,
                                     ctx.nnunet_env(training=True, seed=m.seed),
                                     ctx.out / "logs" / f"train_{m.key}.log", resume=cont,
                                     plans=ctx.cfg.nnunet.plans)
        result[m.key] = {"model": str(m.folder), "trainer": trainer, "seconds": round(seconds, 1)}
    return result


def train_inputs(ctx: StudyContext) -> Dict[str, Any]:
    return segmenter_inputs(ctx, first_models(ctx))


def train_outputs(ctx: StudyContext) -> List[Path]:
    return model_outputs(ctx, first_models(ctx))


def train_clean(ctx: StudyContext) -> None:
    clean_models(ctx, "train", first_models(ctx), ("source", "synthetic"))


def run_train(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Train every model of the rows but the generative rows' (nnUNetv2_train)."""
    return train_models(ctx, first_models(ctx), resume)


STAGE = Stage("train", "train every segmenter (real, synthetic, augmented; every seed)", run_train,
              train_inputs, train_outputs, ("preprocess",), train_clean)
