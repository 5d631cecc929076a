"""Training slices of the source domain from an nnU-Net raw dataset (docs/explanation/algorithm.md).

Every slice along the through-plane axis ``z`` of every selected image, each VOLUME clipped to
its own 0.5/99.5 percentiles and scaled to ``[-1, 1]``, padded to a square with -1 and resized
to the model size (aspect kept): a float tensor ``(N, 1, S, S)``.

Selection: ``imagesTr`` (plus ``imagesTs`` with ``include_test``), optionally restricted to a
list of cases and/or to a vendor / centre recorded in ``cases.json``. The order is the sorted
case order, so the result is deterministic. It is cached (``.npy`` + ``.json``) under
``$nnUNet_preprocessed/DatasetXXX_Name/sddm_slices/`` (or a given folder), keyed by the
files' names, sizes and modification times and by the preprocessing settings, so epochs and
later runs do not re-read NIfTI files.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from nnunet_sddm.data.raw_dataset import list_images, load_cases_json, load_dataset_json
from nnunet_sddm.data.slices import IntensityWindow, configured_percentiles, volume_to_model_slices
from nnunet_sddm.data.volumes import read_volume
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import atomic_path, write_json
from nnunet_sddm.utilities.nnunet_paths import preprocessed_root
from nnunet_sddm.utilities.progress import progress_bar

CACHE_VERSION = 1


@dataclass
class SliceSet:
    """Model-space training slices.

    images: float32 ``(N, 1, S, S)`` in ``[-1, 1]``; cases: the case of each slice (N,);
    slice_index: the ``z`` index of each slice in its volume (N,).
    """

    images: torch.Tensor
    cases: List[str]
    slice_index: List[int]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _read_case_list(cases: Union[None, str, Sequence[str]]) -> Optional[List[str]]:
    """A list of case ids from a list, a comma string or a text/JSON file (one id per line)."""
    if cases is None:
        return None
    if isinstance(cases, str):
        p = Path(cases)
        if p.is_file():
            text = p.read_text()
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError:
                loaded = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
            if not isinstance(loaded, list):
                raise SDDMError(f"{p}: expected a JSON list or one case id per line")
            return [str(c) for c in loaded]
        return [c.strip() for c in cases.split(",") if c.strip()]
    return [str(c) for c in cases]


def select_images(dataset_folder: Union[str, os.PathLike], data_cfg: Mapping[str, Any]) -> Dict[str, Path]:
    """case -> image file of the training selection (sorted by case).

    ``data_cfg`` keys: ``include_test`` (bool), ``cases`` (list / comma string / file, or None),
    ``vendor`` and ``centre`` (match ``cases.json`` records; None = all).
    """
    folder = Path(dataset_folder)
    dj = load_dataset_json(folder)
    ending = dj["file_ending"]
    if not (folder / "imagesTr").is_dir():
        raise SDDMError(f"{folder / 'imagesTr'}: missing; {folder} has no training images")
    images = dict(list_images(folder / "imagesTr", ending))
    if data_cfg.get("include_test") and (folder / "imagesTs").is_dir():
        for case, path in list_images(folder / "imagesTs", ending).items():
            if case in images:
                raise SDDMError(f"{path}: case {case} is in both imagesTr and imagesTs")
            images[case] = path
    wanted = _read_case_list(data_cfg.get("cases"))
    if wanted is not None:
        unknown = sorted(set(wanted) - set(images))
        if unknown:
            raise SDDMError(f"{folder}: cases {unknown[:10]} of the case list are not among its images")
        images = {c: images[c] for c in wanted}
    for key in ("vendor", "centre"):
        value = data_cfg.get(key)
        if value is None:
            continue
        records = load_cases_json(folder)
        if not records:
            raise SDDMError(f"{folder / 'cases.json'}: missing, so images cannot be selected by {key} {value!r}")
        keep = {r["case"] for r in records if str(r.get(key)).lower() == str(value).lower()}
        images = {c: p for c, p in images.items() if c in keep}
    if not images:
        raise SDDMError(f"{folder}: no training images match the selection "
                        f"(include_test={data_cfg.get('include_test')}, cases={data_cfg.get('cases')}, "
                        f"vendor={data_cfg.get('vendor')}, centre={data_cfg.get('centre')})")
    return dict(sorted(images.items()))


def _cache_key(images: Mapping[str, Path], size: int, percentiles: Sequence[float]) -> str:
    entries = []
    for case, p in images.items():
        st = p.stat()
        entries.append([case, p.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": CACHE_VERSION, "size": int(size), "percentiles": [float(x) for x in percentiles],
                       "files": entries}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def default_cache_dir(dataset_folder: Union[str, os.PathLike]) -> Optional[Path]:
    """``$nnUNet_preprocessed/<dataset folder name>/sddm_slices`` (None if the variable is unset)."""
    try:
        return preprocessed_root() / Path(dataset_folder).name / "sddm_slices"
    except SDDMError:
        return None


def load_slices(dataset_folder: Union[str, os.PathLike], size: int, data_cfg: Mapping[str, Any],
                cache_dir: Union[None, str, os.PathLike] = None, progress: bool = True) -> SliceSet:
    """All selected slices in model space ``(N, 1, size, size)``, from the cache when valid.

    Raises ``SDDMError`` for a dataset without images, unreadable / non-3D / NaN images and
    constant volumes (naming the file)."""
    images = select_images(dataset_folder, data_cfg)
    percentiles = configured_percentiles(data_cfg)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(dataset_folder)
    key = _cache_key(images, size, percentiles)
    if cache_dir is not None:
        npy, meta = cache_dir / f"slices_{size}_{key}.npy", cache_dir / f"slices_{size}_{key}.json"
        if npy.is_file() and meta.is_file():
            info = json.loads(meta.read_text())
            arr = np.load(npy)
            return SliceSet(torch.from_numpy(arr.astype(np.float32)), info["cases"], info["slice_index"])
    chunks, cases, index = [], [], []
    for case, path in progress_bar(images.items(), desc="reading slices", unit="volume", disable=not progress):
        vol = read_volume(path)
        window = IntensityWindow.fit(vol.data, percentiles, name=str(path))
        x, _, _ = volume_to_model_slices(vol.data, size, window=window, name=str(path))
        chunks.append(x.numpy())
        cases += [case] * x.shape[0]
        index += list(range(x.shape[0]))
    arr = np.concatenate(chunks).astype(np.float32)
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(npy) as tmp:
            np.save(tmp, arr.astype(np.float16))
        write_json({"dataset": str(Path(dataset_folder).resolve()), "size": int(size),
                    "percentiles": list(percentiles), "cases": cases, "slice_index": index}, meta)
        arr = arr.astype(np.float16).astype(np.float32)  # identical to what a cache hit returns
    return SliceSet(torch.from_numpy(arr), cases, index)
