"""What each diffusion preset costs: parameters, FLOPs and measured CPU speed.

For every preset (or the ones named), prints
  * ``params``: trainable parameters of the UNet;
  * ``train_gflop``: FLOPs of one training step per image at the preset's ``image_size`` (forward
    and backward, counted with ``torch.utils.flop_counter``);
  * ``step_gflop@HxW``: FLOPs of one guided sampler step per slice (forward plus the backward pass
    to the input) on a whole ``H x W`` slice, as spacing mode adapts them (``--slice``, default
    176 x 176: a 350 mm field of view at 2 mm);
  * with ``--measure``: training images/s on this machine (median of a few short blocks of the
    trainer's step), and the ratio to ``tiny`` measured in the same process.

    python benchmarks/preset_cost.py [--presets tiny small paper128] [--slice 176 176] [--measure]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapt_throughput import step_flops  # noqa: E402  (the sampler-step count, one home)
from train_throughput import synthetic_slices  # noqa: E402

from nnunet_sddm.diffusion.factory import create_model  # noqa: E402
from nnunet_sddm.diffusion.presets import PRESETS, apply_overrides, preset_config  # noqa: E402
from nnunet_sddm.diffusion.trainer import Trainer  # noqa: E402


def train_flops(model: torch.nn.Module, size: int) -> float:
    """FLOPs of one training step per image (forward and backward through the parameters)."""
    from torch.utils.flop_counter import FlopCounterMode

    b = 2
    x = torch.zeros(b, 1, size, size)
    t = torch.full((b,), 10, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x, t).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / b


def measured_images_per_s(name: str, blocks: int = 3, steps: int = 3, batch: int = 8) -> float:
    """Training images/s of the preset's trainer (hybrid loss, AdamW, EMA) on generated slices,
    batch ``batch``, median of ``blocks`` blocks of ``steps`` steps."""
    cfg = apply_overrides(preset_config(name), {"training.batch_size": batch, "training.amp": "off",
                                                "training.num_samples": 0})
    size = int(cfg["model"]["image_size"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, synthetic_slices(64, size), Path(tmp), device="cpu", progress=False)
        trainer.train_step()  # warm-up
        rates = []
        for _ in range(blocks):
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            rates.append(steps * batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=sorted(PRESETS))
    p.add_argument("--slice", nargs=2, type=int, default=(176, 176), metavar=("H", "W"))
    p.add_argument("--measure", action="store_true", help="also time training on this machine's CPU")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    h, w = a.slice
    rates = {"tiny": measured_images_per_s("tiny")} if a.measure else {}
    for name in a.presets:
        cfg = preset_config(name)
        model = create_model(cfg)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        size = cfg["model"]["image_size"]
        line = (f"{name}: image_size {size}, model_channels {cfg['model']['model_channels']}, "
                f"channel_mult {cfg['model']['channel_mult']}, params {params / 1e6:.2f} M, "
                f"train_gflop {train_flops(model, size) / 1e9:.2f} per image")
        factor = 2 ** (len(cfg["model"]["channel_mult"]) - 1)
        hh, ww = -(-h // factor) * factor, -(-w // factor) * factor
        line += f", step_gflop@{hh}x{ww} {step_flops(model, hh, torch.device('cpu'), True, width=ww) / 1e9:.2f}"
        if a.measure:
            rate = rates[name] if name in rates else measured_images_per_s(name)
            line += f", train_images_per_s {rate:.1f}, ratio_to_tiny {rate / rates['tiny']:.3f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
