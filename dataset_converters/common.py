"""Reading and checking the source NIfTI files of the real-data converters (ACDC, M&Ms).

The datasets themselves are written by ``nnunet_sddm.data.raw_dataset.RawDatasetBuilder`` (staging
folder, ``dataset.json``, ``cases.json``, splits, atomic publish), shared with the phantoms.
Outputs are written byte-deterministically (fixed gzip header: mtime 0, no file name).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from nnunet_sddm.data.volumes import save_nifti
from nnunet_sddm.utilities.errors import SDDMError

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
