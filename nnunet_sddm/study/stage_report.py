"""Stage ``report``: ``OUT/report.md`` (written by ``study.report``), after every other stage."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.study import GENERATIVE_STAGES
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.report import write_report
from nnunet_sddm.study.stages import Stage


def run_report(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    return {"report": str(write_report(ctx))}


def report_inputs(ctx: StudyContext) -> Any:
    """The configuration; without the generative rows without the ``generative`` section (none of
    it is used then, and studies made before the section keep their fingerprint)."""
    config = ctx.cfg.to_dict()
    if not ctx.cfg.generative.rows:
        config.pop("generative", None)
    return {"config": config}


def report_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.out / "report.md"]


STAGE = Stage("report", "report.md", run_report, report_inputs, report_outputs,
              ("data", "diffusion", "synthesis", "adaptation", "alternatives", "preprocess", "train", "predict",
               "evaluate", "compare", "quality", "figures", *GENERATIVE_STAGES))
