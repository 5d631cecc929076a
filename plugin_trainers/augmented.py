"""The same segmenters trained with nnU-Net's standard augmentation: the ``nnU-Net aug`` row.

A reviewer's first question about a domain-adaptation result is "versus nnU-Net's own
augmentation?" (the M&Ms 2020 winners relied on it). These trainers are the stock
``nnUNetTrainer`` recipe (spatial, intensity, noise, blur, gamma, low-resolution and mirroring
augmentation; the checkpoint allows mirroring test-time augmentation, which ``nnUNetv2_predict``
then uses by default) with the SAME schedule and seeding as the study's no-augmentation trainers.
The study predicts every row without mirroring, so the only difference between a ``Baseline`` and
an ``nnU-Net aug`` row is the training augmentation.

Names: ``nnUNetTrainer_SDDM_Aug_250ep`` (nnU-Net's planned network) and
``nnUNetTrainer_SDDM_VanillaUNetAug`` (the paper's vanilla 2D U-Net, 250 epochs), any
``..._<N>ep`` / ``..._<N>ep_<M>it`` (built from the name, see :mod:`plugin_trainers.schedule`)
and the ``_Quick`` test trainers.
"""
from __future__ import annotations

from plugin_trainers.compat import require_supported_nnunet

require_supported_nnunet()

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402

from plugin_trainers.schedule import (  # noqa: E402
    QuickSchedule,
    ScheduleMixin,
    module_getattr,
    register_family,
    register_variant,
)
from plugin_trainers.vanilla_unet_trainer import VanillaUNetMixin  # noqa: E402


@register_variant
class nnUNetTrainer_SDDM_Aug_250ep(ScheduleMixin, nnUNetTrainer):
    """nnU-Net's planned network and standard augmentation (mirroring TTA at inference), 250 epochs."""

    sddm_num_epochs = 250


register_family("nnUNetTrainer_SDDM_Aug", nnUNetTrainer_SDDM_Aug_250ep)


class nnUNetTrainer_SDDM_Aug_Quick(QuickSchedule, nnUNetTrainer_SDDM_Aug_250ep):
    """Tests and demos: 2 epochs x 5 iterations (2 validation iterations), final validation skipped."""


class nnUNetTrainer_SDDM_VanillaUNetAug(VanillaUNetMixin, ScheduleMixin, nnUNetTrainer):
    """The vanilla 2D U-Net of Appendix A with nnU-Net's standard augmentation, 250 epochs."""

    sddm_num_epochs = 250


register_family("nnUNetTrainer_SDDM_VanillaUNetAug", nnUNetTrainer_SDDM_VanillaUNetAug)


class nnUNetTrainer_SDDM_VanillaUNetAug_Quick(QuickSchedule, nnUNetTrainer_SDDM_VanillaUNetAug):
    """Tests and demos: 2 epochs x 5 iterations (2 validation iterations), final validation skipped."""


__getattr__ = module_getattr(__name__)
