"""Seeded training: the same command gives the same segmenter (on the CPU, bit for bit).

Every SD-DM trainer draws its seed from ``nnUNet_sddm_seed`` (default 0; ``nnUNetv2_sddm_study``
sets it from its ``seed``), records it in the checkpoint (``init_args["sddm_seed"]``) and in the
training log, and seeds Python's ``random``, NumPy's global generator and torch (CPU and every CUDA
device) twice: before the network is built (``initialize``: the weight initialisation) and before
the data loaders are built (``get_dataloaders``: the patch sampling, foreground oversampling and
augmentation streams, which nnU-Net draws from NumPy's and torch's global generators).

What is deterministic: with ``nnUNet_n_proc_DA=0`` (single-threaded augmentation, as the study
trains on the CPU) every random draw happens in the training process in a fixed order, so two runs
of the same command on the same CPU give identical checkpoints and predictions. What is not:
with augmentation worker processes (nnU-Net's ``NonDetMultiThreadedAugmenter``, its default) the
order in which batches arrive varies; on CUDA, cuDNN's algorithm choice and atomics-based kernels
vary from run to run unless ``torch.use_deterministic_algorithms`` is forced, which nnU-Net does not.
"""
from __future__ import annotations

import os
import random
from typing import Mapping, Optional

import numpy as np
import torch

from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.nnunet_paths import SEED_ENV_VAR

DEFAULT_SEED = 0


def trainer_seed(environ: Optional[Mapping[str, str]] = None) -> int:
    """The seed in ``nnUNet_sddm_seed`` (default 0); ``SDDMError`` if it is not an integer >= 0."""
    value = (os.environ if environ is None else environ).get(SEED_ENV_VAR, "").strip()
    if not value:
        return DEFAULT_SEED
    if not value.isdigit():
        raise SDDMError(f"{SEED_ENV_VAR}={value!r}: the training seed must be an integer >= 0")
    return int(value)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SeedMixin:
    """Put before an ``nnUNetTrainer`` subclass (``ScheduleMixin`` includes it): seeded network
    initialisation and data loading, the seed recorded in the checkpoint (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sddm_seed = trainer_seed()
        self.my_init_kwargs["sddm_seed"] = self.sddm_seed  # saved as the checkpoint's init_args

    def initialize(self) -> None:
        if not self.was_initialized:
            seed_everything(self.sddm_seed)
            self.print_to_log_file(f"{self.__class__.__name__}: seed {self.sddm_seed} ({SEED_ENV_VAR})")
        super().initialize()

    def get_dataloaders(self):
        seed_everything(self.sddm_seed + 1)
        return super().get_dataloaders()
