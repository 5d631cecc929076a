"""The ADM UNet of guided-diffusion (Dhariwal & Nichol 2021) as used by improved DDPM / SD-DM.

Module tree and parameter names equal guided-diffusion's ``UNetModel`` for the same flags
(``time_embed.0``, ``input_blocks.N.M``, ``middle_block``, ``output_blocks``, ``out.2``; ResBlock
``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``; AttentionBlock
``norm``, ``qkv``, ``proj_out``), so guided-/improved-diffusion state dicts load directly.

Input ``x``: ``(B, in_channels, H, W)``; timesteps ``(B,)`` (int indices or floats);
output ``(B, out_channels, H, W)``. ``H`` and ``W`` must be divisible by ``2^(len(channel_mult)-1)``.

Conditioning (mask-conditioned synthesis): ``cond_channels`` K > 0 makes the first convolution take
``in_channels + K`` channels, the condition ``cond (B, K, H, W)`` concatenated to ``x``;
``num_domains`` D > 0 adds ``domain_emb = nn.Embedding(D + 1, 4 * model_channels)`` (index D: the
null domain), added to the timestep embedding as guided-diffusion adds its class embedding
(``label_emb``). With K = D = 0 (the default) the module tree, the initialisation order and the
outputs are exactly those of the unconditional model.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nnunet_sddm.diffusion.nn import avg_pool_nd, conv_nd, linear, normalization, timestep_embedding, zero_module


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes the embedding to the children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__()
        self.channels, self.out_channels, self.use_conv, self.dims = channels, out_channels or channels, use_conv, dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: strided 3x3 conv (``op``) or average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__()
        self.channels, self.out_channels, self.use_conv, self.dims = channels, out_channels or channels, use_conv, dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning (additive, or scale-shift "FiLM":
    ``norm(h) * (1 + scale) + shift``), optionally up- or downsampling inside the block."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False, norm_groups: int = 32):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        self.use_scale_shift_norm, self.use_checkpoint = use_scale_shift_norm, use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels, norm_groups), nn.SiLU(),
                                       conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels, norm_groups), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.ndim - 2))
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention over all positions: ``x + proj_out(attn(qkv(norm(x))))``.

    ``num_head_channels`` (if not -1) fixes channels per head, else ``num_heads`` heads.
    ``use_new_attention_order`` splits qkv before heads (guided-diffusion's QKVAttention);
    the default is the legacy layout (heads before q/k/v), as in improved-diffusion checkpoints.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False, norm_groups: int = 32):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by {num_head_channels} channels per head")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.new_order = use_new_attention_order
        self.norm = normalization(channels, norm_groups)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """``(B, 3 * heads * ch, L)`` -> ``(B, heads * ch, L)``; softmax(q k^T / sqrt(ch)) v."""
        b, width, length = qkv.shape
        ch = width // (3 * self.num_heads)
        if self.new_order:
            q, k, v = (z.reshape(b * self.num_heads, ch, length) for z in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, length).split(ch, dim=1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return a.transpose(1, 2).reshape(b, self.num_heads * ch, length)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self._attend(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """guided-diffusion's UNet with timestep embedding and attention.

    Args (guided-diffusion's names): ``attention_resolutions`` are downsampling RATES (ds = 1,
    2, 4, ...; i.e. ``image_size // resolution_in_pixels``), ``channel_mult`` multiplies
    ``model_channels`` per level, ``num_heads_upsample`` -1 means ``num_heads``. ``norm_groups``
    (GroupNorm groups, guided-diffusion: 32) changes no parameter name or shape.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 use_checkpoint: bool = False, num_heads: int = 1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False, norm_groups: int = 32,
                 cond_channels: int = 0, num_domains: int = 0):
        super().__init__()
        if cond_channels < 0 or num_domains < 0:
            raise ValueError(f"cond_channels {cond_channels} and num_domains {num_domains} must be >= 0")
        self.cond_channels, self.num_domains = int(cond_channels), int(num_domains)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_res_blocks = model_channels, num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, time_embed_dim), nn.SiLU(),
                                        linear(time_embed_dim, time_embed_dim))
        if self.num_domains:  # created here, after time_embed, as guided-diffusion's label_emb
            self.domain_emb = nn.Embedding(self.num_domains + 1, time_embed_dim)

        def res(cin, cout=None, **kw):
            return ResBlock(cin, time_embed_dim, dropout, out_channels=cout, dims=dims, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, norm_groups=norm_groups, **kw)

        def attn(c, heads):
            return AttentionBlock(c, num_heads=heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order,
                                  norm_groups=norm_groups)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(
            conv_nd(dims, in_channels + self.cond_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, num_heads), res(ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch, norm_groups), nn.SiLU(),
                                 zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: Optional[torch.Tensor] = None,
                domain: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (B, in_channels, H, W), ``timesteps`` (B,) -> (B, out_channels, H, W).

        Conditional models: ``cond`` (B, cond_channels, H, W), the one-hot label channels (all
        zero: the null condition), required; ``domain`` (B,) long in ``0 .. num_domains`` (the
        last: null), default the null domain. An unconditional model refuses both."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.cond_channels:
            if cond is None:
                raise ValueError(f"this conditional UNet needs cond (B, {self.cond_channels}, H, W): the one-hot "
                                 f"label channels (all zero for the null condition)")
            if cond.shape[0] != x.shape[0] or cond.shape[1] != self.cond_channels or cond.shape[2:] != x.shape[2:]:
                raise ValueError(f"cond has shape {tuple(cond.shape)}, expected ({x.shape[0]}, {self.cond_channels}, "
                                 f"{', '.join(str(s) for s in x.shape[2:])})")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        elif cond is not None:
            raise ValueError("cond given to an unconditional UNet (cond_channels 0)")
        if self.num_domains:
            if domain is None:
                domain = torch.full((x.shape[0],), self.num_domains, dtype=torch.long, device=x.device)
            if domain.shape != (x.shape[0],):
                raise ValueError(f"domain has shape {tuple(domain.shape)}, expected ({x.shape[0]},)")
            emb = emb + self.domain_emb(domain.long()).to(emb.dtype)
        elif domain is not None:
            raise ValueError("domain given to a UNet without a domain token (num_domains 0)")
        skips, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))
