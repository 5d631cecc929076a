"""Label-map generators: an unconditional diffusion model over one-hot label maps (new anatomies).

Notation: a label-map generator (``model.generates`` "labels") knows the foreground label values
``v_1 .. v_{K-1}`` (``model.label_values``) and their names (``model.label_names``). A label map
``L (H, W)`` (integer values in ``{0, v_1, ..}``) is the model-space tensor ``x (K, H, W)``,
``x_k = 2 [L = c_k] - 1`` in ``{-1, 1}`` with the channel values ``c = (0, v_1, .., v_{K-1})``
(background first), so ``model.in_channels`` = K (and ``2K`` output channels with learned sigma).
A sample ``x`` decodes to ``L = c_{argmax_k x_k}``.

Slices: resize mode only (``data.spacing`` null): each training label map goes through the
images' square padding (background 0) and a nearest-neighbour resize to ``S x S``
(``SquareResize.forward_labels``). Generated ``S x S`` maps go back to a slice grid
``SliceGeometry`` (``SquareResize.inverse_labels``, nearest-neighbour): by default
``data.label_geometry``, the median in-plane shape and the median spacing of the training label
maps, recorded at training time.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np
import torch

from nnunet_sddm.data.raw_dataset import list_images, list_labels, load_dataset_json
from nnunet_sddm.data.slices import SquareResize
from nnunet_sddm.data.volumes import read_geometry
from nnunet_sddm.diffusion.conditioning import dataset_labels, encode_labels, is_label_generator
from nnunet_sddm.utilities.errors import SDDMError

PathLike = Union[str, os.PathLike]


def channel_values(label_values: Sequence[int]) -> List[int]:
    """``[0, v_1, ..]``: the label value of each of the K model channels (background first)."""
    return [0, *(int(v) for v in label_values)]


def encode_label_maps(label_maps: Union[torch.Tensor, np.ndarray], label_values: Sequence[int],
                      name: str = "label map") -> torch.Tensor:
    """Label maps ``(N, H, W)`` -> ``(N, K, H, W)`` float32 in ``{-1, 1}``, channel 0 the
    background, channel ``k`` ``label_values[k - 1]``; ``SDDMError`` naming ``name`` for other values."""
    return encode_labels(label_maps, channel_values(label_values), name=name) * 2.0 - 1.0


def decode_label_maps(x: torch.Tensor, label_values: Sequence[int]) -> np.ndarray:
    """Samples ``(N, K, H, W)`` -> label maps ``(N, H, W)`` int16: the value of the largest channel
    (ties: the first channel)."""
    if x.ndim != 4 or x.shape[1] != len(label_values) + 1:
        raise SDDMError(f"expected samples (N, {len(label_values) + 1}, H, W), got {tuple(x.shape)}")
    idx = x.detach().float().argmax(dim=1).cpu().numpy()
    return np.asarray(channel_values(label_values), dtype=np.int16)[idx]


@dataclass(frozen=True)
class SliceGeometry:
    """The grid of a 2D label-map slice: ``shape (h, w)`` pixels and voxel ``spacing (sz, sy, sx)``
    in mm (``sz``: the through-plane spacing written to the ``(1, h, w)`` file)."""

    shape: Tuple[int, int]
    spacing: Tuple[float, float, float]

    def to_json(self) -> Dict[str, list]:
        return {"shape": [int(v) for v in self.shape], "spacing": [float(v) for v in self.spacing]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SliceGeometry":
        return cls(tuple(int(v) for v in d["shape"]), tuple(float(v) for v in d["spacing"]))

    def transform(self, size: int) -> SquareResize:
        """The resize-mode transform between this grid and the model's ``size x size``."""
        return SquareResize(int(self.shape[0]), int(self.shape[1]), int(size))


def median_geometry(files: Sequence[PathLike]) -> SliceGeometry:
    """The median in-plane shape (rounded to pixels) and median spacing of 3D image files (headers only)."""
    if not files:
        raise SDDMError("no image files to take a slice geometry from")
    shapes, spacings = [], []
    for f in files:
        g = read_geometry(f)
        if len(g["shape"]) != 3:
            raise SDDMError(f"{f}: expected a 3D image, found shape {tuple(g['shape'])}")
        x, y, _ = g["shape"]
        sx, sy, sz = g["spacing"][:3]
        shapes.append((y, x))
        spacings.append((sz, sy, sx))
    h, w = (int(round(float(v))) for v in np.median(np.asarray(shapes, dtype=np.float64), axis=0))
    return SliceGeometry((h, w), tuple(float(v) for v in np.median(np.asarray(spacings, dtype=np.float64), axis=0)))


def dataset_geometry(dataset_folder: PathLike) -> SliceGeometry:
    """``median_geometry`` of a raw dataset's ``labelsTr`` (its ``imagesTr`` if it has no label maps)."""
    folder = Path(dataset_folder)
    ending = load_dataset_json(folder)["file_ending"]
    files = list(list_labels(folder / "labelsTr", ending).values())
    if not files and (folder / "imagesTr").is_dir():
        files = list(list_images(folder / "imagesTr", ending).values())
    if not files:
        raise SDDMError(f"{folder}: neither labelsTr nor imagesTr holds files to take a slice geometry from")
    return median_geometry(sorted(files))


def model_geometry(config: Mapping[str, Any], where: PathLike) -> SliceGeometry:
    """The recorded slice grid of a label-map generator (``data.label_geometry``); ``SDDMError``
    naming ``where`` when it has none."""
    geo = (config.get("data") or {}).get("label_geometry")
    if geo is None:
        raise SDDMError(f"{os.fspath(where)}: the model records no data.label_geometry; give a raw dataset "
                        f"(--like DATASET) whose median slice geometry the label maps get")
    return SliceGeometry.from_json(geo)


def label_names(config: Mapping[str, Any]) -> Dict[str, int]:
    """``{name: value}`` of a label-map generator's foreground labels (``label_<v>`` without names)."""
    m = config["model"]
    values = [int(v) for v in m["label_values"]]
    names = m.get("label_names") or [f"label_{v}" for v in values]
    return dict(zip(names, values))


def complete_label_config(config: Mapping[str, Any], dataset_folder: PathLike,
                          training_files: Sequence[PathLike]) -> dict:
    """A copy of a label-map generator's ``config`` completed from its training data (image models:
    unchanged): ``model.label_values`` (default: ``dataset.json``'s foreground values) and
    ``model.label_names`` (their names), ``model.in_channels`` = 1 + their number (``SDDMError`` if set
    to anything but the preset's 1 or that), ``data.label_geometry`` (``median_geometry`` of
    ``training_files``, the training label maps)."""
    cfg = copy.deepcopy(dict(config))
    if not is_label_generator(cfg):
        return cfg
    m = cfg["model"]
    labels = dataset_labels(dataset_folder)
    if m.get("label_values") is None:
        m["label_values"] = sorted(v for v in labels.values() if v != 0)
        if not m["label_values"]:
            raise SDDMError(f"{dataset_folder}: dataset.json has no foreground labels; nothing to generate")
    if m.get("label_names") is None:
        by_value = {v: k for k, v in labels.items()}
        m["label_names"] = [by_value.get(int(v), f"label_{v}") for v in m["label_values"]]
    k = len(m["label_values"]) + 1
    if int(m["in_channels"]) not in (1, k):
        raise SDDMError(f"model.in_channels {m['in_channels']}: a label-map generator of the labels "
                        f"{m['label_values']} has {k} channels (background first); leave model.in_channels unset")
    m["in_channels"] = k
    if cfg["data"].get("label_geometry") is None:
        cfg["data"]["label_geometry"] = median_geometry(training_files).to_json()
    return cfg


def to_slice_grid(label_maps: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """Model-space label maps ``(N, S, S)`` -> ``(N, h, w)`` on ``geometry``'s grid (nearest-neighbour,
    values kept), int16."""
    lab = torch.from_numpy(np.asarray(label_maps, dtype=np.float32))
    out = geometry.transform(int(lab.shape[-1])).inverse_labels(lab)
    return out.round().numpy().astype(np.int16)
