"""Stage ``figures``: the sweep grid of one target slice, the t-SNE of real/target/adapted images,
the per-segmenter CI bar charts and, with the generative rows, the generated pairs (drawn by
``study.figures``), into ``OUT/figures/``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.figures import ci_bars, domain_shift_figure, generated_pairs_figure, sweep_figure
from nnunet_sddm.study.stages import Stage


def run_figures(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Sweep grid of one target slice, t-SNE of real/target/adapted, per-segmenter CI bar charts."""
    fig = ctx.out / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {}
    if ctx.cfg.figures.sweep is not None:
        result["sweep"] = sweep_figure(ctx, fig / "sweep.png")
    if ctx.cfg.figures.tsne:
        result["domain_shift"] = domain_shift_figure(ctx, fig / "domain_shift")
    result["ci_bars"] = ci_bars(ctx, fig)
    if ctx.cfg.generative.rows:
        result["generated_pairs"] = generated_pairs_figure(ctx, fig / "generated_pairs.png")
    return result


def figures_inputs(ctx: StudyContext) -> Any:
    inputs: Dict[str, Any] = {"figures": ctx.cfg["figures"]}
    if ctx.cfg.generative.rows:  # left out otherwise: studies without the rows keep their fingerprint
        inputs["generated_pairs"] = {"cases": 3, "labels": ctx.cfg.generative.labels}
    return inputs


def figures_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.out / "figures"]


STAGE = Stage("figures", "sweep grid, t-SNE, CI bar charts (and the generated pairs)", run_figures, figures_inputs, figures_outputs,
              ("data", "diffusion", "adaptation", "alternatives", "generation", "compare"))
