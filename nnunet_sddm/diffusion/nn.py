"""Small building blocks of the ADM UNet: normalisation, convolutions, timestep embedding."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (stable under fp16/bf16), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int, groups: int = 32) -> nn.Module:
    """The UNet's normalisation layer: GroupNorm over ``channels`` with ``groups`` groups
    (guided-diffusion: always 32; fewer only for very narrow models such as the ``tiny`` preset)."""
    return GroupNorm32(groups, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d/2d/3d`` for ``dims`` = 1, 2, 3."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.AvgPool1d/2d/3d`` for ``dims`` = 1, 2, 3."""
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Linear:
    return nn.Linear(*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` (output layers start as the identity residual)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``(B,)`` -> ``(B, dim)``:
    ``[cos(t f_k), sin(t f_k)]`` with ``f_k = max_period^(-k / (dim/2))``, k = 0..dim/2-1
    (zero-padded when ``dim`` is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
