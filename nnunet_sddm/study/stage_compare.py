"""Stage ``compare``: every row against its segmenter's baseline, over the same target cases and
the mean over repeats: paired tests (Wilcoxon signed-rank, paired t), Holm correction over the
comparisons of one table, mean paired differences with seeded bootstrap 95% CIs, the agreement
between repeats, Welch's test (the paper's), missing/spurious structure counts, Table 1 (Markdown,
CSV, LaTeX; also with the NaN policy) and bar charts, into ``OUT/comparison/``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.evaluation.compare import compare_results
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stages import Stage


def run_compare(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Tests of every row against its baseline; the tables; the missing-structure counts."""
    ev = ctx.cfg.evaluation
    sources = [(e.name, [ctx.evaluation_dir(e.approach.name, e.segmenter, s) for s in ctx.cfg.seeds()])
               for e in ctx.entries()]
    baselines = [(n, s) for n, s in sources if n.startswith("Baseline/")]
    candidates = [(n, s) for n, s in sources if not n.startswith("Baseline/")]
    out = compare_results(baselines, candidates, out_dir=ctx.out / "comparison", alpha=float(ev.alpha),
                          overwrite=True, test=ev.test, seed=ctx.cfg.seed)
    return {"improvements": surface_verdicts(out["tests"])}


def surface_verdicts(test_rows: List[dict]) -> Dict[str, Dict[str, str]]:
    """For each candidate, per metric (all structures pooled): ``better``, ``worse`` or ``n.s.``
    against its baseline by the table's test after Holm's correction, with the adjusted p."""
    out: Dict[str, Dict[str, str]] = {}
    for r in test_rows:
        if r["structure"] != "all":
            continue
        p = r["p_holm"]
        if r["significant"]:
            verdict = "better" if r["candidate_better"] else "worse"
        else:
            verdict = "n.s. " + ("(better mean)" if r["candidate_better"] else "(worse mean)")
        out.setdefault(r["candidate"], {})[r["metric"]] = f"{verdict}, p_holm={p:.2g}" if p == p else verdict
    return out


def compare_inputs(ctx: StudyContext) -> Any:
    return {"alpha": ctx.cfg.evaluation.alpha, "test": ctx.cfg.evaluation.test, "seed": ctx.cfg.seed}


def compare_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.out / "comparison"]


STAGE = Stage("compare", "paired tests against each baseline (Holm), Table 1, missing structures", run_compare,
              compare_inputs, compare_outputs, ("evaluate",))
