"""Compatibility guard: the trainers subclass nnU-Net internals that change between releases.

Every trainer module calls :func:`require_supported_nnunet` at import, so an unsupported nnU-Net
fails at once with a message saying what is installed and what to install, instead of an obscure
``TypeError`` deep inside ``nnUNetv2_train`` (the failure mode DG-TTA users report).
"""
from __future__ import annotations

import importlib.metadata
import inspect
import re
from typing import Callable, Optional, Sequence, Tuple

from nnunet_sddm.utilities.errors import SDDMError

#: Supported nnunetv2 releases: ``>=2.8,<2.9`` (same range as ``install_requires``).
SUPPORTED_MIN: Tuple[int, int] = (2, 8)
SUPPORTED_MAX_EXCLUSIVE: Tuple[int, int] = (2, 9)

#: ``nnUNetTrainer.__init__`` parameters the trainers (and nnU-Net's ``my_init_kwargs`` trick) rely on.
TRAINER_INIT_PARAMS: Tuple[str, ...] = ("self", "plans", "configuration", "fold", "dataset_json", "device")

#: ``build_network_architecture`` parameters used by the vanilla U-Net trainer and by inference.
BUILD_NETWORK_PARAMS: Tuple[str, ...] = ("plans_manager", "configuration_manager", "num_input_channels",
                                         "num_output_channels", "enable_deep_supervision")

_INSTALL_HINT = "install a supported release with: pip install 'nnunetv2>=2.8,<2.9'"


class NNUNetCompatibilityError(SDDMError, ImportError):
    """The installed nnunetv2 is not one the SD-DM trainers were written for."""


def _installed_version() -> str:
    """Version string of the installed ``nnunetv2`` distribution."""
    try:
        return importlib.metadata.version("nnunetv2")
    except importlib.metadata.PackageNotFoundError:
        raise NNUNetCompatibilityError(f"nnunetv2 is not installed; {_INSTALL_HINT}") from None


def parse_major_minor(version: str) -> Tuple[int, int]:
    """``"2.8.1"`` -> ``(2, 8)``; raises for strings without a ``MAJOR.MINOR`` prefix."""
    m = re.match(r"^\s*(\d+)\.(\d+)", version)
    if not m:
        raise NNUNetCompatibilityError(f"cannot parse the nnunetv2 version {version!r}; {_INSTALL_HINT}")
    return int(m.group(1)), int(m.group(2))


def check_version(version: str) -> None:
    """Raise :class:`NNUNetCompatibilityError` unless ``version`` is in ``>=2.8,<2.9``."""
    mm = parse_major_minor(version)
    if not SUPPORTED_MIN <= mm < SUPPORTED_MAX_EXCLUSIVE:
        raise NNUNetCompatibilityError(
            f"nnunetv2 {version} is installed, but the SD-DM trainers support nnunetv2>=2.8,<2.9 only "
            f"(they subclass nnUNetTrainer internals that change between releases); {_INSTALL_HINT}")


def _param_names(fn: Callable) -> Tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def check_trainer_api(trainer_cls: type, init_params: Sequence[str] = TRAINER_INIT_PARAMS,
                      build_params: Sequence[str] = BUILD_NETWORK_PARAMS) -> None:
    """Raise :class:`NNUNetCompatibilityError` if ``trainer_cls.__init__`` or
    ``trainer_cls.build_network_architecture`` no longer has the expected parameters."""
    found = _param_names(trainer_cls.__init__)
    if found != tuple(init_params):
        raise NNUNetCompatibilityError(
            f"{trainer_cls.__module__}.{trainer_cls.__name__}.__init__ has parameters {found}, expected "
            f"{tuple(init_params)}: this nnunetv2 changed the trainer constructor; {_INSTALL_HINT}")
    found = _param_names(trainer_cls.build_network_architecture)
    if found != tuple(build_params):
        raise NNUNetCompatibilityError(
            f"{trainer_cls.__module__}.{trainer_cls.__name__}.build_network_architecture has parameters "
            f"{found}, expected {tuple(build_params)}: this nnunetv2 changed the network API; {_INSTALL_HINT}")


def require_supported_nnunet(version: Optional[str] = None, trainer_cls: Optional[type] = None) -> None:
    """The import-time guard: version range first (no heavy import), then the trainer API.

    ``version`` / ``trainer_cls`` default to the installed nnunetv2 and its ``nnUNetTrainer``.
    """
    check_version(_installed_version() if version is None else version)
    if trainer_cls is None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as trainer_cls
    check_trainer_api(trainer_cls)
