"""``report.md``: the study's results, figures, settings, seeds, software versions and stage times.

Everything in the report is read from the study folder (``study.json``, ``study_state.json``,
``comparison/``, ``figures/``, ``evaluation/``), so it always describes the files next to it;
links are relative to the study folder.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.study.config_tree import APPROACHES, SEGMENTERS
from nnunet_sddm.utilities.files import write_text

SURFACE = ("ASD", "ASSD", "HD", "HD95")

_APPROACH_TEXT = {
    "Baseline": "trained on the real source, applied to the original target images",
    "DA": "trained on the real source, applied to the adapted target images (test-time adaptation)",
    "DG": "trained on the synthetic source (DG dataset), applied to the original target images",
    "Mixed": "trained on the synthetic source, applied to the adapted target images",
    "DA+ens": "trained on the real source; class probabilities of the original and the adapted image averaged "
              "(--ensemble-original)",
    "Mixed+ens": "trained on the synthetic source; probabilities of the original and the adapted image averaged",
}


def _rel(ctx, p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ctx.out))
    except ValueError:
        return str(p)


def _fmt_seconds(s) -> str:
    if s is None:
        return "-"
    s = float(s)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def welch_rows(ctx) -> List[Dict[str, Any]]:
    path = ctx.out / "comparison" / "welch.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("mean_candidate", "mean_baseline", "p"):
            r[k] = float(r[k])
        r["significant"] = r["significant"] == "True"
        r["candidate_better"] = r["candidate_better"] == "True"
    return rows


def improvement_summary(ctx) -> List[str]:
    """Markdown lines: per segmenter and candidate approach, which surface metrics (per-case means
    over the structures) changed significantly against the baseline, and the Dice change."""
    rows = [r for r in welch_rows(ctx) if r["structure"] == "all"]
    alpha = float(ctx.cfg.evaluation.alpha)
    lines = [f"Welch's t-test against the baseline of the same segmenter over per-case values (each case's "
             f"mean over its structures; n = cases), significance p < {alpha:g}. Surface metrics: lower is "
             f"better. Distances when exactly one of prediction and reference is empty: "
             f"{ctx.cfg.evaluation.empty_policy.one_empty}.", "",
             "| candidate | " + " | ".join(SURFACE) + " | DSC |", "|---" * (len(SURFACE) + 2) + "|"]
    by_cand: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        by_cand.setdefault(r["candidate"], {})[r["metric"]] = r
    for cand, ms in by_cand.items():
        cells = []
        for m in SURFACE + ("DSC",):
            r = ms.get(m)
            if r is None:
                cells.append("-")
                continue
            d = r["mean_candidate"] - r["mean_baseline"]
            tag = ("**better**" if r["candidate_better"] else "worse") if r["significant"] else "n.s."
            p = "n/a" if not math.isfinite(r["p"]) else f"{r['p']:.2g}"
            cells.append(f"{d:+.3g} ({tag}, p={p})")
        lines.append(f"| {cand} | " + " | ".join(cells) + " |")
    verdicts = []
    for seg in ctx.cfg.segmenters:
        label = SEGMENTERS[seg][2]
        for a in ("DA", "Mixed", "DA+ens", "Mixed+ens"):
            ms = by_cand.get(f"{a}/{label}", {})
            better = [m for m in SURFACE if m in ms and ms[m]["significant"] and ms[m]["candidate_better"]]
            worse = [m for m in SURFACE if m in ms and ms[m]["significant"] and not ms[m]["candidate_better"]]
            lower = [m for m in SURFACE if m in ms and ms[m]["candidate_better"]]
            verdicts.append(f"- {a} / {label}: significantly better {', '.join(better) or 'none'}; significantly "
                            f"worse {', '.join(worse) or 'none'}; lower mean in {len(lower)}/{len(SURFACE)} "
                            f"surface metrics.")
    return lines + ["", "In words:", ""] + verdicts


def write_report(ctx) -> Path:
    """Write ``OUT/report.md`` and return its path."""
    out = ctx.out
    record = json.loads((out / "study.json").read_text())
    state = json.loads((out / "study_state.json").read_text())["stages"]
    cfg = ctx.cfg
    L: List[str] = []
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    L += [f"# SD-DM study `{cfg.name}`", "",
          f"Generated {now} by nnunet-sddm {record['package_version']} on {record['hardware'].get('cpu_count')} "
          f"CPU core(s)" + (f" and {', '.join(record['hardware']['gpus'])}" if record["hardware"].get("gpus") else "")
          + f"; device `{ctx.device}`. Study folder: `{out}`.", ""]

    # ---- datasets and what was compared
    data = state.get("data", {}).get("result", {})
    L += ["## Experiment", "",
          f"- Source domain: `{ctx.dataset_name('source')}` ({data.get('source_training_cases', '?')} training "
          f"cases) trains the diffusion model and the segmenters.",
          f"- Target test set: `{ctx.dataset_name('target')}` images{cfg.target.split} / "
          f"labels{cfg.target.split} ({data.get('target_test_cases', '?')} cases).",
          f"- DG dataset: `{ctx.dataset_name('synthetic')}` (source training images adapted by the diffusion "
          f"model, original labels, {cfg.synthesis.copies} cop{'y' if cfg.synthesis.copies == 1 else 'ies'}).",
          "- Segmenters: " + "; ".join(f"{SEGMENTERS[s][2]} (`{SEGMENTERS[s][0]}`, `{cfg.trainer(s)}`, fold "
                                         f"{cfg.fold})" for s in cfg.segmenters) + ".",
          "- Approaches: " + "; ".join(f"**{a}**: {_APPROACH_TEXT[a]}" for a in APPROACHES) + ".", ""]

    # ---- the table
    table = out / "comparison" / "table.md"
    L += ["## Results (Table 1)", "", table.read_text().strip(), "",
          "Per structure: " + ", ".join(f"[{p.stem.replace('table_', '')}](comparison/{p.name})"
                                        for p in sorted((out / "comparison").glob("table_*.md"))) +
          "; CSV and LaTeX next to them; per-case values in `evaluation/<approach>__<segmenter>/per_case.csv`; "
          "all t-tests in [comparison/welch.csv](comparison/welch.csv).", ""]
    L += ["## Did adaptation improve the surface metrics?", ""] + improvement_summary(ctx) + [""]

    # ---- figures
    figs = state.get("figures", {}).get("result", {})
    L += ["## Figures", ""]
    if figs.get("sweep"):
        sw = figs["sweep"]
        L += [f"Sweep grid of the middle slice of target case `{sw['case']}` (rows: N, tau; columns: reference, "
              f"then D = {', '.join(map(str, sw['D']))}):", "", "![sweep grid](figures/sweep.png)", ""]
    if figs.get("domain_shift"):
        ds = figs["domain_shift"]
        pairs = "; ".join(f"{k}: {v:.2f}" if isinstance(v, (int, float)) and v == v else f"{k}: n/a"
                          for k, v in ds.get("pairwise_separability", {}).items())
        L += ["t-SNE of 22 DSMRI image features per volume. Random-forest domain separability (balanced "
              f"accuracy, subject-grouped CV; 0.5 = indistinguishable): {pairs}.", "",
              "![t-SNE](figures/domain_shift/tsne.png)", ""]
    bars = figs.get("ci_bars", [])
    if bars:
        L += ["95% CI bar charts per segmenter: " + ", ".join(f"[{Path(b).stem}]({_rel(ctx, Path(b))})" for b in bars)
              + "; all rows together: " + ", ".join(f"[{p.stem}](comparison/{p.name})"
                                                   for p in sorted((out / "comparison").glob("fig_*.png"))) + ".", ""]
        first = [b for b in bars if b.endswith("_HD95.png")][:1]
        if first:
            L += [f"![CI bars]({_rel(ctx, Path(first[0]))})", ""]
    if (ctx.model_dir / "samples.png").is_file():
        L += [f"Diffusion model: [samples]({_rel(ctx, ctx.model_dir / 'samples.png')}), "
              f"[loss curve]({_rel(ctx, ctx.model_dir / 'progress.png')}).", ""]

    # ---- stages
    L += ["## Stages", "", "| stage | wall time | CPU time | finished (UTC) | result |", "|---|---|---|---|---|"]
    total = cpu_total = 0.0
    for name in ctx.runner.names:
        rec = state.get(name, {})
        if name == "report":
            L.append("| report | (this file) | | | |")
            continue
        done = rec.get("status") == "done"
        sec, cpu = (rec.get("seconds"), rec.get("cpu_seconds")) if done else (None, None)
        total += float(sec or 0)
        cpu_total += float(cpu or 0)
        res = json.dumps(rec.get("result", {}), sort_keys=True)
        res = res if len(res) <= 160 else res[:157] + "..."
        L.append(f"| {name} | {_fmt_seconds(sec)} | {_fmt_seconds(cpu)} | {rec.get('finished', '-')} | `{res}` |")
    L += ["", f"Total wall time of the stages: {_fmt_seconds(total)}; CPU time {_fmt_seconds(cpu_total)} (this "
              f"process and nnU-Net's subprocesses; a stage resumed after an interruption counts all its runs).",
          "", "Logs of nnU-Net's commands: `logs/`.", ""]

    # ---- seeds, settings, software
    sampler_seed = cfg.sampler.settings.seed
    seeds = [f"study seed {cfg.seed} (diffusion training seed: `training.seed` below)",
             f"sampler seed {sampler_seed} (per-slice random streams; DG copy k uses seed {sampler_seed} + k)"]
    for side in ("source", "target"):
        d = cfg.side(side)
        if d.phantom:
            seeds.append(f"{side} phantoms: vendor {d.phantom}, seed {d.seed}")
    seeds.append(f"segmenter training seed {cfg.seed} (nnUNet_sddm_seed: network initialisation and data loading; "
                 f"bit-identical on the CPU with single-threaded augmentation, not on CUDA)")
    try:
        dcfg = json.loads((ctx.model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        dcfg = {}
    L += ["## Seeds", ""] + [f"- {x}" for x in seeds] + [""]
    L += ["## Settings", "", "The complete study configuration (also in [study.json](study.json)):", "",
          "```json", json.dumps(cfg.to_dict(), indent=2), "```", ""]
    if dcfg:
        L += ["Diffusion model configuration (`" + _rel(ctx, ctx.model_dir / "config.json") + "`):", "",
              "```json", json.dumps(dcfg, indent=2), "```", ""]
    L += ["## Software", "", "| package | version |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in record["software"].items()]
    L += [""]
    path = out / "report.md"
    write_text("\n".join(L), path)
    return path
