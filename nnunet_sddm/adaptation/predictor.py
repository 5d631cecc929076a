"""SD-DM adaptation inside nnU-Net prediction (``nnUNetv2_sddm_predict``).

:class:`SDDMPredictor` is an ``nnUNetPredictor`` whose raw input images are adapted before nnU-Net
preprocesses them. Per case, in the MAIN process (the diffusion model is never pickled into
nnU-Net's spawn workers):

1. read the case's images with ``plans_manager.image_reader_writer_class()`` (the reader nnU-Net
   itself uses for this model), arrays ``(C, z, y, x)``;
2. adapt the volume ``(z, y, x)`` with the injected ``adapt_fn`` (single-channel images, as all
   of this project; several cases are adapted together so that slices of many volumes share
   sampler batches), given each volume's voxel spacing from the reader's properties (nnU-Net's
   ``properties["spacing"]``, ``(z, y, x)`` mm: what a diffusion model in spacing mode needs);
3. optionally write the adapted images (``--save-adapted``: nnU-Net file names, the input's exact
   geometry, float32, written atomically);
4. run the configuration's preprocessor ``run_case_npy`` and yield
   ``{"data", "data_properties", "ofile"}`` to nnU-Net's own prediction and export.

Both nnU-Net paths are covered: ``predict_from_files`` (export workers, through
``_internal_get_data_iterator_from_lists_of_filenames``) and ``predict_from_files_sequential``
(``-npp 0 -nps 0``). The adapted arrays go to ``run_case_npy`` exactly as nnU-Net would read them
from the files ``nnUNetv2_sddm_adapt`` writes (float32, same geometry), so the segmentation equals
``nnUNetv2_sddm_adapt`` followed by the stock ``nnUNetv2_predict`` with the same seed.

Random streams: every slice is keyed ``"<case>/<k>"`` (``CASE`` of ``CASE_0000.nii.gz``, ``k`` the
slice index), as in ``nnUNetv2_sddm_adapt``, so a seed gives the same adapted image whichever
command, batch size or case grouping produced it.

Other methods (``method="histmatch"`` or ``"fda"``, ``methods.ClassicalAdapter`` fitted on the
source training images) replace the diffusion model as ``adapt_fn``; everything else is the same.
``postprocess="lcc"`` keeps the largest connected component of each label in every segmentation
written (``postprocess.postprocess_file``, in place, after nnU-Net's export; idempotent, so resumed
runs are safe); exported probabilities are left as predicted.

``N = 0`` means no adaptation: the input goes to nnU-Net untouched and the result equals the stock
``nnUNetv2_predict`` (the sampler's N = 0 would only clip intensities to the 0.5/99.5 percentile
window; that is not adaptation and would change nnU-Net's z-scoring).

Ensembling with the original (``--ensemble-original``, the paper's proposed cure for sampling
noise): the cases are predicted twice with the same network, once adapted and once unchanged,
each exported by nnU-Net with its class probabilities (logits -> resampling to the original
geometry -> softmax, nnU-Net's export); the two probability maps are averaged and turned into the
segmentation by nnU-Net's own ensembling (``nnunetv2.ensembling.ensemble.merge_files``, the code of
``nnUNetv2_ensemble``). Averaging in the original geometry avoids forking any nnU-Net code and is
exact even where the two inputs are cropped differently by nnU-Net's nonzero-crop. The exported
``.npz`` probabilities (``--save_probabilities``) are exactly the mean of the two inputs' exports.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.ensembling.ensemble import merge_files
from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
from nnunetv2.inference.export_prediction import (convert_predicted_logits_to_segmentation_with_correct_shape,
                                                  export_prediction_from_logits)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

from nnunet_sddm import __version__
from nnunet_sddm.adaptation.methods import BETA, CLASSICAL, METHODS, ClassicalAdapter, source_images_folder
from nnunet_sddm.adaptation.pipeline import Adapter
from nnunet_sddm.adaptation.postprocess import POSTPROCESS, labels_from_dataset_json, postprocess_file
from nnunet_sddm.data.volumes import write_like
from nnunet_sddm.utilities.devices import resolve_device
from nnunet_sddm.utilities.distributed import Ranks
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import write_json
from nnunet_sddm.utilities.nnunet_paths import (datasets_with_id, ensure_trainer_path_in_env,
                                                parse_dataset_folder_name, results_root)

#: ``adapt_fn(volumes, spacings) -> adapted``: ``{key: (z, y, x)}`` in any intensity units and
#: ``{key: (z, y, x) voxel spacing in mm}`` -> ``{key: (z, y, x) float32}``, same keys and shapes,
#: original intensity units (``Adapter.adapt_arrays``, ``ClassicalAdapter.adapt_arrays``).
AdaptFn = Callable[[Mapping[str, np.ndarray], Mapping[str, Optional[Sequence[float]]]], Dict[str, np.ndarray]]

PathLike = Union[str, os.PathLike]


def case_key(channel_files: Sequence[PathLike], file_ending: str) -> str:
    """The case identifier nnU-Net derives from a case's files (``CASE_0000<ending>`` -> ``CASE``):
    also the key of the case's random streams, as in ``nnUNetv2_sddm_adapt``."""
    return Path(channel_files[0]).name[: -(len(file_ending) + 5)]


def check_reader_for_adaptation(reader, source: str) -> None:
    """``SDDMError`` for an image reader that reorients the image (nnU-Net's ``NibabelIOWithReorient``).

    The adaptation slices the array the reader returns and the adapted images are written into the
    ORIGINAL file's header (``--save-adapted``, ``nnUNetv2_sddm_adapt``): a reoriented array would be
    saved flipped against its labels, adapted along another axis than ``nnUNetv2_sddm_adapt`` does,
    possibly not the through-plane one. ``reader``: the class or an instance; ``source``: where it is set.
    """
    cls = reader if isinstance(reader, type) else type(reader)
    if issubclass(cls, NibabelIOWithReorient) or "reorient" in cls.__name__.lower():
        raise SDDMError(f"{source}: the image reader {cls.__name__} reorients the images, which SD-DM adaptation "
                        f"does not support (adapted images keep the stored orientation and the original header); "
                        f"use a model planned with NibabelIO or SimpleITKIO")


class SDDMPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that adapts each raw input image with ``adapt_fn`` before preprocessing.

    Args:
        adapt_fn: the adaptation (see :data:`AdaptFn`); ``None`` = identity (N = 0).
        save_adapted_dir: folder for copies of the adapted images (nnU-Net names, input geometry).
        cases_per_adaptation: how many cases are adapted in one ``adapt_fn`` call (their slices
            share sampler batches; memory grows with it).
        **kwargs: ``nnUNetPredictor``'s own arguments (``tile_step_size``, ``device``, ...).

    ``adapt_inputs`` (default True) switches the adaptation off, making the predictor the stock
    one (used for the original half of ``--ensemble-original``).
    """

    def __init__(self, adapt_fn: Optional[AdaptFn] = None, save_adapted_dir: Optional[PathLike] = None,
                 cases_per_adaptation: int = 8, **kwargs):
        super().__init__(**kwargs)
        if int(cases_per_adaptation) < 1:
            raise SDDMError(f"cases_per_adaptation must be >= 1, got {cases_per_adaptation}")
        self.adapt_fn = adapt_fn
        self.save_adapted_dir = None if save_adapted_dir is None else Path(save_adapted_dir)
        self.cases_per_adaptation = int(cases_per_adaptation)
        self.adapt_inputs = True

    # ------------------------------------------------------------------ adaptation of raw images
    def read_and_adapt(self, list_of_lists: Sequence[Sequence[str]]) -> Iterator[Tuple[np.ndarray, dict]]:
        """For each case (its list of channel files) yield ``(data (1, z, y, x) float32, properties)``:
        the image as nnU-Net's reader gives it, adapted. Cases are adapted in groups
        of ``cases_per_adaptation``; adapted copies are written when ``save_adapted_dir`` is set."""
        rw = self.plans_manager.image_reader_writer_class()
        if self.adapt_fn is not None or self.save_adapted_dir is not None:
            check_reader_for_adaptation(rw, "the nnU-Net model's plans (image_reader_writer)")
        ending = self.dataset_json["file_ending"]
        for start in range(0, len(list_of_lists), self.cases_per_adaptation):
            group = list_of_lists[start:start + self.cases_per_adaptation]
            raw = []
            volumes: Dict[str, np.ndarray] = {}
            spacings: Dict[str, Optional[Tuple[float, ...]]] = {}
            for files in group:
                if len(files) != 1:
                    raise SDDMError(f"{files[1]}: only single-channel images can be adapted (the diffusion "
                                    f"model sees one channel; found {len(files)} channels)")
                try:
                    data, props = rw.read_images(list(files))
                except Exception as e:
                    raise SDDMError(f"{files[0]}: cannot read image ({type(e).__name__}: {e})") from None
                data = np.asarray(data, dtype=np.float32)
                raw.append((files, data, props))
                volumes[case_key(files, ending)] = data[0]
                spacing = props.get("spacing")  # nnU-Net's readers give it, (z, y, x) like the array
                spacings[case_key(files, ending)] = None if spacing is None else tuple(float(v) for v in spacing)
            adapted = volumes if self.adapt_fn is None else self.adapt_fn(volumes, spacings)
            for files, data, props in raw:
                a = np.asarray(adapted[case_key(files, ending)], dtype=np.float32)
                if a.shape != data[0].shape:
                    raise SDDMError(f"{files[0]}: adaptation returned shape {a.shape}, expected {data[0].shape}")
                if self.save_adapted_dir is not None:
                    write_like(a, files[0], self.save_adapted_dir / Path(files[0]).name)
                yield a[None], props

    def adapted_preprocessed_cases(self, input_list_of_lists: Sequence[Sequence[str]],
                                   seg_from_prev_stage_files: Optional[Sequence[Optional[str]]],
                                   output_filenames_truncated: Optional[Sequence[Optional[str]]]) -> Iterator[dict]:
        """nnU-Net's data iterator contract, in the main process: adapt, ``run_case_npy``, yield
        ``{"data": (C', ...) float32 tensor, "data_properties", "ofile"}`` (``C'`` includes the
        one-hot previous-stage segmentation of a cascade)."""
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose_preprocessing)
        rw = self.plans_manager.image_reader_writer_class()
        label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        n = len(input_list_of_lists)
        segs = list(seg_from_prev_stage_files) if seg_from_prev_stage_files is not None else [None] * n
        ofiles = list(output_filenames_truncated) if output_filenames_truncated is not None else [None] * n
        for (data, props), seg_file, ofile in zip(self.read_and_adapt(input_list_of_lists), segs, ofiles):
            seg = rw.read_seg(seg_file)[0] if seg_file is not None else None
            data, seg, props = preprocessor.run_case_npy(data, seg, props, self.plans_manager,
                                                         self.configuration_manager, self.dataset_json)
            if seg_file is not None:
                onehot = convert_labelmap_to_one_hot(seg[0], label_manager.foreground_labels, data.dtype)
                data = np.vstack((data, onehot))
            data = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format)
            yield {"data": data, "data_properties": props, "ofile": ofile}

    # ------------------------------------------------------------------ nnU-Net hooks
    def _internal_get_data_iterator_from_lists_of_filenames(self, input_list_of_lists, seg_from_prev_stage_files,
                                                            output_filenames_truncated, num_processes):
        """Adapted cases are preprocessed in this process (``num_processes`` is unused then: the
        diffusion sampling dominates the cost); with ``adapt_inputs`` off, nnU-Net's own workers."""
        if not self.adapt_inputs:
            return super()._internal_get_data_iterator_from_lists_of_filenames(
                input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated, num_processes)
        return self.adapted_preprocessed_cases(input_list_of_lists, seg_from_prev_stage_files,
                                               output_filenames_truncated)

    def predict_from_files_sequential(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None):
        """nnU-Net's sequential prediction (no worker processes) with the adapted inputs."""
        if not self.adapt_inputs:
            return super().predict_from_files_sequential(list_of_lists_or_source_folder,
                                                         output_folder_or_list_of_truncated_output_files,
                                                         save_probabilities, overwrite,
                                                         folder_with_segs_from_prev_stage)
        outputs = output_folder_or_list_of_truncated_output_files
        if isinstance(outputs, str):
            output_folder = outputs
        elif isinstance(outputs, list):
            output_folder = os.path.dirname(outputs[0]) or os.path.curdir
        else:
            output_folder = None
        if output_folder is not None:
            self._record_inputs(output_folder, dict(
                list_of_lists_or_source_folder=list_of_lists_or_source_folder,
                output_folder_or_list_of_truncated_output_files=outputs,
                save_probabilities=save_probabilities, overwrite=overwrite,
                folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage))
        if self.configuration_manager.previous_stage_name is not None and folder_with_segs_from_prev_stage is None:
            raise SDDMError(f"configuration {self.configuration_manager.configuration_name!r} is a cascade stage: "
                            f"give the previous stage's predictions with -prev_stage_predictions")
        lists, ofiles, segs = self._manage_input_and_output_lists(
            list_of_lists_or_source_folder, outputs, folder_with_segs_from_prev_stage, overwrite, 0, 1,
            save_probabilities)
        if len(lists) == 0:
            return []
        if folder_with_segs_from_prev_stage is None:
            segs = None
        ret = []
        for item in self.adapted_preprocessed_cases(lists, segs, ofiles):
            logits = self.predict_logits_from_preprocessed_data(item["data"]).cpu()
            if item["ofile"] is not None:
                export_prediction_from_logits(logits, item["data_properties"], self.configuration_manager,
                                              self.plans_manager, self.dataset_json, item["ofile"],
                                              save_probabilities)
            else:
                ret.append(convert_predicted_logits_to_segmentation_with_correct_shape(
                    logits, self.plans_manager, self.configuration_manager, self.label_manager,
                    item["data_properties"], save_probabilities))
        return ret

    def _record_inputs(self, output_folder: PathLike, arguments: dict) -> None:
        """What nnU-Net writes next to its predictions (its call arguments, dataset.json, plans.json)."""
        arguments = deepcopy(arguments)
        recursive_fix_for_json_export(arguments)
        os.makedirs(output_folder, exist_ok=True)
        save_json(arguments, os.path.join(output_folder, "predict_from_raw_data_args.json"))
        save_json(self.dataset_json, os.path.join(output_folder, "dataset.json"), sort_keys=False)
        save_json(self.plans_manager.plans, os.path.join(output_folder, "plans.json"), sort_keys=False)


# ---------------------------------------------------------------------- folder-level prediction
@dataclass
class Case:
    """One case to predict: its identifier, its channel files and its truncated output name."""

    case_id: str
    files: List[str]
    output_truncated: str


def list_cases(input_folder: PathLike, output_folder: PathLike, file_ending: str,
               num_parts: int = 1, part_id: int = 0) -> List[Case]:
    """The cases of an nnU-Net-named image folder (``CASE_XXXX<ending>``), this part's share
    (``[part_id::num_parts]``, as nnU-Net splits them). ``SDDMError`` if there are none."""
    input_folder = Path(input_folder)
    if not input_folder.is_dir():
        raise SDDMError(f"input folder {input_folder} does not exist")
    lists = create_lists_from_splitted_dataset_folder(str(input_folder), file_ending)
    if not lists:
        raise SDDMError(f"{input_folder}: no images named CASE_XXXX{file_ending} (nnU-Net naming, the "
                        f"model's file ending {file_ending!r})")
    cases = []
    for files in lists[part_id::num_parts]:
        case_id = os.path.basename(files[0])[: -(len(file_ending) + 5)]
        cases.append(Case(case_id, [str(f) for f in files], os.path.join(str(output_folder), case_id)))
    return cases


def is_predicted(case: Case, file_ending: str, save_probabilities: bool) -> bool:
    """True if the case's outputs (segmentation, and probabilities if asked for) exist."""
    done = os.path.isfile(case.output_truncated + file_ending)
    if save_probabilities:
        done = done and os.path.isfile(case.output_truncated + ".npz")
    return done


def _predict(predictor: nnUNetPredictor, cases: Sequence[Case], outputs: Sequence[str], save_probabilities: bool,
             num_processes_preprocessing: int, num_processes_segmentation_export: int,
             prev_stage_predictions: Optional[str]) -> None:
    """Run nnU-Net's prediction on explicit lists, sequentially when both process counts are 0
    (as ``nnUNetv2_predict``), else with its worker pools."""
    lists = [c.files for c in cases]
    for folder in {os.path.dirname(o) for o in outputs}:
        os.makedirs(folder, exist_ok=True)  # nnU-Net's sequential path does not create it
    if num_processes_preprocessing == 0 and num_processes_segmentation_export == 0:
        predictor.predict_from_files_sequential(lists, list(outputs), save_probabilities=save_probabilities,
                                                overwrite=True, folder_with_segs_from_prev_stage=prev_stage_predictions)
    else:
        predictor.predict_from_files(lists, list(outputs), save_probabilities=save_probabilities, overwrite=True,
                                     num_processes_preprocessing=max(1, num_processes_preprocessing),
                                     num_processes_segmentation_export=max(1, num_processes_segmentation_export),
                                     folder_with_segs_from_prev_stage=prev_stage_predictions,
                                     num_parts=1, part_id=0)


def predict_cases(predictor: SDDMPredictor, cases: Sequence[Case], output_folder: PathLike, *,
                  save_probabilities: bool = False, ensemble_original: bool = False,
                  num_processes_preprocessing: int = 3, num_processes_segmentation_export: int = 3,
                  prev_stage_predictions: Optional[str] = None) -> List[str]:
    """Predict ``cases`` into ``output_folder`` with the adapted inputs (or, with
    ``ensemble_original``, the average of the adapted and the original inputs' probabilities).
    ``num_processes_*`` 0 and 0: sequential, no worker processes. Returns the case ids predicted."""
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    if not cases:
        return []
    if not ensemble_original:
        predictor.adapt_inputs = True
        _predict(predictor, cases, [c.output_truncated for c in cases], save_probabilities,
                 num_processes_preprocessing, num_processes_segmentation_export, prev_stage_predictions)
        return [c.case_id for c in cases]

    work = Path(tempfile.mkdtemp(prefix=".sddm_ensemble-", dir=output_folder))
    try:
        for name, adapt in (("adapted", True), ("original", False)):
            predictor.adapt_inputs = adapt
            _predict(predictor, cases, [str(work / name / c.case_id) for c in cases], True,
                     num_processes_preprocessing, num_processes_segmentation_export, prev_stage_predictions)
        predictor.adapt_inputs = True
        ensemble_folders(predictor, [work / "adapted", work / "original"], output_folder,
                         save_probabilities=save_probabilities, case_ids=[c.case_id for c in cases])
        predictor._record_inputs(output_folder, {"ensemble_original": True, "cases": [c.case_id for c in cases],
                                                 "save_probabilities": save_probabilities})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [c.case_id for c in cases]


def predict_folder(predictor: SDDMPredictor, input_folder: PathLike, output_folder: PathLike, *,
                   save_probabilities: bool = False, num_processes_preprocessing: int = 0,
                   num_processes_segmentation_export: int = 0) -> List[str]:
    """Predict every case of the nnU-Net-named image folder ``input_folder`` into ``output_folder``
    (``predict_cases`` without ensembling; default sequential, no worker processes). Returns the
    case ids."""
    cases = list_cases(input_folder, output_folder, predictor.dataset_json["file_ending"])
    return predict_cases(predictor, cases, output_folder, save_probabilities=save_probabilities,
                         num_processes_preprocessing=num_processes_preprocessing,
                         num_processes_segmentation_export=num_processes_segmentation_export)


def ensemble_folders(predictor: nnUNetPredictor, folders: Sequence[PathLike], output_folder: PathLike, *,
                     save_probabilities: bool = False, case_ids: Optional[Sequence[str]] = None) -> List[str]:
    """Average the class probabilities (``CASE.npz`` + ``CASE.pkl``, nnU-Net's export) of the same
    cases in ``folders`` and write the segmentations (and, with ``save_probabilities``, the mean
    probabilities) to ``output_folder`` with nnU-Net's ``merge_files`` (the code of
    ``nnUNetv2_ensemble``). ``case_ids``: the cases (default: every ``.npz`` of the folders, which
    must hold the same cases). Each case is merged under a temporary name and moved into place,
    probabilities first, segmentation last: a present segmentation means a finished case.
    Returns the case ids."""
    folders = [Path(f) for f in folders]
    if case_ids is None:
        found = [sorted(p.name[:-4] for p in f.glob("*.npz")) for f in folders]
        if not found[0] or any(c != found[0] for c in found):
            raise SDDMError(f"cannot ensemble {', '.join(map(str, folders))}: their probability files (.npz) differ")
        case_ids = found[0]
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    ending = predictor.dataset_json["file_ending"]
    rw = predictor.plans_manager.image_reader_writer_class()
    work = Path(tempfile.mkdtemp(prefix=".sddm_merge-", dir=output_folder))
    try:
        for case in case_ids:
            merged = work / case
            merge_files([str(f / f"{case}.npz") for f in folders], str(merged), ending, rw, predictor.label_manager,
                        save_probabilities)
            for suffix in ([".npz", ".pkl"] if save_probabilities else []) + [ending]:
                os.replace(str(merged) + suffix, str(output_folder / case) + suffix)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return list(case_ids)


# ---------------------------------------------------------------------- loading a trained nnU-Net model
def set_prediction_threads(device: str) -> None:
    """torch's thread settings of ``nnUNetv2_predict``: every core on the CPU, one thread (and one
    inter-op thread, if not fixed yet in this process) with CUDA; MPS keeps torch's default."""
    if device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif device == "cuda":
        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # torch allows it once per process, before any inter-op work
            pass


def load_nnunet_predictor(model_folder: PathLike, folds: Sequence[Union[int, str]],
                          checkpoint: str = "checkpoint_final.pth", *, device: str = "cuda", step_size: float = 0.5,
                          use_mirroring: bool = True, perform_everything_on_device: bool = True,
                          verbose: bool = False, allow_tqdm: bool = True, adapt_fn: Optional[AdaptFn] = None,
                          save_adapted_dir: Optional[PathLike] = None) -> SDDMPredictor:
    """The :class:`SDDMPredictor` of a trained nnU-Net model folder (``dataset.json``, ``plans.json``,
    ``fold_X/<checkpoint>``), built as ``nnUNetv2_predict`` builds its predictor: Gaussian
    sliding windows of step ``step_size`` (0, 1], mirroring unless ``use_mirroring`` is False,
    nnUNetv2_predict's torch threads (:func:`set_prediction_threads`). ``device``: ``cpu``,
    ``cuda`` or ``mps``; ``adapt_fn``: the adaptation of the inputs (None: the images are
    predicted as they are). The plugin's trainers are made findable (``nnUNet_extTrainer``);
    ``SDDMError`` if nnU-Net cannot find the model's trainer class."""
    ensure_trainer_path_in_env()
    set_prediction_threads(device)
    predictor = SDDMPredictor(adapt_fn=adapt_fn, save_adapted_dir=save_adapted_dir, tile_step_size=float(step_size),
                              use_gaussian=True, use_mirroring=use_mirroring,
                              perform_everything_on_device=perform_everything_on_device, device=torch.device(device),
                              verbose=verbose, verbose_preprocessing=verbose, allow_tqdm=allow_tqdm)
    try:
        predictor.initialize_from_trained_model_folder(str(model_folder), list(folds), checkpoint_name=checkpoint)
    except RuntimeError as e:
        if "trainer" in str(e).lower():
            raise SDDMError(f"{model_folder}: nnU-Net cannot find the trainer class of this model ({e}); "
                            f"custom trainers must be on nnUNet_extTrainer") from None
        raise
    return predictor


# ---------------------------------------------------------------------- the whole command
NNUNET_DEVICES = ("cpu", "cuda", "mps")


def nnunet_model_folder(dataset: Union[int, str], trainer: str, plans: str, configuration: str) -> Path:
    """``$nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>`` (what
    ``nnUNetv2_predict -d -tr -p -c`` uses); ``SDDMError`` if it does not exist."""
    results = results_root()
    s = str(dataset)
    if s.isdigit():
        found = datasets_with_id(int(s), results)
        if not found:
            raise SDDMError(f"-d {s}: no trained nnU-Net models for dataset {int(s)} in {results}")
        if len(found) > 1:
            raise SDDMError(f"-d {s}: several datasets with id {int(s)} in {results}: {[p.name for p in found]}")
        name = found[0].name
    else:
        parse_dataset_folder_name(s)
        name = s
    folder = results / name / f"{trainer}__{plans}__{configuration}"
    if not folder.is_dir():
        raise SDDMError(f"no trained nnU-Net model at {folder} (check -d, -tr, -p and -c)")
    return folder


def parse_folds(folds: Sequence[Union[int, str]]) -> List[Union[int, str]]:
    """nnU-Net's ``-f`` values: integers or ``all``."""
    out: List[Union[int, str]] = []
    for f in folds:
        if str(f) == "all":
            out.append("all")
        elif str(f).isdigit():
            out.append(int(f))
        else:
            raise SDDMError(f"-f: fold {f!r} is neither an integer nor 'all'")
    if not out:
        raise SDDMError("-f: no folds given")
    return out


def check_checkpoints(model_folder: Path, folds: Sequence[Union[int, str]], checkpoint_name: str) -> None:
    """``SDDMError`` naming the first missing ``fold_X/<checkpoint>``, dataset.json or plans.json."""
    for f in ("dataset.json", "plans.json"):
        if not (model_folder / f).is_file():
            raise SDDMError(f"{model_folder / f} not found: not a complete nnU-Net model folder")
    for f in folds:
        ckpt = model_folder / f"fold_{f}" / checkpoint_name
        if not ckpt.is_file():
            raise SDDMError(f"{ckpt} not found: fold {f} of this model is not trained (choose folds with -f, "
                            f"the checkpoint with -chk)")


def check_method_arguments(method: str, model: Optional[PathLike], settings, source: Optional[PathLike],
                           beta: Optional[float]) -> bool:
    """``SDDMError`` unless the arguments fit ``method`` (sddm: a model and settings, no source or
    beta; histmatch: a source, no model, settings or beta; fda: a source, no model or settings).
    Returns True for the classical methods."""
    if method not in METHODS:
        raise SDDMError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "sddm":
        if model is None or settings is None:
            raise SDDMError("--method sddm needs a diffusion model: give -m/--model")
        if source is not None or beta is not None:
            raise SDDMError(f"--method sddm does not use {'--source' if source is not None else '--beta'} "
                            f"(options of histmatch / fda)")
        return False
    if source is None:
        raise SDDMError(f"--method {method} needs the source training images: give --source (a raw dataset "
                        f"id, DatasetXXX_Name or folder, or a folder of images)")
    if model is not None:
        raise SDDMError(f"--method {method} does not use a diffusion model (-m/--model is for --method sddm)")
    if settings is not None:
        raise SDDMError(f"--method {method} does not use sampler settings (they are for --method sddm)")
    if beta is not None and method != "fda":
        raise SDDMError(f"--method {method} does not use --beta (an option of fda)")
    return method in CLASSICAL


def _same(a: Optional[PathLike], b: Optional[PathLike]) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def sddm_predict(input_folder: PathLike, output_folder: PathLike, dataset: Union[int, str], configuration: str,
                 model: Optional[PathLike], settings, *, plans: str = "nnUNetPlans", trainer: str = "nnUNetTrainer",
                 folds: Sequence[Union[int, str]] = (0, 1, 2, 3, 4), checkpoint: str = "checkpoint_final.pth",
                 step_size: float = 0.5, disable_tta: bool = False, verbose: bool = False,
                 save_probabilities: bool = False, continue_prediction: bool = False,
                 num_processes_preprocessing: int = 3, num_processes_segmentation_export: int = 3,
                 prev_stage_predictions: Optional[PathLike] = None, num_parts: int = 1, part_id: int = 0,
                 device: str = "cuda", disable_progress_bar: bool = False, not_on_device: bool = False,
                 batch_size: Optional[int] = None, amp: Optional[str] = None,
                 save_adapted: Optional[PathLike] = None, ensemble_original: bool = False,
                 method: str = "sddm", source: Optional[PathLike] = None, beta: Optional[float] = None,
                 seed: int = 0, postprocess: Optional[str] = None) -> dict:
    """``nnUNetv2_sddm_predict``: ``nnUNetv2_predict`` (same arguments and meaning) on SD-DM-adapted
    inputs.

    Args (beyond ``nnUNetv2_predict``'s):
        model: diffusion model folder or ``DATASET[:PRESET]``.
        settings: ``SamplerSettings`` (D, N, tau, steps, seed, reference_behaviour); N = 0: no adaptation.
        batch_size: slices per sampler batch (default: per device); amp: None, "bf16" or "fp16".
        save_adapted: folder for the adapted images (nnU-Net names, input geometry).
        ensemble_original: average the class probabilities of the adapted and the original input.
        method: ``"sddm"`` (``model`` and ``settings`` required), ``"histmatch"`` or ``"fda"``
            (``source`` required, ``model`` and ``settings`` must be None).
        source: the source training images of histmatch / fda: a raw dataset (id, name, folder;
            its ``imagesTr``) or a folder of nnU-Net-named images.
        beta: FDA's low-frequency fraction (default 0.01; fda only); seed: FDA's seed of the
            per-slice source choices.
        postprocess: ``None`` or ``"lcc"`` (largest connected component per label of the
            segmentations written; probabilities unchanged).

    Everything is checked (folders, nnU-Net model and folds, diffusion model, sampler settings,
    every input image) before anything is written. Returns a summary (cases predicted/skipped).
    """

    t0 = time.perf_counter()
    # ---- plain arguments
    if device not in NNUNET_DEVICES:
        raise SDDMError(f"-device must be one of {', '.join(NNUNET_DEVICES)}, got {device!r}")
    if not 0 < float(step_size) <= 1:
        raise SDDMError(f"-step_size must be in (0, 1], got {step_size}")
    if int(num_parts) < 1 or not 0 <= int(part_id) < int(num_parts):
        raise SDDMError(f"-part_id must be in 0..num_parts-1 (got -part_id {part_id}, -num_parts {num_parts})")
    if int(num_processes_preprocessing) < 0 or int(num_processes_segmentation_export) < 0:
        raise SDDMError("-npp and -nps must be >= 0")
    if batch_size is not None and int(batch_size) < 1:
        raise SDDMError(f"--batch-size must be >= 1, got {batch_size}")
    classical = check_method_arguments(method, model, settings, source, beta)
    if postprocess not in (None,) + POSTPROCESS:
        raise SDDMError(f"--postprocess must be one of {', '.join(POSTPROCESS)}, got {postprocess!r}")
    folds = parse_folds(folds)
    input_folder, output_folder = Path(input_folder), Path(output_folder)
    if _same(input_folder, output_folder):
        raise SDDMError(f"-o {output_folder} is the input folder: choose another output folder")
    if save_adapted is not None and (_same(save_adapted, input_folder) or _same(save_adapted, output_folder)):
        raise SDDMError(f"--save-adapted {save_adapted} must differ from the input and the output folder")
    if prev_stage_predictions is not None and not Path(prev_stage_predictions).is_dir():
        raise SDDMError(f"-prev_stage_predictions {prev_stage_predictions} does not exist")

    # ---- the nnU-Net model and the inputs
    model_folder = nnunet_model_folder(dataset, trainer, plans, configuration)
    check_checkpoints(model_folder, folds, checkpoint)
    dataset_json = load_json(str(model_folder / "dataset.json"))
    ending = dataset_json["file_ending"]
    cases = list_cases(input_folder, output_folder, ending, int(num_parts), int(part_id))
    todo = [c for c in cases if not (continue_prediction and is_predicted(c, ending, save_probabilities))]

    # ---- the adaptation: the diffusion model and the sampler settings, or a classical method
    if classical:
        adapter = ClassicalAdapter.open(method, source_images_folder(source), beta=BETA if beta is None else beta,
                                        seed=seed, progress=not disable_progress_bar)
        adapting = True
    else:
        adapter = Adapter.open(model, settings, device=resolve_device(device), batch_size=batch_size, amp=amp,
                               progress=not disable_progress_bar, ranks=Ranks())
        adapting = settings.N > 0
    reader_class = PlansManager(load_json(str(model_folder / "plans.json"))).image_reader_writer_class
    if adapting or save_adapted is not None:
        check_reader_for_adaptation(reader_class, f"{model_folder / 'plans.json'}")
    if adapting and todo:
        adapter.check_images([f for c in todo for f in c.files], reader_class())
    adapt_fn = adapter.adapt_arrays

    # ---- nnU-Net's predictor (the same construction as the study's predictions)
    predictor = load_nnunet_predictor(model_folder, folds, checkpoint, device=device, step_size=step_size,
                                      use_mirroring=not disable_tta, perform_everything_on_device=not not_on_device,
                                      verbose=verbose, allow_tqdm=not disable_progress_bar,
                                      adapt_fn=adapt_fn if adapting else None, save_adapted_dir=save_adapted)
    if predictor.configuration_manager.previous_stage_name is not None and prev_stage_predictions is None:
        raise SDDMError(f"-c {configuration} is a cascade stage: give the previous stage's predictions "
                        f"with -prev_stage_predictions")

    # ---- record the exact configuration, then predict
    record = {
        "nnunet_sddm_version": __version__,
        "command": "nnUNetv2_sddm_predict",
        "input_folder": str(input_folder.resolve()),
        "nnunet_model_folder": str(model_folder.resolve()),
        "folds": folds, "checkpoint": checkpoint, "configuration": configuration,
        "step_size": float(step_size), "use_mirroring": not disable_tta,
        "diffusion_model": None if classical else str(Path(adapter.loaded.model_dir).resolve()),
        "sampler": None if classical else settings.to_dict(),
        "adaptation": method if classical else ("sd-dm" if adapting else "none (N = 0)"),
        "method": adapter.identity() if classical else {"method": "sddm"},
        "postprocess": postprocess,
        "batch_size": batch_size, "amp": amp, "device": device,
        "ensemble_original": bool(ensemble_original), "save_adapted": None if save_adapted is None else
        str(Path(save_adapted).resolve()),
        "num_parts": int(num_parts), "part_id": int(part_id),
    }
    output_folder.mkdir(parents=True, exist_ok=True)
    write_json(record, output_folder / "sddm_predict.json")
    if save_adapted is not None:
        Path(save_adapted).mkdir(parents=True, exist_ok=True)
        write_json(record, Path(save_adapted) / "sddm_predict.json")
    done = predict_cases(predictor, todo, output_folder, save_probabilities=save_probabilities,
                         ensemble_original=ensemble_original,
                         num_processes_preprocessing=int(num_processes_preprocessing),
                         num_processes_segmentation_export=int(num_processes_segmentation_export),
                         prev_stage_predictions=None if prev_stage_predictions is None else str(prev_stage_predictions))
    if postprocess == "lcc":
        rw = reader_class()
        labels = labels_from_dataset_json(dataset_json)
        record["postprocess_removed_voxels"] = {
            c.case_id: postprocess_file(c.output_truncated + ending, c.output_truncated + ending, labels,
                                        reader_writer=rw)
            for c in cases if os.path.isfile(c.output_truncated + ending)}
    if classical and method == "fda":
        record["method"]["choices"] = {c: adapter.choices[c] for c in sorted(adapter.choices)}
    if postprocess or classical:
        write_json(record, output_folder / "sddm_predict.json")
    return {"predicted": done, "skipped": [c.case_id for c in cases if c not in todo],
            "seconds": round(time.perf_counter() - t0, 3)}
