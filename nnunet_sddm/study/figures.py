"""Figures of a study, drawn with the project's APIs.

* ``sweep.png``: the paper's Fig. 3-5 grid (``adaptation.sweep.sweep_grid``) of the middle slice of
  one target test image over the configured D, N and tau values;
* ``domain_shift/``: 22 DSMRI features, t-SNE and random-forest separability
  (``evaluation.domain_shift``) of the real source, the synthetic source (DG), the target, the
  adapted target (DA) and the target standardised by the alternatives (histogram matching, FDA),
  plus the pairwise separability of each from the source (lower = closer to the source domain);
* ``ci_<segmenter>_<metric>.png``: Fig.-7-style bars (mean, 95% CI, per structure) of every row
  without post-processing for one segmenter (``evaluation.figures.bar_chart_ci``; empty-mask
  penalties counted above the bars, not averaged into them);
* ``missing_<segmenter>.png``: per row without post-processing and structure, the cases where the
  structure is missing from the prediction or spurious (``evaluation.figures.count_chart``);
* ``generated_pairs.png`` (generative rows): for three source label maps, the map, the map the
  images were generated from (its deformed copy, or the map itself with ``generative.labels``
  "as-is"), and the images the conditional model generates from it in the source and the target
  domain with the same noise (``generated_pair_panels``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from nnunet_sddm.adaptation.sweep import sweep_grid
from nnunet_sddm.adaptation.synthesize_labels import LabelSampler
from nnunet_sddm.data.raw_dataset import FILE_ENDING, list_images, load_cases_json, load_dataset_json
from nnunet_sddm.data.volumes import read_volume
from nnunet_sddm.evaluation.compare import Entry, structure_counts
from nnunet_sddm.evaluation.domain_shift import domain_shift, separability
from nnunet_sddm.evaluation.evaluate import load_results
from nnunet_sddm.evaluation.figures import bar_chart_ci, count_chart, label_image_grid
from nnunet_sddm.evaluation.image_features import FEATURE_NAMES
from nnunet_sddm.evaluation.io import labels_from_dataset_json
from nnunet_sddm.study.config_tree import SEGMENTERS
from nnunet_sddm.study.stage_generative_model import generative_model_dir
from nnunet_sddm.utilities.errors import SDDMError

#: The domain-shift figure's name of the generated target-style images (``generative.rows``).
GENERATED_SET = "generated target-style (Gen-only)"
#: Metrics drawn as per-segmenter CI bar charts.
BAR_METRICS = ("DSC", "ASSD", "HD95")


def sweep_figure(ctx, out_png: Path) -> Dict[str, Any]:
    """The sweep grid of one target test image (``figures.sweep.case``, default the first)."""
    sw = ctx.cfg.figures.sweep
    images = list_images(ctx.target_images)
    case = sw.case or sorted(images)[0]
    if case not in images:
        raise SDDMError(f"figures.sweep.case {case!r} is not a target test case ({', '.join(sorted(images)[:5])}, ...)")
    sweep_grid(images[case], ctx.model_dir, out_png, Ds=list(sw.D), Ns=list(sw.N), taus=list(sw.tau),
               slice_index=sw.slice, base=ctx.cfg.sampler.settings, device=ctx.device, amp=ctx.cfg.sampler.amp,
               progress=ctx.progress)
    return {"png": str(out_png), "case": case, "D": list(sw.D), "N": list(sw.N), "tau": list(sw.tau)}


def domain_shift_figure(ctx, out_dir: Path) -> Dict[str, Any]:
    """t-SNE of the four image sets and the separability of the pairs that matter."""
    sets = {"source": ctx.raw("source") / "imagesTr",
            "synthetic source (DG)": ctx.folders["raw"] / ctx.dataset_name("synthetic") / "imagesTr",
            "target": ctx.target_images,
            "adapted target (DA)": ctx.adapted,
            "target, histogram-matched": ctx.input_images("histmatch") if ctx.cfg.alternatives.histmatch else None,
            "target, FDA": ctx.input_images("fda") if ctx.cfg.alternatives.fda else None,
            GENERATED_SET: ctx.raw("generated") / "imagesTr" if ctx.cfg.generative.rows else None}
    sets = {k: v for k, v in sets.items() if v is not None and Path(v).is_dir()}
    res = domain_shift(sets, out_dir=out_dir, overwrite=True, seed=ctx.cfg.seed,
                       num_processes=ctx.cfg.evaluation.num_processes, progress=ctx.progress)
    rows = res["features"]
    pairs = {}
    for a, b in (("source", "target"), ("source", "adapted target (DA)"), ("source", "synthetic source (DG)"),
                 ("source", "target, histogram-matched"), ("source", "target, FDA"), ("target", GENERATED_SET)):
        sel = [r for r in rows if r["domain"] in (a, b)]
        if len({r["domain"] for r in sel}) < 2:
            continue
        X = np.array([[r[k] for k in FEATURE_NAMES] for r in sel], dtype=np.float64)
        subjects = [_subject(r["case"]) for r in sel]
        groups = None if None in subjects else [f"{r['domain']}:{g}" for r, g in zip(sel, subjects)]
        sep = separability(X, [r["domain"] for r in sel], seed=ctx.cfg.seed, groups=groups)
        pairs[f"{a} vs {b}"] = sep.get("separability")
    return {"tsne_png": str(out_dir / "tsne.png"), "separability_all": res["separability"].get("separability"),
            "pairwise_separability": pairs}


def _subject(case: str):
    """Subject of an ``<subject>_ED`` / ``<subject>_ES`` case (also ``..._syn<k>``, ``..._gen<k>``), else
    None: ED and ES of one subject are near-twins and must stay in one cross-validation fold."""
    m = re.match(r"^(.+)_(ED|ES)(_syn\d+|_gen\d+)?$", case)
    return m.group(1) if m else None


def ci_bars(ctx, out_dir: Path) -> List[str]:
    """One bar chart per segmenter and metric in ``BAR_METRICS``: every row without post-processing,
    per structure; per-case values are means over the repeats; cases with an empty-mask penalty are
    counted above their bar instead of entering its mean (``bar_chart_ci``)."""
    files = []
    for seg in ctx.cfg.segmenters:
        entries = [Entry(name=e.approach.name, approach=e.approach.name, model=SEGMENTERS[seg][2],
                         repeats=[load_results(ctx.evaluation_dir(e.approach.name, seg, s)) for s in ctx.cfg.seeds()])
                   for e in ctx.entries() if e.segmenter == seg and e.approach.postprocess is None]
        structures = entries[0].repeats[0].structures
        for metric in BAR_METRICS:
            samples = {e.name: {st: e.pooled(st, metric)[1] for st in structures} for e in entries}
            penalised = {e.name: {st: e.penalised(st, metric) for st in structures} for e in entries}
            out = out_dir / f"ci_{seg}_{metric}.png"
            repeats = f", mean over {ctx.cfg.repeats} repeats" if ctx.cfg.repeats > 1 else ""
            bar_chart_ci(samples, metric, out, penalised=penalised,
                         title=f"{SEGMENTERS[seg][2]}: {metric} per structure (mean, 95% CI{repeats})")
            files.append(str(out))
        counts = {e.name: {r["structure"]: r for r in structure_counts(e) if r["structure"] != "all"} for e in entries}
        out = out_dir / f"missing_{seg}.png"
        count_chart(counts, out, title=f"{SEGMENTERS[seg][2]}: cases with a structure missing from the prediction "
                                       f"(reference has it) or spurious (reference lacks it)")
        files.append(str(out))
    return files


def generated_pair_panels(ctx, num_cases: int = 3) -> List[Dict[str, Any]]:
    """For ``num_cases`` label maps of the generated dataset (copy 0; one per subject first, in
    order of case name): the slice ``z`` with the most foreground of the conditioning map, as
    ``{"case", "z", "labels", "label", "conditioning", "source_style", "target_style"}`` (maps
    ``(h, w)`` int: the source's label map and the one the image was generated from, deformed or
    as it is per ``labels``; images ``(h, w)`` in [0, 1]).

    ``target_style`` is the generated dataset's image (UDA-syn's and Gen-only's training data);
    ``source_style`` is sampled now by the same model from the same map with the same random
    streams (the record's seed, key ``label_map``), only the domain token set to "source"."""
    src, gen = ctx.raw("source"), ctx.raw("generated")
    first = sorted((r for r in load_cases_json(gen) if r.get("copy") == 0), key=lambda r: r["case"])
    by_subject = list({str(r.get("subject", r["case"])): r for r in reversed(first)}.values())[::-1]
    records = (by_subject + [r for r in first if r not in by_subject])[:num_cases]
    if not records:
        raise SDDMError(f"{gen / 'cases.json'}: no generated cases to draw")
    sampler = LabelSampler.open(generative_model_dir(ctx), int(records[0]["steps"]),
                                float(records[0]["guidance_scale"]), "source", device=ctx.device,
                                batch_size=ctx.cfg.sampler.batch_size, progress=False)
    maps = {r["label_map"]: read_volume(gen / "labelsTr" / f"{r['case']}{FILE_ENDING}") for r in records}
    seeds = {int(r["seed"]) for r in records}
    if len(seeds) != 1:
        raise SDDMError(f"{gen / 'cases.json'}: copy 0 of the drawn cases has seeds {sorted(seeds)}; expected one")
    source = dict(sampler.iter_generated([(k, v.data, v.spacing) for k, v in maps.items()], seeds.pop()))
    out = []
    for r in records:
        cond = maps[r["label_map"]]
        label = read_volume(src / "labelsTr" / f"{r['label_map']}{FILE_ENDING}").data
        target = read_volume(gen / "imagesTr" / f"{r['case']}_0000{FILE_ENDING}").data
        z = int(np.argmax((np.rint(cond.data) != 0).reshape(cond.data.shape[0], -1).sum(axis=1)))
        out.append({"case": r["case"], "z": z, "labels": r.get("labels"), "label": np.rint(label[z]).astype(np.int64),
                    "conditioning": np.rint(cond.data[z]).astype(np.int64),
                    "source_style": source[r["label_map"]][z], "target_style": target[z]})
    return out


def generated_pairs_figure(ctx, out_png: Path) -> Dict[str, Any]:
    """``generated_pairs.png``: ``generated_pair_panels`` side by side, one case per row."""
    panels = generated_pair_panels(ctx)
    labels = labels_from_dataset_json(load_dataset_json(ctx.raw("source")), str(ctx.raw("source") / "dataset.json"))
    by_value = sorted((v, k) for k, v in labels.items())
    deformed = panels[0]["labels"] == "deformed"  # as the generated dataset's records say
    columns = ("label map", "deformed label map" if deformed else "label map (as it is)", "generated, source style",
               "generated, target style")
    label_image_grid([[p["label"], p["conditioning"], p["source_style"], p["target_style"]] for p in panels],
                     ["labels", "labels", "image", "image"], columns,
                     [f"{p['case']} z={p['z']}" for p in panels], out_png, [v for v, _ in by_value],
                     [k for _, k in by_value],
                     title=f"Mask-conditioned generation: one {'deformed ' if deformed else ''}map, two domains, "
                           f"the same noise")
    return {"png": str(out_png), "cases": [p["case"] for p in panels], "slices": [p["z"] for p in panels]}
