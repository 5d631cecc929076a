"""Training slices of the source domain from an nnU-Net raw dataset (docs/explanation/algorithm.md).

Every slice along the through-plane axis ``z`` of every selected image, each VOLUME clipped to
its own 0.5/99.5 percentiles and scaled to ``[-1, 1]``, then

- resize mode (``data.spacing`` null): padded to a square with -1 and resized to the model size
  (aspect kept): a float tensor ``(N, 1, S, S)``;
- spacing mode (``data.spacing`` = s mm): resampled from the image's in-plane spacing (its
  header) to s mm, each slice ``(h_i, w_i)`` stored in the top-left corner of one tensor
  ``(N, 1, H, W)`` (``H, W`` the largest extents, the rest -1) with its ``extents``. The
  trainer draws random ``S x S`` crops of them (``crop_offsets``, ``crop_batch``).

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
from nnunet_sddm.data.slices import (IntensityWindow, configured_percentiles, slice_transform, volume_to_model_slices,
                                     working_spacing)
from nnunet_sddm.data.volumes import read_geometry, read_volume
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import atomic_path, write_json
from nnunet_sddm.utilities.nnunet_paths import preprocessed_root
from nnunet_sddm.utilities.progress import progress_bar

CACHE_VERSION = 1

#: Background value of model space (the padding of slices and crops).
PAD_VALUE = -1.0


@dataclass
class SliceSet:
    """Model-space training slices.

    images: float32 ``(N, 1, S, S)`` in ``[-1, 1]`` (resize mode) or ``(N, 1, H, W)`` (spacing
    mode: slice ``i`` is ``images[i, :, :h_i, :w_i]``, the rest -1); cases: the case of each slice
    (N,); slice_index: the ``z`` index of each slice in its volume (N,); spacing: the working
    spacing in mm (None: resize mode); extents: ``(N, 2)`` int64 ``(h_i, w_i)`` in spacing mode,
    else None. Conditional models (``load_label_slices``, ``concat_slice_sets``): labels, int16
    ``(N, S, S)`` / ``(N, H, W)`` label maps on the grid of ``images`` (background 0 in the
    padding); domains, int64 ``(N,)`` indices into ``model.domains`` (None: no domain token).
    """

    images: torch.Tensor
    cases: List[str]
    slice_index: List[int]
    spacing: Optional[float] = None
    extents: Optional[np.ndarray] = None
    labels: Optional[torch.Tensor] = None
    domains: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


def crop_offsets(extents: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(B, 2)`` int64 top-left corners ``(dy, dx)`` of uniformly random ``size x size`` crops of
    slices of ``extents (B, 2)``: in ``[0, h - size]`` where the slice is larger than the crop, in
    ``[h - size, 0]`` (the slice placed at random inside the crop, padded with -1) where smaller."""
    ext = np.asarray(extents, dtype=np.int64).reshape(-1, 2)
    lo = np.minimum(0, ext - int(size))
    hi = np.maximum(0, ext - int(size))
    return rng.integers(lo, hi + 1, dtype=np.int64)


def crop_batch(images: torch.Tensor, extents: np.ndarray, idx: np.ndarray, offsets: np.ndarray,
               size: int, fill: float = PAD_VALUE) -> torch.Tensor:
    """``(B, C, size, size)`` crops of the slices ``idx`` of a spacing-mode ``SliceSet``
    (``images (N, C, H, W)``, ``extents (N, 2)``) at ``offsets (B, 2)`` (``crop_offsets``); pixels
    outside a slice are ``fill`` (-1; 0 for label maps). On ``images``' device."""
    size = int(size)
    out = torch.full((len(idx), images.shape[1], size, size), fill, dtype=images.dtype, device=images.device)
    for b, (i, (dy, dx)) in enumerate(zip(np.asarray(idx).tolist(), np.asarray(offsets).tolist())):
        h, w = (int(v) for v in extents[i])
        y0, y1, x0, x1 = max(dy, 0), min(dy + size, h), max(dx, 0), min(dx + size, w)
        if y1 > y0 and x1 > x0:
            out[b, :, y0 - dy:y1 - dy, x0 - dx:x1 - dx] = images[i, :, y0:y1, x0:x1]
    return out


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


def _cache_key(images: Mapping[str, Path], size: int, percentiles: Sequence[float],
               spacing: Optional[float] = None) -> str:
    entries = []
    for case, p in images.items():
        st = p.stat()
        entries.append([case, p.name, st.st_size, st.st_mtime_ns])
    key: Dict[str, Any] = {"v": CACHE_VERSION, "size": int(size), "percentiles": [float(x) for x in percentiles],
                           "files": entries}
    if spacing is not None:  # resize mode keeps its earlier keys (and cache files)
        key["spacing"] = float(spacing)
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def default_cache_dir(dataset_folder: Union[str, os.PathLike]) -> Optional[Path]:
    """``$nnUNet_preprocessed/<dataset folder name>/sddm_slices`` (None if the variable is unset)."""
    try:
        return preprocessed_root() / Path(dataset_folder).name / "sddm_slices"
    except SDDMError:
        return None


def volume_model_slices(path: Union[str, os.PathLike], size: int, data_cfg: Mapping[str, Any]) -> torch.Tensor:
    """The slices of one image file in the model space of a model with side ``size`` and ``data``
    section ``data_cfg``: float32 ``(z, 1, size, size)`` in resize mode, ``(z, 1, h, w)`` at the
    working spacing in spacing mode, values in ``[-1, 1]``."""
    vol = read_volume(path)
    window = IntensityWindow.fit(vol.data, configured_percentiles(data_cfg), name=str(path))
    transform = slice_transform(data_cfg, size, vol.data.shape[1:], vol.spacing, name=str(path))
    x, _, _ = volume_to_model_slices(vol.data, size, window=window, name=str(path), transform=transform)
    return x


def load_slices(dataset_folder: Union[str, os.PathLike], size: int, data_cfg: Mapping[str, Any],
                cache_dir: Union[None, str, os.PathLike] = None, progress: bool = True) -> SliceSet:
    """All selected slices in model space, from the cache when valid: ``(N, 1, size, size)`` in
    resize mode; in spacing mode (``data_cfg["spacing"]`` mm) every slice at the working spacing,
    ``(N, 1, H, W)`` with ``extents`` (see ``SliceSet``).

    Raises ``SDDMError`` for a dataset without images, unreadable / non-3D / NaN images, constant
    volumes and (spacing mode) images without a valid in-plane spacing (naming the file)."""
    images = select_images(dataset_folder, data_cfg)
    percentiles = configured_percentiles(data_cfg)
    spacing = working_spacing(data_cfg)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(dataset_folder)
    key = _cache_key(images, size, percentiles, spacing)
    stem = f"slices_{size}_{key}" if spacing is None else f"slices_{spacing:g}mm_{key}"
    if cache_dir is not None:
        npy, meta = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
        if npy.is_file() and meta.is_file():
            info = json.loads(meta.read_text())
            arr = np.load(npy)
            extents = None if spacing is None else np.asarray(info["extents"], dtype=np.int64).reshape(-1, 2)
            return SliceSet(torch.from_numpy(arr.astype(np.float32)), info["cases"], info["slice_index"],
                            spacing, extents)
    chunks, cases, index = [], [], []
    for case, path in progress_bar(images.items(), desc="reading slices", unit="volume", disable=not progress):
        x = volume_model_slices(path, size, data_cfg)
        chunks.append(x.numpy())
        cases += [case] * x.shape[0]
        index += list(range(x.shape[0]))
    extents = None
    if spacing is None:
        arr = np.concatenate(chunks).astype(np.float32)
    else:
        extents = np.asarray([c.shape[-2:] for c in chunks for _ in range(c.shape[0])], dtype=np.int64).reshape(-1, 2)
        height, width = (int(v) for v in extents.max(axis=0))
        arr = np.full((len(cases), 1, height, width), PAD_VALUE, dtype=np.float32)
        start = 0
        for c in chunks:
            arr[start:start + c.shape[0], :, :c.shape[2], :c.shape[3]] = c
            start += c.shape[0]
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(npy) as tmp:
            np.save(tmp, arr.astype(np.float16))
        info = {"dataset": str(Path(dataset_folder).resolve()), "size": int(size),
                "percentiles": list(percentiles), "cases": cases, "slice_index": index}
        if spacing is not None:
            info.update(spacing=spacing, extents=extents.tolist())
        write_json(info, meta)
        arr = arr.astype(np.float16).astype(np.float32)  # identical to what a cache hit returns
    return SliceSet(torch.from_numpy(arr), cases, index, spacing, extents)


def label_file(image: Path, file_ending: str) -> Path:
    """The label map of an image file of a raw dataset: ``imagesTr/CASE_0000<ending>`` ->
    ``labelsTr/CASE<ending>`` (``imagesTs`` -> ``labelsTs``)."""
    from nnunet_sddm.data.raw_dataset import case_of

    folder = image.parent.parent / image.parent.name.replace("images", "labels", 1)
    return folder / f"{case_of(image)}{file_ending}"


def load_label_slices(dataset_folder: Union[str, os.PathLike], size: int, data_cfg: Mapping[str, Any],
                      slices: SliceSet, label_values: Sequence[int], progress: bool = True) -> torch.Tensor:
    """The label maps of the slices of ``slices`` (``load_slices`` of the same dataset, size and
    ``data_cfg``) on the grid of their images: int16 ``(N, size, size)`` in resize mode
    (``SquareResize.forward_labels``), ``(N, H, W)`` in spacing mode (``SpacingResample.forward_labels``,
    slice ``i`` in the top-left ``extents[i]`` corner like its image, 0 elsewhere).

    ``SDDMError`` naming the case for a missing label file, one whose shape differs from its image,
    or one with values outside ``{0} | label_values`` (``conditioning.encode_labels``)."""
    from nnunet_sddm.diffusion.conditioning import encode_labels

    images = select_images(dataset_folder, data_cfg)
    ending = load_dataset_json(dataset_folder)["file_ending"]
    spacing = working_spacing(data_cfg)
    height, width = (int(size), int(size)) if spacing is None else tuple(int(v) for v in slices.images.shape[-2:])
    out = torch.zeros((len(slices), height, width), dtype=torch.int16)
    cases = np.asarray(slices.cases)
    for case, image in progress_bar(images.items(), desc="reading label maps", unit="volume", disable=not progress):
        rows = np.flatnonzero(cases == case)
        path = label_file(image, ending)
        if not path.is_file():
            raise SDDMError(f"case {case}: label map {path} not found (a conditional model trains on labelled "
                            f"cases only)")
        if read_geometry(path)["shape"] != read_geometry(image)["shape"]:
            raise SDDMError(f"case {case}: label map {path} has shape {read_geometry(path)['shape']}, its image "
                            f"{image} {read_geometry(image)['shape']}")
        vol = read_volume(path)
        lab = np.rint(vol.data)
        if lab.shape[0] != len(rows):
            raise SDDMError(f"case {case}: label map {path} has {lab.shape[0]} slices, the training slices "
                            f"{len(rows)}")
        values = np.unique(lab)
        encode_labels(values.reshape(-1, 1, 1), label_values, name=f"case {case} ({path})")
        transform = slice_transform(data_cfg, size, lab.shape[1:], vol.spacing, name=str(path))
        maps = transform.forward_labels(torch.from_numpy(lab.astype(np.float32)))
        if spacing is not None and tuple(maps.shape[-2:]) != tuple(int(v) for v in slices.extents[rows[0]]):
            raise SDDMError(f"case {case}: label map {path} resamples to {tuple(maps.shape[-2:])}, its image to "
                            f"{tuple(slices.extents[rows[0]])} (different voxel spacing?)")
        out[rows, :maps.shape[-2], :maps.shape[-1]] = maps.round().to(torch.int16)
    return out


def concat_slice_sets(sets: Sequence[SliceSet]) -> SliceSet:
    """One ``SliceSet`` of several (e.g. the source and a pseudo-labelled target dataset), in
    order; spacing mode: padded to the largest ``(H, W)`` (-1 images, 0 labels). Labels and
    domains are kept when every set has them."""
    if len(sets) == 1:
        return sets[0]
    spacing = sets[0].spacing
    if any(s.spacing != spacing for s in sets):
        raise SDDMError(f"cannot combine slices at working spacings {[s.spacing for s in sets]} mm")
    height = max(int(s.images.shape[-2]) for s in sets)
    width = max(int(s.images.shape[-1]) for s in sets)

    def pad(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]), value=value)

    images = torch.cat([pad(s.images, PAD_VALUE) for s in sets])
    labels = torch.cat([pad(s.labels, 0) for s in sets]) if all(s.labels is not None for s in sets) else None
    domains = np.concatenate([s.domains for s in sets]) if all(s.domains is not None for s in sets) else None
    extents = None if spacing is None else np.concatenate([s.extents for s in sets])
    return SliceSet(images, [c for s in sets for c in s.cases], [i for s in sets for i in s.slice_index],
                    spacing, extents, labels, domains)
