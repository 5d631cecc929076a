"""Stage ``predict``: every trained model segments the target test images its rows need: as they
are (``original``), as SD-DM adapted them (``adapted``), as the alternatives standardised them
(``histmatch``, ``fda``), the ensemble of original and adapted (``ensemble``: mean class
probabilities), and, with ``postprocess``, the same segmentations post-processed (``__lcc``:
the largest connected component per structure).

The predictions run through the same code as ``nnUNetv2_sddm_predict``
(``nnunet_sddm.adaptation.predictor``): the model is loaded once per model by
``load_nnunet_predictor`` (nnUNetv2_predict's predictor and thread settings; no mirroring
test-time augmentation for any row, also not for the models trained with nnU-Net's augmentation,
whose checkpoints allow it: the nnU-Net aug row then differs from the Baseline by the training
augmentation alone), each folder is predicted by ``predict_folder`` (sequential, no worker processes)
and the ensemble is nnU-Net's ``merge_files`` through ``ensemble_folders``, as
``--ensemble-original``; post-processing is ``--postprocess``'s ``postprocess_folder``. Each
output folder is built under a temporary name and renamed when complete, so a folder that exists
is finished.
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch

from nnunet_sddm.adaptation import predictor as nnunet_prediction
from nnunet_sddm.adaptation.postprocess import postprocess_folder
from nnunet_sddm.study.context import Model, StudyContext
from nnunet_sddm.study.stages import Stage
from nnunet_sddm.study.stage_train import segmenter_inputs
from nnunet_sddm.utilities.files import staging_dir

#: Inputs with images of their own (``ensemble`` merges the probabilities of original and adapted).
IMAGE_INPUTS = ("original", "adapted", "histmatch", "fda")


@contextlib.contextmanager
def prediction_threads() -> Iterator[None]:
    """nnUNetv2_predict's torch thread count (``load_predictor`` sets it) for the block only: the
    process's count is restored afterwards, so later stages run alike whether or not a prediction
    ran before them (the inter-op count, set once per process on CUDA, cannot be restored)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_predict(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Segment the target test images every row needs with every trained model."""
    with prediction_threads():
        return {m.key: _predict_model(ctx, m, resume) for m in ctx.models()}


def load_predictor(ctx: StudyContext, m: Model) -> nnunet_prediction.SDDMPredictor:
    """The study's predictor of model ``m``: its fold, the study's step size, no mirroring."""
    return nnunet_prediction.load_nnunet_predictor(m.folder, [ctx.cfg.fold], device=ctx.device,
                                                   step_size=ctx.cfg.nnunet.step_size, allow_tqdm=False,
                                                   use_mirroring=False)


def _predict_model(ctx: StudyContext, m: Model, resume: bool) -> Dict[str, Any]:
    rows = [a for a in ctx.cfg.approaches() if a.kind == m.kind]
    inputs = list(dict.fromkeys(a.input for a in rows))
    ensemble = "ensemble" in inputs
    if ensemble:
        inputs = list(dict.fromkeys(["original", "adapted"] + inputs))
    posts = [(a.input, a.postprocess) for a in rows if a.postprocess]
    dirs = {inp: ctx.prediction_dir(m.kind, m.segmenter, inp, m.seed) for inp in inputs}
    t0 = time.perf_counter()
    todo = [inp for inp in inputs if not (resume and dirs[inp].is_dir())]
    if todo:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints its trainer lookup and every case
            predictor = load_predictor(ctx, m)
            for inp in todo:
                with staging_dir(dirs[inp], overwrite=True) as tmp:
                    if inp == "ensemble":
                        nnunet_prediction.ensemble_folders(predictor, [dirs["original"], dirs["adapted"]], tmp)
                    else:
                        nnunet_prediction.predict_folder(predictor, ctx.input_images(inp), tmp,
                                                         save_probabilities=ensemble and inp in ("original",
                                                                                                 "adapted"))
    for inp, post in posts:
        out = ctx.prediction_dir(m.kind, m.segmenter, inp, m.seed, post)
        if not (resume and out.is_dir()):
            postprocess_folder(dirs[inp], out, overwrite=True, progress=False)
    cases = len(list(dirs[inputs[0]].glob("*.nii.gz")))
    ctx.log(f"[study]   predicted with {m.key}: {cases} cases x {len(inputs)} inputs"
            + (f", {len(posts)} post-processed" if posts else ""))
    return {"cases": cases, "inputs": inputs, "seconds": round(time.perf_counter() - t0, 1)}


def predict_inputs(ctx: StudyContext) -> Any:
    return {**segmenter_inputs(ctx), "step_size": ctx.cfg.nnunet.step_size,
            "rows": [[a.kind, a.input, a.postprocess] for a in ctx.cfg.approaches()]}


def predict_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.out / "predictions"]


STAGE = Stage("predict", "predict the target test set (every input and post-processing the rows need)",
              run_predict, predict_inputs, predict_outputs, ("data", "adaptation", "alternatives", "train",
                                                            "generative_train"))
