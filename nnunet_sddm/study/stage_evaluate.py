"""Stage ``evaluate``: the paper's metrics (DSC, IoU, ASD, ASSD, HD, HD95 per structure) of every
table row (approach x segmenter) and repeat against the target's labels, into
``OUT/evaluation/seed<S>/``. The structures evaluated are those the target's and the source's
label maps both name (a target labelled with LV and MYO only is scored on those two; the
predictions' other structures are ignored, and the skipped ones are recorded)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.evaluation.evaluate import evaluate_folders, load_results
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stages import Stage


def run_evaluate(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """The paper's metrics of every table row and repeat (pooled means in the result)."""
    ev = ctx.cfg.evaluation
    result: Dict[str, Any] = {}
    skipped: List[str] = []
    for seed in ctx.cfg.seeds():
        for entry in ctx.entries():
            out = ctx.evaluation_dir(entry.approach.name, entry.segmenter, seed)
            if resume and (out / "summary.json").is_file():  # evaluated before the interruption (staged folder)
                summary = load_results(out).summary
            else:
                summary = evaluate_folders(ctx.target_labels, ctx.entry_predictions(entry, seed),
                                           dataset_json=ctx.raw("target") / "dataset.json",
                                           prediction_dataset_json=ctx.raw("source") / "dataset.json",
                                           num_processes=ev.num_processes, empty_policy=ev.empty_policy,
                                           out_dir=out, overwrite=True, progress=False).summary
            skipped = sorted(summary.get("skipped_structures", {}))
            pooled = summary["structures"]["all"]["metrics"]
            result[f"{entry.name}@seed{seed}"] = {m: (d["mean"] if d["mean"] == d["mean"] else None)
                                                  for m, d in pooled.items()}
    result["skipped_structures"] = skipped
    return result


def evaluate_inputs(ctx: StudyContext) -> Any:
    """The evaluation settings that change the numbers (not the worker count, nor what only the
    comparison uses: alpha and the test)."""
    return {"evaluation": {k: v for k, v in ctx.cfg["evaluation"].items() if k not in ("num_processes", "alpha",
                                                                                    "test")}}


def evaluate_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.out / "evaluation"]


STAGE = Stage("evaluate", "DSC, IoU, ASD, ASSD, HD, HD95 of every row and repeat", run_evaluate, evaluate_inputs,
              evaluate_outputs, ("data", "predict"))
