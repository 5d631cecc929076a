"""Training length of the SD-DM trainers: epochs, iterations, final validation, and epoch variants.

A trainer declares its schedule as class attributes; :class:`ScheduleMixin` applies them after
``nnUNetTrainer.__init__``. Any schedule is available by NAME: ``<family>_<N>ep`` (N epochs of nnU-Net's 250 iterations, e.g.
``nnUNetTrainer_SDDM_NoDA_100ep``) and ``<family>_<N>ep_<M>it`` (N epochs of M iterations and
ceil(M / 5) validation iterations, nnU-Net's 250 : 50 ratio, e.g. ``nnUNetTrainer_SDDM_NoDA_1ep_100it``)
are built on first lookup by :func:`epoch_variant`, which the modules of the trainer families
expose through a module-level ``__getattr__`` (PEP 562), the hook that nnU-Net's
``hasattr(module, name)`` lookup and ``pickle`` both use. The schedule thus stays in the trainer
name and therefore in the results folder name and the checkpoint.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple

import torch

from plugin_trainers.compat import require_supported_nnunet

require_supported_nnunet()

from nnunet_sddm.utilities.errors import SDDMError  # noqa: E402
from nnunet_sddm.utilities.nnunet_paths import FINAL_VALIDATION_ENV_VAR  # noqa: E402
from plugin_trainers.seeding import SeedMixin  # noqa: E402

_VARIANT_RE = re.compile(r"^(?P<family>nnUNetTrainer_SDDM_[A-Za-z]+)_(?P<epochs>[1-9]\d{0,4})ep"
                         r"(?:_(?P<iterations>[1-9]\d{0,4})it)?$")
_FAMILIES: Dict[str, type] = {}
_VARIANTS: Dict[Tuple[str, int, Optional[int]], type] = {}


def _variant_key(m: "re.Match[str]") -> Tuple[str, int, Optional[int]]:
    its = m.group("iterations")
    return m.group("family"), int(m.group("epochs")), None if its is None else int(its)


#: Quick schedule shared by all ``*_Quick`` trainers: epochs x iterations, validation iterations.
QUICK_EPOCHS, QUICK_ITERATIONS, QUICK_VAL_ITERATIONS = 2, 5, 2


class QuickSchedule:
    """Put first among the bases of a ``*_Quick`` trainer (tests and demos): 2 epochs x 5
    iterations (2 validation iterations), final validation skipped."""

    sddm_num_epochs = QUICK_EPOCHS
    sddm_iterations_per_epoch = QUICK_ITERATIONS
    sddm_val_iterations_per_epoch = QUICK_VAL_ITERATIONS
    sddm_final_validation = False


class ScheduleMixin(SeedMixin):
    """Put before an ``nnUNetTrainer`` subclass: sets epochs / iterations after its ``__init__``
    (and, through :class:`~plugin_trainers.seeding.SeedMixin`, seeds the training).

    ``sddm_iterations_per_epoch`` / ``sddm_val_iterations_per_epoch`` of None keep nnU-Net's
    defaults (250 / 50); ``sddm_final_validation = False`` skips nnU-Net's final validation
    (prediction of every validation case and ``summary.json``), which quick trainers do not need;
    the environment variable ``nnUNet_sddm_final_validation=0`` skips it for any SD-DM trainer
    (the study sets it: with fold ``all`` that validation predicts every training case).
    """

    sddm_num_epochs: int = 250
    sddm_iterations_per_epoch: Optional[int] = None
    sddm_val_iterations_per_epoch: Optional[int] = None
    sddm_final_validation: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.sddm_environment_validation = final_validation_enabled()  # a bad value fails before training
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(self.sddm_num_epochs)
        if self.sddm_iterations_per_epoch is not None:
            self.num_iterations_per_epoch = int(self.sddm_iterations_per_epoch)
        if self.sddm_val_iterations_per_epoch is not None:
            self.num_val_iterations_per_epoch = int(self.sddm_val_iterations_per_epoch)
        # one checkpoint_latest at most every 50 epochs, as in nnU-Net, but never more often than the run
        self.save_every = min(self.save_every, max(1, self.num_epochs))

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not self.sddm_final_validation:
            self.print_to_log_file(f"{self.__class__.__name__}: final validation skipped (quick trainer)")
            return
        if not getattr(self, "sddm_environment_validation", True):
            self.print_to_log_file(f"{self.__class__.__name__}: final validation skipped "
                                   f"({FINAL_VALIDATION_ENV_VAR}=0)")
            return
        return super().perform_actual_validation(save_probabilities)


def final_validation_enabled(environ: Optional[Mapping[str, str]] = None) -> bool:
    """False when ``nnUNet_sddm_final_validation`` is ``0``, True when it is unset or ``1``;
    ``SDDMError`` otherwise (checked when the trainer is built, not after its training)."""
    flag = (os.environ if environ is None else environ).get(FINAL_VALIDATION_ENV_VAR, "1").strip()
    if flag not in ("0", "1"):
        raise SDDMError(f"{FINAL_VALIDATION_ENV_VAR}={flag!r}: must be 0 (skip nnU-Net's final validation) or 1")
    return flag == "1"


def register_family(prefix: str, base: type) -> None:
    """Make ``<prefix>_<N>ep`` resolve to a subclass of ``base`` with ``sddm_num_epochs = N``."""
    _FAMILIES[prefix] = base


def register_variant(cls: type) -> type:
    """Class decorator for a statically defined ``<family>_<N>ep`` class: checks that its
    ``sddm_num_epochs`` matches its name and makes :func:`epoch_variant` return it."""
    m = _VARIANT_RE.match(cls.__name__)
    if not m or m.group("iterations") or int(m.group("epochs")) != cls.sddm_num_epochs:
        raise RuntimeError(f"{cls.__name__}: name and sddm_num_epochs={cls.sddm_num_epochs} disagree")
    _VARIANTS[_variant_key(m)] = cls
    return cls


def epoch_variant(name: str) -> type:
    """The trainer class called ``name`` = ``<family>_<N>ep`` or ``<family>_<N>ep_<M>it``
    (1 <= N, M <= 99999): a subclass of the registered family's base class with
    ``sddm_num_epochs = N`` (and ``sddm_iterations_per_epoch = M``,
    ``sddm_val_iterations_per_epoch = ceil(M / 5)``). Built once and cached (the same object on
    every call; the statically defined variants are returned as they are).

    Raises ``AttributeError`` for any other name (so ``hasattr`` lookups stay cheap and correct).
    """
    m = _VARIANT_RE.match(name)
    if not m or m.group("family") not in _FAMILIES:
        raise AttributeError(name)
    key = _variant_key(m)
    if key not in _VARIANTS:
        family, epochs, iterations = key
        base = _FAMILIES[family]
        attrs = {"sddm_num_epochs": epochs, "__module__": base.__module__, "__qualname__": name,
                 "__doc__": f"{base.__name__} trained for {epochs} epochs (class built from its name)."}
        if iterations is not None:
            attrs["sddm_iterations_per_epoch"] = iterations
            attrs["sddm_val_iterations_per_epoch"] = -(-iterations // 5)
            attrs["__doc__"] = (f"{base.__name__} trained for {epochs} epochs of {iterations} iterations "
                                f"(class built from its name).")
        _VARIANTS[key] = type(name, (base,), attrs)
    return _VARIANTS[key]


def module_getattr(module_name: str):
    """A PEP 562 ``__getattr__`` for a trainer module: epoch variants of the families defined in it."""

    def __getattr__(name: str) -> type:
        cls = epoch_variant(name)
        if cls.__module__ != module_name:
            raise AttributeError(name)
        return cls

    return __getattr__
