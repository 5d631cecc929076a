"""Stage ``quality``: the quality report (``evaluation.quality``: fidelity, privacy, utility) of every
image set the study synthesises or adapts, into ``OUT/quality/<set>/``:

* ``dg``: the DG dataset against the source training images it was made from;
* ``da``: the DA-adapted target images against the original target images.

Both are checked for copies of the diffusion model's training slices (the source training images
it read) and share one membership inference (members: those slices, non-members: the held-out
source cases, when there are any); utility is the study's own rows (Table 1 and the in-domain test).
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from nnunet_sddm.diffusion.model_folder import load_config
from nnunet_sddm.diffusion.slice_dataset import select_images
from nnunet_sddm.evaluation.quality import QualitySettings, ReportCache, quality_report
from nnunet_sddm.data.raw_dataset import list_images
from nnunet_sddm.evaluation.quality_slices import ImageSet, image_set, merged_set
from nnunet_sddm.study.config_tree import SEGMENTERS
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stage_in_domain import read_in_domain
from nnunet_sddm.study.stages import Stage
from nnunet_sddm.utilities.errors import SDDMError

#: The image sets reported on: folder name under ``OUT/quality`` -> title.
SETS = {"dg": "DG dataset (source training images restyled by the diffusion model)",
        "da": "DA-adapted target images"}


def quality_dir(ctx: StudyContext) -> Path:
    return ctx.out / "quality"


def _settings(ctx: StudyContext) -> QualitySettings:
    return QualitySettings(seed=int(ctx.cfg.seed), device=str(ctx.device))


def _privacy_sets(ctx: StudyContext) -> Tuple[Optional[ImageSet], Optional[ImageSet], Optional[str]]:
    """The diffusion model's training images (members) and the other source images of the same
    selection (vendor, centre; non-members), and why the membership inference is skipped (None:
    it runs). Without a training set the model can be checked against (a model trained on another
    dataset), both are None."""
    data_cfg = load_config(ctx.model_dir).get("data", {})
    source = ctx.dataset_name("source")
    trained_on = data_cfg.get("dataset")
    if trained_on is None or Path(str(trained_on)).name != source:
        return None, None, (f"Not measured: the diffusion model was trained on `{trained_on}`, not on the study's "
                            f"source `{source}`, so its training slices are not at hand.")
    folders = [f for f in (ctx.raw("source") / "imagesTr", ctx.raw("source") / "imagesTs")
               if f.is_dir() and list_images(f)]
    every = merged_set("source images", [image_set(f, "source images") for f in folders])
    try:
        chosen = select_images(ctx.raw("source"), data_cfg)
        same_domain = select_images(ctx.raw("source"), {**data_cfg, "include_test": True, "cases": None})
    except SDDMError as e:
        return None, None, f"Not measured: the diffusion model's training selection does not fit the source ({e})."
    members = merged_set("the diffusion model's training images", [every], keep=list(chosen))
    others = [c for c in same_domain if c not in chosen]
    if not others:
        return members, None, ("Not measured: every source image of the model's selection was used to train it, so "
                               "there are no non-members.")
    heldout = merged_set("source images the diffusion model never saw", [every], keep=others)
    n_m, n_h = len({c.subject for c in members.cases}), len({c.subject for c in heldout.cases})
    if min(n_m, n_h) < 2:
        return members, heldout, (f"Not measured: cross-validation needs at least 2 subjects on each side ({n_m} "
                                  f"training, {n_h} held-out).")
    return members, heldout, None


def _table(ctx: StudyContext) -> Dict[str, float]:
    path = ctx.out / "comparison" / "table.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["name"]: float(r["DSC"]) for r in csv.DictReader(f)}


def utility_lines(ctx: StudyContext, which: str) -> str:
    """Markdown of the study rows that measure the utility of image set ``which`` (``dg``/``da``):
    target Dice (Table 1, mean over repeats) against the baseline's, and for DG the in-domain Dice
    of the segmenter trained on the synthetic set; for DA the source round trip."""
    table = _table(ctx)
    rows = read_in_domain(ctx)

    def in_domain(seg: str, kind: str, inp: str) -> Optional[float]:
        v = [float(r["dice"]) for r in rows if (r["segmenter"], r["trained_on"], r["input"], r["structure"])
             == (seg, kind, inp, "all")]
        return sum(v) / len(v) if v else None

    names = ("DG", "Mixed") if which == "dg" else ("DA", "DA+ens")
    L = ["Mean Dice over LV/MYO/RV from the study (Table 1 on the target test set; the in-domain test on the "
         "held-out source cases), mean over repeats:", "",
         "| segmenter | row | target Dice | baseline's target Dice | in-domain Dice | baseline's in-domain Dice |",
         "|---|---|---|---|---|---|"]
    for seg in ctx.cfg.segmenters:
        label = SEGMENTERS[seg][2]
        base = table.get(f"Baseline/{label}")
        for name in names:
            v = table.get(f"{name}/{label}")
            if which == "dg":
                own = in_domain(seg, "synthetic", "original") if name == "DG" else None
            else:
                own = in_domain(seg, "real", "adapted") if name == "DA" else None
            ref = in_domain(seg, "real", "original")
            L.append(f"| {label} | {name} | {_f(v)} | {_f(base)} | {_f(own)} | {_f(ref)} |")
    L += ["", ("DG: a segmenter trained on the synthetic set alone, tested on real target images (target Dice) and "
               "on real held-out source images (in-domain Dice); Mixed: the same segmenter on DA-adapted target "
               "images.") if which == "dg" else
          ("DA: the real-data segmenter on adapted target images (target Dice) and on adapted held-out source "
           "images (in-domain Dice: the source round trip); DA+ens: mean probabilities of the original and "
           "adapted image.")]
    return "\n".join(L)


def _f(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def run_quality(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """The quality reports of the DG dataset and the DA-adapted target images."""
    out = quality_dir(ctx)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(ctx)
    train, heldout, skipped = _privacy_sets(ctx)
    cache = ReportCache()
    pairs = {"dg": (image_set(ctx.raw("synthetic"), "DG dataset"),
                    image_set(ctx.raw("source") / "imagesTr", "source training images")),
             "da": (image_set(ctx.adapted, "DA-adapted target images"),
                    image_set(ctx.target_images, "target images"))}
    result: Dict[str, Any] = {}
    for key, (synthetic, real) in pairs.items():
        ctx.log(f"[quality] {SETS[key]}")
        summary = quality_report(synthetic, real, out / key, train=train, heldout=heldout,
                                 model_dir=None if skipped else ctx.model_dir, settings=settings,
                                 utility=utility_lines(ctx, key), title=SETS[key], membership_skipped=skipped,
                                 cache=cache,
                                 num_processes=int(ctx.cfg.nnunet.num_processes), overwrite=True,
                                 progress=ctx.progress)
        result[key] = {"paired": summary["paired"].get("pairs", 0),
                       "ssim": summary["paired"].get("ssim", {}).get("mean"),
                       "likely_copy": summary.get("privacy", {}).get("synthetic", {}).get("likely_copy"),
                       "membership_auc": summary.get("membership", {}).get("auc")}
    return result


def quality_inputs(ctx: StudyContext) -> Any:
    return {"settings": dataclasses.asdict(_settings(ctx))}


def quality_outputs(ctx: StudyContext) -> List[Path]:
    return [quality_dir(ctx)]


STAGE = Stage("quality", "fidelity, privacy and utility of the DG and DA image sets", run_quality, quality_inputs,
              quality_outputs, ("data", "diffusion", "synthesis", "adaptation", "in_domain", "compare"))
