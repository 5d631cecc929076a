"""Training throughput of the diffusion model: our trainer vs a bare PyTorch loop.

For a preset and device, measures images/s of
  * ``trainer``: ``nnunet_sddm.diffusion.trainer.Trainer.train_step`` (batch gathering from the
    slice tensor, timestep sampler, hybrid loss, AdamW, EMA; AMP/channels_last on CUDA), and
  * ``bare``: the same UNet in a minimal loop (fixed input, random timesteps, MSE on the output,
    backward, AdamW; no data handling, no diffusion maths, no EMA): the ceiling.
Blocks of the two are interleaved and the median block time is used (robust on a busy machine).
The last line is ``ratio_to_bare_loop: <trainer images/s / bare images/s>``.

With no arguments: preset ``tiny`` on CPU (1 thread) with generated data, in well under 2 minutes.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from nnunet_sddm.diffusion.factory import create_model
from nnunet_sddm.diffusion.presets import apply_overrides, preset_config
from nnunet_sddm.diffusion.slice_dataset import SliceSet
from nnunet_sddm.diffusion.trainer import Trainer
from nnunet_sddm.utilities.devices import resolve_device


def synthetic_slices(n: int, size: int, seed: int = 0):
    """``n`` generated ``(1, size, size)`` slices in [-1, 1]: bright ellipses on a dark disc."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = []
    for _ in range(n):
        cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([0.4, 0.4, 0.2]) + torch.tensor([-0.2, -0.2, 0.15]))
        body = ((xx ** 2 + yy ** 2) < 0.8).float() * 0.6 - 1
        heart = (((xx - cx) ** 2 + (yy - cy) ** 2) < r ** 2).float() * 1.2
        imgs.append((body + heart + 0.05 * torch.randn(size, size, generator=g)).clamp(-1, 1))
    return SliceSet(torch.stack(imgs)[:, None], ["synthetic"] * n, list(range(n)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="tiny, small, paper128 or paper256 (default tiny)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, the preset's on CUDA")
    p.add_argument("--blocks", type=int, default=None, help="interleaved timing blocks per loop (default 4 CPU, 5 CUDA)")
    p.add_argument("--steps-per-block", type=int, default=None, help="default 3 on CPU, 10 on CUDA")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default="bf16", help="CUDA autocast (default bf16)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both the trainer's network (training.compile) and the bare loop's")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: stable figures on a shared machine; 0 = torch's choice)")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    blocks = a.blocks or (5 if cuda else 4)
    spb = a.steps_per_block or (10 if cuda else 3)
    cfg = preset_config(a.preset)
    bs = a.batch_size or (int(cfg["training"]["batch_size"]) if cuda else 16)
    cfg = apply_overrides(cfg, {"training.batch_size": bs, "training.amp": a.amp, "training.num_samples": 0,
                                "training.compile": bool(a.compile)})
    size = int(cfg["model"]["image_size"])
    print(f"preset {a.preset}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, batch {bs}, {size} px, "
          f"threads {torch.get_num_threads()}, amp {a.amp if cuda else 'off (CPU)'}, "
          f"{'torch.compile' if a.compile else 'eager'}, channels_last {'on' if cuda else 'off'}")

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, synthetic_slices(max(4 * bs, 64), size), Path(tmp), device=str(device), progress=False)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        print(f"parameters: {n_params:,}")

        # bare loop: a fresh copy of the same architecture
        bare = create_model(cfg).to(device)
        if cuda:
            bare = bare.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(bare.parameters(), lr=1e-4)
        if a.compile:
            bare = torch.compile(bare)
        x = torch.randn(bs, cfg["model"]["in_channels"], size, size, device=device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.randn(bs, 2 * cfg["model"]["in_channels"], size, size, device=device)
        ac = (lambda: torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[a.amp])) \
            if cuda and a.amp != "off" else nullcontext

        def bare_step():
            t = torch.randint(0, 1000, (bs,), device=device)
            opt.zero_grad(set_to_none=True)
            with ac():
                out = bare(x, t)
            torch.nn.functional.mse_loss(out.float(), target).backward()
            opt.step()

        loops = {"bare": bare_step, "trainer": trainer.train_step}
        for fn in loops.values():  # warm-up (allocations, mkldnn/cuDNN algorithm choice)
            fn()
            fn()
        _sync(device)
        times = {k: [] for k in loops}
        for _ in range(blocks):
            for name, fn in loops.items():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(spb):
                    fn()
                _sync(device)
                times[name].append((time.perf_counter() - t0) / spb)
    ips = {k: bs / statistics.median(v) for k, v in times.items()}
    for k in loops:
        spread = f"{min(times[k]) * 1e3:.0f}-{max(times[k]) * 1e3:.0f}"
        print(f"{k:8s}: {ips[k]:8.2f} images/s  (median {statistics.median(times[k]) * 1e3:.1f} ms/step, "
              f"blocks {spread} ms)")
    print(f"ratio_to_bare_loop: {ips['trainer'] / ips['bare']:.3f}")


if __name__ == "__main__":
    main()
