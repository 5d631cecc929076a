"""nnU-Net raw datasets: ``dataset.json``, case listing, ``cases.json`` and patient-level splits.

Layout (nnU-Net v2): ``DatasetXXX_Name/{imagesTr,labelsTr,imagesTs[,labelsTs]}``, images
``CASE_0000<ending>``, labels ``CASE<ending>``. ``cases.json`` is this project's per-case record
(subject, phase, vendor, centre, ...), a list of dicts with at least ``case`` and ``subject``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import read_json, write_json

#: Labels of every dataset this project writes (M&Ms convention).
CARDIAC_LABELS: Dict[str, int] = {"background": 0, "LV": 1, "MYO": 2, "RV": 3}

#: File endings of 3D images that nnU-Net's reader/writers handle, longest first.
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl", ".tif", ".tiff")

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
