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
model_kwargs={"cond": onehot, "domain": domain})``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

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
