"""Classifier-free guidance (Ho & Salimans 2022) for a mask-conditioned model.

A conditional model trained with label dropout (``training.label_dropout``: a sample's condition
replaced by the null condition, all-zero label channels and the null domain) predicts both
``eps_cond = eps(x_t, t, cond, domain)`` and ``eps_uncond = eps(x_t, t, 0, null)``. Sampling with
guidance scale ``w`` uses

    eps = eps_uncond + w (eps_cond - eps_uncond)

on the mean half of the output (channels ``0 .. C-1``, what ``diffusion.predict_xstart`` says the
model predicts; the combination is linear either way), the learned-variance half (channels
``C .. 2C-1``) from the conditional pass. ``w = 1`` is plain conditional sampling (one pass: the
model's conditional output exactly), ``w = 0`` unconditional (one pass: the model's null-condition
output exactly, variance included), ``w > 1`` pushes the samples further towards the mask.

``ClassifierFreeGuidance(model, w)`` has the model's call signature, so it goes wherever a model
goes: ``diffusion.p_sample_loop(ClassifierFreeGuidance(model, 2.0), shape,
model_kwargs={"cond": onehot, "domain": domain})``. ``sample_from_labels`` is that loop with one
random stream per slice (``guided.SliceNoise``): a slice's sample depends on (model, its condition,
seed, key, K, w, domain) only, not on its batch neighbours.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from nnunet_sddm.sampling.guided import ModelAndChain, SliceNoise, _model_and_diffusion, frozen

from nnunet_sddm.utilities.errors import SDDMError


class ClassifierFreeGuidance(torch.nn.Module):
    """``model`` (a conditional ``UNetModel``) with guidance scale ``scale`` (w, finite, >= 0)."""

    def __init__(self, model: torch.nn.Module, scale: float = 1.0):
        super().__init__()
        scale = float(scale)
        if not math.isfinite(scale) or scale < 0:
            raise SDDMError(f"guidance scale {scale!r}: expected a finite number >= 0 (1: conditional, "
                            f"0: unconditional)")
        if not getattr(model, "cond_channels", 0):
            raise SDDMError("classifier-free guidance needs a conditional model (model.condition 'labels')")
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: Optional[torch.Tensor] = None,
                domain: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cond is None:
            raise SDDMError("classifier-free guidance needs the condition: pass model_kwargs={'cond': ...}")
        if self.scale == 1.0:
            return self.model(x, timesteps, cond=cond, domain=domain)
        uncond = self.model(x, timesteps, cond=torch.zeros_like(cond), domain=None)  # None: the null domain
        if self.scale == 0.0:
            return uncond
        out = self.model(x, timesteps, cond=cond, domain=domain)
        c = x.shape[1]
        eps = uncond[:, :c] + self.scale * (out[:, :c] - uncond[:, :c])
        return torch.cat([eps, out[:, c:]], dim=1)


def sample_from_labels(loaded_or_model_diffusion: ModelAndChain, cond: torch.Tensor, keys: Sequence[str], seed: int,
                       steps: int, scale: float = 1.0, domain: Optional[int] = None) -> torch.Tensor:
    """Pure ancestral sampling from noise, conditioned on one-hot label maps.

    Args:
        loaded_or_model_diffusion: a conditional ``LoadedModel`` (respaced to ``steps``) or a
            ``(model, diffusion)`` pair whose diffusion already has ``steps`` steps.
        cond: ``(B, K, H, W)`` one-hot conditions (``conditioning.encode_labels``).
        keys: ``B`` unique slice names: their random streams under ``seed`` (x_T, then one draw
            per step but the last).
        steps: respaced chain length K. scale: guidance scale w (1: conditional, no guidance).
        domain: the domain index of every slice (models with ``model.domains``), None: none.

    Returns:
        ``(B, 1, H, W)`` float32 samples in model units (about [-1, 1], not clamped) on ``cond``'s device.
    """
    if cond.ndim != 4:
        raise SDDMError(f"sample_from_labels expects (B, K, H, W) conditions, got {tuple(cond.shape)}")
    if len(keys) != cond.shape[0] or len(set(keys)) != len(keys):
        raise SDDMError(f"sample_from_labels needs {cond.shape[0]} unique slice keys, got {len(keys)}")
    model, diffusion = _model_and_diffusion(loaded_or_model_diffusion, int(steps))
    device = next(model.parameters()).device
    B, _, H, W = cond.shape
    noise = SliceNoise(int(seed), list(keys), (1, H, W), device)
    kwargs = {"cond": cond.to(device=device, dtype=torch.float32)}
    if domain is not None:
        kwargs["domain"] = torch.full((B,), int(domain), dtype=torch.long, device=device)
    with frozen(model):
        x = diffusion.p_sample_loop(ClassifierFreeGuidance(model, scale), (B, 1, H, W), device=device,
                                    model_kwargs=kwargs, draw=noise.draw)
    return x.float().contiguous().to(cond.device)
