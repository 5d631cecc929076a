"""Import a guided-diffusion / improved-diffusion checkpoint into a model folder of ours.

The checkpoint is a state dict (``torch.save``d ``.pt``, loaded weights-only, or safetensors);
the flags are the ones the model was trained with, in the scripts' own syntax, e.g.
``"--image_size 128 --num_channels 128 --num_res_blocks 1 --learn_sigma True ..."``.
Flags not given take guided-diffusion's defaults (``defaults="guided"``) or
improved-diffusion's (``defaults="improved"``: ``rescale_timesteps`` and
``rescale_learned_sigmas`` True). Input/output channels are read from the weights (the
reference code hard-codes 3; cardiac users patched it to 1 in / 2 out).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch

from nnunet_sddm.diffusion.factory import create_model
from nnunet_sddm.diffusion.model_folder import EMA_FILE, RAW_FILE, save_config, save_weights
from nnunet_sddm.diffusion.presets import PRESETS, validate_config
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import staging_dir

GUIDED_DEFAULTS: Dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "num_head_channels": -1, "attention_resolutions": "16,8", "channel_mult": "", "dropout": 0.0,
    "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True, "resblock_updown": False,
    "use_fp16": False, "use_new_attention_order": False, "learn_sigma": False, "diffusion_steps": 1000,
    "noise_schedule": "linear", "timestep_respacing": "", "use_kl": False, "predict_xstart": False,
    "rescale_timesteps": False, "rescale_learned_sigmas": False, "sigma_small": False,
}
IMPROVED_DEFAULTS: Dict[str, Any] = {**GUIDED_DEFAULTS, "rescale_timesteps": True, "rescale_learned_sigmas": True}

#: channel multipliers guided-/improved-diffusion pick from the image size when none are given
DEFAULT_CHANNEL_MULT = {512: [0.5, 1, 1, 2, 2, 4, 4], 256: [1, 1, 2, 2, 4, 4], 128: [1, 1, 2, 3, 4],
                        64: [1, 2, 3, 4], 32: [1, 2, 2, 2]}


def _to_bool(name: str, v: str) -> bool:
    low = v.lower()
    if low in ("true", "1", "yes", "y", "t"):
        return True
    if low in ("false", "0", "no", "n", "f"):
        return False
    raise SDDMError(f"--flags: {name} expects a boolean, got {v!r}")


def parse_guided_flags(flags: str, defaults: str = "guided") -> Dict[str, Any]:
    """``"--image_size 128 --learn_sigma True"`` -> dict over the defaults (typed like them).
    Unknown flags raise ``SDDMError`` (training-only flags such as ``--lr`` are ignored)."""
    base = {"guided": GUIDED_DEFAULTS, "improved": IMPROVED_DEFAULTS}.get(defaults)
    if base is None:
        raise SDDMError(f"--defaults {defaults!r}: choose guided or improved")
    ignored = {"lr", "weight_decay", "lr_anneal_steps", "batch_size", "microbatch", "ema_rate", "log_interval",
               "save_interval", "resume_checkpoint", "fp16_scale_growth", "schedule_sampler", "data_dir",
               "clip_denoised", "num_samples", "use_ddim", "model_path", "classifier_scale"}
    out = dict(base)
    tokens = shlex.split(flags or "")
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise SDDMError(f"--flags: expected --name value pairs, got {tok!r}")
        name, _, value = tok[2:].partition("=")
        if not value:
            if i + 1 >= len(tokens):
                raise SDDMError(f"--flags: {tok} has no value")
            value = tokens[i + 1]
            i += 1
        i += 1
        name = name.replace("-", "_")
        if name in ignored:
            continue
        if name not in out:
            raise SDDMError(f"--flags: unknown flag --{name}")
        default = base[name]
        if isinstance(default, bool):
            out[name] = _to_bool(name, value)
        elif isinstance(default, int):
            out[name] = int(value)
        elif isinstance(default, float):
            out[name] = float(value)
        else:
            out[name] = value
    return out


def flags_to_config(flags: Mapping[str, Any], in_channels: int) -> Dict[str, Any]:
    """Our config dict for guided-diffusion flags (``preset`` = ``"imported"``)."""
    if flags["class_cond"]:
        raise SDDMError("--flags: class-conditional models (--class_cond True) are not supported")
    size = int(flags["image_size"])
    if flags["channel_mult"]:
        mult = [float(x) if "." in x else int(x) for x in str(flags["channel_mult"]).split(",")]
    elif size in DEFAULT_CHANNEL_MULT:
        mult = DEFAULT_CHANNEL_MULT[size]
    else:
        raise SDDMError(f"--flags: no default channel_mult for image_size {size}; give --channel_mult")
    attn = [int(r) for r in str(flags["attention_resolutions"]).split(",") if r.strip()]
    learn_sigma = bool(flags["learn_sigma"])
    if flags["use_kl"]:
        loss = "rescaled_kl"
    elif flags["rescale_learned_sigmas"] and learn_sigma:
        loss = "rescaled_hybrid"
    else:
        loss = "hybrid" if learn_sigma else "mse"
    respacing = str(flags["timestep_respacing"] or "").strip()
    cfg = {
        "preset": "imported",
        "model": {
            "image_size": size, "in_channels": int(in_channels), "model_channels": int(flags["num_channels"]),
            "num_res_blocks": int(flags["num_res_blocks"]), "channel_mult": mult, "attention_resolutions": attn,
            "num_heads": int(flags["num_heads"]), "num_head_channels": int(flags["num_head_channels"]),
            "num_heads_upsample": int(flags["num_heads_upsample"]), "dropout": float(flags["dropout"]),
            "use_scale_shift_norm": bool(flags["use_scale_shift_norm"]),
            "resblock_updown": bool(flags["resblock_updown"]),
            "use_new_attention_order": bool(flags["use_new_attention_order"]),
            "use_checkpoint": bool(flags["use_checkpoint"]), "norm_groups": 32,
        },
        "diffusion": {
            "steps": int(flags["diffusion_steps"]), "noise_schedule": flags["noise_schedule"],
            "learn_sigma": learn_sigma, "loss": loss, "predict_xstart": bool(flags["predict_xstart"]),
            "sigma_small": bool(flags["sigma_small"]), "rescale_timesteps": bool(flags["rescale_timesteps"]),
            "sample_respacing": int(respacing) if respacing.isdigit() else 100,
        },
        "data": dict(PRESETS["paper128"]["data"]),
        "training": dict(PRESETS["paper128"]["training"]),
    }
    cfg["diffusion"]["sample_respacing"] = min(cfg["diffusion"]["sample_respacing"], cfg["diffusion"]["steps"])
    return cfg


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """A state dict from ``.pt``/``.pth`` (weights-only) or ``.safetensors``; unwraps
    ``{"state_dict": ...}`` / ``{"model": ...}`` and DDP's ``module.`` prefix; float32."""
    path = Path(path)
    if not path.is_file():
        raise SDDMError(f"{path}: checkpoint not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SDDMError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for key in ("state_dict", "model", "ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SDDMError(f"{path}: not a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v.float() if v.is_floating_point() else v
            for k, v in state.items()}


def import_checkpoint(checkpoint: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], flags: str = "",
                      defaults: str = "guided", overwrite: bool = False) -> Path:
    """Write a model folder for a guided-/improved-diffusion checkpoint trained with ``flags``.

    The weights are stored both as EMA and raw weights (released checkpoints are the ones
    used for sampling). Nothing is written unless the weights load exactly into the model the
    flags describe."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SDDMError(f"{out_dir} already exists; use --overwrite to replace it")
    state = read_checkpoint(checkpoint)
    parsed = parse_guided_flags(flags, defaults)
    w = state.get("input_blocks.0.0.weight")
    if w is None:
        raise SDDMError(f"{checkpoint}: no 'input_blocks.0.0.weight': not a guided-/improved-diffusion UNet")
    cfg = flags_to_config(parsed, in_channels=int(w.shape[1]))
    out_w = state.get("out.2.weight")
    expected_out = (2 if cfg["diffusion"]["learn_sigma"] else 1) * int(w.shape[1])
    if out_w is not None and int(out_w.shape[0]) != expected_out:
        raise SDDMError(f"{checkpoint}: the network outputs {int(out_w.shape[0])} channels for {int(w.shape[1])} "
                        f"input channels, but --learn_sigma {cfg['diffusion']['learn_sigma']} needs {expected_out}")
    try:
        validate_config(cfg)
        model = create_model(cfg)
    except (SDDMError, ValueError) as e:
        raise SDDMError(f"--flags: {e}") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise SDDMError(f"{checkpoint}: weights do not match the model of these flags: missing {missing[:5]}"
                        f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}, shape mismatch "
                        f"{wrong[:5]} (check --flags)")
    model.load_state_dict(state)
    cfg["imported_from"] = {"checkpoint": str(Path(checkpoint).resolve()), "flags": flags, "defaults": defaults}
    with staging_dir(out_dir, overwrite=overwrite) as tmp:
        save_weights(model.state_dict(), tmp / RAW_FILE)
        try:
            os.link(tmp / RAW_FILE, tmp / EMA_FILE)  # same bytes, no extra space
        except OSError:
            save_weights(model.state_dict(), tmp / EMA_FILE)
        save_config(cfg, tmp)
    return out_dir
