"""The paper's Appendix A U-Net: layer structure, analytic parameter count, odd sizes, 2D only."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from plugin_trainers.vanilla_unet import DoubleConv, VanillaUNet2d


def analytic_parameter_count(c_in: int, k: int, f: int, depth: int = 4) -> int:
    """Appendix A, with w_i = f 2^i (i = 0..depth; bottleneck w_depth = 16 f for depth 4).

    double conv a -> b (two 3x3 convs without bias, two BatchNorms with weight and bias):
        D(a, b) = 9 a b + 2 b + 9 b b + 2 b
    encoder:    sum_{i=0}^{depth-1} D(w_{i-1}, w_i) with w_{-1} = c_in
    bottleneck: D(w_{depth-1}, w_depth)
    decoder:    sum_{i=0}^{depth-1} [ 2x2 transposed conv w_{i+1} -> w_i with bias: 4 w_{i+1} w_i + w_i
                                      + D(2 w_i, w_i) ]
    head:       1x1 conv with bias: w_0 k + k
    """
    w = [f * 2 ** i for i in range(depth + 1)]

    def D(a, b):
        return 9 * a * b + 2 * b + 9 * b * b + 2 * b

    enc = sum(D(c_in if i == 0 else w[i - 1], w[i]) for i in range(depth))
    bottleneck = D(w[depth - 1], w[depth])
    dec = sum(4 * w[i + 1] * w[i] + w[i] + D(2 * w[i], w[i]) for i in range(depth))
    head = w[0] * k + k
    return enc + bottleneck + dec + head


def test_parameter_count_equals_appendix_a_formula():
    net = VanillaUNet2d(in_channels=1, num_classes=4, base_filters=64)
    n = sum(p.numel() for p in net.parameters())
    assert n == analytic_parameter_count(1, 4, 64)
    assert n == 31_036_676  # the number the formula gives for the paper's setting
    small = VanillaUNet2d(in_channels=2, num_classes=3, base_filters=8)
    assert sum(p.numel() for p in small.parameters()) == analytic_parameter_count(2, 3, 8)


def test_layer_structure():
    net = VanillaUNet2d(in_channels=1, num_classes=4, base_filters=64)
    assert [b[0].out_channels for b in net.encoder] == [64, 128, 256, 512]
    assert net.bottleneck[0].out_channels == 1024 == 16 * 64
    assert [(u.in_channels, u.out_channels, u.kernel_size, u.stride) for u in net.up] == [
        (1024, 512, (2, 2), (2, 2)), (512, 256, (2, 2), (2, 2)), (256, 128, (2, 2), (2, 2)),
        (128, 64, (2, 2), (2, 2))]
    assert [b[0].in_channels for b in net.decoder] == [1024, 512, 256, 128]  # concat doubles
    for block in [*net.encoder, net.bottleneck, *net.decoder]:
        assert isinstance(block, DoubleConv)
        kinds = [type(m) for m in block]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
        assert all(m.kernel_size == (3, 3) and m.bias is None for m in block if isinstance(m, nn.Conv2d))
    assert net.pool.kernel_size == 2 and net.pool.stride == 2
    assert net.head.kernel_size == (1, 1) and net.head.out_channels == 4
    assert not any(isinstance(m, (nn.InstanceNorm2d, nn.Dropout)) for m in net.modules())


@pytest.mark.parametrize("h,w", [(40, 40), (37, 53), (16, 16), (1, 5)])
def test_any_size_is_padded_and_cropped_back(h, w):
    torch.manual_seed(0)
    net = VanillaUNet2d(in_channels=1, num_classes=4, base_filters=4).eval()
    x = torch.randn(2, 1, h, w)
    y = net(x)
    assert y.shape == (2, 4, h, w)
    # the crop is the centre of the padded output: same result as padding by hand
    k = net.size_multiple
    ph, pw = (-h) % k, (-w) % k
    xp = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    with torch.no_grad():
        full = net(xp)
    torch.testing.assert_close(y, full[..., ph // 2:ph // 2 + h, pw // 2:pw // 2 + w])


def test_rejects_non_2d_input():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        VanillaUNet2d(base_filters=4)(torch.zeros(1, 1, 4, 16, 16))
