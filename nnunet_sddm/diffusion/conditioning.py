"""Conditioning of a mask-conditioned diffusion model: label maps as one-hot input channels.

A conditional model (``model.condition`` "labels") knows the foreground label values
``model.label_values`` (K values, background 0 excluded, from the training dataset's
``dataset.json``). Its condition is ``(B, K, H, W)`` float32, channel k equal to 1 where the label
map holds ``label_values[k]``; the null condition (classifier-free guidance) is all zeros. With
``model.domains`` the model also takes a domain index ``(B,)`` (``0 .. D-1``; ``D``: the null
domain).
"""
from __future__ import annotations

import os
from typing import Any, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from nnunet_sddm.data.raw_dataset import IGNORE, load_dataset_json
from nnunet_sddm.utilities.errors import SDDMError

#: The domain names of a model trained with ``--pseudo-labelled`` (source cases, then target cases).
DOMAINS = ["source", "target"]


def encode_labels(label_map: Union[torch.Tensor, np.ndarray], label_values: Sequence[int],
                  name: str = "label map") -> torch.Tensor:
    """Label maps ``(N, H, W)`` (integer values) -> one-hot ``(N, K, H, W)`` float32, channel ``k``
    for ``label_values[k]``, background 0 in no channel. Any value not in ``{0} | label_values``
    raises ``SDDMError`` naming ``name`` (the case) and the unknown values."""
    lab = torch.as_tensor(np.asarray(label_map) if not isinstance(label_map, torch.Tensor) else label_map)
    if lab.ndim != 3:
        raise SDDMError(f"{name}: expected label maps (N, H, W), got shape {tuple(lab.shape)}")
    if lab.is_floating_point():
        if not torch.isfinite(lab).all() or not torch.equal(lab, lab.round()):
            raise SDDMError(f"{name}: label map has non-integer values")
    lab = lab.long()
    values = [int(v) for v in label_values]
    unknown = sorted(set(torch.unique(lab).tolist()) - {0, *values})
    if unknown:
        raise SDDMError(f"{name}: label values {unknown[:10]} are not among the model's labels {values} "
                        f"(and background 0)")
    ref = torch.as_tensor(values, dtype=torch.long, device=lab.device).view(1, -1, 1, 1)
    return (lab[:, None] == ref).float()


def null_condition(n: int, num_labels: int, shape: Sequence[int], device: Union[None, str, torch.device] = None
                   ) -> torch.Tensor:
    """The null condition: all-zero ``(n, num_labels, *shape)`` float32."""
    return torch.zeros((int(n), int(num_labels), *(int(s) for s in shape)), device=device)


def is_conditional(config: Mapping[str, Any]) -> bool:
    """True for a mask-conditioned model (``model.condition`` "labels")."""
    return (config.get("model") or {}).get("condition") == "labels"


def dataset_labels(dataset_folder: Union[str, os.PathLike]) -> dict:
    """``{name: value}`` of ``dataset.json``'s labels with integer values; ``SDDMError`` naming
    the dataset for region-based (list) labels or non-integer values."""
    dj = load_dataset_json(dataset_folder)
    out = {}
    for k, v in dj["labels"].items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise SDDMError(f"{dataset_folder}: dataset.json label {k!r} has value {v!r}; a label-conditioned "
                            f"model needs one integer per label (no region-based labels)")
        out[str(k)] = int(v)
    return out


def dataset_label_values(dataset_folder: Union[str, os.PathLike]) -> List[int]:
    """The foreground label values of a raw dataset's ``dataset.json`` (sorted, background 0 excluded)."""
    values = sorted(v for v in dataset_labels(dataset_folder).values() if v != 0)
    if not values:
        raise SDDMError(f"{dataset_folder}: dataset.json has no foreground labels; nothing to condition on")
    return values


def check_same_labels(source: Union[str, os.PathLike], other: Union[str, os.PathLike],
                      role: str = "--pseudo-labelled dataset") -> None:
    """``SDDMError`` naming ``other`` unless its ``dataset.json`` labels equal ``source``'s."""
    a, b = dataset_labels(source), dataset_labels(other)
    if IGNORE in b and IGNORE not in a and {k: v for k, v in b.items() if k != IGNORE} == a:
        raise SDDMError(f"{role} {os.fspath(other)}: has nnU-Net's ignore label (pseudo-labels written with "
                        f"--threshold); a mask-conditioned model needs a label at every voxel: write the "
                        f"pseudo-labels for the diffusion model without --threshold (the ignore label is for "
                        f"nnU-Net training)")
    if a != b:
        raise SDDMError(f"{role} {os.fspath(other)}: its dataset.json labels {b} differ from those of the "
                        f"source dataset {os.fspath(source)} ({a}); both must use the same labels")


def complete_condition_config(config: Mapping[str, Any], dataset_folder: Union[str, os.PathLike],
                              pseudo_folder: Optional[Union[str, os.PathLike]] = None) -> dict:
    """A copy of ``config`` with the conditioning filled in from the data: ``model.label_values``
    from ``dataset_folder``'s ``dataset.json`` when null, ``model.domains`` ``DOMAINS`` when a
    pseudo-labelled dataset is given (and null). ``SDDMError`` for a pseudo-labelled dataset without
    ``model.condition`` "labels", with other labels than the source, or with other domains set."""
    import copy

    cfg = copy.deepcopy(dict(config))
    m = cfg["model"]
    if pseudo_folder is not None and not is_conditional(cfg):
        raise SDDMError(f"--pseudo-labelled {os.fspath(pseudo_folder)}: needs a conditional model "
                        f"(--condition labels)")
    if not is_conditional(cfg):
        return cfg
    if m.get("label_values") is None:
        m["label_values"] = dataset_label_values(dataset_folder)
    if pseudo_folder is not None:
        check_same_labels(dataset_folder, pseudo_folder)
        if m.get("domains") is None:
            m["domains"] = list(DOMAINS)
        elif list(m["domains"]) != DOMAINS:
            raise SDDMError(f"model.domains {m['domains']!r}: with --pseudo-labelled the domains are {DOMAINS} "
                            f"(source cases, then the pseudo-labelled target cases)")
    return cfg


def is_label_generator(config: Mapping[str, Any]) -> bool:
    """True for a label-map generator (``model.generates`` "labels"; absent: an image model)."""
    return ((config.get("model") or {}).get("generates") or "images") == "labels"


def require_unconditional(config: Mapping[str, Any], where: Union[str, os.PathLike], what: str) -> None:
    """``SDDMError`` naming ``where`` (the model folder) unless ``config`` is an unconditional image
    model's: ``what`` (e.g. "adaptation") calls the network without a condition on image slices, so
    it refuses a conditional model and a label-map generator (``model.generates`` "labels")."""
    if is_conditional(config):
        raise SDDMError(f"{os.fspath(where)}: a mask-conditioned model (model.condition 'labels'); {what} needs an "
                        f"unconditional model (nnUNetv2_sddm_train without --condition)")
    if is_label_generator(config):
        raise SDDMError(f"{os.fspath(where)}: a label-map generator (model.generates 'labels'), which generates "
                        f"label maps, not images; {what} needs an unconditional image model (nnUNetv2_sddm_train "
                        f"without --generate labels)")


def require_label_generator(config: Mapping[str, Any], where: Union[str, os.PathLike]) -> None:
    """``SDDMError`` naming ``where`` unless ``config`` is a label-map generator's."""
    if not is_label_generator(config):
        raise SDDMError(f"{os.fspath(where)}: an image model (model.generates 'images'); generating label maps "
                        f"needs a label-map generator (nnUNetv2_sddm_train DATASET --generate labels)")
