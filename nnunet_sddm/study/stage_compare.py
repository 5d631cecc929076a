"""Stage ``compare``: Welch's t-tests of every approach against its segmenter's baseline, Table 1
(Markdown, CSV, LaTeX) and CI bar charts, into ``OUT/comparison/``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.evaluation.compare import compare_results
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stages import Stage


def run_compare(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Welch's t-tests of every approach against its segmenter's baseline; Table 1; CI bars."""
    entries = ctx.entries()
    baselines = [(name, ctx.evaluation_dir(a, s)) for a, s, name, _ in entries if a == "Baseline"]
    candidates = [(name, ctx.evaluation_dir(a, s)) for a, s, name, _ in entries if a != "Baseline"]
    out = compare_results(baselines, candidates, out_dir=ctx.out / "comparison",
                          alpha=float(ctx.cfg.evaluation.alpha), overwrite=True)
    return {"improvements": surface_verdicts(out["welch"])}


def surface_verdicts(welch_rows: List[dict]) -> Dict[str, Dict[str, str]]:
    """For each candidate, per metric (all structures pooled): ``better (p=...)``,
    ``worse (p=...)`` or ``n.s. (p=...)`` against its baseline at the study's alpha."""
    out: Dict[str, Dict[str, str]] = {}
    for r in welch_rows:
        if r["structure"] != "all":
            continue
        p = r["p"]
        if r["significant"]:
            verdict = "better" if r["candidate_better"] else "worse"
        else:
            verdict = "n.s. " + ("(better mean)" if r["candidate_better"] else "(worse mean)")
        out.setdefault(r["candidate"], {})[r["metric"]] = f"{verdict}, p={p:.2g}" if p == p else verdict
    return out


def compare_inputs(ctx: StudyContext) -> Any:
    return {"alpha": ctx.cfg.evaluation.alpha}


def compare_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.out / "comparison"]


STAGE = Stage("compare", "Welch's t-tests against each baseline, Table 1", run_compare, compare_inputs,
              compare_outputs, ("evaluate",))
