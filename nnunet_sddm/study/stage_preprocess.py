"""Stage ``preprocess``: nnU-Net planning and preprocessing of the real and the synthetic source
datasets (``nnUNetv2_plan_and_preprocess`` in a subprocess, log in ``OUT/logs/preprocess.log``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.study import nnunet_steps
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.ownership import clean_study_outputs
from nnunet_sddm.study.stages import Stage


def preprocess_outputs(ctx: StudyContext) -> List[Path]:
    out = []
    for side in ("source", "synthetic"):
        base = ctx.folders["preprocessed"] / ctx.dataset_name(side)
        out += [base / "nnUNetPlans.json", base / "dataset.json", base / "dataset_fingerprint.json"]
        out += [base / f"nnUNetPlans_{c}" for c in ctx.cfg.configurations()]
    return out


def run_preprocess(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """nnU-Net planning and preprocessing of the real and the synthetic source datasets."""
    ids = [ctx.dataset_id("source"), ctx.dataset_id("synthetic")]
    seconds = nnunet_steps.plan_and_preprocess(ids, ctx.cfg.configurations(), ctx.nnunet_env(),
                                               ctx.cfg.nnunet.num_processes, ctx.out / "logs" / "preprocess.log")
    return {"datasets": ids, "configurations": ctx.cfg.configurations(), "seconds": round(seconds, 1)}


def preprocess_inputs(ctx: StudyContext) -> Any:
    return {"configurations": ctx.cfg.configurations()}


def preprocess_clean(ctx: StudyContext) -> None:
    clean_study_outputs(ctx, "preprocess", preprocess_outputs(ctx))


STAGE = Stage("preprocess", "nnU-Net plan + preprocess (real and synthetic source)", run_preprocess,
              preprocess_inputs, preprocess_outputs, ("data", "synthesis"), preprocess_clean)
