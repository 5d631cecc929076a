"""Post-processing of segmentations: keep the largest connected component of each structure.

Notation: a segmentation ``seg`` is an integer label map ``(z, y, x)`` (or ``(y, x)``), 0 the
background; ``labels`` the structure values to clean (e.g. 1 LV, 2 MYO, 3 RV).

``largest_component_per_label``: for each label ``l``, the connected components of ``seg == l``
are found with ``scipy.ndimage.label`` and the structure
``scipy.ndimage.generate_binary_structure(seg.ndim, connectivity)``; with the default
``connectivity = seg.ndim`` (3 for volumes) that is the full 3 x 3 x 3 neighbourhood (26-connected:
full connectivity in-plane and across slices, diagonals included). Every voxel of ``l`` outside the
largest component becomes background 0; other labels are untouched. Ties between equally large
components keep the one ``ndimage.label`` numbers first, i.e. the one whose first voxel comes
first in C (raster) order.

``postprocess_folder`` applies it to every segmentation of a prediction folder, read and written
with nnU-Net's reader/writer (the one of the folder's ``plans.json`` when nnU-Net copied it there,
else the one nnU-Net picks for the file ending), which keeps spacing, origin and direction.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

import nnunet_sddm
from nnunet_sddm.data.raw_dataset import publishable_permissions, scan_folder
from nnunet_sddm.data.volumes import default_reader_writer
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import atomic_path, read_json, staging_dir, write_json
from nnunet_sddm.utilities.progress import progress_bar

PathLike = Union[str, os.PathLike]

#: Every value of ``--postprocess``.
POSTPROCESS = ("lcc",)

#: Record of ``postprocess_folder`` in the output folder.
RECORD_FILE = "postprocess.json"

#: Files nnU-Net writes next to its predictions that ``postprocess_folder`` copies unchanged.
COPIED_FILES = ("dataset.json", "plans.json")


def largest_component_per_label(seg: np.ndarray, labels: Sequence[int], connectivity: Optional[int] = None) -> np.ndarray:
    """``seg`` with only the largest connected component of each of ``labels`` kept.

    Args:
        seg: integer label map, 2D or 3D (``(z, y, x)``).
        labels: the structure values to clean (values absent from ``seg`` are ignored; 0 is
            refused).
        connectivity: 1 .. ``seg.ndim`` as in ``scipy.ndimage.generate_binary_structure``
            (default ``seg.ndim``: 26-connected in 3D, 8-connected in 2D).

    Returns a new array of ``seg``'s dtype and shape; removed voxels are 0.
    """
    s = np.asarray(seg)
    if s.ndim not in (2, 3):
        raise SDDMError(f"largest component: expected a 2D or 3D segmentation, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.integer):
        if not np.all(np.isfinite(s)) or np.any(s != np.round(s)):
            raise SDDMError("largest component: the segmentation holds non-integer values")
    conn = s.ndim if connectivity is None else int(connectivity)
    if not 1 <= conn <= s.ndim:
        raise SDDMError(f"largest component: connectivity must be in 1..{s.ndim}, got {connectivity}")
    structure = ndimage.generate_binary_structure(s.ndim, conn)
    out = s.copy()
    for lab in labels:
        if int(lab) == 0:
            raise SDDMError("largest component: label 0 is the background, not a structure")
        mask = s == lab
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        keep = int(np.argmax(sizes))  # first of equal maxima: the earliest component in raster order
        out[mask & (comp != keep)] = 0
    return out


def labels_from_dataset_json(dataset_json: Dict[str, Any]) -> Optional[List[int]]:
    """The non-zero integer label values of a ``dataset.json`` (region-based datasets: their
    ``regions_class_order``); ``None`` if it has none."""
    if "regions_class_order" in dataset_json:
        return sorted({int(v) for v in dataset_json["regions_class_order"] if int(v) != 0})
    values = []
    for v in (dataset_json.get("labels") or {}).values():
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and int(v) != 0:
            values.append(int(v))
    return sorted(set(values)) or None


def reader_writer_for(folder: PathLike, example: PathLike):
    """nnU-Net's reader/writer for the segmentations of ``folder``: that of its ``plans.json``
    (nnU-Net copies it next to its predictions), else the one nnU-Net picks for ``example``."""
    plans = Path(folder) / "plans.json"
    if plans.is_file():
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        try:
            return PlansManager(read_json(plans)).image_reader_writer_class()
        except Exception as e:
            raise SDDMError(f"{plans}: cannot determine the image reader/writer ({type(e).__name__}: {e})") from None
    return default_reader_writer(example)


def postprocess_file(src: PathLike, dst: PathLike, labels: Optional[Sequence[int]] = None, *,
                     connectivity: Optional[int] = None, reader_writer: Any = None) -> Dict[str, int]:
    """Read the segmentation ``src``, keep each label's largest component, write ``dst``
    atomically with the same reader/writer (same geometry; ``dst`` may be ``src``).
    ``labels``: default every non-zero value present. Returns ``{label: voxels removed}``."""
    src, dst = Path(src), Path(dst)
    rw = reader_writer if reader_writer is not None else default_reader_writer(src)
    try:
        data, props = rw.read_seg(str(src))
    except Exception as e:
        raise SDDMError(f"{src}: cannot read segmentation ({type(e).__name__}: {e})") from None
    seg = np.asarray(data)[0]
    if seg.ndim != 3:
        raise SDDMError(f"{src}: expected a single 3D segmentation, the reader gave shape {np.shape(data)}")
    if labels is None:
        labels = [int(v) for v in np.unique(seg) if v != 0]
    out = largest_component_per_label(seg, labels, connectivity)
    removed = {str(int(lab)): int(np.count_nonzero((seg == lab) & (out != lab))) for lab in labels}
    with atomic_path(dst) as tmp:
        rw.write_seg(out, str(tmp), props)
    return removed


def postprocess_folder(pred_dir: PathLike, out_dir: PathLike, labels: Optional[Sequence[int]] = None, *,
                       connectivity: Optional[int] = None, overwrite: bool = False,
                       progress: bool = True) -> Dict[str, Any]:
    """Keep the largest component per structure in every segmentation ``CASE<ending>`` of
    ``pred_dir`` and write them, same names and geometry, into ``out_dir``.

    Args:
        labels: structures to clean; default the non-zero labels of ``pred_dir/dataset.json``
            (nnU-Net copies it there), else every non-zero value present in each file.
        connectivity: see ``largest_component_per_label`` (default full 3D connectivity).
        overwrite: replace an existing ``out_dir`` (otherwise refused).

    The file ending is ``dataset.json``'s ``file_ending`` if there is one, else any image ending
    (one per folder). ``dataset.json`` and ``plans.json`` are copied; probabilities (``.npz``)
    are not. ``out_dir`` is built under a hidden staging name and renamed when complete. Returns
    the record also written to ``out_dir/postprocess.json`` (method, connectivity, labels, input
    folder, voxels removed per case and label, package version).
    """
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    if not pred_dir.is_dir():
        raise SDDMError(f"prediction folder {pred_dir} does not exist")
    if out_dir.resolve() == pred_dir.resolve():
        raise SDDMError(f"output folder {out_dir} is the prediction folder; choose another one")
    if out_dir.exists() and not overwrite:
        raise SDDMError(f"output folder {out_dir} exists; pass overwrite to replace it")
    dj_path = pred_dir / "dataset.json"
    dj = read_json(dj_path) if dj_path.is_file() else {}
    files = scan_folder(pred_dir, dj.get("file_ending"))
    endings = {e for _, e, _ in files}
    if not files:
        raise SDDMError(f"{pred_dir}: no segmentations (CASE.nii.gz, ...) found")
    if len(endings) > 1:
        raise SDDMError(f"{pred_dir}: mixed file endings {sorted(endings)}; use one ending per folder")
    if labels is None:
        labels = labels_from_dataset_json(dj) if dj else None
    labels = None if labels is None else [int(v) for v in labels]
    rw = reader_writer_for(pred_dir, files[0][2])
    removed: Dict[str, Dict[str, int]] = {}
    with staging_dir(out_dir, overwrite=overwrite) as tmp:
        for stem, _, path in progress_bar(files, desc="largest components", unit="case", disable=not progress):
            removed[stem] = postprocess_file(path, tmp / path.name, labels, connectivity=connectivity,
                                             reader_writer=rw)
        for name in COPIED_FILES:
            if (pred_dir / name).is_file():
                shutil.copyfile(pred_dir / name, tmp / name)
        record = {"package_version": nnunet_sddm.__version__, "postprocess": "lcc",
                  "description": "largest connected component per label, others set to 0",
                  "connectivity": connectivity or 3, "labels": labels if labels is not None else "present values",
                  "input": str(pred_dir.resolve()), "removed_voxels": removed}
        write_json(record, tmp / RECORD_FILE)
        publishable_permissions(tmp)
    return record
