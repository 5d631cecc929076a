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

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np

from nnunet_sddm import __version__
from nnunet_sddm.data.raw_dataset import (CARDIAC_LABELS, patient_level_splits, write_dataset_json,
                                          write_splits)
from nnunet_sddm.data.volumes import save_nifti
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import staging_dir, write_json
from nnunet_sddm.utilities.nnunet_paths import (dataset_folder_name, datasets_with_id,
                                                preprocessed_root, raw_root)

FILE_ENDING = ".nii.gz"


def log(msg: str) -> None:
    """Progress/report line on stderr (stdout stays free for machine-readable output)."""
    print(msg, file=sys.stderr, flush=True)


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
            existing = folder / "splits_final.json"
            log(f"note: {existing} exists already and was kept (never overwritten)")
            try:
                with open(existing) as f:
                    listed = {c for fold in json.load(f) for c in fold.get("val", [])}
            except (OSError, ValueError, TypeError, AttributeError):
                listed = set()
            if listed != set(train):
                log(f"WARNING: {existing} does not list the same training cases as the new dataset "
                    f"({len(listed)} vs {len(train)}); delete it to get a fresh patient-level split")
        else:
            self.splits_path = p

    def summary(self) -> Dict[str, int]:
        """Counts of cases per split."""
        out: Dict[str, int] = {}
        for r in self.records:
            out[r["split"]] = out.get(r["split"], 0) + 1
        return out


# -- reading and checking source NIfTI files ------------------------------------------------------

@dataclass
class Source:
    """A NIfTI file read for conversion: header (the geometry template) and voxel data.

    data: array in the file's own axis order ``(x, y, z[, t])``; repair: description of a
    direction-cosine repair applied to the header (None if none was needed).
    """

    path: Path
    header: object
    data: np.ndarray
    repair: Optional[str] = None

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)


def load_source(path: Path, ndim: int, what: str = "image") -> Source:
    """Read a NIfTI file that must have ``ndim`` (3 or 4) dimensions (a trailing singleton time
    axis counts as 3D). Raises ``SDDMError`` naming the file for a missing/unreadable file, the
    wrong dimensionality, or NaN/inf voxels. Non-orthonormal direction cosines are repaired."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise SDDMError(f"{path}: {what} file not found")
    if not path.name.endswith((".nii.gz", ".nii")):
        raise SDDMError(f"{path}: expected a NIfTI file (.nii.gz or .nii)")
    try:
        img = nib.load(str(path))
        shape = tuple(img.shape)
        while len(shape) > max(3, ndim) and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != ndim:
            kind = {3: "a 3D frame (x, y, slices)", 4: "a 4D cine (x, y, slices, time)"}[ndim]
            raise SDDMError(f"{path}: expected {kind} {what}, found {len(shape)}D with shape {shape}")
        # 4D cines stay on disk (frames are read by ``frame``); 3D frames are read now
        data = img.dataobj if ndim == 4 else np.asanyarray(img.dataobj).reshape(shape)
    except SDDMError:
        raise
    except Exception as e:
        raise SDDMError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
    if ndim == 3:
        _check_finite(data, path, what)
    header = img.header.copy()
    src = Source(path=path, header=header, data=data)
    src.repair = repair_direction(src)
    return src


def _check_finite(data: np.ndarray, path: Path, what: str) -> None:
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise SDDMError(f"{path}: {what} contains NaN or infinite values")


def frame(src: Source, index: int, what: str = "frame") -> Source:
    """Frame ``index`` (0-based, last axis) of a 4D source as a 3D source with the same geometry."""
    n = src.data.shape[3]
    if not 0 <= index < n:
        raise SDDMError(f"{src.path}: {what} index {index} is outside the frames 0..{n - 1} of this 4D file")
    try:
        data = np.asanyarray(src.data[:, :, :, index])
    except Exception as e:
        raise SDDMError(f"{src.path}: cannot read frame {index} ({type(e).__name__}: {e})") from None
    _check_finite(data, src.path, what)
    return Source(path=src.path, header=src.header, data=data, repair=src.repair)


def _sitk_accepts(header) -> Optional[str]:
    """None if SimpleITK/ITK accepts the direction cosines of this NIfTI header, else its error."""
    import nibabel as nib
    import SimpleITK as sitk
    import tempfile

    h = header.copy()
    shape = (2, 2, 2)
    h.set_data_shape(shape)
    h.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(np.zeros(shape, np.uint8), None, header=h)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "h.nii")
        img.to_filename(p)
        r = sitk.ImageFileReader()
        r.SetFileName(p)
        try:
            r.ReadImageInformation()
        except RuntimeError as e:
            return str(e).strip().splitlines()[-1]
    return None


def _direction_deviation(affine: np.ndarray) -> float:
    m = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return float(np.abs(m.T @ m - np.eye(3)).max())


def repair_direction(src: Source) -> Optional[str]:
    """Make the header's direction cosines orthonormal if (and only if) ITK refuses them.

    The nearest orthonormal matrix (polar decomposition, SVD) replaces the sform/qform
    rotation; voxel sizes and origin are kept. Returns a report, or None when nothing was done.
    """
    hdr = src.header
    if _direction_deviation(hdr.get_best_affine()) < 1e-6:
        return None
    problem = _sitk_accepts(hdr)
    if problem is None:
        return None
    reports = []
    for kind in ("sform", "qform"):
        code = int(hdr[f"{kind}_code"])
        if code == 0:
            continue
        aff = hdr.get_sform() if kind == "sform" else hdr.get_qform()
        zooms = np.linalg.norm(aff[:3, :3], axis=0)
        d = aff[:3, :3] / zooms
        u, _, vt = np.linalg.svd(d)
        r = u @ vt
        fixed = aff.copy()
        fixed[:3, :3] = r * zooms
        corner = np.array(src.data.shape[:3], dtype=float) - 1
        shift = float(np.linalg.norm((aff[:3, :3] - fixed[:3, :3]) @ corner))
        reports.append(f"{kind} direction cosines not orthonormal (max |D^T D - I| = "
                       f"{_direction_deviation(aff):.2e}), replaced by the nearest orthonormal matrix "
                       f"(far corner moves {shift:.3f} mm)")
        if kind == "sform":
            hdr.set_sform(fixed, code=code)
        else:
            hdr.set_qform(fixed, code=code)
    still = _sitk_accepts(hdr)
    if still is not None:
        raise SDDMError(f"{src.path}: direction cosines could not be repaired ({still})")
    return "; ".join(reports) if reports else None


def check_same_grid(image: Source, label: Source) -> None:
    """Image and label must have the same shape and geometry (voxel-to-world matrix, 1e-3 mm)."""
    if image.shape[:3] != label.shape[:3]:
        raise SDDMError(f"{label.path}: label shape {label.shape} differs from image {image.path} "
                        f"shape {image.shape}")
    a, b = image.header.get_best_affine(), label.header.get_best_affine()
    za, zb = image.header.get_zooms()[:3], label.header.get_zooms()[:3]
    if not np.allclose(a, b, atol=1e-3) or not np.allclose(za, zb, atol=1e-4):
        raise SDDMError(f"{label.path}: label geometry (spacing/origin/direction) differs from image "
                        f"{image.path}:\n{np.round(b, 4)}\nvs\n{np.round(a, 4)}")


def label_array(src: Source, mapping: Mapping[int, int]) -> np.ndarray:
    """Label voxels mapped with ``mapping`` (source value -> output value) as uint8.

    Raises ``SDDMError`` for non-integer values or values outside ``mapping``'s keys."""
    data = src.data
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise SDDMError(f"{src.path}: label map has non-integer values")
        data = rounded
    values = np.unique(data).astype(np.int64)
    bad = sorted(set(values.tolist()) - set(int(k) for k in mapping))
    if bad:
        raise SDDMError(f"{src.path}: label values {bad} outside the expected set {sorted(mapping)}")
    lut = np.zeros(int(values.max()) + 1, np.uint8)
    for k, v in mapping.items():
        if k < lut.size:
            lut[int(k)] = v
    return lut[data.astype(np.int64)]


def image_dtype(src: Source):
    """Output dtype of an image: integer types kept, floating types as float32."""
    return src.data.dtype if src.data.dtype.kind in "iu" else np.float32


def write_with_header(data: np.ndarray, src: Source, out: Path, dtype) -> Path:
    """Write ``data`` (the file's axis order, 3D) with ``src``'s header (all geometry fields, qform
    and sform codes) and ``dtype``, byte-deterministic and atomic."""
    import nibabel as nib

    h = src.header.copy()
    arr = np.ascontiguousarray(np.asarray(data).astype(dtype, copy=False))
    h.set_data_shape(arr.shape)
    h.set_data_dtype(arr.dtype)
    h["scl_slope"] = np.nan
    h["scl_inter"] = np.nan
    return save_nifti(nib.Nifti1Image(arr, None, header=h), out)
