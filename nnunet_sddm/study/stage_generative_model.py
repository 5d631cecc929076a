"""Stage ``generative_model`` (generative rows): ONE mask-conditioned diffusion model
(``model.condition`` "labels", domains ``["source", "target"]``) trained on the source's labelled
training cases and the pseudo-labelled target cases, into ``OUT/generative_model/``
(``diffusion.trainer.train_model`` with ``pseudo_labelled``, as ``nnUNetv2_sddm_train --condition
labels --pseudo-labelled``). Preset, iterations, batch size and ``set`` are the study's
``diffusion`` settings unless ``generative.diffusion`` gives its own; the training seed is the
study seed. Resumable from its training checkpoint. Off: not part of the study."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.diffusion.model_folder import load_config
from nnunet_sddm.diffusion.trainer import train_model
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stage_diffusion import last_log_row
from nnunet_sddm.study.stage_pseudo_labels import generative_rows
from nnunet_sddm.study.stages import Stage


def generative_model_dir(ctx: StudyContext) -> Path:
    """``OUT/generative_model``: the conditional diffusion model of the generative rows."""
    return ctx.out / "generative_model"


def run_generative_model(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Train the conditional diffusion model on the source and the pseudo-labelled target."""
    gen, model_dir = ctx.cfg.generative, generative_model_dir(ctx)
    resume = resume and (model_dir / "training_state.pt").is_file()
    model_dir, status = train_model(ctx.dataset_name("source"), preset=gen.preset, overrides=dict(gen.overrides),
                                    model_dir=model_dir, resume=resume, overwrite=not resume, device=ctx.device,
                                    progress=ctx.progress, pseudo_labelled=ctx.dataset_name("pseudo"))
    if status != "finished":
        raise KeyboardInterrupt
    cfg = load_config(model_dir)
    last = last_log_row(model_dir / "log.csv")
    return {"model_dir": str(model_dir), "preset": cfg.get("preset"), "domains": cfg["model"].get("domains"),
            "label_values": cfg["model"].get("label_values"), "iterations": cfg["training"]["iterations"],
            "batch_size": cfg["training"]["batch_size"], "final_loss": last.get("loss"),
            "training_seconds": last.get("elapsed_s")}


def generative_model_inputs(ctx: StudyContext) -> Any:
    gen = ctx.cfg.generative
    return {"preset": gen.preset, "overrides": dict(gen.overrides)}


def generative_model_outputs(ctx: StudyContext) -> List[Path]:
    return [generative_model_dir(ctx)]


STAGE = Stage("generative_model", "generative rows: conditional diffusion model (source + pseudo-labelled target)",
              run_generative_model, generative_model_inputs, generative_model_outputs, ("data", "pseudo_labels"),
              enabled=generative_rows)
