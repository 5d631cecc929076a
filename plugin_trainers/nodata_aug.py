"""nnU-Net's planned architecture trained without data augmentation (the paper's 2D/3D nnU-Net).

The paper trains every segmenter for 250 epochs without augmentation (see docs/how_to/trainers.md).
Based on nnU-Net's ``nnUNetTrainerNoDA``: training transforms = validation transforms, and
``inference_allowed_mirroring_axes = None`` is stored in the checkpoint, so ``nnUNetv2_predict``
does no mirroring test-time augmentation either. Valid for ``2d`` and ``3d_fullres``.

Names: ``nnUNetTrainer_SDDM_NoDA_250ep`` (the paper), any ``..._<N>ep`` or ``..._<N>ep_<M>it``
(built from the name, see :mod:`plugin_trainers.schedule`) and ``nnUNetTrainer_SDDM_NoDA_Quick``.
"""
from __future__ import annotations

from plugin_trainers.compat import require_supported_nnunet

require_supported_nnunet()

from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import (  # noqa: E402
    nnUNetTrainerNoDA,
)

from plugin_trainers.schedule import (  # noqa: E402
    QuickSchedule,
    ScheduleMixin,
    module_getattr,
    register_family,
    register_variant,
)

@register_variant
class nnUNetTrainer_SDDM_NoDA_250ep(ScheduleMixin, nnUNetTrainerNoDA):
    """nnU-Net's planned network, no augmentation, no mirroring, 250 epochs x 250 iterations."""

    sddm_num_epochs = 250


register_family("nnUNetTrainer_SDDM_NoDA", nnUNetTrainer_SDDM_NoDA_250ep)


class nnUNetTrainer_SDDM_NoDA_Quick(QuickSchedule, nnUNetTrainer_SDDM_NoDA_250ep):
    """Tests and demos: 2 epochs x 5 iterations (2 validation iterations), final validation skipped."""


__getattr__ = module_getattr(__name__)
