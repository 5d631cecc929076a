"""nnU-Net's environment variables and dataset folder names, read at call time.

``nnunetv2.paths`` reads the variables once at import (and, in 2.8.1, not as plain strings);
reading them here at call time lets tests and long-lived processes change them.

Trainer lookup: nnU-Net finds third-party trainers only through ``nnUNet_extTrainer`` (folders
separated by ``os.pathsep``), in ``nnUNetv2_train`` and ``nnUNetv2_predict`` alike. The folder of
this plugin, ``plugin_trainers/nnunet_ext``, is located here without importing the trainers (the
library never imports ``plugin_trainers``; the trainers import the library).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
import importlib.util
from typing import List, MutableMapping, Optional, Union

from nnunet_sddm.utilities.errors import SDDMError

_DATASET_RE = re.compile(r"^Dataset(\d{3})_(.+)$")

#: nnU-Net's variable for third-party trainer folders.
TRAINER_ENV_VAR = "nnUNet_extTrainer"

#: The training seed of the SD-DM trainers (``plugin_trainers.seeding``; default 0).
SEED_ENV_VAR = "nnUNet_sddm_seed"
#: ``0`` skips nnU-Net's final validation in the SD-DM trainers (the study sets it: it never reads
#: that validation, which with fold ``all`` predicts every training case).
FINAL_VALIDATION_ENV_VAR = "nnUNet_sddm_final_validation"


def trainer_folder() -> Path:
    """The folder to put in ``nnUNet_extTrainer`` (``plugin_trainers/nnunet_ext`` of the installed
    package); ``SDDMError`` if the installation lacks it."""
    spec = importlib.util.find_spec("plugin_trainers")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        folder = Path(loc).resolve() / "nnunet_ext"
        if (folder / "sddm_trainers.py").is_file():
            return folder
    raise SDDMError("plugin_trainers/nnunet_ext/sddm_trainers.py is missing: the nnunet-sddm installation is "
                    "incomplete (reinstall the package: pip install -e .)")


def ensure_trainer_path_in_env(env: Optional[MutableMapping[str, str]] = None) -> MutableMapping[str, str]:
    """Append :func:`trainer_folder` to ``env[nnUNet_extTrainer]`` unless already there.

    ``env`` defaults to ``os.environ`` (nnU-Net reads the variable at lookup time, so this also
    works in-process); pass a copy of the environment for a subprocess. Folders the user listed
    keep their order and precedence. Returns ``env``.
    """
    env = os.environ if env is None else env
    ours = str(trainer_folder())
    parts = [p for p in env.get(TRAINER_ENV_VAR, "").split(os.pathsep) if p.strip()]
    if not any(os.path.realpath(p) == os.path.realpath(ours) for p in parts):
        parts.append(ours)
    env[TRAINER_ENV_VAR] = os.pathsep.join(parts)
    return env


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
