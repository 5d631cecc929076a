"""Light image reading for evaluation: arrays in nnU-Net's ``(z, y, x)`` order, spacing in the
same order, and the geometry needed to check that a prediction matches its reference.

NIfTI files are read with nibabel (no SimpleITK orthonormality check: some M&Ms files have
slightly non-orthonormal direction cosines that SimpleITK refuses), other formats with
SimpleITK. Nothing here imports torch or nnU-Net, so worker processes start fast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np

from nnunet_sddm.data.raw_dataset import IGNORE, case_of, scan_folder
from nnunet_sddm.utilities.errors import SDDMError

_NIFTI = (".nii.gz", ".nii")


@dataclass
class Image:
    """data: array ``(z, y, x)`` (file axes reversed); spacing: mm per axis in the same order;
    affine: 4x4 voxel-to-world matrix (NIfTI) or built from origin/direction/spacing."""

    data: np.ndarray
    spacing: tuple
    affine: np.ndarray
    path: Path


def nifti_affine(img: Any) -> np.ndarray:
    """The voxel-to-world matrix (4 x 4, mm) of a nibabel NIfTI image as ITK reads it, and so as
    nnU-Net does (its reader is SimpleITK). When the sform is set but its column norms are not the
    voxel sizes, ITK warns "unexpected scales in sform" and keeps the sform's directions and origin
    with the voxel sizes of pixdim; so does this. Some ACDC files have such a sform (code 2, unit
    scales, qform code 0), which nibabel's ``affine`` would take as it is. Otherwise nibabel's
    ``affine``."""
    hdr = img.header
    if int(hdr["sform_code"]) > 0:
        sform = np.asarray(img.get_sform(), dtype=np.float64)
        zooms = np.asarray(hdr.get_zooms()[:3], dtype=np.float64)
        norms = np.linalg.norm(sform[:3, :3], axis=0)
        if np.all(norms > 0) and not np.allclose(norms, zooms, rtol=1e-4, atol=1e-6):
            sform[:3, :3] = sform[:3, :3] / norms * zooms
        return sform
    return np.asarray(img.affine, dtype=np.float64)


def read_image(path: os.PathLike, dtype=np.float64) -> Image:
    """Read a 3D image; ``SDDMError`` naming the file if it is missing, unreadable or not 3D."""
    path = Path(path)
    if not path.is_file():
        raise SDDMError(f"{path}: file not found")
    try:
        if path.name.endswith(_NIFTI):
            import nibabel as nib

            img = nib.load(str(path))
            if len(img.shape) != 3:
                raise SDDMError(f"{path}: expected a 3D image, found shape {tuple(img.shape)}")
            arr = np.asarray(img.dataobj, dtype=dtype).transpose(2, 1, 0)
            spacing = tuple(float(s) for s in img.header.get_zooms()[:3])[::-1]
            affine = nifti_affine(img)
        else:
            import SimpleITK as sitk

            img = sitk.ReadImage(str(path))
            if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
                raise SDDMError(f"{path}: expected a single-channel 3D image")
            arr = sitk.GetArrayFromImage(img).astype(dtype, copy=False)
            sp = np.asarray(img.GetSpacing(), dtype=np.float64)
            affine = np.eye(4)
            affine[:3, :3] = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3) * sp
            affine[:3, 3] = img.GetOrigin()
            spacing = tuple(float(s) for s in sp[::-1])
    except SDDMError:
        raise
    except Exception as e:
        raise SDDMError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return Image(data=np.ascontiguousarray(arr), spacing=spacing, affine=affine, path=path)


def read_label_map(path: os.PathLike) -> Image:
    """Read a segmentation; values must be finite integers (float files are accepted when
    every voxel is within 1e-3 of an integer). Returns data as int16 ``(z, y, x)``."""
    img = read_image(path, dtype=np.float64)
    d = img.data
    if not np.isfinite(d).all():
        raise SDDMError(f"{path}: label map contains NaN or infinite values")
    r = np.rint(d)
    if np.abs(d - r).max(initial=0.0) > 1e-3:
        raise SDDMError(f"{path}: label map has non-integer values (is it an image, not a segmentation?)")
    if r.min(initial=0) < -32768 or r.max(initial=0) > 32767:
        raise SDDMError(f"{path}: label values out of range")
    img.data = r.astype(np.int16)
    return img


def check_same_geometry(ref: Image, pred: Image, atol: float = 1e-3) -> None:
    """Raise ``SDDMError`` if two images differ in shape, spacing or placement (affine, mm)."""
    if ref.data.shape != pred.data.shape:
        raise SDDMError(f"{pred.path}: shape {pred.data.shape[::-1]} differs from the reference "
                        f"{ref.path} {ref.data.shape[::-1]}")
    if not np.allclose(ref.spacing, pred.spacing, atol=atol, rtol=1e-5):
        raise SDDMError(f"{pred.path}: spacing {pred.spacing[::-1]} differs from the reference "
                        f"{ref.path} {ref.spacing[::-1]}")
    if not np.allclose(ref.affine, pred.affine, atol=atol, rtol=1e-5):
        raise SDDMError(f"{pred.path}: orientation/origin (affine) differs from the reference {ref.path}")


def list_cases(folder: os.PathLike, file_ending: Optional[str] = None,
               strip_channel: bool = False) -> Dict[str, Path]:
    """Map case id -> file for every image file directly in ``folder`` (hidden files and
    non-image files such as ``dataset.json`` or ``plans.json`` are ignored).

    file_ending: only this ending (default: any known ending, but only one per folder).
    strip_channel: drop an nnU-Net channel suffix ``_0000`` from the case id.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SDDMError(f"{folder}: folder does not exist")
    out: Dict[str, Path] = {}
    seen = set()
    for stem, ending, p in scan_folder(folder, file_ending):
        if strip_channel:
            stem = case_of(stem)
        out[stem] = p
        seen.add(ending)
    if len(seen) > 1:
        raise SDDMError(f"{folder}: mixed file endings {sorted(seen)}; pass the dataset.json "
                        f"(-djfile) so that its file_ending selects the files")
    return out


def labels_from_dataset_json(dj: Mapping, source: str = "dataset.json") -> Dict[str, int]:
    """Foreground structures ``{name: value}`` from a dataset.json ``labels`` entry (background
    and the ``ignore`` label dropped). Region-based labels (lists) are not supported."""
    labels = dj.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise SDDMError(f"{source}: 'labels' must be a non-empty mapping name -> value")
    out: Dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise SDDMError(f"{source}: region-based label {name!r}={value} is not supported; "
                            f"use --labels NAME=VALUE ...")
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise SDDMError(f"{source}: label {name!r} has a non-integer value {value!r}") from None
        if v == 0 or name == IGNORE:
            continue
        out[str(name)] = v
    if not out:
        raise SDDMError(f"{source}: no foreground labels")
    return out
