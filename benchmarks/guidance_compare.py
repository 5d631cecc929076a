"""Projection guidance (ILVR) against gradient guidance (DDA, the paper's) on the same model and slices.

Given a study folder whose diffusion stage is done (``nnUNetv2_sddm_study --quick`` makes one), adapts
the study's target test images twice in this process, once per guidance mode, with the study's
sampler settings otherwise, and prints per mode:

- ``slices/s`` (same model, slices and batch size; the ratio projection / gradient);
- ``lowpass_rms``: the RMS distance, in the model's [-1, 1] space, between phi_D of each adapted
  slice and phi_D of its reference (what guidance is meant to keep), mean over slices;
- ``separability``: the balanced accuracy of ``nnUNetv2_sddm_domain_shift``'s random forest telling
  the source training images from the (adapted) target images (0.5 = indistinguishable), for the
  original target images too;
- with a finished study (segmenters trained): the DA row of each mode, i.e. every segmenter trained
  on real source data applied to the adapted target images through the user's prediction path,
  evaluated with the study's metrics and empty-mask policy, next to the study's own Baseline and DA
  rows (the study's DA row and this script's gradient row use the same settings and seeds).

    python benchmarks/guidance_compare.py sddm_quick [-o guidance_compare]

Writes ``OUT/guidance_compare.json`` and the adapted images (``OUT/adapted_<mode>/``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from nnunet_sddm.adaptation.folders import adapt_folder
from nnunet_sddm.adaptation.pipeline import Adapter
from nnunet_sddm.data.raw_dataset import list_images
from nnunet_sddm.adaptation.volumes import model_space_slices
from nnunet_sddm.data.slices import IntensityWindow
from nnunet_sddm.data.volumes import read_volume
from nnunet_sddm.evaluation.domain_shift import domain_shift
from nnunet_sddm.sampling.lowpass import LowPass
from nnunet_sddm.utilities.distributed import Ranks

MODES = ("gradient", "projection")


def lowpass_rms(original: Path, adapted: Path, adapter: Adapter) -> float:
    """Mean over slices of the RMS of phi_D(adapted) - phi_D(original) in model space (either mode:
    the slices the sampler saw)."""
    D = adapter.settings.D
    values = []
    for case, path in sorted(list_images(original).items()):
        vol = read_volume(path)
        out = read_volume(adapted / path.name).data
        window = IntensityWindow.fit(vol.data, adapter.percentiles, name=str(path))
        a, _ = model_space_slices(vol.data, window, adapter.loaded, D, vol.spacing, name=str(path))
        b, _ = model_space_slices(out, window, adapter.loaded, D, vol.spacing, name=str(adapted / path.name))
        phi = LowPass.get(a.shape[-2], a.shape[-1], D, adapter.settings.padding)
        d = (phi(b) - phi(a)).flatten(1)
        values.extend(torch.sqrt((d ** 2).mean(dim=1)).tolist())
    return float(np.mean(values))


def da_rows(ctx, adapted: Path, out: Path) -> Dict[str, dict]:
    """The DA row of every segmenter trained on real source data: predictions of ``adapted`` (the
    user's prediction path), evaluated like the study's rows. ``{segmenter: {metric: mean}}``."""
    import contextlib
    import io

    from nnunet_sddm.adaptation import predictor as nnunet_prediction
    from nnunet_sddm.evaluation.evaluate import evaluate_folders

    ev = ctx.cfg.evaluation
    rows = {}
    for m in ctx.models():
        seg, mdir = m.segmenter, m.folder
        if m.kind != "real" or m.seed != ctx.cfg.seed or \
                not (mdir / f"fold_{ctx.cfg.fold}" / "checkpoint_final.pth").is_file():
            continue
        pred = out / f"pred_{seg}"
        with contextlib.redirect_stdout(io.StringIO()):
            predictor = nnunet_prediction.load_nnunet_predictor(mdir, [ctx.cfg.fold], device=ctx.device,
                                                                step_size=ctx.cfg.nnunet.step_size, allow_tqdm=False)
            nnunet_prediction.predict_folder(predictor, adapted, pred)
        res = evaluate_folders(ctx.target_labels, pred, dataset_json=ctx.raw("target") / "dataset.json",
                               empty_policy=ev.empty_policy, out_dir=out / f"eval_{seg}", overwrite=True,
                               progress=False)
        rows[seg] = {m: d["mean"] for m, d in res.summary["structures"]["all"]["metrics"].items()}
    return rows


def study_rows(ctx, approach: str) -> Dict[str, dict]:
    """The study's own row ``approach`` (e.g. Baseline, DA) per segmenter, from its evaluation folders
    (the first repeat's, trained with the study seed, as ``da_rows``)."""
    rows = {}
    for seg in ctx.cfg.segmenters:
        summary = ctx.evaluation_dir(approach, seg, ctx.cfg.seed) / "summary.json"
        if summary.is_file():
            metrics = json.loads(summary.read_text())["structures"]["all"]["metrics"]
            rows[seg] = {m: d["mean"] for m, d in metrics.items()}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", type=Path, help="study folder (its diffusion stage done)")
    p.add_argument("-o", "--output", type=Path, default=Path("guidance_compare"))
    a = p.parse_args(argv)
    from nnunet_sddm.study.context import nnunet_environment, open_study

    ctx = open_study(a.study)
    cfg = ctx.cfg
    out = a.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = cfg.sampler.settings
    results: Dict[str, dict] = {}
    with nnunet_environment(ctx):
        target_images = ctx.target_images
        n_slices = sum(read_volume(p).num_slices for p in list_images(target_images).values())
        print(f"guidance_compare: model {ctx.model_dir}, {n_slices} target slices of {target_images.parent.parent.name}, "
              f"D={base.D} N={base.N} tau={base.tau:g} K={base.steps}, {torch.get_num_threads()} threads", flush=True)
        for mode in MODES:
            settings = base.replace(guidance=mode)
            adapter = Adapter.open(ctx.model_dir, settings, device="cpu" if ctx.device == "cpu" else ctx.device,
                                   batch_size=cfg.sampler.batch_size, amp=cfg.sampler.amp, progress=False,
                                   ranks=Ranks())
            dest = out / f"adapted_{mode}"
            t0 = time.perf_counter()
            adapt_folder(target_images, dest, adapter.loaded, settings, batch_size=cfg.sampler.batch_size,
                         amp=cfg.sampler.amp, overwrite=True, progress=False, ranks=Ranks())
            dt = time.perf_counter() - t0
            results[mode] = {"seconds": dt, "slices_per_s": n_slices / dt,
                             "lowpass_rms": lowpass_rms(target_images, dest, adapter)}
            print(f"  {mode:10s}: {n_slices / dt:7.3f} slices/s ({dt:6.1f} s), lowpass_rms "
                  f"{results[mode]['lowpass_rms']:.4f}", flush=True)
        ratio = results["projection"]["slices_per_s"] / results["gradient"]["slices_per_s"]
        print(f"  projection_vs_gradient: {ratio:.2f}x slices/s", flush=True)
        sep = {}
        for name, folder in (("original", target_images), *((m, out / f"adapted_{m}") for m in MODES)):
            res = domain_shift({"source": ctx.raw("source") / "imagesTr", "target": folder}, progress=False)
            sep[name] = res["separability"]
            print(f"  separability source vs {name:10s} target: balanced accuracy "
                  f"{res['separability'].get('balanced_accuracy', float('nan')):.3f}", flush=True)
        rows = {"Baseline": study_rows(ctx, "Baseline"), "DA (study)": study_rows(ctx, "DA")}
        for mode in MODES:
            rows[f"DA {mode}"] = da_rows(ctx, out / f"adapted_{mode}", out / f"da_{mode}")
    for name, per_seg in rows.items():
        for seg, m in per_seg.items():
            print(f"  row {name:14s} {seg:10s} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()), flush=True)
    (out / "guidance_compare.json").write_text(json.dumps(
        {"study": str(ctx.out), "settings": base.to_dict(), "slices": n_slices, "modes": results,
         "projection_vs_gradient": ratio, "separability": sep, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
