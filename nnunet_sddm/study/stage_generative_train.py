"""Stage ``generative_train`` (generative rows): the segmenters of the rows ``UDA-syn`` (trained
on the merged real source + generated dataset) and ``Gen-only`` (on the generated dataset alone),
every segmenter and repeat, with the same trainers, plans and code as ``train``
(``stage_train.train_models``), and, when the mask adherence can be measured, its oracle: the
first segmenter trained on the target's labelled cases (never a table row). Off: not part of the
study."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.study.config_tree import GENERATIVE_KINDS
from nnunet_sddm.study.context import Model, StudyContext
from nnunet_sddm.study.stage_adherence import oracle_unavailable
from nnunet_sddm.study.stage_pseudo_labels import generative_rows
from nnunet_sddm.study.stage_train import clean_models, model_outputs, segmenter_inputs, train_models
from nnunet_sddm.study.stages import Stage


def generative_models(ctx: StudyContext) -> List[Model]:
    """The UDA-syn and Gen-only segmenters of every repeat, then the oracle (when measurable)."""
    return ctx.models(GENERATIVE_KINDS) + ([] if oracle_unavailable(ctx) else [ctx.oracle()])


def run_generative_train(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    return train_models(ctx, generative_models(ctx), resume)


def generative_train_inputs(ctx: StudyContext) -> Any:
    return segmenter_inputs(ctx, generative_models(ctx))


def generative_train_outputs(ctx: StudyContext) -> List[Path]:
    return model_outputs(ctx, generative_models(ctx))


def generative_train_clean(ctx: StudyContext) -> None:
    """Remove every model this stage can have trained (also with the rows switched off since)."""
    models = [ctx.model(s, kind, seed) for seed in ctx.cfg.seeds() for s in ctx.cfg.segmenters
              for kind in GENERATIVE_KINDS] + [ctx.oracle()]
    clean_models(ctx, "generative_train", models, ("merged", "generated", "target"))


STAGE = Stage("generative_train", "generative rows: train the UDA-syn, Gen-only and oracle segmenters",
              run_generative_train, generative_train_inputs, generative_train_outputs, ("generative_preprocess",),
              generative_train_clean, generative_rows)
