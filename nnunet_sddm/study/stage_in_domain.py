"""Stage ``in_domain``: the segmenters on the source's own held-out test cases, and the source
round trip.

The held-out cases are the source dataset's ``imagesTs`` with ``labelsTs`` (phantoms:
``source.test_subjects`` > 0; an existing dataset: when it has both). Every trained segmenter
segments them as they are (its in-domain Dice: did it learn?). The baseline segmenters (trained on
the real source without augmentation) also segment them after two round trips:

- ``geometry``: the diffusion model's data path alone (intensity window, then pad to a square and
  resize to the model size and back, or in spacing mode resample to the working spacing and back;
  no diffusion: ``data.slices.data_round_trip``), the floor of any adaptation through that model;
- ``adapted``: SD-DM adaptation with the study's sampler settings.

Adapting images of the source domain should change nothing a segmenter cares about, so the Dice
lost in the round trip measures what adaptation costs the anatomy, without any target label
(goal: at most ``ROUND_TRIP_GOAL``). Into ``OUT/in_domain/``::

    images/geometry/ images/adapted/                  the round-tripped source test images
    predictions/seed<S>/<trained>__<segmenter>__<input>/
    evaluation/seed<S>/<trained>__<segmenter>__<input>/   per_case.csv, summary.json
    in_domain.csv    per model, input and structure: mean Dice, cases, loss against the original

The predictions use the predict stage's predictor (no mirroring); each folder is built under a
temporary name and renamed when complete.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from nnunet_sddm.adaptation import predictor as nnunet_prediction
from nnunet_sddm.adaptation.folders import adapt_folder
from nnunet_sddm.data.raw_dataset import list_images
from nnunet_sddm.data.slices import data_round_trip
from nnunet_sddm.data.volumes import read_volume, write_like
from nnunet_sddm.diffusion.model_folder import load_config
from nnunet_sddm.evaluation.evaluate import evaluate_folders
from nnunet_sddm.study.context import Model, StudyContext
from nnunet_sddm.study.stage_predict import load_predictor, prediction_threads
from nnunet_sddm.study.stage_train import segmenter_inputs
from nnunet_sddm.study.stages import Stage
from nnunet_sddm.utilities.files import staging_dir, write_text

#: What the held-out source cases are segmented as: as they are, and after each round trip.
INPUTS = ("original", "geometry", "adapted")
#: The round trip's goal: at most this Dice lost per structure.
ROUND_TRIP_GOAL = 0.02
CSV_FIELDS = ("segmenter", "trained_on", "seed", "input", "structure", "dice", "cases", "loss")


def source_test(ctx: StudyContext) -> Optional[Tuple[Path, Path]]:
    """``(imagesTs, labelsTs)`` of the source, or None when it has no labelled held-out cases."""
    raw = ctx.raw("source")
    images, labels = raw / "imagesTs", raw / "labelsTs"
    if images.is_dir() and labels.is_dir() and list_images(images):
        return images, labels
    return None


def in_domain_dir(ctx: StudyContext) -> Path:
    """``OUT/in_domain``: the stage's images, predictions, evaluations and ``in_domain.csv``."""
    return ctx.out / "in_domain"


def geometry_round_trip(images: Path, out: Path, size: int, data_cfg: Optional[Mapping[str, Any]]) -> None:
    """Every image of ``images`` through the data path alone of a model of side ``size`` and
    ``data`` section ``data_cfg`` (``data_round_trip`` with the image's spacing), written into
    ``out`` (replaced; built under a temporary name) with its file name and geometry."""
    with staging_dir(out, overwrite=True) as tmp:
        for case, path in sorted(list_images(images).items()):
            vol = read_volume(path)
            write_like(data_round_trip(vol.data, size, data_cfg, vol.spacing, name=str(path)), path,
                       tmp / path.name)


def run_in_domain(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """In-domain Dice of every model; the round trips of the baselines (``in_domain.csv``)."""
    test = source_test(ctx)
    root = in_domain_dir(ctx)
    if test is None:  # an empty table (the report says why), so that the stage's output exists
        _write_csv(root / "in_domain.csv", [])
        return {"skipped": "the source has no labelled held-out cases (imagesTs with labelsTs; phantoms: "
                           "source.test_subjects > 0)"}
    images, labels = test
    folders = {"original": images, "geometry": root / "images" / "geometry", "adapted": root / "images" / "adapted"}
    if not (resume and folders["geometry"].is_dir()):
        config = load_config(ctx.model_dir)
        geometry_round_trip(images, folders["geometry"], int(config["model"]["image_size"]), config.get("data"))
    smp = ctx.cfg.sampler
    adapt_folder(images, folders["adapted"], ctx.model_dir, smp.settings, batch_size=smp.batch_size,
                 device=ctx.device, amp=smp.amp, overwrite=False, progress=ctx.progress)
    with prediction_threads():
        rows, result = _segment_and_score(ctx, folders, labels, resume)
    _write_csv(root / "in_domain.csv", rows)
    ctx.log(f"[study]   in-domain test: {len(list_images(images))} held-out source cases, {len(ctx.models())} models")
    return result


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(text.getvalue(), path)


def lazy_predictor(ctx: StudyContext, m: Model) -> Callable[[], nnunet_prediction.SDDMPredictor]:
    """The study's predictor of model ``m``, loaded on the first call and kept for the next ones."""
    return functools.cache(functools.partial(load_predictor, ctx, m))


def score_folder(ctx: StudyContext, predictor: Callable[[], nnunet_prediction.SDDMPredictor], images: Path,
                 labels: Path, pred: Path, evaluation: Path, resume: bool,
                 side: str = "source") -> Tuple[Dict[str, float], int]:
    """``predictor()`` (``lazy_predictor``: called only when a prediction is needed) segments every
    image of ``images`` into ``pred`` (kept when ``resume`` and it exists), scored against the
    labels ``labels`` of the ``side`` (``source`` or ``target``) dataset into ``evaluation``: the
    mean Dice per structure (``all`` included) and the number of cases."""
    if not (resume and pred.is_dir()):
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints every case
            loaded = predictor()
            with staging_dir(pred, overwrite=True) as tmp:
                nnunet_prediction.predict_folder(loaded, images, tmp)
    ev = ctx.cfg.evaluation
    summary = evaluate_folders(labels, pred, dataset_json=ctx.raw(side) / "dataset.json",
                               prediction_dataset_json=ctx.raw("source") / "dataset.json",
                               num_processes=ev.num_processes, empty_policy=ev.empty_policy,
                               out_dir=evaluation, overwrite=True, progress=False).summary
    return {s: d["metrics"]["DSC"]["mean"] for s, d in summary["structures"].items()}, summary["n_cases"]


def _segment_and_score(ctx: StudyContext, folders: Dict[str, Path], labels: Path,
                       resume: bool) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Every model on the original held-out cases, the baselines also on both round trips; the
    ``in_domain.csv`` rows and the stage result."""
    root = in_domain_dir(ctx)
    rows: List[Dict[str, Any]] = []
    result: Dict[str, Any] = {}
    for m in ctx.models():
        predictor = lazy_predictor(ctx, m)
        original: Dict[str, float] = {}
        for inp in INPUTS if m.kind == "real" else ("original",):
            name = f"{m.kind}__{m.segmenter}__{inp}"
            dice, cases = score_folder(ctx, predictor, folders[inp], labels,
                                       root / "predictions" / f"seed{m.seed}" / name,
                                       root / "evaluation" / f"seed{m.seed}" / name, resume)
            if inp == "original":
                original = dice
            for s, v in dice.items():
                rows.append({"segmenter": m.segmenter, "trained_on": m.kind, "seed": m.seed, "input": inp,
                             "structure": s, "dice": f"{v:.6f}", "cases": cases,
                             "loss": "" if inp == "original" else f"{original[s] - v:.6f}"})
            result[f"{m.key}/{inp}"] = {s: round(v, 4) for s, v in dice.items()}
    return rows, result


def read_in_domain(ctx: StudyContext) -> List[Dict[str, str]]:
    """The rows of ``in_domain.csv`` (empty when the stage was skipped)."""
    path = in_domain_dir(ctx) / "in_domain.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def in_domain_inputs(ctx: StudyContext) -> Any:
    """The models, the predictor's step size, the sampler and the distance metrics' empty policy
    (the held-out cases and the diffusion model: the upstream data and diffusion stages)."""
    return {**segmenter_inputs(ctx), "step_size": ctx.cfg.nnunet.step_size, "sampler": ctx.cfg.sampler.inputs(),
            "empty_policy": ctx.cfg["evaluation"]["empty_policy"]}


def in_domain_outputs(ctx: StudyContext) -> List[Path]:
    """The stage's folder (``in_domain.csv`` only, header-only, without held-out cases)."""
    return [in_domain_dir(ctx)]


STAGE = Stage("in_domain", "in-domain test of every segmenter and the source round trip", run_in_domain,
              in_domain_inputs, in_domain_outputs, ("data", "diffusion", "train", "generative_train"))
