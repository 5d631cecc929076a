"""Make the SD-DM trainers visible to nnU-Net (``nnUNet_extTrainer``).

nnU-Net v2 finds third-party trainers only through the environment variable
``nnUNet_extTrainer`` (folders separated by ``os.pathsep``), both in ``nnUNetv2_train`` and in
``nnUNetv2_predict`` (the checkpoint stores the trainer's class name). The folder we expose,
``plugin_trainers/nnunet_ext``, holds one thin module re-exporting the classes of this package.

    export nnUNet_extTrainer=$(nnUNetv2_sddm_trainer_path)

Our own commands call :func:`ensure_trainer_path_in_env` before they run nnU-Net.
This module imports nothing heavy (no torch, no nnunetv2).
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

from nnunet_sddm.utilities.errors import SDDMError, cli_entry
from nnunet_sddm.utilities.nnunet_paths import TRAINER_ENV_VAR as ENV_VAR  # noqa: F401
from nnunet_sddm.utilities.nnunet_paths import ensure_trainer_path_in_env, trainer_folder

#: Every trainer name this plugin defines statically (epoch variants ``<family>_<N>ep`` also resolve).
TRAINER_NAMES: tuple = (
    "nnUNetTrainer_SDDM_NoDA_250ep",
    "nnUNetTrainer_SDDM_NoDA_1ep",
    "nnUNetTrainer_SDDM_NoDA_5ep",
    "nnUNetTrainer_SDDM_NoDA_20ep",
    "nnUNetTrainer_SDDM_NoDA_50ep",
    "nnUNetTrainer_SDDM_NoDA_Quick",
    "nnUNetTrainer_SDDM_VanillaUNet",
    "nnUNetTrainer_SDDM_VanillaUNet_1ep",
    "nnUNetTrainer_SDDM_VanillaUNet_5ep",
    "nnUNetTrainer_SDDM_VanillaUNet_20ep",
    "nnUNetTrainer_SDDM_VanillaUNet_50ep",
    "nnUNetTrainer_SDDM_VanillaUNet_Quick",
    "nnUNetTrainer_SDDM_Aug_250ep",
    "nnUNetTrainer_SDDM_Aug_Quick",
    "nnUNetTrainer_SDDM_VanillaUNetAug",
    "nnUNetTrainer_SDDM_VanillaUNetAug_Quick",
    "nnUNetTrainer_SDDM_RealPlusSynthetic",
    "nnUNetTrainer_SDDM_RealPlusSynthetic_Quick",
)


def trainer_path() -> str:
    """Absolute path of the folder to put in ``nnUNet_extTrainer`` (raises if it is missing)."""
    return str(trainer_folder())


def check_lookup(names: Sequence[str] = TRAINER_NAMES) -> List[str]:
    """Resolve each name through nnU-Net's own lookup with our folder on ``nnUNet_extTrainer``
    (imports nnunetv2; about 3 s). Returns ``"name -> module"`` lines; raises on the first failure."""
    import contextlib
    import io

    ensure_trainer_path_in_env()
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    out = []
    for name in names:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                cls = recursive_find_trainer_class_by_name(name)
            except RuntimeError as e:
                raise SDDMError(f"nnU-Net cannot find trainer {name}: {e}") from None
        if cls.__name__ != name:
            raise SDDMError(f"nnU-Net resolved {name} to {cls.__module__}.{cls.__name__}")
        out.append(f"{name} -> {cls.__module__}")
    return out


@cli_entry
def print_trainer_path(argv: Optional[Sequence[str]] = None) -> int:
    """``nnUNetv2_sddm_trainer_path [--check]``: print the folder for ``nnUNet_extTrainer``."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_trainer_path",
        description="Print the folder to put in nnUNet_extTrainer so that nnUNetv2_train/predict find the "
                    "SD-DM trainers: export nnUNet_extTrainer=$(nnUNetv2_sddm_trainer_path)")
    parser.add_argument("--check", action="store_true",
                        help="also resolve every trainer name through nnU-Net's lookup and list them "
                             "(on stderr; imports nnunetv2, a few seconds)")
    args = parser.parse_args(argv)
    path = trainer_path()
    if args.check:
        import sys

        for line in check_lookup():
            print(line, file=sys.stderr)
    print(path)
    return 0
