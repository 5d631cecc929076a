"""Thin re-export of the SD-DM trainers for nnU-Net's ``nnUNet_extTrainer`` lookup.

This folder is NOT a package: nnU-Net imports each file here as a top-level module while the
folder is on ``sys.path`` and drops it afterwards. The classes themselves live in the installed
``plugin_trainers`` package (one copy, picklable, relative imports work). The module-level
``__getattr__`` resolves epoch variants by name (``nnUNetTrainer_SDDM_NoDA_100ep`` ...).
"""
from plugin_trainers.augmented import (  # noqa: F401
    nnUNetTrainer_SDDM_Aug_250ep,
    nnUNetTrainer_SDDM_Aug_Quick,
    nnUNetTrainer_SDDM_VanillaUNetAug,
    nnUNetTrainer_SDDM_VanillaUNetAug_Quick,
)
from plugin_trainers.nodata_aug import (  # noqa: F401
    nnUNetTrainer_SDDM_NoDA_250ep,
    nnUNetTrainer_SDDM_NoDA_Quick,
)
from plugin_trainers.real_plus_synthetic import (  # noqa: F401
    nnUNetTrainer_SDDM_RealPlusSynthetic,
    nnUNetTrainer_SDDM_RealPlusSynthetic_Quick,
)
from plugin_trainers.schedule import epoch_variant as __getattr__  # noqa: F401
from plugin_trainers.vanilla_unet_trainer import (  # noqa: F401
    nnUNetTrainer_SDDM_VanillaUNet,
    nnUNetTrainer_SDDM_VanillaUNet_Quick,
)
