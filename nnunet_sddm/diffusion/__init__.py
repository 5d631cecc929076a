"""The source-domain diffusion model: improved-DDPM process, ADM UNet, training, model folders.

Public API (see the modules for details)::

    from nnunet_sddm.diffusion import (GaussianDiffusion, SpacedDiffusion, space_timesteps,
        create_model, create_diffusion, load_model, resolve_model_dir, save_model_folder,
        create_model_folder, preset_config, encode_labels)

Mask-conditioned models: ``conditioning`` (``encode_labels``, config completion); classifier-free
guidance: ``nnunet_sddm.sampling.conditional.ClassifierFreeGuidance``.
"""
from nnunet_sddm.diffusion.conditioning import encode_labels
from nnunet_sddm.diffusion.factory import create_diffusion, create_model
from nnunet_sddm.diffusion.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from nnunet_sddm.diffusion.model_folder import (LoadedModel, create_model_folder, load_model, resolve_model_dir,
                                                save_model_folder)
from nnunet_sddm.diffusion.presets import PRESETS, apply_overrides, preset_config
from nnunet_sddm.diffusion.respace import SpacedDiffusion, space_timesteps
from nnunet_sddm.diffusion.unet import UNetModel

__all__ = ["GaussianDiffusion", "SpacedDiffusion", "space_timesteps", "get_named_beta_schedule", "UNetModel",
           "create_model", "create_diffusion", "load_model", "LoadedModel", "resolve_model_dir",
           "save_model_folder", "create_model_folder", "preset_config", "apply_overrides", "PRESETS",
           "encode_labels"]
