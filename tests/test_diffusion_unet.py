"""ADM UNet: output shapes per preset and guided-diffusion parameter names/shapes/counts."""
from __future__ import annotations

import pytest
import torch

from nnunet_sddm.diffusion import create_model, preset_config
from nnunet_sddm.diffusion.presets import PRESETS, apply_overrides, validate_config
from nnunet_sddm.utilities.errors import SDDMError


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is faster


# ---------------------------------------------------------------------------------------------
# guided-diffusion's module tree (guided_diffusion/unet.py, UNetModel), written out by hand:
#   time_embed = Sequential(Linear(mc, 4mc), SiLU, Linear(4mc, 4mc))
#   ResBlock:  in_layers = (GroupNorm(cin), SiLU, Conv3x3(cin, cout)); emb_layers = (SiLU, Linear(4mc, 2cout
#              if scale-shift else cout)); out_layers = (GroupNorm(cout), SiLU, Dropout, Conv3x3(cout, cout));
#              skip_connection = Conv1x1(cin, cout) if cin != cout (else Identity, no parameters)
#   AttentionBlock: norm = GroupNorm(c); qkv = Conv1d(c, 3c, 1); proj_out = Conv1d(c, c, 1)
#   out = (GroupNorm(ch), SiLU, Conv3x3(ch, out_channels))


def _gn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _conv(prefix, cout, cin, k):
    return {f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)}


def _res(prefix, cin, cout, emb, scale_shift=True):
    d = {**_gn(f"{prefix}.in_layers.0", cin), **_conv(f"{prefix}.in_layers.2", cout, cin, 3),
         f"{prefix}.emb_layers.1.weight": (2 * cout if scale_shift else cout, emb),
         f"{prefix}.emb_layers.1.bias": (2 * cout if scale_shift else cout,),
         **_gn(f"{prefix}.out_layers.0", cout), **_conv(f"{prefix}.out_layers.3", cout, cout, 3)}
    if cin != cout:
        d.update({f"{prefix}.skip_connection.weight": (cout, cin, 1, 1), f"{prefix}.skip_connection.bias": (cout,)})
    return d


def _attn(prefix, c):
    return {**_gn(f"{prefix}.norm", c), f"{prefix}.qkv.weight": (3 * c, c, 1), f"{prefix}.qkv.bias": (3 * c,),
            f"{prefix}.proj_out.weight": (c, c, 1), f"{prefix}.proj_out.bias": (c,)}


def expected_small_guided_state():
    """guided-diffusion UNetModel(image_size=16, in_channels=1, model_channels=32, out_channels=2,
    num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=32,
    use_scale_shift_norm=True, resblock_updown=True): names and shapes by hand."""
    e = {"time_embed.0.weight": (128, 32), "time_embed.0.bias": (128,),
         "time_embed.2.weight": (128, 128), "time_embed.2.bias": (128,)}
    e.update(_conv("input_blocks.0.0", 32, 1, 3))
    e.update(_res("input_blocks.1.0", 32, 32, 128))          # level 0 res block
    e.update(_res("input_blocks.2.0", 32, 32, 128))          # down ResBlock (resblock_updown)
    e.update(_res("input_blocks.3.0", 32, 64, 128))          # level 1 (ds=2): res + attention
    e.update(_attn("input_blocks.3.1", 64))
    e.update(_res("middle_block.0", 64, 64, 128))
    e.update(_attn("middle_block.1", 64))
    e.update(_res("middle_block.2", 64, 64, 128))
    e.update(_res("output_blocks.0.0", 64 + 64, 64, 128))   # skip from input_blocks.3
    e.update(_attn("output_blocks.0.1", 64))
    e.update(_res("output_blocks.1.0", 64 + 32, 64, 128))   # skip from input_blocks.2
    e.update(_attn("output_blocks.1.1", 64))
    e.update(_res("output_blocks.1.2", 64, 64, 128))        # up ResBlock
    e.update(_res("output_blocks.2.0", 64 + 32, 32, 128))   # skip from input_blocks.1
    e.update(_res("output_blocks.3.0", 32 + 32, 32, 128))   # skip from input_blocks.0
    e.update(_gn("out.0", 32))
    e.update(_conv("out.2", 2, 32, 3))
    return e


def _small_config():
    cfg = preset_config("tiny")
    return apply_overrides(cfg, {"model.image_size": 16, "model.model_channels": 32, "model.channel_mult": [1, 2],
                                 "model.attention_resolutions": [8], "model.num_head_channels": 32,
                                 "model.num_res_blocks": 1, "model.norm_groups": 32})


def test_parameter_names_and_shapes_equal_guided_diffusion():
    model = create_model(_small_config())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_small_guided_state()


def guided_param_count(image_size, in_ch, mc, out_ch, nrb, attn_res_px, mult, head_ch=64, scale_shift=True,
                       updown=True):
    """Parameter count of guided-diffusion's UNetModel from its construction rules (arithmetic only)."""
    emb = 4 * mc
    gn = lambda c: 2 * c
    conv = lambda ci, co, k: co * ci * k * k + co
    res = lambda ci, co: (gn(ci) + conv(ci, co, 3) + emb * (2 * co if scale_shift else co)
                          + (2 * co if scale_shift else co) + gn(co) + conv(co, co, 3)
                          + (conv(ci, co, 1) if ci != co else 0))
    attn = lambda c: gn(c) + (3 * c * c + 3 * c) + (c * c + c)
    attn_ds = {image_size // r for r in attn_res_px}
    n = (mc * emb + emb) + (emb * emb + emb)
    ch = int(mult[0] * mc)
    n += conv(in_ch, ch, 3)
    chans, ds = [ch], 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            n += res(ch, int(m * mc))
            ch = int(m * mc)
            n += attn(ch) if ds in attn_ds else 0
            chans.append(ch)
        if level != len(mult) - 1:
            n += res(ch, ch) if updown else conv(ch, ch, 3)
            chans.append(ch)
            ds *= 2
    n += 2 * res(ch, ch) + attn(ch)
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nrb + 1):
            n += res(ch + chans.pop(), int(m * mc))
            ch = int(m * mc)
            n += attn(ch) if ds in attn_ds else 0
            if level and i == nrb:
                n += res(ch, ch) if updown else conv(ch, ch, 3)
                ds //= 2
    return n + gn(ch) + conv(int(mult[0] * mc), out_ch, 3)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_count_equals_guided_formula(preset):
    cfg = preset_config(preset)
    m = cfg["model"]
    with torch.device("meta"):
        model = create_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == guided_param_count(m["image_size"], m["in_channels"], m["model_channels"], 2 * m["in_channels"],
                                   m["num_res_blocks"], m["attention_resolutions"], m["channel_mult"],
                                   m["num_head_channels"])
    if preset == "paper128":
        assert n == 70_648_962


def test_paper128_matches_paper_settings():
    m = preset_config("paper128")["model"]
    assert (m["image_size"], m["in_channels"], m["model_channels"], m["num_res_blocks"]) == (128, 1, 128, 1)
    assert m["channel_mult"] == [1, 1, 2, 3, 4] and m["attention_resolutions"] == [16]
    assert m["num_head_channels"] == 64 and m["resblock_updown"] and m["use_scale_shift_norm"]
    assert m["dropout"] == 0.0
    d = preset_config("paper128")["diffusion"]
    assert (d["steps"], d["noise_schedule"], d["learn_sigma"], d["loss"]) == (1000, "linear", True, "hybrid")
    assert preset_config("paper256")["model"]["channel_mult"] == [1, 1, 2, 2, 4, 4]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_output_shapes(preset):
    cfg = preset_config(preset)
    size = cfg["model"]["image_size"]
    if preset == "tiny":
        model = create_model(cfg)
        out = model(torch.randn(2, 1, size, size), torch.tensor([0, 999]))
    else:  # meta device: shapes without the cost of a forward pass
        with torch.device("meta"):
            model = create_model(cfg)
            out = model(torch.randn(2, 1, size, size), torch.tensor([0, 999]))
    assert out.shape == (2, 2, size, size)


def test_forward_with_new_attention_order_and_fixed_sigma():
    cfg = apply_overrides(_small_config(), {"model.use_new_attention_order": True, "diffusion.learn_sigma": False,
                                            "diffusion.loss": "mse"})
    model = create_model(cfg)
    torch.nn.init.normal_(model.out[2].weight)
    out = model(torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3]))
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()


def test_invalid_model_sizes():
    with pytest.raises(SDDMError, match="not divisible by 2"):
        validate_config(apply_overrides(preset_config("tiny"), {"model.image_size": 60}))
    with pytest.raises(SDDMError, match="GroupNorm"):
        validate_config(apply_overrides(preset_config("tiny"), {"model.model_channels": 20}))
    with pytest.raises(SDDMError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(SDDMError, match="unknown key"):
        apply_overrides(preset_config("tiny"), {"model.channels": 3})
