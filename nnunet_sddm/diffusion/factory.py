"""Build the UNet and the diffusion process from a configuration dict (see ``presets``)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from nnunet_sddm.diffusion.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from nnunet_sddm.diffusion.presets import validate_config
from nnunet_sddm.diffusion.respace import SpacedDiffusion, space_timesteps
from nnunet_sddm.diffusion.unet import UNetModel
from nnunet_sddm.utilities.errors import SDDMError


def model_out_channels(config: Mapping[str, Any]) -> int:
    """``in_channels`` (fixed variance) or ``2 * in_channels`` (learned sigma)."""
    c = int(config["model"]["in_channels"])
    return 2 * c if config["diffusion"]["learn_sigma"] else c


def create_model(config: Mapping[str, Any]) -> UNetModel:
    """The ADM UNet of ``config["model"]`` (``model(x (B,C,H,W), t (B,)) -> (B, out, H, W)``); with
    ``model.condition`` "labels" it takes ``cond`` (one channel per ``model.label_values``) and, with
    ``model.domains``, a ``domain`` index (see ``UNetModel.forward``)."""
    validate_config(config)
    m = config["model"]
    size = int(m["image_size"])
    cond_channels = num_domains = 0
    if m.get("condition") == "labels":
        if not m.get("label_values"):
            raise SDDMError("model.condition is 'labels' but model.label_values is not set: give the foreground "
                            "label values (e.g. --set model.label_values=1,2,3)")
        cond_channels = len(m["label_values"])
        num_domains = len(m.get("domains") or [])
    return UNetModel(
        image_size=size, in_channels=int(m["in_channels"]), model_channels=int(m["model_channels"]),
        out_channels=model_out_channels(config), num_res_blocks=int(m["num_res_blocks"]),
        attention_resolutions=[size // int(r) for r in m["attention_resolutions"]],
        dropout=float(m["dropout"]), channel_mult=tuple(m["channel_mult"]),
        use_checkpoint=bool(m.get("use_checkpoint", False)), num_heads=int(m["num_heads"]),
        num_head_channels=int(m["num_head_channels"]), num_heads_upsample=int(m["num_heads_upsample"]),
        use_scale_shift_norm=bool(m["use_scale_shift_norm"]), resblock_updown=bool(m["resblock_updown"]),
        use_new_attention_order=bool(m["use_new_attention_order"]), norm_groups=int(m.get("norm_groups", 32)),
        cond_channels=cond_channels, num_domains=num_domains)


def create_diffusion(config: Mapping[str, Any], respacing: Optional[Union[int, str]] = None) -> GaussianDiffusion:
    """The process of ``config["diffusion"]`` (a full config or just its diffusion section):
    all T steps if ``respacing`` is None, else a ``SpacedDiffusion`` with K kept steps."""
    d = config["diffusion"] if "diffusion" in config else config
    betas = get_named_beta_schedule(d["noise_schedule"], int(d["steps"]))
    fixed = "fixed_small" if d.get("sigma_small") else "fixed_large"
    kwargs = dict(model_var_type="learned_range" if d["learn_sigma"] else fixed,
                  loss_type=d["loss"], model_mean_type="start_x" if d.get("predict_xstart") else "epsilon",
                  rescale_timesteps=bool(d.get("rescale_timesteps", False)))
    if respacing is None or respacing == "" or (isinstance(respacing, int) and respacing == int(d["steps"])):
        return GaussianDiffusion(betas, **kwargs)
    return SpacedDiffusion(space_timesteps(int(d["steps"]), respacing), betas=betas, **kwargs)
