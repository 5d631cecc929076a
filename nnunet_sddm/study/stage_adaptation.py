"""Stage ``adaptation`` (DA): the target test images adapted to the source domain, once, into
``OUT/adapted/target`` (nnU-Net names, the input's geometry); the predict stage segments them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.adaptation.folders import adapt_folder
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stages import Stage


def run_adaptation(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """DA: the target test images adapted to the source domain."""
    smp = ctx.cfg.sampler
    adapt_folder(ctx.target_images, ctx.adapted, ctx.model_dir, smp.settings, batch_size=smp.batch_size,
                 device=ctx.device, amp=smp.amp, overwrite=False, progress=ctx.progress)
    return {"folder": str(ctx.adapted), "images": len(list(ctx.adapted.glob("*_0000.*")))}


def adaptation_inputs(ctx: StudyContext) -> Any:
    return {"sampler": ctx.cfg.sampler.inputs(), "split": ctx.cfg.target.split}


def adaptation_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.adapted]


STAGE = Stage("adaptation", "DA: adapted target test images", run_adaptation, adaptation_inputs, adaptation_outputs,
              ("data", "diffusion"))
