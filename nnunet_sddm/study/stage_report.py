"""Stage ``report``: ``OUT/report.md`` (written by ``study.report``), after every other stage."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.report import write_report
from nnunet_sddm.study.stages import Stage


def run_report(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    return {"report": str(write_report(ctx))}


def report_inputs(ctx: StudyContext) -> Any:
    return {"config": ctx.cfg.to_dict()}


def report_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.out / "report.md"]


STAGE = Stage("report", "report.md", run_report, report_inputs, report_outputs,
              ("data", "diffusion", "synthesis", "adaptation", "alternatives", "preprocess", "train", "predict",
               "evaluate", "compare", "quality", "figures"))
