"""Shared writer logic of every dataset converter and generator.

A dataset is built in a hidden staging folder next to its final ``$nnUNet_raw/DatasetXXX_Name``
and renamed into place only when everything succeeded, so a failed run leaves nothing behind.
An existing dataset with the same id (any name) is refused unless ``overwrite``; with
``overwrite`` it is replaced (and other-named datasets with that id are removed) only after the
new one is complete.

NIfTI files are written with a fixed gzip header (mtime 0, no file name) so that the same
content always gives the same bytes.
"""
from __future__ import annotations

import gzip
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np

from nnunet_sddm import __version__
from nnunet_sddm.data.raw_dataset import (CARDIAC_LABELS, patient_level_splits, write_dataset_json,
                                          write_splits)
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import atomic_path, staging_dir, write_json
from nnunet_sddm.utilities.nnunet_paths import (dataset_folder_name, datasets_with_id,
                                                preprocessed_root, raw_root)

FILE_ENDING = ".nii.gz"


def log(msg: str) -> None:
    """Progress/report line on stderr (stdout stays free for machine-readable output)."""
    print(msg, file=sys.stderr, flush=True)


def nifti_bytes(img) -> bytes:
    """gzip-compressed bytes of a nibabel ``Nifti1Image`` with a deterministic gzip header."""
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def save_nifti(img, path: Path) -> Path:
    """Write a nibabel image to ``path`` (``.nii.gz``) atomically and byte-deterministically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(nifti_bytes(img))
    return path


def make_nifti(data_zyx: np.ndarray, spacing_zyx, dtype) -> "object":
    """A NIfTI image of a ``(z, y, x)`` array with axis-aligned geometry.

    spacing_zyx: voxel size in mm in the array's order; the file stores ``(x, y, z)`` with an
    affine ``diag(sx, sy, sz)`` (origin 0, qform and sform code 1).
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


def check_target_free(dataset_id: int, overwrite: bool) -> List[Path]:
    """Existing raw datasets with this id; raises unless ``overwrite``."""
    existing = datasets_with_id(dataset_id, raw_root())
    if existing and not overwrite:
        raise SDDMError(f"{existing[0]}: a dataset with id {int(dataset_id)} exists already "
                        f"({', '.join(p.name for p in existing)}); pass --overwrite to replace it")
    return existing


def _publishable_permissions(folder: Path) -> None:
    """Temp files/folders are created private (0600/0700); give the dataset the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


class DatasetBuilder:
    """Collect the cases of one nnU-Net raw dataset in a staging folder and publish it atomically.

    Use as a context manager::

        with DatasetBuilder(27, "ACDC", overwrite=False) as b:
            b.image_path("patient001_ED", "Tr")  # where to write the _0000 image
            b.add_record({...})
        # b.final now exists with dataset.json, cases.json; splits in nnUNet_preprocessed
    """

    def __init__(self, dataset_id: int, name: str, overwrite: bool = False,
                 labels: Mapping[str, int] = CARDIAC_LABELS, description: str = "",
                 extra_json: Optional[dict] = None):
        self.dataset_id = int(dataset_id)
        self.name = name
        self.folder_name = dataset_folder_name(dataset_id, name)
        self.overwrite = overwrite
        self.labels = dict(labels)
        self.description = description
        self.extra_json = dict(extra_json or {})
        self.records: List[dict] = []
        self.final = raw_root() / self.folder_name
        self.staging: Optional[Path] = None
        self._ctx = None
        self.splits_path: Optional[Path] = None

    # -- layout -----------------------------------------------------------------------------
    def image_path(self, case: str, split: str) -> Path:
        """Staging path of the channel-0 image of ``case`` (split ``"Tr"`` or ``"Ts"``)."""
        return self.staging / f"images{split}" / f"{case}_0000{FILE_ENDING}"

    def label_path(self, case: str, split: str) -> Path:
        """Staging path of the label map of ``case``."""
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

    # -- context ----------------------------------------------------------------------------
    def __enter__(self) -> "DatasetBuilder":
        self.existing = check_target_free(self.dataset_id, self.overwrite)
        self._ctx = staging_dir(self.final, overwrite=self.overwrite)
        self.staging = self._ctx.__enter__()
        for sub in ("imagesTr", "labelsTr"):
            (self.staging / sub).mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self._finish_files()
            except BaseException:
                self._ctx.__exit__(*sys.exc_info())
                raise
        self._ctx.__exit__(exc_type, exc, tb)
        if exc_type is None:
            for old in self.existing:
                if old.resolve() != self.final.resolve() and old.exists():
                    shutil.rmtree(old)
                    log(f"removed {old} (replaced by {self.final.name}, --overwrite)")
            self._write_splits()
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
        _publishable_permissions(self.staging)

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
        folder = preprocessed_root() / self.folder_name
        p = write_splits(folder, patient_level_splits(train, n_folds=n_folds))
        if p is None:
            log(f"note: {folder / 'splits_final.json'} exists already and was kept (never overwritten)")
        else:
            self.splits_path = p

    def summary(self) -> Dict[str, int]:
        """Counts of cases per split."""
        out: Dict[str, int] = {}
        for r in self.records:
            out[r["split"]] = out.get(r["split"], 0) + 1
        return out
