"""``report.md``: the study's results, figures, settings, seeds, software versions and stage times.

Everything in the report is read from the study folder (``study.json``, ``study_state.json``,
``in_domain/``, ``comparison/``, ``quality/``, ``figures/``, ``evaluation/``), so it always describes the files next to it;
links are relative to the study folder.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.study.config_tree import PSEUDO_LABELLERS, SEGMENTERS, StudyConfig
from nnunet_sddm.study.stage_in_domain import INPUTS, ROUND_TRIP_GOAL, read_in_domain
from nnunet_sddm.utilities.files import write_text

SURFACE = ("ASD", "ASSD", "HD", "HD95")

_APPROACH_TEXT = {
    "Baseline": "trained on the real source without augmentation, applied to the original target images",
    "nnU-Net aug": "the same segmenter trained with nnU-Net's standard augmentation (same schedule), applied to the "
                   "original target images",
    "HistMatch": "the baseline segmenter applied to the target images after histogram matching to the source "
                 "training set (Nyul landmark standardisation)",
    "FDA": "the baseline segmenter applied to the target images after Fourier domain adaptation (low-frequency "
           "amplitude of a source training slice)",
    "DA": "the baseline segmenter applied to the SD-DM-adapted target images (test-time adaptation)",
    "DG": "trained on the synthetic source (DG dataset), applied to the original target images",
    "Mixed": "trained on the synthetic source, applied to the adapted target images",
    "UDA-syn": "trained on the real source plus target-style images generated from the source's label maps by a "
               "conditional diffusion model trained on the source and the target pseudo-labelled by a segmenter "
               "trained on the real source (Diffuse-UDA's recipe; the Experiment section names it), applied to "
               "the original target images",
    "Gen-only": "the same segmenter trained on the generated target-style pairs alone (SynCMRI's utility test), "
                "applied to the original target images",
    "DA+ens": "the baseline segmenter; class probabilities of the original and the adapted image averaged "
              "(--ensemble-original)",
    "Mixed+ens": "trained on the synthetic source; probabilities of the original and the adapted image averaged",
}
_POST_TEXT = {"lcc": "the same rows with the largest connected component of each structure kept (post-processing)"}
_TEST_TEXT = {"wilcoxon": "the Wilcoxon signed-rank test", "ttest_rel": "the paired t-test",
              "welch": "Welch's unpaired t-test (the paper's)"}
#: The rows the "in words" summary describes, in order.
_SUMMARY_METRICS = ("DSC",) + SURFACE


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


def _read_csv(path: Path) -> List[Dict[str, Any]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows(ctx) -> List[Dict[str, Any]]:
    """``comparison/tests.csv`` with numbers and booleans parsed."""
    rows = _read_csv(ctx.out / "comparison" / "tests.csv")
    for r in rows:
        for k, v in r.items():
            if v in ("True", "False"):
                r[k] = v == "True"
            elif k not in ("candidate", "baseline", "structure", "metric"):
                try:
                    r[k] = float(v)
                except ValueError:
                    pass
    return rows


def _p(v: float) -> str:
    return "n/a" if not (isinstance(v, float) and math.isfinite(v)) else f"{v:.2g}"


def improvement_summary(ctx) -> List[str]:
    """Markdown lines: per candidate row, the change against its segmenter's baseline in every
    metric (cases pooled over structures), the test behind the verdict after Holm's correction,
    the bootstrap CI of the mean paired difference and, with repeats, their agreement; then the
    same in words for every approach."""
    cfg = ctx.cfg
    rows = [r for r in test_rows(ctx) if r["structure"] == "all"]
    alpha, test = float(cfg.evaluation.alpha), cfg.evaluation.test
    R = cfg.repeats
    lines = [f"Each row against the baseline of the same segmenter on the same target cases (each case's mean "
             f"over its structures; n = cases with a finite value in both{', mean over ' + str(R) + ' repeats' if R > 1 else ''}). "
             f"Cell: mean paired difference (candidate - baseline) [bootstrap 95% CI]; verdict by "
             f"{_TEST_TEXT[test]}, Holm-corrected over the comparisons of the table, p_holm < {alpha:g}"
             + (f"; k/{R}: repeats whose change has the same sign and is significant on their own (Wilcoxon, "
                f"uncorrected)" if R > 1 else "") + ". DSC: higher is better; distances (mm): lower is better. "
             f"Distances when exactly one of prediction and reference is empty: "
             f"{cfg.evaluation.empty_policy.one_empty} (the NaN-policy table below leaves those cases out).", "",
             "| row | " + " | ".join(_SUMMARY_METRICS) + " |", "|---" * (len(_SUMMARY_METRICS) + 1) + "|"]
    by_cand: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        by_cand.setdefault(r["candidate"], {})[r["metric"]] = r
    for cand, ms in by_cand.items():
        cells = []
        for m in _SUMMARY_METRICS:
            r = ms.get(m)
            if r is None or not math.isfinite(r["mean_diff"]):
                cells.append("n/a")
                continue
            tag = ("**better**" if r["candidate_better"] else "**worse**") if r["significant"] else "n.s."
            rep = (f", {int(r['repeats_same_sign_significant'])}/{int(r['repeats'])}" if R > 1 else "")
            cells.append(f"{r['mean_diff']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}] {tag} "
                         f"(p_holm={_p(r['p_holm'])}{rep})")
        lines.append(f"| {cand} | " + " | ".join(cells) + " |")
    words = []
    for a in cfg.approaches():
        if a.name == "Baseline":
            continue
        for seg in cfg.segmenters:
            ms = by_cand.get(f"{a.name}/{SEGMENTERS[seg][2]}", {})
            better = [m for m in _SUMMARY_METRICS if m in ms and ms[m]["significant"] and ms[m]["candidate_better"]]
            worse = [m for m in _SUMMARY_METRICS if m in ms and ms[m]["significant"] and not ms[m]["candidate_better"]]
            lower = [m for m in _SUMMARY_METRICS if m in ms and ms[m]["candidate_better"]]
            words.append(f"- {a.name} / {SEGMENTERS[seg][2]}: significantly better in {', '.join(better) or 'none'}; "
                         f"significantly worse in {', '.join(worse) or 'none'}; better mean in "
                         f"{len(lower)}/{len(_SUMMARY_METRICS)} metrics.")
    return lines + ["", "In words (every approach, every segmenter):", ""] + words


def scope_lines(ctx, data: Dict[str, Any]) -> List[str]:
    """What this run can and cannot show: cases, repeats, training length, tests."""
    cfg = ctx.cfg
    n_t = data.get("target_test_cases", "?")
    subjects = cfg.target.subjects if cfg.target.phantom else None
    epochs = ("the quick test schedule (2 epochs x 5 iterations)" if cfg.epochs == "quick" else
              f"{cfg.epochs} epoch(s) x {cfg.iterations_per_epoch or 250} iterations")
    paper = cfg.epochs != "quick" and int(cfg.epochs) >= 250 and (cfg.iterations_per_epoch or 250) >= 250
    structures = data.get("structures", {})
    plural = "s" if subjects != 1 else ""
    lines = [f"- **Cases.** {n_t} target test cases" + (f" ({subjects} subject{plural}, ED and ES of each: the two "
                                                        f"phases of a subject are not independent)" if subjects else "")
             + ". Every row is evaluated on the same cases, so the comparisons are paired; with few cases only "
               "large effects can reach significance, and a non-significant change is not evidence of no change.",
             f"- **Repeats.** {cfg.repeats} training seed(s) per segmenter ({', '.join(map(str, cfg.seeds()))}). "
             + ("With one repeat the table shows one training run: the variation between training runs, which "
                "can exceed the differences between rows, is not measured." if cfg.repeats == 1 else
                "The diffusion model and the DG dataset are the same in every repeat; only the segmenters are "
                "retrained."),
             f"- **Training length.** Segmenters: {epochs}" + ("" if paper else
                                                            " (shorter than the paper's 250 x 250: the absolute "
                                                            "numbers are not the paper's)") + ".",
             f"- **Tests.** Marks and verdicts use {_TEST_TEXT[cfg.evaluation.test]} with Holm's correction over "
             f"the comparisons of one table, at alpha = {cfg.evaluation.alpha:g}; Welch's p (the paper's test) is "
             f"kept in [comparison/welch.csv](comparison/welch.csv) and [comparison/tests.csv](comparison/tests.csv)."]
    lines += generative_scope_lines(cfg)
    floor = attainable_significance(ctx)
    if floor:
        lines.append(f"- **Smallest attainable p.** {floor}")
    skipped = structures.get("source_only", []) + structures.get("target_only", [])
    if skipped:
        lines.append(f"- **Structures.** Evaluated: {', '.join(structures.get('shared', []))}; skipped (labelled in "
                     f"only one of the datasets): {', '.join(skipped)}.")
    return lines


def generative_scope_lines(cfg: StudyConfig) -> List[str]:
    """The scope bullet of the generative rows (none without them): one training run of the
    conditional model."""
    if not cfg.generative.rows:
        return []
    seed = cfg.generative.overrides["training.seed"]
    return [f"- **Generative model.** The conditional diffusion model of UDA-syn and Gen-only is trained once "
            f"(seed {seed}), whatever the repeats: the generated pairs, their mask adherence and those two rows "
            f"rest on one training run of it. The sd of the adherence is over cases; the variation between "
            f"training runs of the model is not measured, and a second seed can move the adherence more than a "
            f"change of setting does."]


def attainable_significance(ctx) -> str:
    """A sentence on the smallest Holm-adjusted p this design can reach: with n paired cases the
    exact two-sided Wilcoxon p is at least 2 / 2^n, and Holm multiplies the smallest p of a table
    by its number of comparisons m (empty if the marks' test is not Wilcoxon or nothing was compared)."""
    if ctx.cfg.evaluation.test != "wilcoxon":
        return ""
    rows = [r for r in test_rows(ctx) if r["structure"] == "all"]
    ns = [int(r["n"]) for r in rows if isinstance(r["n"], float) and r["n"] >= 2]
    if not ns:
        return ""
    n, m, alpha = max(ns), len(rows), float(ctx.cfg.evaluation.alpha)
    p_min = 2.0 / 2 ** n
    holm_min = min(1.0, m * p_min)
    verdict = ("so no row can be marked significant in this run, whatever its effect: more cases (or fewer "
               "comparisons) are needed" if holm_min >= alpha else
               "so only effects with (nearly) every case changing in one direction can be marked significant")
    return (f"With n = {n} paired cases the exact two-sided Wilcoxon p is at least 2/2^{n} = {p_min:.2g}; Holm "
            f"over the m = {m} comparisons of the pooled table makes the smallest adjusted p {holm_min:.2g} "
            f"(alpha = {alpha:g}), {verdict}. The unadjusted p-values and the bootstrap CIs of the changes are in "
            f"the table below and in comparison/tests.csv.")


def missing_lines(ctx) -> List[str]:
    """The missing/spurious structure table (``comparison/missing.md``) and its figure."""
    md = ctx.out / "comparison" / "missing.md"
    if not md.is_file():
        return []
    first = sorted((ctx.out / "figures").glob("missing_*.png"))[:1]
    fig = (f"![missing and spurious structures]({_rel(ctx, first[0])})" if first else
           "![missing and spurious structures](comparison/fig_missing.png)")
    return [md.read_text().strip(), "", fig, ""]


_TRAINED_ON = {"real": "real source", "real_aug": "real source, nnU-Net aug", "synthetic": "synthetic source (DG)",
               "uda_syn": "real source + generated target-style (UDA-syn)",
               "gen_only": "generated target-style (Gen-only)"}
_ROUND_TRIP = {"original": "as they are", "geometry": "geometric round trip (the model's data path alone, no diffusion)",
               "adapted": "SD-DM round trip (adapted with the study's sampler)"}


def in_domain_lines(ctx) -> List[str]:
    """The in-domain Dice of every segmenter and the source round trip of the baselines
    (``in_domain/in_domain.csv``, mean over repeats); without held-out source cases, a sentence
    saying so."""
    rows = read_in_domain(ctx)
    if not rows:
        return ["No held-out source cases (the source has no imagesTs with labelsTs; phantoms: "
                "`source.test_subjects`), so neither the in-domain Dice nor the source round trip was measured.", ""]
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    mean: Dict[tuple, float] = {}
    for key in dict.fromkeys((r["segmenter"], r["trained_on"], r["input"], r["structure"]) for r in rows):
        vals = [float(r["dice"]) for r in rows if (r["segmenter"], r["trained_on"], r["input"], r["structure"]) == key]
        mean[key] = sum(vals) / len(vals)
    n = rows[0]["cases"]
    head = "| segmenter | trained on | " + " | ".join(structures) + " |"
    sep = "|---|---|" + "---|" * len(structures)
    L = [f"{n} held-out cases of the source domain (`imagesTs` of `{ctx.dataset_name('source')}`), Dice per structure "
         f"(`all`: the mean over structures per case), mean over {ctx.cfg.repeats} repeat(s); in "
         f"[in_domain/in_domain.csv](in_domain/in_domain.csv). Did the segmenters learn?", "", head, sep]
    models = list(dict.fromkeys((r["segmenter"], r["trained_on"]) for r in rows))
    for seg, kind in models:
        L.append(f"| {SEGMENTERS[seg][2]} | {_TRAINED_ON[kind]} | "
                 + " | ".join(f"{mean[(seg, kind, 'original', s)]:.3f}" for s in structures) + " |")
    L += ["", "**The source round trip.** Adapting images of the source domain should change nothing a segmenter "
              "cares about: the baseline segmenters on the same held-out source cases after each round trip, with "
              f"the Dice lost against the original images (goal: at most {ROUND_TRIP_GOAL:g} per structure).", "",
          "| segmenter | input | " + " | ".join(structures) + " | largest loss |", sep + "---|"]
    for seg in dict.fromkeys(r["segmenter"] for r in rows if r["trained_on"] == "real"):
        for inp in INPUTS:
            if (seg, "real", inp, structures[0]) not in mean:
                continue
            cells, losses = [], []
            for s in structures:
                v = mean[(seg, "real", inp, s)]
                loss = mean[(seg, "real", "original", s)] - v
                cells.append(f"{v:.3f}" if inp == "original" else f"{v:.3f} ({-loss:+.3f})")
                losses.append(loss)
            worst = "" if inp == "original" else (f"{max(losses):.3f}" + (" (goal met)" if max(losses) <= ROUND_TRIP_GOAL
                                                                           else " (above the goal)"))
            L.append(f"| {SEGMENTERS[seg][2]} | {_ROUND_TRIP[inp]} | " + " | ".join(cells) + f" | {worst} |")
    return L + [""]


def quality_lines(ctx) -> List[str]:
    """One row per quality report (``quality/<set>/quality.json``): paired fidelity, the Frechet
    distance to the source training set against the real images', the privacy flags and the
    membership AUC."""
    from nnunet_sddm.study.stage_quality import SETS, quality_dir

    L = ["Fidelity, privacy and utility of every image set the study made, in full in `quality/<set>/quality.md`. "
         "SSIM / PSNR: each synthetic slice against the real slice it was made from; FD: Fréchet distance of the 22 "
         "image features to the diffusion model's training slices, for the set, for the real images it was made "
         "from (when they are not the training slices themselves) and for unseen real source slices (the reference); likely copies / memorised: synthetic slices that nearly duplicate a training slice / whose nearest "
         "training slice is much nearer than the second (NNDR < 0.6), with the rate of held-out real slices in "
         "brackets (the flags' false-positive rate); MIA AUC: membership inference against the diffusion model "
         "(0.5: no measurable leakage).", "",
         "| set | pairs | SSIM | PSNR (dB) | FD to training set: set / its inputs / unseen real | likely copies | memorised | "
         "MIA AUC (95% CI) |", "|---|---|---|---|---|---|---|---|"]
    found = False
    for key, title in SETS.items():
        path = quality_dir(ctx) / key / "quality.json"
        if not path.is_file():
            continue
        found = True
        q = json.loads(path.read_text())
        p = q.get("paired", {})
        fd = {r["comparison"]: r["frechet"] for r in q.get("distances", []) if r["space"].startswith("image")}
        pr = q.get("privacy") or {}
        syn, held = pr.get("synthetic", {}), pr.get("heldout", {})

        def rate(d: dict, k: str, ref: dict) -> str:
            if k not in d:
                return "n/a"
            return f"{100 * d[k]:.1f}%" + (f" ({100 * ref[k]:.1f}%)" if k in ref else "")

        m = q.get("membership")
        mia = f"{m['auc']:.3f} ({m['ci_low']:.3f} to {m['ci_high']:.3f})" if m else "not measured"
        num = lambda st: "n/a" if not st or not st.get("n") else (  # noqa: E731
            "inf" if st["mean"] == "inf" else f"{st['mean']:.3f}")
        fd_text = " / ".join(f"{fd[k]:.2f}" if k in fd else "-"
                             for k in ("synthetic vs train", "real vs train", "held-out vs train"))
        L.append(f"| [{title}](quality/{key}/quality.md) | {p.get('pairs', 0)} | {num(p.get('ssim'))} | "
                 f"{num(p.get('psnr'))} | {fd_text} | {rate(syn, 'likely_copy', held)} | "
                 f"{rate(syn, 'memorised_pixel', held)} | {mia} |")
    return (L if found else ["The quality stage wrote no report."]) + [""]


def generative_lines(ctx) -> List[str]:
    """The generative rows' datasets (Experiment section; empty without ``generative.rows``)."""
    gen = ctx.cfg.generative
    if not gen.rows:
        return []
    return [f"- Generative rows: the target `{ctx.dataset_name('target')}` pseudo-labelled by the "
            f"{SEGMENTERS[ctx.cfg.segmenters[0]][2]} of the {PSEUDO_LABELLERS[gen.pseudo_labeller][0]} row "
            f"(`{ctx.dataset_name('pseudo')}`); one conditional diffusion "
            f"model trained on the source and those cases with domains source/target "
            f"([generative_model](generative_model/config.json)); {gen.copies} target-style image(s) per source "
            f"label map ({gen.labels}, guidance scale {gen.guidance_scale:g}) in `{ctx.dataset_name('generated')}` "
            f"(Gen-only's training set), with the real source cases in `{ctx.dataset_name('merged')}` (UDA-syn's)."]


def adherence_lines(ctx) -> List[str]:
    """Mask adherence of the generated images (``adherence/adherence.json``): Dice per structure of
    the measuring segmenter's segmentation against the label maps, or why it was not measured."""
    path = ctx.out / "adherence" / "adherence.json"
    if not path.is_file():
        return ["The adherence stage wrote no record.", ""]
    L = ["Does a generated image show the label map it was generated from? A segmenter trained on real labelled "
         "cases of the generated images' domain segments every generated image (target-style images: the oracle "
         "trained on the target's labelled cases, never a table row; the DG dataset: the Baseline); Dice per "
         "structure against the label map (mean, sd, n cases). Details in `adherence/<set>/`.", ""]
    for entry in json.loads(path.read_text())["sets"].values():
        if not entry["measurable"]:
            L += [f"- `{entry['dataset']}` ({entry['domain']}-style): {entry['reason']}"]
            continue
        seg = entry["segmenter"]
        L += [f"`{entry['dataset']}` ({entry['domain']}-style, {entry['n_cases']} cases; segmented by "
              f"`{seg['dataset']}` {seg['trainer']} {seg['configuration']}, folds {seg['folds']}):", "",
              "| structure | DSC mean | DSC sd | n |", "|---|---|---|---|"]
        for s, d in entry["structures"].items():
            L.append(f"| {s} | " + " | ".join("n/a" if d[k] is None else f"{d[k]:.3f}" for k in ("mean", "sd"))
                     + f" | {d['n']} |")
        L.append("")
    return L + [""]


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
          *generative_lines(ctx),
          "- Segmenters: " + "; ".join(f"{SEGMENTERS[s][2]} (`{SEGMENTERS[s][0]}`, `{cfg.trainer(s)}`"
                                         + (f", with augmentation `{cfg.trainer(s, augmented=True)}`"
                                            if "real_aug" in cfg.kinds() else "") + f", fold {cfg.fold})"
                                         for s in cfg.segmenters)
          + ". At inference no row uses mirroring test-time augmentation.",
          "- Rows: " + "; ".join(f"**{a.name}**: {_APPROACH_TEXT[a.name]}" for a in cfg.approaches()
                                 if a.postprocess is None)
          + (f"; **+{cfg.postprocess.upper()}**: {_POST_TEXT[cfg.postprocess]}" if cfg.postprocess else "") + ".", "",
          "## What this run can and cannot show", ""] + scope_lines(ctx, data) + [""]
    L += ["## In-domain test and the source round trip", ""] + in_domain_lines(ctx)

    # ---- the table
    comp = out / "comparison"
    L += ["## Results (Table 1)", "", (comp / "table.md").read_text().strip(), "",
          "Per structure: " + ", ".join(f"[{p.stem.replace('table_', '')}](comparison/{p.name})"
                                        for p in sorted(comp.glob("table_*.md")) if "finite" not in p.stem) +
          "; CSV and LaTeX next to them; per-case values in `evaluation/seed<S>/<approach>__<segmenter>/per_case.csv`; "
          "every test in [comparison/tests.csv](comparison/tests.csv).", ""]
    if (comp / "table_finite.md").is_file():
        L += ["### The same with the NaN policy", "",
              "Distances of a structure missing from the prediction (or spurious) are left out instead of the "
              "penalty; each cell shows how many cases remain.", "", (comp / "table_finite.md").read_text().strip(), ""]
    L += ["### Missing and spurious structures", ""] + missing_lines(ctx)
    L += ["## Which rows changed against the baseline?", ""] + improvement_summary(ctx) + [""]
    L += ["## Quality of the synthetic and adapted images", ""] + quality_lines(ctx)
    if cfg.generative.rows:
        L += ["## Mask adherence of the generated images", ""] + adherence_lines(ctx)

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
        L += ["95% CI bar charts per segmenter: " + ", ".join(f"[{Path(b).stem}]({_rel(ctx, Path(b))})" for b in bars
                                                        if not Path(b).name.startswith("missing_"))
              + "; all rows together: " + ", ".join(f"[{p.stem}](comparison/{p.name})"
                                                   for p in sorted((out / "comparison").glob("fig_*.png"))) + ".", ""]
        missing = [b for b in bars if Path(b).name.startswith("missing_")]
        if missing:
            L += ["Missing and spurious structures per segmenter: " + ", ".join(
                f"[{Path(b).stem}]({_rel(ctx, Path(b))})" for b in missing) + ".", ""]
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
        if not ctx.runner.is_enabled(name, ctx):
            continue
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
    seeds.append(f"segmenter training seed(s) {', '.join(map(str, cfg.seeds()))} (one per repeat; nnUNet_sddm_seed: "
                 f"network initialisation, data loading and augmentation; bit-identical on the CPU with "
                 f"single-threaded augmentation, not on CUDA)")
    if cfg.alternatives.fda:
        seeds.append(f"FDA: source slice choices seeded with {cfg.seed} and the case id "
                     f"(`adapted/fda/adaptation.json` lists them)")
    if cfg.generative.rows:
        seeds.append(f"generative rows: conditional diffusion model trained with `training.seed` "
                     f"{cfg.generative.overrides.get('training.seed')}; generated copy k sampled with seed "
                     f"{sampler_seed} + k (label-map deformations seeded from it and the case; "
                     f"`{ctx.dataset_name('generated')}/cases.json` records them)")
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
