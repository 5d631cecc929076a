"""Stage ``diffusion``: train the source-domain diffusion model, or check a given one."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.diffusion.model_folder import load_config
from nnunet_sddm.diffusion.trainer import train_model
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stages import Stage, file_listing


def run_diffusion(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Train the source-domain diffusion model (or check a given one)."""
    dif = ctx.cfg.diffusion
    if dif.model:
        cfg = load_config(ctx.model_dir)
        return {"model_dir": str(ctx.model_dir), "trained_by_study": False, "preset": cfg.get("preset")}
    resume = resume and (ctx.model_dir / "training_state.pt").is_file()
    model_dir, status = train_model(ctx.dataset_name("source"), preset=dif.preset,
                                    overrides=ctx.cfg.diffusion_overrides(), model_dir=ctx.model_dir, resume=resume,
                                    overwrite=not resume, device=ctx.device, progress=ctx.progress)
    if status != "finished":
        raise KeyboardInterrupt
    cfg = load_config(model_dir)
    last = last_log_row(model_dir / "log.csv")
    return {"model_dir": str(model_dir), "trained_by_study": True, "preset": cfg.get("preset"),
            "iterations": cfg["training"]["iterations"], "batch_size": cfg["training"]["batch_size"],
            "final_loss": last.get("loss"), "training_seconds": last.get("elapsed_s")}


def last_log_row(path: Path) -> Dict[str, float]:
    """The last row of a training ``log.csv`` (empty if there is none)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items()} if rows else {}


def diffusion_outputs(ctx: StudyContext) -> List[Path]:
    return [] if ctx.cfg.diffusion.model else [ctx.model_dir]


def diffusion_inputs(ctx: StudyContext) -> Any:
    if ctx.cfg.diffusion.model:
        return {"model": str(ctx.model_dir), "files": file_listing(ctx.model_dir)}
    return {"preset": ctx.cfg.diffusion.preset, "overrides": ctx.cfg.diffusion_overrides()}


STAGE = Stage("diffusion", "source-domain diffusion model", run_diffusion, diffusion_inputs, diffusion_outputs,
              ("data",))
