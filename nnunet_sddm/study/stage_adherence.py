"""Stage ``adherence`` (generative rows): the mask adherence of every generated dataset of the
study: does a generated image show the label map it was generated from? A segmenter trained on
REAL labelled data of the generated images' domain segments them (``evaluation.mask_adherence``)
and its Dice per structure against the conditioning maps is reported. The generated images are
target-style, so that segmenter is the oracle of ``generative_train``: trained on the target's
labelled cases (``imagesTr`` with ``labelsTr``; phantoms have them), never a table row. Without
labelled target training cases the adherence is not measurable and the record says why. Into
``OUT/adherence/``::

    adherence.json        per generated set: measurable, why not, oracle, per-structure DSC (mean, sd, n)
    generated/            mask_adherence's outputs: adherence.json/.csv/.md, predictions/, evaluation/

Off: not part of the study."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from nnunet_sddm.adaptation.pseudo_labels import NnUNetModel
from nnunet_sddm.data.raw_dataset import list_images, list_labels, load_dataset_json
from nnunet_sddm.evaluation.mask_adherence import mask_adherence
from nnunet_sddm.study.config_tree import SEGMENTERS
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stage_predict import prediction_threads
from nnunet_sddm.study.stage_pseudo_labels import generative_rows
from nnunet_sddm.study.stages import Stage
from nnunet_sddm.utilities.files import staging_dir, write_json

#: The generated image sets measured: folder under ``OUT/adherence`` -> (dataset side, domain).
SETS = {"generated": ("generated", "target")}


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


def oracle_model(ctx: StudyContext) -> NnUNetModel:
    """The oracle as the ``NnUNetModel`` of ``mask_adherence`` (the study's fold)."""
    m = ctx.oracle()
    return NnUNetModel(dataset=ctx.dataset_name("target"), configuration=SEGMENTERS[m.segmenter][0],
                       trainer=ctx.cfg.trainer(m.segmenter), plans=ctx.cfg.nnunet.plans, folds=(ctx.cfg.fold,))


def run_adherence(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """The mask adherence of every generated set (``OUT/adherence``, written atomically)."""
    why = oracle_unavailable(ctx)
    record: Dict[str, Any] = {"sets": {}}
    with staging_dir(adherence_dir(ctx), overwrite=True) as tmp, prediction_threads():
        for key, (side, domain) in SETS.items():
            entry: Dict[str, Any] = {"dataset": ctx.dataset_name(side), "domain": domain, "measurable": why is None}
            if why is not None:
                entry["reason"] = f"Not measurable: {why}."
            else:
                res = mask_adherence(ctx.raw(side), oracle_model(ctx), tmp / key, device=ctx.device, num_processes=0,
                                     progress=ctx.progress)
                entry.update({"oracle": res.record["model"], "oracle_key": ctx.oracle().key,
                              "n_cases": res.record["n_cases"], "structures": res.summary,
                              "details": f"adherence/{key}/adherence.json"})
            record["sets"][key] = entry
        write_json(record, tmp / "adherence.json")
    return {k: ({s: d["mean"] for s, d in v["structures"].items()} if v["measurable"] else "not measurable")
            for k, v in record["sets"].items()}


def adherence_inputs(ctx: StudyContext) -> Any:
    """The oracle (segmenter, trainer, seed, fold), or why there is none."""
    why = oracle_unavailable(ctx)
    m = ctx.oracle()
    return {"oracle": None if why else [m.segmenter, ctx.cfg.trainer(m.segmenter), m.seed, ctx.cfg.fold],
            "unavailable": why}


def adherence_outputs(ctx: StudyContext) -> List[Path]:
    return [adherence_dir(ctx)]


STAGE = Stage("adherence", "generative rows: mask adherence of the generated images (oracle segmenter)",
              run_adherence, adherence_inputs, adherence_outputs, ("data", "generation", "generative_train"),
              enabled=generative_rows)
