"""Stage ``adherence`` (generative rows): the mask adherence of every generated dataset of the
study: does a generated image show the label map it was generated from? A segmenter trained on
REAL labelled data of the generated images' domain segments them (``evaluation.mask_adherence``)
and its Dice per structure against those label maps is reported:

* ``generated``: the target-style pairs of the generative rows, segmented by the oracle of
  ``generative_train``: the first segmenter trained on the target's labelled cases (``imagesTr``
  with ``labelsTr``; phantoms have them), never a table row. Without labelled target training
  cases the adherence is not measurable and the record says why;
* ``dg``: the DG dataset (source-style images with the source's labels), segmented by the Baseline
  segmenter (trained on the real source without augmentation: ``StudyContext.baseline``).

Into ``OUT/adherence/``::

    adherence.json   per set: dataset, domain, measurable (or why not), segmenter, per-structure DSC (mean, sd, n)
    <set>/           mask_adherence's outputs: adherence.json/.csv/.md, predictions/, evaluation/

Off: not part of the study."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Dict, List, Optional

from nnunet_sddm.data.raw_dataset import list_images, list_labels, load_dataset_json
from nnunet_sddm.evaluation.mask_adherence import mask_adherence
from nnunet_sddm.study.context import Model, StudyContext
from nnunet_sddm.study.stage_predict import prediction_threads
from nnunet_sddm.study.stage_pseudo_labels import as_nnunet_model, generative_rows
from nnunet_sddm.study.stages import Stage
from nnunet_sddm.utilities.files import staging_dir, write_json

#: The generated image sets measured: folder under ``OUT/adherence`` -> (dataset side, domain).
SETS = {"generated": ("generated", "target"), "dg": ("synthetic", "source")}


def adherence_dir(ctx: StudyContext) -> Path:
    return ctx.out / "adherence"


def oracle_unavailable(ctx: StudyContext) -> Optional[str]:
    """Why no segmenter trained on real labelled target data can be had (None: the target's
    ``imagesTr`` all have labels in ``labelsTr``, so the oracle trains on them)."""
    raw = ctx.raw("target")
    if not (raw / "dataset.json").is_file():  # before the data stage ran
        return f"the target dataset {raw.name} does not exist (yet)"
    ending = load_dataset_json(raw)["file_ending"]
    images = list_images(raw / "imagesTr", ending) if (raw / "imagesTr").is_dir() else {}
    labels = list_labels(raw / "labelsTr", ending) if (raw / "labelsTr").is_dir() else {}
    if not images:
        return (f"the target dataset {raw.name} has no training images (imagesTr) to train a segmenter of the target "
                f"domain on")
    missing = sorted(set(images) - set(labels))
    if missing:
        return (f"the target dataset {raw.name} has no labels (labelsTr) for {len(missing)} of its {len(images)} "
                f"training images (e.g. {missing[0]}), so no segmenter can be trained on real labelled target data")
    return None


def measuring_segmenter(ctx: StudyContext, domain: str) -> Model:
    """The segmenter trained on real labelled data of ``domain``: the oracle (``target``) or the
    Baseline (``source``)."""
    return ctx.oracle() if domain == "target" else ctx.baseline()


def run_adherence(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """The mask adherence of every generated set (``OUT/adherence``, written atomically)."""
    record: Dict[str, Any] = {"sets": {}}
    with staging_dir(adherence_dir(ctx), overwrite=True) as tmp, prediction_threads(), \
            contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints every case
        for key, (side, domain) in SETS.items():
            why = oracle_unavailable(ctx) if domain == "target" else None
            entry: Dict[str, Any] = {"dataset": ctx.dataset_name(side), "domain": domain, "measurable": why is None}
            if why is not None:
                entry["reason"] = f"Not measurable: {why}."
            else:
                m = measuring_segmenter(ctx, domain)
                res = mask_adherence(ctx.raw(side), as_nnunet_model(ctx, m), tmp / key, device=ctx.device,
                                     num_processes=0, progress=ctx.progress)
                entry.update({"segmenter": res.record["model"], "segmenter_key": m.key,
                              "n_cases": res.record["n_cases"], "structures": res.summary,
                              "details": f"adherence/{key}/adherence.json"})
            record["sets"][key] = entry
        write_json(record, tmp / "adherence.json")
    return {k: ({s: d["mean"] for s, d in v["structures"].items()} if v["measurable"] else "not measurable")
            for k, v in record["sets"].items()}


def adherence_inputs(ctx: StudyContext) -> Any:
    """The measuring segmenters (segmenter, kind, trainer, seed, fold), or why the oracle is missing."""
    why = oracle_unavailable(ctx)
    models = [measuring_segmenter(ctx, domain) for _, domain in SETS.values() if domain != "target" or not why]
    return {"segmenters": [[m.segmenter, m.kind, ctx.trainer(m.segmenter, m.kind), m.seed] for m in models],
            "fold": ctx.cfg.fold, "unavailable": why}


def adherence_outputs(ctx: StudyContext) -> List[Path]:
    return [adherence_dir(ctx)]


STAGE = Stage("adherence", "generative rows: mask adherence of the generated and the DG images", run_adherence,
              adherence_inputs, adherence_outputs, ("data", "synthesis", "train", "generation", "generative_train"),
              enabled=generative_rows)
