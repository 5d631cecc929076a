"""Pseudo-labelled target datasets: a trained nnU-Net segments target images, the result is a raw dataset.

Notation: ``P`` the class probabilities of one case, ``(C, z, y, x)`` float32 in [0, 1], channel
``c`` the probability of label value ``c`` (nnU-Net's consecutive labels ``0 .. C-1``, 0 the
background), in the image's own array order and shape (nnU-Net's export); ``seg`` the label map
``(z, y, x)``; the confidence of a voxel is ``max_c P[c]``.

``pseudo_label_dataset(TARGET, NEW_ID, model)`` (``nnUNetv2_sddm_pseudo_label``):

1. every member of the model, one ``(fold, checkpoint)`` pair per fold and checkpoint, predicts
   the target images with nnU-Net's own predictor (``predictor.load_nnunet_predictor`` and
   ``predictor.predict_cases``, the path of ``nnUNetv2_sddm_predict``; no adaptation) and exports
   its probabilities (``--save_probabilities``); ``P`` is the mean of the members' exported
   probabilities (nnU-Net's ``average_probabilities``, the code of ``nnUNetv2_ensemble``), so the
   folds are averaged as probabilities, not as logits as in one ``nnUNetv2_predict -f`` call;
2. ``seg`` = nnU-Net's segmentation of ``P`` (``LabelManager.convert_probabilities_to_segmentation``:
   the argmax), then the largest connected component of each structure is kept
   (``postprocess.largest_component_per_label``, 26-connected; removed voxels become background);
3. with a threshold ``t``: every voxel with confidence ``< t`` gets nnU-Net's ignore label
   (``"ignore"`` = ``C``, max label + 1, in ``dataset.json``), which nnU-Net's training leaves out
   of the loss; without a threshold there is no ignore label;
4. the images are byte copies of the target images and the labels are written by nnU-Net's
   reader/writer with the properties nnU-Net exported; a label whose geometry differs from its
   image is refused.

Layout: ``$nnUNet_raw/DatasetNEW_<name>`` (default name ``<target name>PseudoLabel``) with
``imagesTr``, ``labelsTr``, ``dataset.json`` (the model's labels, plus ``ignore`` when thresholded,
and a ``sddm_pseudo_label`` block) and ``cases.json`` (per case: ``case``, ``subject``,
``source_image``, ``source_dataset``, ``model``, ``mean_confidence`` (over the final foreground
before the ignore label), ``ignored_fraction``, ``lcc_removed_voxels`` per structure name,
``threshold``, ``pseudo_label: true`` and the target record's fields), written by
``raw_dataset.RawDatasetBuilder`` (staging folder renamed into place, patient-level
``splits_final.json``). The member predictions live in ``$nnUNet_raw/.DatasetNEW_<name>.partial``
until the dataset is published: an interrupted run resumes there (same target and model: finished
cases are not predicted again), anything else starts afresh.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from nnunetv2.ensembling.ensemble import average_probabilities
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import nnunet_sddm
from nnunet_sddm.adaptation.postprocess import largest_component_per_label
from nnunet_sddm.adaptation.predictor import (Case, check_checkpoints, is_predicted, list_cases, load_nnunet_predictor,
                                              nnunet_model_folder, parse_folds, predict_cases)
from nnunet_sddm.data.raw_dataset import (FILE_ENDING, IGNORE, RawDatasetBuilder, check_target_free, load_cases_json,
                                          load_dataset_json, log)
from nnunet_sddm.data.volumes import same_geometry
from nnunet_sddm.diffusion.conditioning import check_same_labels, dataset_labels
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import read_json, write_json
from nnunet_sddm.utilities.nnunet_paths import (dataset_folder_name, find_raw_dataset,
                                                parse_dataset_folder_name, raw_root)
from nnunet_sddm.utilities.progress import progress_bar

PathLike = Union[str, os.PathLike]
Fold = Union[int, str]

#: Record of an unfinished run in the ``.partial`` folder (what it predicted, to resume).
RECORD_FILE = "sddm_pseudo_label.json"


# ---------------------------------------------------------------------- the trained nnU-Net
@dataclass(frozen=True)
class NnUNetModel:
    """A trained nnU-Net: what ``nnUNetv2_predict -d -c -tr -p -f -chk`` name.

    ``folds``: integers or ``"all"``; ``checkpoints``: checkpoint file names. Every
    ``(fold, checkpoint)`` pair is one member of the ensemble (:meth:`members`).
    """

    dataset: Union[int, str]
    configuration: str
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetPlans"
    folds: Tuple[Fold, ...] = (0, 1, 2, 3, 4)
    checkpoints: Tuple[str, ...] = ("checkpoint_final.pth",)

    def __post_init__(self):
        object.__setattr__(self, "folds", tuple(parse_folds(self.folds)))
        object.__setattr__(self, "checkpoints", tuple(str(c) for c in self.checkpoints))
        if not self.checkpoints:
            raise SDDMError("-chk: no checkpoint given")

    @property
    def folder(self) -> Path:
        """``$nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>`` (``SDDMError`` if missing)."""
        return nnunet_model_folder(self.dataset, self.trainer, self.plans, self.configuration)

    def members(self) -> List[Tuple[Fold, str]]:
        """The ``(fold, checkpoint)`` pairs whose probabilities are averaged."""
        return [(f, c) for c in self.checkpoints for f in self.folds]

    def check(self) -> Path:
        """The model folder, after checking that every member's checkpoint exists and that its
        ``dataset.json`` has integer labels with at least one structure."""
        folder = self.folder
        for chk in self.checkpoints:
            check_checkpoints(folder, self.folds, chk)
        dj = load_dataset_json(folder)
        if "regions_class_order" in dj:
            raise SDDMError(f"{folder / 'dataset.json'}: a region-based model; pseudo-labels and mask adherence "
                            f"need a model with one label per structure")
        if not [v for k, v in dataset_labels(folder).items() if k != IGNORE and v != 0]:
            raise SDDMError(f"{folder / 'dataset.json'}: the model's dataset has no labels besides the background")
        return folder

    def to_dict(self) -> dict:
        """JSON record: dataset folder name, configuration, trainer, plans, folds, checkpoints."""
        d = asdict(self)
        d["dataset"] = self.folder.parent.name
        d["folds"], d["checkpoints"] = list(self.folds), list(self.checkpoints)
        return d


def model_labels(model_folder: PathLike) -> Dict[str, int]:
    """``{name: value}`` of the model's ``dataset.json``, background included, ignore label excluded."""
    return {k: v for k, v in dataset_labels(model_folder).items() if k != IGNORE}


def _member_dir(work: Path, fold: Fold, checkpoint: str) -> Path:
    return work / f"fold_{fold}__{Path(checkpoint).stem}"


def predict_members(model: NnUNetModel, image_lists: Dict[str, List[str]], work: PathLike, *, device: str = "cuda",
                    num_processes: int = 0, progress: bool = True) -> List[Path]:
    """Predict every case ``{case: [channel files]}`` with every member of ``model`` into
    ``work/fold_<f>__<checkpoint>/`` (segmentation, ``.npz`` probabilities and ``.pkl`` properties,
    nnU-Net's export; cases with both files present are skipped). ``num_processes``: nnU-Net's
    preprocessing and export workers (0: sequential). Returns the member folders."""
    folder = model.check()
    ending = load_dataset_json(folder)["file_ending"]
    out = []
    for fold, chk in model.members():
        member = _member_dir(Path(work), fold, chk)
        cases = [Case(c, list(files), str(member / c)) for c, files in sorted(image_lists.items())]
        todo = [c for c in cases if not is_predicted(c, ending, save_probabilities=True)]
        if todo:
            predictor = load_nnunet_predictor(folder, [fold], chk, device=device, allow_tqdm=progress)
            predict_cases(predictor, todo, member, save_probabilities=True,
                          num_processes_preprocessing=int(num_processes),
                          num_processes_segmentation_export=int(num_processes))
        out.append(member)
    return out


def mean_probabilities(member_dirs: Sequence[PathLike], case: str) -> Tuple[np.ndarray, dict]:
    """``(P, properties)`` of ``case``: the mean of the members' exported probabilities
    (``(C, z, y, x)`` float32) and nnU-Net's properties of the first member (for writing)."""
    files = [str(Path(d) / f"{case}.npz") for d in member_dirs]
    return average_probabilities(files), load_pickle(files[0][:-4] + ".pkl")


# ---------------------------------------------------------------------- pure functions of P
def confidence_mask(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean ``(z, y, x)``: True where the confidence ``max_c P[c]`` is below ``threshold`` (0, 1]."""
    p = np.asarray(probabilities)
    if p.ndim < 2 or p.shape[0] < 2:
        raise SDDMError(f"probabilities: expected (C >= 2, ...) class probabilities, got shape {p.shape}")
    t = float(threshold)
    if not 0.0 < t <= 1.0:
        raise SDDMError(f"--threshold must be in (0, 1], got {threshold}")
    return p.max(axis=0) < t


def largest_components(seg: np.ndarray, labels: Sequence[int]) -> Tuple[np.ndarray, Dict[int, int]]:
    """``(seg with the largest 26-connected component of each of labels kept, {label: voxels removed})``
    (``postprocess.largest_component_per_label``; removed voxels become 0)."""
    out = largest_component_per_label(seg, labels)
    return out, {int(v): int(np.count_nonzero((seg == v) & (out != v))) for v in labels}


@dataclass
class PseudoLabel:
    """One case's pseudo-label: ``seg`` (z, y, x) (``ignore_value`` where not confident),
    ``removed`` ``{label: voxels removed by the largest-component step}``, ``mean_confidence``
    (mean of ``max_c P`` over ``seg``'s foreground before the ignore label; None without foreground),
    ``ignored_fraction`` (share of voxels given the ignore label, 0 without threshold)."""

    seg: np.ndarray
    removed: Dict[int, int] = field(default_factory=dict)
    mean_confidence: Optional[float] = None
    ignored_fraction: float = 0.0


def pseudo_label(probabilities: np.ndarray, label_manager, threshold: Optional[float] = None) -> PseudoLabel:
    """The pseudo-label of class probabilities ``P`` (``(C, z, y, x)``): nnU-Net's segmentation
    (``label_manager``: nnU-Net's ``LabelManager`` of the model), its largest component per
    structure, and with ``threshold`` the ignore label ``C`` on voxels whose confidence is below it."""
    p = np.asarray(probabilities, dtype=np.float32)
    n_classes = len(label_manager.foreground_labels) + 1
    if p.ndim != 4 or p.shape[0] != n_classes:
        raise SDDMError(f"probabilities of shape {p.shape}: expected ({n_classes}, z, y, x), one channel per label")
    seg = np.asarray(label_manager.convert_probabilities_to_segmentation(p))
    seg, removed = largest_components(seg, [int(v) for v in label_manager.foreground_labels])
    confidence = p.max(axis=0)
    fg = seg > 0
    mean_conf = float(confidence[fg].mean()) if fg.any() else None
    ignored = 0.0
    if threshold is not None:
        low = confidence_mask(p, threshold)
        seg = seg.astype(np.int16 if n_classes > 255 else np.uint8, copy=True)
        seg[low] = n_classes
        ignored = float(low.mean())
    return PseudoLabel(seg=seg, removed=removed, mean_confidence=mean_conf, ignored_fraction=ignored)


# ---------------------------------------------------------------------- checks of datasets
def check_pseudo_label_dataset(pseudo: PathLike, source: PathLike) -> None:
    """``SDDMError`` naming ``pseudo`` unless its ``dataset.json`` labels are those of ``source``
    (a raw dataset or an nnU-Net model folder), optionally plus nnU-Net's ignore label ``"ignore"``
    = max label + 1 (``diffusion.conditioning.check_same_labels`` for the labels themselves)."""
    labels = dataset_labels(pseudo)
    if IGNORE not in labels:
        check_same_labels(source, pseudo, role="pseudo-label dataset")
        return
    ignore = labels.pop(IGNORE)
    if ignore != max(labels.values()) + 1:
        raise SDDMError(f"pseudo-label dataset {os.fspath(pseudo)}: its ignore label is {ignore}, nnU-Net needs "
                        f"max label + 1 = {max(labels.values()) + 1}")
    source_labels = model_labels(source)
    if labels != source_labels:
        raise SDDMError(f"pseudo-label dataset {os.fspath(pseudo)}: its dataset.json labels {labels} (besides "
                        f"ignore) differ from those of the source {os.fspath(source)} ({source_labels})")


# ---------------------------------------------------------------------- the target images
@dataclass
class Target:
    """The images to pseudo-label: ``{case: [channel files]}``, the raw dataset they come from
    (None for a plain folder), its ``cases.json`` records and the default dataset name."""

    images: Dict[str, List[str]]
    dataset: Optional[Path]
    records: Dict[str, dict]
    name: str


def find_target(target: PathLike, file_ending: str) -> Target:
    """Resolve ``target``: a raw dataset (id, ``DatasetXXX_Name`` or its folder; every image of its
    ``imagesTr`` and ``imagesTs``) or a folder of nnU-Net-named images (``CASE_0000<ending>``)."""
    p = Path(str(target))
    is_dataset = (p / "dataset.json").is_file() if p.is_dir() else True
    if not is_dataset:
        cases = list_cases(p, p, file_ending)
        return Target({c.case_id: c.files for c in cases}, None, {}, p.resolve().name)
    ds = find_raw_dataset(str(target))
    images: Dict[str, List[str]] = {}
    for sub in ("imagesTr", "imagesTs"):
        if not (ds / sub).is_dir():
            continue
        for c in list_cases(ds / sub, ds / sub, file_ending):
            if c.case_id in images:
                raise SDDMError(f"{ds}: case {c.case_id} is in imagesTr and imagesTs; case names must be unique")
            images[c.case_id] = c.files
    if not images:
        raise SDDMError(f"{ds}: no images named CASE_0000{file_ending} in imagesTr or imagesTs")
    records = {r["case"]: r for r in load_cases_json(ds)}
    return Target(images, ds, records, parse_dataset_folder_name(ds.name)[1] if ds.name.startswith("Dataset")
                  else ds.name)


def _partial(folder_name: str) -> Path:
    return raw_root() / f".{folder_name}.partial"


def _open_partial(partial: Path, identity: dict) -> None:
    """Keep an unfinished run's folder with the same identity (resume), else start afresh."""
    rec = partial / RECORD_FILE
    if partial.exists():
        try:
            same = rec.is_file() and read_json(rec) == identity
        except SDDMError:
            same = False
        if same:
            log(f"resuming the predictions in {partial}")
            return
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_json(identity, rec)


# ---------------------------------------------------------------------- the whole command
def pseudo_label_dataset(target: PathLike, new_id: int, model: NnUNetModel, *, threshold: Optional[float] = None,
                         name: Optional[str] = None, overwrite: bool = False, device: str = "cuda",
                         num_processes: int = 0, progress: bool = True) -> Path:
    """Build the pseudo-labelled raw dataset ``DatasetNEW_<name>`` from ``target`` (see the module docstring).

    Args:
        target: raw dataset (id, name, folder) or a folder of nnU-Net-named images.
        new_id: id of the new dataset (not the model's dataset, not the target's).
        model: the trained nnU-Net (all folds x checkpoints are averaged as probabilities).
        threshold: confidence in (0, 1] below which voxels get the ignore label; None: no ignore label.
        name: dataset name (default ``<target name>PseudoLabel``).
        num_processes: nnU-Net's preprocessing/export workers (0: sequential, no worker processes).

    Returns the new raw dataset folder.
    """
    if threshold is not None and not 0.0 < float(threshold) <= 1.0:
        raise SDDMError(f"--threshold must be in (0, 1], got {threshold}")
    if int(num_processes) < 0:
        raise SDDMError(f"-np must be >= 0, got {num_processes}")
    folder = model.check()
    dj = load_dataset_json(folder)
    ending = dj["file_ending"]
    if ending != FILE_ENDING:
        raise SDDMError(f"{folder / 'dataset.json'}: file ending {ending!r}; pseudo-label datasets are written "
                        f"as {FILE_ENDING}")
    if len(dj.get("channel_names", {"0": None})) != 1:
        raise SDDMError(f"{folder / 'dataset.json'}: only single-channel models are supported")
    labels = model_labels(folder)
    source_id = parse_dataset_folder_name(folder.parent.name)[0]
    tgt = find_target(target, ending)
    if int(new_id) == source_id:
        raise SDDMError(f"the new dataset id {new_id} is the model's dataset ({folder.parent.name}); choose another id")
    if tgt.dataset is not None and tgt.dataset.name.startswith("Dataset") and \
            parse_dataset_folder_name(tgt.dataset.name)[0] == int(new_id):
        raise SDDMError(f"the new dataset id {new_id} is the target's ({tgt.dataset.name}); choose another id")
    folder_name = dataset_folder_name(new_id, name or f"{tgt.name}PseudoLabel")
    check_target_free(int(new_id), overwrite)

    plans_manager = PlansManager(read_json(folder / "plans.json"))
    label_manager = plans_manager.get_label_manager(dj)
    rw = plans_manager.image_reader_writer_class()
    names = {v: k for k, v in labels.items()}
    model_record = model.to_dict()
    partial = _partial(folder_name)
    identity = {"package_version": nnunet_sddm.__version__, "model": model_record,
                "images": {c: [str(Path(f).resolve()) for f in fs] for c, fs in sorted(tgt.images.items())}}
    _open_partial(partial, identity)
    members = predict_members(model, tgt.images, partial, device=device, num_processes=num_processes,
                              progress=progress)

    out_labels = dict(labels)
    if threshold is not None:
        out_labels[IGNORE] = max(labels.values()) + 1
    extra = {"sddm_pseudo_label": {"model": model_record, "threshold": threshold,
                                   "target": str(tgt.dataset.resolve() if tgt.dataset is not None else
                                                 Path(str(target)).resolve())}}
    description = f"pseudo-labels of {tgt.name} by {model_record['dataset']} ({model.trainer}, {model.configuration})"
    with RawDatasetBuilder(int(new_id), folder_name.split("_", 1)[1], overwrite=overwrite, labels=out_labels,
                           description=description, extra_json=extra) as b:
        for case, files in progress_bar(sorted(tgt.images.items()), desc="pseudo-labels", unit="case",
                                        disable=not progress):
            probs, props = mean_probabilities(members, case)
            pl = pseudo_label(probs, label_manager, threshold)
            image, label = b.image_path(case, "Tr"), b.label_path(case, "Tr")
            shutil.copyfile(files[0], image)
            rw.write_seg(pl.seg, str(label), props)
            if not same_geometry(image, label):
                raise SDDMError(f"{files[0]}: nnU-Net wrote the pseudo-label of case {case} with another geometry "
                                f"than the image (shape, spacing or orientation); the image cannot be used as is")
            base = {k: v for k, v in tgt.records.get(case, {}).items() if k not in ("case", "split", "dataset")}
            b.add_record({**base, "case": case, "subject": str(base.get("subject", case)), "split": "Tr",
                          "source_image": str(Path(files[0]).resolve()),
                          "source_dataset": None if tgt.dataset is None else tgt.dataset.name,
                          "model": model_record, "threshold": threshold,
                          "mean_confidence": pl.mean_confidence, "ignored_fraction": pl.ignored_fraction,
                          "lcc_removed_voxels": {names[v]: n for v, n in pl.removed.items()},
                          "pseudo_label": True})
    shutil.rmtree(partial, ignore_errors=True)
    return b.final
