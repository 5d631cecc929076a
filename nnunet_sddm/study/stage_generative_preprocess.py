"""Stage ``generative_preprocess`` (generative rows): nnU-Net planning and preprocessing, with the
study's plans (``nnunet.spacing``, ``nnunet.batch_size``), of the generative rows' training sets
(the merged and the generated dataset) and, when the mask adherence can be measured, of the
target dataset its oracle segmenter trains on (``stage_adherence.oracle_unavailable``); log in
``OUT/logs/generative_preprocess.log``. Off: not part of the study."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.ownership import clean_study_outputs
from nnunet_sddm.study.stage_adherence import oracle_unavailable
from nnunet_sddm.study.stage_preprocess import plan_and_preprocess_sides, preprocess_inputs, preprocessed_outputs
from nnunet_sddm.study.stage_pseudo_labels import generative_rows
from nnunet_sddm.study.stages import Stage


def generative_sides(ctx: StudyContext) -> List[str]:
    """The datasets to preprocess: ``merged``, ``generated`` and (adherence measurable) ``target``."""
    return ["merged", "generated"] + ([] if oracle_unavailable(ctx) else ["target"])


def run_generative_preprocess(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    return plan_and_preprocess_sides(ctx, generative_sides(ctx), "generative_preprocess.log")


def generative_preprocess_inputs(ctx: StudyContext) -> Any:
    """``preprocess_inputs`` and the datasets."""
    return {**preprocess_inputs(ctx), "sides": generative_sides(ctx)}


def generative_preprocess_outputs(ctx: StudyContext) -> List[Path]:
    return preprocessed_outputs(ctx, generative_sides(ctx))


def generative_preprocess_clean(ctx: StudyContext) -> None:
    clean_study_outputs(ctx, "generative_preprocess", preprocessed_outputs(ctx, ["merged", "generated", "target"]))


STAGE = Stage("generative_preprocess", "generative rows: nnU-Net plan + preprocess (merged, generated, target)",
              run_generative_preprocess, generative_preprocess_inputs, generative_preprocess_outputs,
              ("data", "generation"), generative_preprocess_clean, generative_rows)
