"""Stage ``synthesis`` (DG): the source training set adapted by the diffusion model, with the
original labels, as a new raw dataset (``synthesis.id``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.adaptation.synthesize import synthesize_dataset
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.ownership import clean_study_outputs
from nnunet_sddm.study.stages import Stage
from nnunet_sddm.utilities.nnunet_paths import parse_dataset_folder_name


def run_synthesis(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """DG: the source training set adapted by the diffusion model, with the original labels."""
    smp = ctx.cfg.sampler
    name = parse_dataset_folder_name(ctx.dataset_name("synthetic"))[1]
    folder = synthesize_dataset(ctx.dataset_name("source"), ctx.cfg.synthesis.id, ctx.model_dir, smp.settings,
                                name=name, copies=ctx.cfg.synthesis.copies, overwrite=False,
                                batch_size=smp.batch_size, device=ctx.device, amp=smp.amp, progress=ctx.progress)
    return {"dataset": folder.name, "cases": len(list((folder / "imagesTr").iterdir()))}


def synthesis_inputs(ctx: StudyContext) -> Any:
    return {"sampler": ctx.cfg.sampler.inputs(), "synthesis": ctx.cfg["synthesis"]}


def synthesis_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.folders["raw"] / ctx.dataset_name("synthetic")]


def synthesis_clean(ctx: StudyContext) -> None:
    name = ctx.dataset_name("synthetic")
    paths = [ctx.folders["raw"] / name, ctx.folders["raw"] / f".{name}.partial", ctx.folders["preprocessed"] / name]
    clean_study_outputs(ctx, "synthesis", paths)


STAGE = Stage("synthesis", "DG: synthetic source training set", run_synthesis, synthesis_inputs, synthesis_outputs,
              ("data", "diffusion"), synthesis_clean)
