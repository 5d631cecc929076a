"""nnU-Net raw datasets: ``dataset.json``, case listing, ``cases.json`` and patient-level splits.

Layout (nnU-Net v2): ``DatasetXXX_Name/{imagesTr,labelsTr,imagesTs[,labelsTs]}``, images
``CASE_0000<ending>``, labels ``CASE<ending>``. ``cases.json`` is this project's per-case record
(subject, phase, vendor, centre, ...), a list of dicts with at least ``case`` and ``subject``.

``RawDatasetBuilder`` is the one writer of such datasets (converters, phantoms): it checks the
nnU-Net folders and the dataset id before writing anything, builds the dataset in a hidden staging
folder next to its final ``$nnUNet_raw/DatasetXXX_Name``, writes the patient-level
``splits_final.json`` into ``$nnUNet_preprocessed/DatasetXXX_Name/`` and only then renames the
dataset into place, so a failed run leaves nothing that blocks the identical retry.
NIfTI files written through ``make_nifti`` + ``save_nifti`` have a fixed gzip header (mtime 0, no
file name): the same content always gives the same bytes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunet_sddm import __version__
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import read_json, staging_dir, write_json
from nnunet_sddm.utilities.nnunet_paths import (dataset_folder_name, datasets_with_id,
                                                preprocessed_root, raw_root)

#: Labels of every dataset this project writes (M&Ms convention).
CARDIAC_LABELS: Dict[str, int] = {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
#: Name of nnU-Net's ignore label in ``dataset.json`` (voxels left out of the loss and the metrics).
IGNORE = "ignore"

#: File endings of 3D images that nnU-Net's reader/writers handle, longest first.
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl", ".tif", ".tiff")

#: File ending of the datasets this project writes.
FILE_ENDING = ".nii.gz"

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def load_dataset_json(dataset_folder: os.PathLike) -> dict:
    """Read ``dataset.json`` of a raw dataset, with a clear error if missing or broken."""
    p = Path(dataset_folder) / "dataset.json"
    if not p.is_file():
        raise SDDMError(f"{p}: missing dataset.json (is {Path(dataset_folder)} an nnU-Net raw dataset?)")
    dj = read_json(p)
    for key in ("labels", "file_ending"):
        if key not in dj:
            raise SDDMError(f"{p}: required key {key!r} is missing")
    return dj


def split_ending(filename: str, endings: Sequence[str] = IMAGE_ENDINGS) -> tuple:
    """``"a_0000.nii.gz"`` -> ``("a_0000", ".nii.gz")``; ``(name, "")`` if no known ending."""
    for e in endings:
        if filename.endswith(e):
            return filename[: -len(e)], e
    return filename, ""


def case_of(path: os.PathLike) -> str:
    """The nnU-Net case id of an image or label file: ``CASE_0000.nii.gz`` -> ``CASE`` (the file
    name without its ending and without a 4-digit channel suffix), ``CASE.nii.gz`` -> ``CASE``."""
    stem, _ = split_ending(Path(path).name)
    m = _CHANNEL_RE.match(stem)
    return m.group("case") if m else stem


def scan_folder(folder: os.PathLike, file_ending: Optional[str] = None) -> List[Tuple[str, str, Path]]:
    """``(stem, ending, path)`` of every visible file directly in ``folder`` whose name ends in
    ``file_ending`` (default: any of ``IMAGE_ENDINGS``), sorted by name; other files are ignored."""
    endings = (file_ending,) if file_ending else IMAGE_ENDINGS
    out = []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        stem, ending = split_ending(p.name, endings)
        if ending:
            out.append((stem, ending, p))
    return out


def list_images(folder: os.PathLike, file_ending: Optional[str] = None) -> Dict[str, Path]:
    """Map case id -> channel-0 image file for a folder of nnU-Net-named images.

    Only single-channel data is supported (cine MR); a case with other channels raises.
    ``file_ending`` restricts the listing (default: any ending nnU-Net can read, but a folder
    must use one ending only).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SDDMError(f"image folder {folder} does not exist")
    cases: Dict[str, Path] = {}
    seen_endings = set()
    for stem, ending, p in scan_folder(folder, file_ending):
        m = _CHANNEL_RE.match(stem)
        if not m:
            raise SDDMError(f"{p}: image file names must end in _XXXX{ending} (nnU-Net channel suffix)")
        if m.group("channel") != "0000":
            raise SDDMError(f"{p}: only single-channel images are supported (found channel "
                            f"{m.group('channel')})")
        cases[m.group("case")] = p
        seen_endings.add(ending)
    if len(seen_endings) > 1:
        raise SDDMError(f"{folder}: mixed file endings {sorted(seen_endings)}; use one ending per folder")
    return cases


def list_labels(folder: os.PathLike, file_ending: str) -> Dict[str, Path]:
    """Map case id -> label file (``CASE<ending>``) in a labels folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {stem: p for stem, _, p in scan_folder(folder, file_ending)}


def load_cases_json(dataset_folder: os.PathLike) -> List[dict]:
    """Read ``cases.json`` (empty list if the dataset has none)."""
    p = Path(dataset_folder) / "cases.json"
    if not p.is_file():
        return []
    records = read_json(p)
    if not isinstance(records, list) or not all(isinstance(r, dict) and "case" in r for r in records):
        raise SDDMError(f"{p}: expected a list of records, each with a 'case' key")
    return records


def write_dataset_json(dataset_folder: os.PathLike, num_training: int, *, name: str,
                       description: str = "", labels: Mapping[str, int] = CARDIAC_LABELS,
                       channel_name: str = "cineMRI", file_ending: str = ".nii.gz",
                       **extra) -> dict:
    """Write an nnU-Net v2 ``dataset.json`` (same keys as nnU-Net's ``generate_dataset_json``).

    ``channel_name`` other than CT/noNorm/... means per-case z-score normalisation in nnU-Net.
    """
    dj = {
        "channel_names": {"0": channel_name},
        "labels": dict(labels),
        "numTraining": int(num_training),
        "file_ending": file_ending,
        "name": name,
        "description": description,
    }
    dj.update(extra)
    write_json(dj, Path(dataset_folder) / "dataset.json")
    return dj


def patient_level_splits(case_to_subject: Mapping[str, str], n_folds: int = 5,
                         seed: int = 12345) -> List[dict]:
    """nnU-Net ``splits_final.json`` content with all cases of one subject in the same fold.

    Subjects are shuffled with ``seed`` and dealt round-robin into ``n_folds`` folds, so fold
    sizes differ by at most one subject. Needs at least ``n_folds`` subjects.
    """
    subjects = sorted(set(case_to_subject.values()))
    if len(subjects) < n_folds:
        raise SDDMError(f"{len(subjects)} subjects cannot be split into {n_folds} folds")
    rng = np.random.default_rng(seed)
    order = [subjects[i] for i in rng.permutation(len(subjects))]
    fold_of = {s: i % n_folds for i, s in enumerate(order)}
    splits = []
    for k in range(n_folds):
        val = sorted(c for c, s in case_to_subject.items() if fold_of[s] == k)
        train = sorted(c for c, s in case_to_subject.items() if fold_of[s] != k)
        splits.append({"train": train, "val": val})
    return splits


def write_splits(preprocessed_dataset_folder: os.PathLike, splits: List[dict]) -> Optional[Path]:
    """Write ``splits_final.json`` unless one exists already (never overwritten).

    Returns the written path, or None if an existing file was kept.
    """
    p = Path(preprocessed_dataset_folder) / "splits_final.json"
    if p.exists():
        return None
    write_json(splits, p)
    return p


def subjects_of(records: Iterable[dict]) -> Dict[str, str]:
    """case -> subject from ``cases.json`` records (the case itself if no subject is recorded)."""
    return {r["case"]: str(r.get("subject", r["case"])) for r in records}


def log(msg: str) -> None:
    """Progress/report line on stderr (stdout stays free for machine-readable output)."""
    print(msg, file=sys.stderr, flush=True)


def make_nifti(data_zyx: np.ndarray, spacing_zyx: Sequence[float], dtype) -> "object":
    """A nibabel NIfTI image of a ``(z, y, x)`` array with axis-aligned geometry.

    spacing_zyx: voxel size in mm in the array's order; the file stores ``(x, y, z)`` with an
    affine ``diag(sx, sy, sz)`` (origin 0, qform and sform code 1). Write it with
    ``nnunet_sddm.data.volumes.save_nifti`` (atomic, byte-deterministic).
    """
    import nibabel as nib

    sz, sy, sx = (float(s) for s in spacing_zyx)
    affine = np.diag([sx, sy, sz, 1.0])
    arr = np.ascontiguousarray(np.asarray(data_zyx).transpose(2, 1, 0).astype(dtype, copy=False))
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def _root_folder(var: str, getter) -> Path:
    """``$var`` (``SDDMError`` if unset, or if it names something that is not a folder)."""
    root = getter()
    if root.exists() and not root.is_dir():
        raise SDDMError(f"{var}={root} is not a folder")
    return root


def check_target_free(dataset_id: int, overwrite: bool) -> List[Path]:
    """Existing raw datasets with this id (any name); ``SDDMError`` unless ``overwrite``."""
    existing = datasets_with_id(dataset_id, raw_root())
    if existing and not overwrite:
        raise SDDMError(f"{existing[0]}: a dataset with id {int(dataset_id)} exists already "
                        f"({', '.join(p.name for p in existing)}); pass --overwrite to replace it")
    return existing


def publishable_permissions(folder: os.PathLike) -> None:
    """Give every folder and file below ``folder`` (itself included) the usual modes of the umask
    (``0777``/``0666`` minus the umask): temporary files and folders are created private
    (0600/0700), which a published dataset must not be."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


class RawDatasetBuilder:
    """Collect the cases of one nnU-Net raw dataset in a staging folder and publish it atomically.

    Use as a context manager::

        with RawDatasetBuilder(27, "ACDC") as b:
            save_nifti(img, b.image_path("patient001_ED", "Tr"))  # CASE_0000.nii.gz in imagesTr
            save_nifti(lab, b.label_path("patient001_ED", "Tr"))
            b.add_record({"case": "patient001_ED", "subject": "patient001", "split": "Tr", ...})
        b.final        # $nnUNet_raw/Dataset027_ACDC with dataset.json and cases.json
        b.splits_path  # $nnUNet_preprocessed/Dataset027_ACDC/splits_final.json (None if kept/none)

    Before anything is written (constructor and ``__enter__``): ``nnUNet_raw`` and
    ``nnUNet_preprocessed`` must be set (and be folders where they exist), the name valid, and no
    raw dataset with this id may exist unless ``overwrite``. On success, in this order: the staging
    folder gets ``dataset.json`` (``numTraining`` = cases with split ``"Tr"``, ``extra_json`` keys
    merged in) and ``cases.json`` (records sorted training first, then by case; ``dataset`` added);
    ``splits_final.json`` is written (patient-level, ``min(5, subjects)`` folds; an existing one is
    kept, never overwritten; none for fewer than 2 subjects); the dataset is renamed into place;
    with ``overwrite``, other-named datasets with the same id are removed. On any error the staging
    folder and a split file written by this run are removed and the final folder is untouched.
    """

    def __init__(self, dataset_id: int, name: str, *, overwrite: bool = False,
                 labels: Mapping[str, int] = CARDIAC_LABELS, description: str = "",
                 extra_json: Optional[dict] = None) -> None:
        self.dataset_id = int(dataset_id)
        self.name = name
        self.folder_name = dataset_folder_name(dataset_id, name)
        self.overwrite = bool(overwrite)
        self.labels = dict(labels)
        self.description = description
        self.extra_json = dict(extra_json or {})
        self.records: List[dict] = []
        self.final = _root_folder("nnUNet_raw", raw_root) / self.folder_name
        self.preprocessed = _root_folder("nnUNet_preprocessed", preprocessed_root) / self.folder_name
        if self.preprocessed.exists() and not self.preprocessed.is_dir():
            raise SDDMError(f"{self.preprocessed}: exists and is not a folder (splits_final.json goes there)")
        self.staging: Optional[Path] = None
        self.splits_path: Optional[Path] = None
        self.existing: List[Path] = []
        self._ctx = None

    # -- layout -----------------------------------------------------------------------------
    def image_path(self, case: str, split: str) -> Path:
        """Staging path of the channel-0 image of ``case`` (split ``"Tr"`` or ``"Ts"``)."""
        (self.staging / f"images{split}").mkdir(exist_ok=True)
        return self.staging / f"images{split}" / f"{case}_0000{FILE_ENDING}"

    def label_path(self, case: str, split: str) -> Path:
        """Staging path of the label map of ``case``."""
        (self.staging / f"labels{split}").mkdir(exist_ok=True)
        return self.staging / f"labels{split}" / f"{case}{FILE_ENDING}"

    def add_record(self, record: dict) -> None:
        """Add one ``cases.json`` record (needs ``case``, ``subject`` and ``split``)."""
        for key in ("case", "subject", "split"):
            if key not in record:
                raise ValueError(f"cases.json record lacks {key!r}: {record}")
        if any(r["case"] == record["case"] for r in self.records):
            raise SDDMError(f"case {record['case']} would be written twice (duplicate subject/phase "
                            f"in the input: {record.get('source', record['case'])})")
        self.records.append(record)

    def summary(self) -> Dict[str, int]:
        """Counts of cases per split."""
        out: Dict[str, int] = {}
        for r in self.records:
            out[r["split"]] = out.get(r["split"], 0) + 1
        return out

    # -- context ----------------------------------------------------------------------------
    def __enter__(self) -> "RawDatasetBuilder":
        self.existing = check_target_free(self.dataset_id, self.overwrite)
        self._ctx = staging_dir(self.final, overwrite=self.overwrite)
        self.staging = self._ctx.__enter__()
        for sub in ("imagesTr", "labelsTr"):
            (self.staging / sub).mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._ctx.__exit__(exc_type, exc, tb)
            return False
        try:
            self._finish_files()
            self._write_splits()
        except BaseException:
            self._ctx.__exit__(*sys.exc_info())
            self._remove_own_splits()
            raise
        try:
            self._ctx.__exit__(None, None, None)  # publish: rename the staging folder into place
        except BaseException:
            self._remove_own_splits()
            raise
        for old in self.existing:
            if old.resolve() != self.final.resolve() and old.exists():
                shutil.rmtree(old)
                log(f"removed {old} (replaced by {self.final.name}, --overwrite)")
        return False

    def _finish_files(self) -> None:
        train = [r for r in self.records if r["split"] == "Tr"]
        if not train:
            raise SDDMError(f"{self.folder_name}: no training cases (with labels) were found in the input")
        for r in self.records:
            r.setdefault("dataset", self.folder_name)
        write_dataset_json(self.staging, len(train), name=self.name, description=self.description,
                           labels=self.labels, file_ending=FILE_ENDING,
                           nnunet_sddm_version=__version__, **self.extra_json)
        write_json(sorted(self.records, key=lambda r: (r["split"] != "Tr", r["case"])),
                   self.staging / "cases.json")
        publishable_permissions(self.staging)

    def _write_splits(self) -> None:
        train = {r["case"]: str(r["subject"]) for r in self.records if r["split"] == "Tr"}
        n_subjects = len(set(train.values()))
        if n_subjects < 2:
            log(f"note: only {n_subjects} labelled subject; no splits_final.json written")
            return
        n_folds = min(5, n_subjects)
        if n_folds < 5:
            log(f"note: only {n_subjects} labelled subjects: splits_final.json has {n_folds} "
                f"patient-level folds (0..{n_folds - 1}) instead of 5")
        target = self.preprocessed / "splits_final.json"
        try:
            p = write_splits(self.preprocessed, patient_level_splits(train, n_folds=n_folds))
        except OSError as e:
            raise SDDMError(f"{target}: cannot write the splits ({type(e).__name__}: {e}); "
                            f"the dataset was not published") from None
        if p is not None:
            self.splits_path = p
            return
        log(f"note: {target} exists already and was kept (never overwritten)")
        try:
            with open(target) as f:
                listed = {c for fold in json.load(f) for c in fold.get("val", [])}
        except (OSError, ValueError, TypeError, AttributeError):
            listed = set()
        if listed != set(train):
            log(f"WARNING: {target} does not list the same training cases as the new dataset "
                f"({len(listed)} vs {len(train)}); delete it to get a fresh patient-level split")

    def _remove_own_splits(self) -> None:
        """Undo this run's ``splits_final.json`` (never one that existed before)."""
        if self.splits_path is not None:
            self.splits_path.unlink(missing_ok=True)
            self.splits_path = None
