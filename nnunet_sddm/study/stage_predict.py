"""Stage ``predict``: every trained model segments the target test images as they are
(``original``), as the adaptation stage adapted them (``adapted``), and the ensemble of both
(``ensemble``: mean class probabilities).

The predictions run through the same code as ``nnUNetv2_sddm_predict``
(``nnunet_sddm.adaptation.predictor``): the model is loaded once per segmenter by
``load_nnunet_predictor`` (nnUNetv2_predict's predictor and thread settings), each folder is
predicted by ``predict_folder`` (sequential, no worker processes, with class probabilities) and
the ensemble is nnU-Net's ``merge_files`` through ``ensemble_folders``, as
``--ensemble-original``. Each output folder is built under a temporary name and renamed when
complete, so a folder that exists is finished.
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from nnunet_sddm.adaptation import predictor as nnunet_prediction
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.stages import Stage
from nnunet_sddm.study.stage_train import segmenter_inputs
from nnunet_sddm.utilities.files import staging_dir

INPUTS = ("original", "adapted", "ensemble")


def run_predict(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Segment the target test images, original and adapted, with every trained model, and the
    ensemble of both (mean class probabilities)."""
    threads = torch.get_num_threads()  # nnUNetv2_predict's thread settings hold for this stage only
    try:
        return _predict_all(ctx, resume)
    finally:
        torch.set_num_threads(threads)


def _predict_all(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    result = {}
    for seg, kind, mdir in ctx.segmenter_models():
        dirs = {inp: ctx.prediction_dir(kind, seg, inp) for inp in INPUTS}
        if resume and all(d.is_dir() for d in dirs.values()):
            continue
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints its trainer lookup and every case
            predictor = nnunet_prediction.load_nnunet_predictor(
                mdir, [ctx.cfg.fold], device=ctx.device, step_size=ctx.cfg.nnunet.step_size, allow_tqdm=False)
            for inp, images in (("original", ctx.target_images), ("adapted", ctx.adapted)):
                if not (resume and dirs[inp].is_dir()):
                    with staging_dir(dirs[inp], overwrite=True) as tmp:
                        nnunet_prediction.predict_folder(predictor, images, tmp, save_probabilities=True)
            with staging_dir(dirs["ensemble"], overwrite=True) as tmp:
                cases = nnunet_prediction.ensemble_folders(predictor, [dirs["original"], dirs["adapted"]], tmp)
        result[f"{kind}__{seg}"] = {"cases": len(cases), "seconds": round(time.perf_counter() - t0, 1)}
        ctx.log(f"[study]   predicted with {kind}__{seg}: {len(cases)} cases x 3 inputs")
    return result


def predict_inputs(ctx: StudyContext) -> Any:
    return {**segmenter_inputs(ctx), "step_size": ctx.cfg.nnunet.step_size}


def predict_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.out / "predictions"]


STAGE = Stage("predict", "predict the target test set (original, adapted, ensemble)", run_predict, predict_inputs,
              predict_outputs, ("data", "adaptation", "train"))
