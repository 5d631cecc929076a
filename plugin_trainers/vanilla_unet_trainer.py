"""nnU-Net trainers for the paper's vanilla 2D U-Net (Appendix A), without data augmentation.

``nnUNetTrainer_SDDM_VanillaUNet`` (250 epochs, the paper), any ``..._<N>ep`` or
``..._<N>ep_<M>it`` (built from the name) and ``nnUNetTrainer_SDDM_VanillaUNet_Quick``. The network
replaces nnU-Net's planned one; everything else (plans, preprocessing, patch sampling, Dice+CE
loss, SGD + poly LR, sliding-window inference) is nnU-Net's. ``2d`` configurations only.
"""
from __future__ import annotations

from plugin_trainers.compat import require_supported_nnunet

require_supported_nnunet()

import torch  # noqa: E402
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import (  # noqa: E402
    nnUNetTrainerNoDA,
)
from nnunetv2.utilities.plans_handling.plans_handler import (  # noqa: E402
    ConfigurationManager,
    PlansManager,
)
from torch import nn  # noqa: E402

from nnunet_sddm.utilities.errors import SDDMError  # noqa: E402
from plugin_trainers.schedule import (  # noqa: E402
    QuickSchedule,
    ScheduleMixin,
    module_getattr,
    register_family,
)
from plugin_trainers.vanilla_unet import VanillaUNet2d  # noqa: E402

#: Appendix A: 64 filters at the first level.
BASE_FILTERS = 64


def require_2d(configuration_manager: ConfigurationManager, configuration: str) -> None:
    """Raise :class:`SDDMError` unless the configuration's patch size is 2D."""
    patch = tuple(configuration_manager.patch_size)
    if len(patch) != 2:
        raise SDDMError(
            f"the vanilla U-Net trainers are 2D only (paper Appendix A), but configuration "
            f"{configuration!r} has a {len(patch)}D patch size {patch}: use '-c 2d', or "
            f"nnUNetTrainer_SDDM_NoDA_250ep for 3D configurations")


class VanillaUNetMixin:
    """Put first among the bases of an ``nnUNetTrainer`` subclass: the Appendix A U-Net (BatchNorm,
    base 64, no deep supervision) replaces nnU-Net's planned network; ``2d`` configurations only."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # check before nnU-Net creates the output folder and log file for a configuration we refuse
        require_2d(PlansManager(plans).get_configuration(configuration), configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager,
                                   configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The Appendix A network for the dataset's channel and segmentation-head counts
        (a single full-resolution output whatever ``enable_deep_supervision`` says)."""
        require_2d(configuration_manager, configuration_manager.data_identifier)
        return VanillaUNet2d(num_input_channels, num_output_channels, base_filters=BASE_FILTERS, depth=4)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """No-op: the vanilla U-Net has one output (nnU-Net's version expects ``decoder.deep_supervision``)."""


class nnUNetTrainer_SDDM_VanillaUNet(VanillaUNetMixin, ScheduleMixin, nnUNetTrainerNoDA):
    """Appendix A U-Net (BatchNorm, base 64, no deep supervision), no augmentation/mirroring, 250 epochs."""

    sddm_num_epochs = 250


register_family("nnUNetTrainer_SDDM_VanillaUNet", nnUNetTrainer_SDDM_VanillaUNet)


class nnUNetTrainer_SDDM_VanillaUNet_Quick(QuickSchedule, nnUNetTrainer_SDDM_VanillaUNet):
    """Tests and demos: 2 epochs x 5 iterations (2 validation iterations), final validation skipped."""


__getattr__ = module_getattr(__name__)
