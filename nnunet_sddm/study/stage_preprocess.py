"""Stage ``preprocess``: nnU-Net planning and preprocessing of the real and the synthetic source
datasets (``nnUNetv2_plan_and_preprocess`` in a subprocess, log in ``OUT/logs/preprocess.log``);
with ``nnunet.spacing`` both are planned at that target spacing, and with ``nnunet.batch_size``
their plans get that batch size, under a plans name of their own
(``nnunet_steps.plan_and_preprocess``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from nnunet_sddm.study import nnunet_steps
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.ownership import clean_study_outputs
from nnunet_sddm.study.stages import Stage


def preprocessed_outputs(ctx: StudyContext, sides: Sequence[str]) -> List[Path]:
    """nnU-Net's default plans, the dataset files, the fingerprint, and the plans and preprocessed
    data of the study's plans (``nnunet_steps.plans_name``) of the datasets of ``sides``."""
    plans = ctx.cfg.nnunet.plans
    out = []
    for side in sides:
        base = ctx.folders["preprocessed"] / ctx.dataset_name(side)
        out += [base / f"{p}.json" for p in dict.fromkeys((nnunet_steps.PLANS, plans))]
        out += [base / "dataset.json", base / "dataset_fingerprint.json"]
        out += [base / f"{plans}_{c}" for c in ctx.cfg.configurations()]
    return out


def plan_and_preprocess_sides(ctx: StudyContext, sides: Sequence[str], log_name: str) -> Dict[str, Any]:
    """nnU-Net planning and preprocessing of the datasets of ``sides`` with the study's
    configurations, ``nnunet.spacing`` and ``nnunet.batch_size`` (log ``OUT/logs/<log_name>``)."""
    ids = [ctx.dataset_id(side) for side in sides]
    seconds = nnunet_steps.plan_and_preprocess(ids, ctx.cfg.configurations(), ctx.nnunet_env(),
                                               ctx.cfg.nnunet.num_processes, ctx.out / "logs" / log_name,
                                               spacing=ctx.cfg.nnunet.spacing, batch_size=ctx.cfg.nnunet.batch_size)
    return {"datasets": ids, "configurations": ctx.cfg.configurations(), "plans": ctx.cfg.nnunet.plans,
            "seconds": round(seconds, 1)}


def preprocess_outputs(ctx: StudyContext) -> List[Path]:
    """The preprocessed real and synthetic source datasets (``preprocessed_outputs``)."""
    return preprocessed_outputs(ctx, ("source", "synthetic"))


def run_preprocess(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """nnU-Net planning and preprocessing of the real and the synthetic source datasets."""
    return plan_and_preprocess_sides(ctx, ("source", "synthetic"), "preprocess.log")


def preprocess_inputs(ctx: StudyContext) -> Any:
    """The configurations and, when set, ``nnunet.spacing`` (its plans name) and
    ``nnunet.batch_size`` (each left out when null, so that studies made before the key keep their
    fingerprint)."""
    inputs: Dict[str, Any] = {"configurations": ctx.cfg.configurations()}
    if ctx.cfg.nnunet.spacing is not None:  # by its plans name: 3 and 3.0 are the same plans
        inputs["spacing"] = nnunet_steps.plans_name(ctx.cfg.nnunet.spacing)
    if ctx.cfg.nnunet.batch_size is not None:
        inputs["batch_size"] = ctx.cfg.nnunet.batch_size
    return inputs


def preprocess_clean(ctx: StudyContext) -> None:
    clean_study_outputs(ctx, "preprocess", preprocess_outputs(ctx))


STAGE = Stage("preprocess", "nnU-Net plan + preprocess (real and synthetic source)", run_preprocess,
              preprocess_inputs, preprocess_outputs, ("data", "synthesis"), preprocess_clean)
