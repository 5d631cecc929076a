"""nnU-Net's environment variables and dataset folder names, read at call time.

``nnunetv2.paths`` reads the variables once at import (and, in 2.8.1, not as plain strings);
reading them here at call time lets tests and long-lived processes change them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Union

from nnunet_sddm.utilities.errors import SDDMError

_DATASET_RE = re.compile(r"^Dataset(\d{3})_(.+)$")


def _env_folder(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        raise SDDMError(f"environment variable {var} is not set; nnU-Net needs nnUNet_raw, "
                        f"nnUNet_preprocessed and nnUNet_results (see the README)")
    return Path(value)


def raw_root() -> Path:
    """``$nnUNet_raw``."""
    return _env_folder("nnUNet_raw")


def preprocessed_root() -> Path:
    """``$nnUNet_preprocessed``."""
    return _env_folder("nnUNet_preprocessed")


def results_root() -> Path:
    """``$nnUNet_results``."""
    return _env_folder("nnUNet_results")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name`` for an integer id in [1, 999] and a name without path separators."""
    if not 0 < int(dataset_id) < 1000:
        raise SDDMError(f"dataset id must be in 1..999, got {dataset_id}")
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise SDDMError(f"invalid dataset name {name!r}")
    return f"Dataset{int(dataset_id):03d}_{name}"


def datasets_with_id(dataset_id: int, root: Optional[Path] = None) -> List[Path]:
    """All folders ``DatasetXXX_*`` under ``root`` (default ``$nnUNet_raw``) with this id."""
    root = raw_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        m = _DATASET_RE.match(p.name)
        if p.is_dir() and m and int(m.group(1)) == int(dataset_id):
            out.append(p)
    return out


def find_raw_dataset(dataset: Union[int, str], root: Optional[Path] = None) -> Path:
    """Resolve ``27``, ``"27"``, ``"Dataset027_ACDC"`` or a path to an existing raw dataset folder."""
    s = str(dataset)
    if os.sep in s or Path(s).is_dir():
        p = Path(s)
        if not p.is_dir():
            raise SDDMError(f"dataset folder {p} does not exist")
        return p
    root = raw_root() if root is None else Path(root)
    m = _DATASET_RE.match(s)
    if m:
        p = root / s
        if not p.is_dir():
            raise SDDMError(f"dataset {s} not found in {root}")
        return p
    if not s.isdigit():
        raise SDDMError(f"{s!r} is neither a dataset id, a DatasetXXX_Name nor a folder")
    found = datasets_with_id(int(s), root)
    if not found:
        raise SDDMError(f"no dataset with id {int(s)} in {root}")
    if len(found) > 1:
        raise SDDMError(f"several datasets with id {int(s)} in {root}: {[p.name for p in found]}")
    return found[0]


def parse_dataset_folder_name(name: str) -> tuple:
    """``"Dataset027_ACDC"`` -> ``(27, "ACDC")``."""
    m = _DATASET_RE.match(name)
    if not m:
        raise SDDMError(f"{name!r} is not a DatasetXXX_Name folder name")
    return int(m.group(1)), m.group(2)
