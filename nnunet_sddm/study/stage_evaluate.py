"""Stage ``evaluate``: the paper's metrics (DSC, IoU, ASD, ASSD, HD, HD95 per structure) of every
table row (approach x segmenter) against the target's labels, into ``OUT/evaluation/``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.evaluation.evaluate import evaluate_folders
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stages import Stage


def run_evaluate(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """The paper's metrics (DSC, IoU, ASD, ASSD, HD, HD95 per structure) of every table row."""
    ev = ctx.cfg.evaluation
    result = {}
    for approach, seg, name, pred in ctx.entries():
        out = ctx.evaluation_dir(approach, seg)
        if resume and (out / "per_case.csv").is_file():
            continue
        res = evaluate_folders(ctx.target_labels, pred, dataset_json=ctx.raw("target") / "dataset.json",
                               num_processes=ev.num_processes, empty_policy=ev.empty_policy, out_dir=out,
                               overwrite=True, progress=False)
        pooled = res.summary["structures"]["all"]["metrics"]
        result[name] = {m: (d["mean"] if d["mean"] == d["mean"] else None) for m, d in pooled.items()}
    return result


def evaluate_inputs(ctx: StudyContext) -> Any:
    """The evaluation settings that change the numbers (not the worker count)."""
    return {"evaluation": {k: v for k, v in ctx.cfg["evaluation"].items() if k != "num_processes"}}


def evaluate_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.out / "evaluation"]


STAGE = Stage("evaluate", "DSC, IoU, ASD, ASSD, HD, HD95 of every approach x model", run_evaluate, evaluate_inputs,
              evaluate_outputs, ("data", "predict"))
