"""The source round trip of diffusion models: what adaptation costs the anatomy, measured without
any target label; with ``--target``, each model's DA row on the target as well.

Given a finished study (its ``train`` stage done and a source with labelled held-out cases, e.g.
the real-data recipe or ``--quick``), the study's baseline segmenters (trained on the real source,
first repeat; the study's predictor, no mirroring) segment the held-out source images
``imagesTs``

- as they are (``original``);
- after the data path alone of each model (``geometry``: intensity window, then resize mode: pad
  to a square, resize to the model size and back; spacing mode: resample to the working spacing
  and back; no diffusion);
- after SD-DM adaptation with each model and the study's sampler settings (``adapted``);
- after the resize-mode data path at each ``--resize-size`` with the study model's intensity
  window (no model needed: the floor of a resize-mode model of that size and window);

and, with ``--target``, the study's target test images as they are (``Baseline``) and adapted by
each model (``DA``).

    python benchmarks/round_trip.py STUDY [--model DIR ...] [--resize-size 64 128] [--target] [-o OUT]

``--model`` defaults to the study's diffusion model; give several folders (e.g. the same preset
trained in resize mode and in spacing mode, ``nnUNetv2_sddm_train ... --set data.spacing=2``) to
compare them on the same cases with the same segmenters and sampler. The study's own adaptations
with its model are reused (copied, then checked against their records). Prints, per segmenter and
input, the mean Dice per structure and its change against ``original`` (source; the goal is a
loss of at most 0.02) or ``Baseline`` (target), and writes ``OUT/round_trip.csv`` and
``OUT/round_trip.json`` (inputs, settings, adaptation seconds, rows), with the images,
predictions and evaluations under ``OUT/``. Adaptations resume when run again.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from nnunet_sddm.adaptation.folders import RECORD_FILE, adapt_folder
from nnunet_sddm.data.raw_dataset import list_images
from nnunet_sddm.diffusion.model_folder import load_config
from nnunet_sddm.study.stage_in_domain import (ROUND_TRIP_GOAL, geometry_round_trip, lazy_predictor, score_folder,
                                                source_test)
from nnunet_sddm.study.stage_predict import prediction_threads

FIELDS = ("part", "segmenter", "input", "structure", "dice", "change", "cases")


def model_label(model_dir: Path, config: Dict[str, Any]) -> str:
    """``<folder name> (resize <S> px | spacing <s> mm)``: which data path a model folder (its
    ``config.json`` ``config``) uses."""
    spacing = (config.get("data") or {}).get("spacing")
    mode = f"resize {config['model']['image_size']} px" if spacing is None else f"spacing {float(spacing):g} mm"
    return f"{model_dir.name} ({mode})"


def adapt(ctx: Any, images: Path, dest: Path, model: Path, study_copy: Optional[Path]) -> float:
    """Adapt ``images`` into ``dest`` with ``model`` and the study's sampler, resumable
    (``adapt_folder``'s record). ``study_copy``, the study's own adaptation of the same images with
    the same model, is copied in first when its record names this model and input folder
    (``adapt_folder`` then checks every output's digest and adapts only what it lacks). The
    seconds taken (checking included)."""
    smp = ctx.cfg.sampler
    record = study_copy / RECORD_FILE if study_copy is not None else None
    if record is not None and record.is_file() and not dest.exists():
        old = json.loads(record.read_text())
        if old.get("model") == str(model) and old.get("input") == str(images.resolve()):
            tmp = dest.with_name(f".{dest.name}.copying")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(study_copy, tmp)
            tmp.rename(dest)
    t0 = time.perf_counter()
    adapt_folder(images, dest, model, smp.settings, batch_size=smp.batch_size, device=ctx.device, amp=smp.amp,
                 overwrite=False, progress=True)
    return time.perf_counter() - t0


def benchmark_inputs(ctx: Any, images: Path, models: List[Path], resize_sizes: List[int], target: bool,
                     out: Path) -> Tuple[Dict[str, Path], Dict[str, Path], Dict[str, float]]:
    """The folders to segment: the held-out source images ``{label: folder}`` (``original``
    first), the target test images (``Baseline``, then ``DA, <model>``; empty without ``target``),
    and the seconds each adaptation took. Labels carry the model's position in ``models``."""
    source: Dict[str, Path] = {"original": images}
    targets: Dict[str, Path] = {"Baseline": ctx.target_images} if target else {}
    seconds: Dict[str, float] = {}
    base_data = load_config(ctx.model_dir).get("data") or {}
    for size in resize_sizes:
        label = f"geometry, resize {size} px"
        source[label] = out / "images" / f"geometry_resize{size}"
        geometry_round_trip(images, source[label], size, {**base_data, "spacing": None})
    for i, model in enumerate(models):
        config = load_config(model)
        label = f"{i}: {model_label(model, config)}"
        study_model = model == ctx.model_dir.resolve()
        source[f"geometry, {label}"] = out / "images" / f"geometry_model{i}"
        geometry_round_trip(images, source[f"geometry, {label}"], int(config["model"]["image_size"]),
                            config.get("data"))
        source[f"adapted, {label}"] = out / "images" / f"adapted_model{i}"
        seconds[f"source, {label}"] = adapt(ctx, images, source[f"adapted, {label}"], model,
                                            ctx.out / "in_domain" / "images" / "adapted" if study_model else None)
        if target:
            targets[f"DA, {label}"] = out / "target" / f"adapted_model{i}"
            seconds[f"target, {label}"] = adapt(ctx, ctx.target_images, targets[f"DA, {label}"], model,
                                                ctx.adapted if study_model else None)
    return source, targets, seconds


def print_table(rows: List[Dict[str, Any]], part: str, reference: str) -> None:
    """One part's rows (``source`` or ``target``) per segmenter and input: Dice per structure, with
    the change against ``reference``."""
    rows = [r for r in rows if r["part"] == part]
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    print(f"{part}: {'segmenter':<10} {'input':<44} " + " ".join(f"{s:>15}" for s in structures))
    for seg in dict.fromkeys(r["segmenter"] for r in rows):
        for label in dict.fromkeys(r["input"] for r in rows):
            cell = {r["structure"]: r for r in rows if r["segmenter"] == seg and r["input"] == label}
            print(f"{part}: {seg:<10} {label:<44} " + " ".join(
                f"{cell[s]['dice']:6.3f}" + (f" ({cell[s]['change']:+.3f})" if label != reference else " " * 9)
                for s in structures))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", type=Path, help="a study folder (its train stage done; the source has imagesTs "
                                            "with labelsTs)")
    p.add_argument("--model", type=Path, nargs="*", default=None,
                   help="diffusion model folders to round-trip with (default: the study's; none: --model "
                        "without a folder, e.g. for --resize-size alone)")
    p.add_argument("--resize-size", type=int, nargs="*", default=[],
                   help="also the resize-mode data path alone at these model sizes (px)")
    p.add_argument("--target", action="store_true",
                   help="also each model's DA row on the study's labelled target test images")
    p.add_argument("-o", "--output", type=Path, default=Path("round_trip"))
    a = p.parse_args(argv)
    from nnunet_sddm.study.context import nnunet_environment, open_study

    ctx = open_study(a.study)
    cfg = ctx.cfg
    out = a.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = [m.resolve() for m in (a.model if a.model is not None else [ctx.model_dir])]
    rows: List[Dict[str, Any]] = []
    with nnunet_environment(ctx):
        test = source_test(ctx)
        if test is None:
            print(f"{a.study}: the source has no labelled held-out cases (imagesTs with labelsTs)", file=sys.stderr)
            return 2
        images, labels = test
        segmenters = [m for m in ctx.models() if m.kind == "real" and m.seed == cfg.seed
                      and (m.folder / f"fold_{cfg.fold}" / "checkpoint_final.pth").is_file()]
        if not segmenters:
            print(f"{a.study}: no trained baseline segmenter (the study's train stage is not done)", file=sys.stderr)
            return 2
        print(f"round_trip: {len(list_images(images))} held-out source cases of {images.parent.name}, "
              f"segmenters {', '.join(m.segmenter for m in segmenters)}, sampler {cfg.sampler.settings.to_dict()}",
              flush=True)
        source, targets, seconds = benchmark_inputs(ctx, images, models, a.resize_size, a.target, out)
        with prediction_threads():
            for m in segmenters:
                predictor = lazy_predictor(ctx, m)
                for part, inputs, truth in (("source", source, labels), ("target", targets, ctx.target_labels)):
                    reference: Dict[str, float] = {}
                    for i, (label, folder) in enumerate(inputs.items()):
                        name = f"{part}_{i}"
                        dice, cases = score_folder(ctx, predictor, folder, truth,
                                                   out / "predictions" / m.segmenter / name,
                                                   out / "evaluation" / m.segmenter / name, resume=False, side=part)
                        reference = reference or dice
                        rows.extend({"part": part, "segmenter": m.segmenter, "input": label, "structure": s,
                                     "dice": round(v, 4), "change": round(v - reference[s], 4), "cases": cases}
                                    for s, v in dice.items())
    print_table(rows, "source", "original")
    print(f"source: goal: a loss of at most {ROUND_TRIP_GOAL} per structure")
    if a.target:
        print_table(rows, "target", "Baseline")
    with open(out / "round_trip.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (out / "round_trip.json").write_text(json.dumps(
        {"study": str(ctx.out), "models": [str(m) for m in models], "resize_sizes": a.resize_size,
         "sampler": cfg.sampler.settings.to_dict(), "adaptation_seconds": seconds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
