"""The paper's vanilla 2D U-Net (the paper's Appendix A; see docs/how_to/trainers.md).

Encoder: ``depth`` = 4 blocks of (3x3 conv, BN, ReLU) x 2, each followed by a 2x2 max-pool of
stride 2, with F, 2F, 4F, 8F filters (F = 64); bottleneck: the same double conv with 16F filters;
decoder: 4 blocks of 2x2 transposed conv (stride 2, halving the filters), concatenation with the
encoder feature map of the same size, double conv; head: 1x1 conv to the classes (logits).

Convolutions followed by BatchNorm carry no bias (BN's shift makes it redundant); the transposed
convolutions and the head do. The analytic parameter count is written out in
``tests/test_trainers_vanilla_unet.py``.

Inputs whose height/width are not multiples of ``2**depth`` = 16 are padded with zeros (the mean
of nnU-Net's z-scored intensities) split evenly on both sides, and the logits are cropped back, so
the network maps (B, C, H, W) to (B, K, H, W) for any H, W >= 1: nnU-Net's sliding window always
feeds tiles of exactly the planned patch size, which need not be divisible by 16.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Sequential):
    """(3x3 conv without bias, BatchNorm, ReLU) x 2: (B, c_in, H, W) -> (B, c_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class VanillaUNet2d(nn.Module):
    """Appendix A U-Net: (B, in_channels, H, W) float -> (B, num_classes, H, W) logits.

    ``base_filters`` F (paper: 64) sets the widths F * 2**i of level i = 0..depth (bottleneck 16F).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 4, base_filters: int = 64, depth: int = 4):
        super().__init__()
        if min(in_channels, num_classes, base_filters, depth) < 1:
            raise ValueError("in_channels, num_classes, base_filters and depth must be >= 1")
        self.depth = depth
        widths = [base_filters * 2 ** i for i in range(depth + 1)]
        self.widths = widths
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth)])
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = DoubleConv(widths[depth - 1], widths[depth])
        # decoder level i (deepest first): upsample widths[i+1] -> widths[i], concat skip -> 2 widths[i]
        self.up = nn.ModuleList(
            [nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2)
             for i in reversed(range(depth))])
        self.decoder = nn.ModuleList([DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def size_multiple(self) -> int:
        """Height and width are padded internally to multiples of this (2**depth)."""
        return 2 ** self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"VanillaUNet2d expects (B, C, H, W) input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        k = self.size_multiple
        ph, pw = (-h) % k, (-w) % k
        top, left = ph // 2, pw // 2
        if ph or pw:
            x = F.pad(x, (left, pw - left, top, ph - top))
        skips: List[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips)):
            x = block(torch.cat([skip, up(x)], dim=1))
        logits = self.head(x)
        return logits[..., top:top + h, left:left + w]
