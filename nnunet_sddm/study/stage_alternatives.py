"""Stage ``alternatives``: the target test images standardised by the classical alternatives to
SD-DM a reviewer compares against, into ``OUT/adapted/<method>`` (nnU-Net names, the input's
geometry), fitted on the source training images: ``histmatch`` (Nyul's piecewise-linear landmark
standardisation) and ``fda`` (Fourier domain adaptation, window ``alternatives.fda_beta``, source
slices chosen with the study seed). The predict stage segments them with the baseline segmenters."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.adaptation.methods import CLASSICAL, adapt_folder_classical
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stages import Stage, remove_paths


def methods(ctx: StudyContext) -> List[str]:
    """The enabled classical methods (``alternatives.histmatch``, ``alternatives.fda``)."""
    return [m for m in CLASSICAL if getattr(ctx.cfg.alternatives, m)]


def run_alternatives(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Histogram matching and FDA of the target test images (each folder written atomically)."""
    result = {}
    for method in methods(ctx):
        out = ctx.input_images(method)
        if resume and out.is_dir():
            continue
        adapt_folder_classical(method, ctx.target_images, out, source_images=ctx.raw("source") / "imagesTr",
                               beta=float(ctx.cfg.alternatives.fda_beta), seed=ctx.cfg.seed, overwrite=True,
                               progress=ctx.progress)
        result[method] = {"folder": str(out), "images": len(list(out.glob("*_0000.*")))}
    return result


def alternatives_inputs(ctx: StudyContext) -> Any:
    return {"methods": methods(ctx), "fda_beta": ctx.cfg.alternatives.fda_beta, "seed": ctx.cfg.seed,
            "split": ctx.cfg.target.split}


def alternatives_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.input_images(m) for m in methods(ctx)]


def alternatives_clean(ctx: StudyContext) -> None:
    """Remove the folders of both methods (a disabled method's old images must not linger)."""
    remove_paths([ctx.input_images(m) for m in CLASSICAL])


STAGE = Stage("alternatives", "histogram matching and FDA of the target test images", run_alternatives,
              alternatives_inputs, alternatives_outputs, ("data",), alternatives_clean)
