"""Cleaning of generated 2D label maps (numpy / scipy only).

Notation: a label map ``L (h, w)`` holds integer values, 0 the background; ``labels`` are the
structure values ``v_1 .. v_{K-1}``. ``clean_label_map`` applies, in this order:

1. largest connected component per structure (``adaptation.postprocess.largest_component_per_label``,
   full 8-connectivity in 2D); the other pieces become background 0;
2. holes filled per structure: a hole of structure ``v`` is a connected component (4-connected,
   the dual of 8) of the pixels that are not ``v`` and do not reach the border
   (``scipy.ndimage.binary_fill_holes``); it becomes ``v`` only if all its pixels are background,
   so the LV blood pool inside the myocardial ring is never filled with myocardium.

``missing_structures`` lists the structures a cleaned map lacks (such maps are redrawn).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
from scipy import ndimage

from nnunet_sddm.adaptation.postprocess import largest_component_per_label
from nnunet_sddm.utilities.errors import SDDMError

#: Connectivity of the holes (4-connected: the dual of the components' full 8-connectivity).
_HOLE_STRUCTURE = ndimage.generate_binary_structure(2, 1)


def _check_map(label_map: np.ndarray) -> np.ndarray:
    lab = np.asarray(label_map)
    if lab.ndim != 2:
        raise SDDMError(f"expected a 2D label map (h, w), got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise SDDMError(f"expected an integer label map, got dtype {lab.dtype}")
    return lab


def fill_background_holes(label_map: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """``label_map (h, w)`` with every all-background hole of each of ``labels`` (in that order)
    set to the structure's value (step 2 of the module docstring); a new array."""
    out = _check_map(label_map).copy()
    for v in labels:
        mask = out == int(v)
        if not mask.any():
            continue
        holes = ndimage.binary_fill_holes(mask, structure=_HOLE_STRUCTURE) & ~mask
        if not holes.any():
            continue
        comp, n = ndimage.label(holes, structure=_HOLE_STRUCTURE)
        # a hole component is filled iff it holds no pixel of another structure
        foreign = np.bincount(comp[out != 0].ravel(), minlength=n + 1)
        fill = np.flatnonzero(foreign[1:] == 0) + 1
        out[np.isin(comp, fill)] = int(v)
    return out


def clean_label_map(label_map: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """The cleaned ``label_map (h, w)``: largest component per structure, then its all-background
    holes filled (module docstring); same dtype and shape."""
    lab = _check_map(label_map)
    return fill_background_holes(largest_component_per_label(lab, [int(v) for v in labels], connectivity=2), labels)


def missing_structures(label_map: np.ndarray, labels: Sequence[int]) -> List[int]:
    """The values of ``labels`` absent from ``label_map``."""
    present = set(np.unique(np.asarray(label_map)).tolist())
    return [int(v) for v in labels if int(v) not in present]
