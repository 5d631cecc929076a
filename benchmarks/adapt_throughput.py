"""Throughput of the guided sampler: the project's batched sampler against DDA's reference loop.

Both run in this process, on the same model weights (two copies of one generated model folder)
and the same reference slices, with the same D, N, tau and K:

- project: ``guided_sample`` with the project's defaults: slices of many volumes in batches of
  ``--batch-size``, per-sample guidance norm, per-slice random streams, precomputed phi_D
  matrices, frozen parameters, channels-last, and on CUDA bf16 autocast;
- reference: DDA's loop: one slice at a time (batch 1), fp32, ``reference_behaviour=True`` (one
  norm over the batch, N / N-1 offset, zero padding), the filter weights rebuilt for every slice,
  contiguous (channels-first) tensors.

Reported per configuration: slices/s of each, their ratio, and the peak memory during each run
(CPU: resident set size above the level before the run, sampled every 5 ms; CUDA: peak allocated
by torch). Also run: projection guidance (``guidance="projection"``, ILVR: one forward pass per
step, no backward), with its ratio to gradient guidance on the same model and slices.

Distance to the machine's limit: the arithmetic of one sampler step per slice (FLOPs of one forward
plus one input-gradient backward pass of the UNet, counted with ``torch.utils.flop_counter``; the
forward alone for projection), the achieved FLOP/s of each run (slices/s x N x FLOPs per step), and
the machine's measured peak (the best of several large matrix products, fp32 on the CPU, the run's
dtype on CUDA). With no arguments it runs ``tiny`` (64 x 64) on the CPU in under 2 minutes with a
generated model and generated slices; on a machine with a GPU add ``--device cuda`` (then it also
runs ``paper128`` at 128 x 128 with bf16). The last line is ``speedup_vs_reference: <number>``
for the last configuration that ran.

    python benchmarks/adapt_throughput.py
    python benchmarks/adapt_throughput.py --device cuda --slices 128 --batch-size 64 -N 25
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def generated_slices(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``(n, 1, size, size)`` cardiac-like slices in [-1, 1]: a bright ellipse (blood pool) in a
    darker ring (myocardium) inside a body ellipse, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(-0.08, 0.08, 2)
        body = ((yy / 0.42) ** 2 + (xx / 0.48) ** 2) < 1
        r = np.hypot(yy - cy, xx - cx)
        img = 0.25 * body + 0.35 * (r < rng.uniform(0.12, 0.16)) + 0.6 * (r < rng.uniform(0.07, 0.1))
        img = img + rng.normal(0, 0.04, img.shape)
        out[i, 0] = np.clip(img * 2.0 - 1.0, -1, 1)
    return torch.from_numpy(out)


class PeakMemory:
    """Peak memory during a block: CUDA peak allocated, or the CPU RSS sampled every 5 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base, self.max, self.stop = self._rss(), 0, False

        def poll():
            while not self.stop:
                self.max = max(self.max, self._rss())
                time.sleep(0.005)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.stop = True
            self.thread.join()
            self.peak_mb = max(self.max, self._rss()) - self.base
            self.peak_mb /= 2**20
        return False


def step_flops(model: torch.nn.Module, size: int, device: torch.device, backward: bool,
               width: Optional[int] = None) -> float:
    """FLOPs of one sampler step for ONE ``size x width`` slice (``width`` None: square): the UNet's
    forward (and, with ``backward``, the backward pass to the input only: parameters frozen, as in
    the sampler), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from nnunet_sddm.sampling.guided import frozen

    b = 2  # a small batch, divided out (some kernels special-case batch 1)
    x = torch.zeros(b, 1, size, width or size, device=device, requires_grad=backward)
    t = torch.full((b,), 10, dtype=torch.long, device=device)
    with frozen(model), FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            out = model(x, t)
            if backward:
                out.float().sum().backward()  # only x requires a gradient (parameters frozen)
    return counter.get_total_flops() / b


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5) -> float:
    """The machine's measured peak: the best FLOP/s (2 n^3 per product) of ``reps`` ``n x n``
    matrix products on ``device`` in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def run_config(preset: str, device: torch.device, n_slices: int, batch_size: int, N: int, steps: int,
               amp, workdir: Path, reference_slices: int = 0) -> float:
    from nnunet_sddm.diffusion.model_folder import create_model_folder, load_model
    from nnunet_sddm.sampling import lowpass
    from nnunet_sddm.sampling.guided import SamplerSettings, guided_sample

    folder = create_model_folder(workdir / preset, preset=preset, seed=0)
    project_model = load_model(folder, device)
    torch.manual_seed(0)
    with torch.no_grad():  # the output layer is zero-initialised: give the network a real gradient
        for name, p in project_model.model.named_parameters():
            if name.startswith("out."):
                p.normal_(0.0, 0.02)
    reference_model = copy.deepcopy(project_model)
    size = project_model.image_size
    y0 = generated_slices(n_slices, size).to(device)
    keys = [f"bench/{i}" for i in range(n_slices)]
    project = SamplerSettings(D=2, N=N, tau=6.0, steps=steps, seed=0)
    reference = project.replace(reference_behaviour=True)
    projection = project.replace(guidance="projection")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run_project():
        for s in range(0, n_slices, batch_size):
            guided_sample(project_model, y0[s:s + batch_size], project, keys[s:s + batch_size], amp=amp)
        sync()

    def run_projection():
        for s in range(0, n_slices, batch_size):
            guided_sample(project_model, y0[s:s + batch_size], projection, keys[s:s + batch_size], amp=amp)
        sync()

    n_reference = min(reference_slices or n_slices, n_slices)

    def run_reference():
        for i in range(n_reference):
            lowpass.LowPass._cache.clear()          # DDA rebuilds its resize weights at every call
            lowpass.lowpass_matrix.cache_clear()
            lowpass.resize_matrix.cache_clear()
            guided_sample(reference_model, y0[i:i + 1], reference, keys[i:i + 1], amp=None, channels_last=False)
        sync()

    # warm-up (allocator, oneDNN/cuDNN algorithm choice) on a short chain, not timed
    warm = project.replace(N=1)
    guided_sample(project_model, y0[:min(batch_size, n_slices)], warm, keys[:min(batch_size, n_slices)], amp=amp)
    guided_sample(reference_model, y0[:1], warm.replace(reference_behaviour=True), keys[:1], channels_last=False)
    sync()

    results = {}
    for name, fn in (("reference", run_reference), ("project", run_project), ("projection", run_projection)):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        n = n_reference if name == "reference" else n_slices
        results[name] = (n / dt, dt, mem.peak_mb)
        print(f"  {name:10s}: {results[name][0]:8.3f} slices/s  ({dt:6.1f} s for {n} slices x {N} steps)  "
              f"peak memory +{mem.peak_mb:7.1f} MiB", flush=True)
    ratio = results["project"][0] / results["reference"][0]
    print(f"  {preset} on {device} ({size}x{size}, batch {batch_size}, amp {amp or 'fp32'}): "
          f"speedup {ratio:.2f}x", flush=True)
    print(f"  projection_vs_gradient: {results['projection'][0] / results['project'][0]:.2f}x "
          f"(same model, slices and batch)", flush=True)
    fwd_bwd = step_flops(project_model.model, size, device, backward=True)
    fwd = step_flops(project_model.model, size, device, backward=False)
    peak = matmul_peak(device, torch.bfloat16 if (amp == "bf16" and device.type == "cuda") else torch.float32)
    print(f"  flops_per_slice_step: {fwd_bwd / 1e9:.3f} GFLOP (forward + input-gradient backward), "
          f"{fwd / 1e9:.3f} GFLOP (forward only)", flush=True)
    print(f"  flops_per_slice: {N * fwd_bwd / 1e9:.2f} GFLOP at N = {N} (gradient guidance)", flush=True)
    for name, per_step in (("reference", fwd_bwd), ("project", fwd_bwd), ("projection", fwd)):
        achieved = results[name][0] * N * per_step
        print(f"  achieved_flops {name:10s}: {achieved / 1e9:8.2f} GFLOP/s = {100 * achieved / peak:5.1f}% of the "
              f"measured peak", flush=True)
    print(f"  measured_peak: {peak / 1e9:.1f} GFLOP/s (best 2048 x 2048 matrix product, "
          f"{'bf16' if (amp == 'bf16' and device.type == 'cuda') else 'fp32'}, {torch.get_num_threads()} threads)",
          flush=True)
    return ratio


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--presets", nargs="+", default=None,
                   help="model presets to run (default: tiny; on CUDA: tiny paper128)")
    p.add_argument("--slices", type=int, default=None, help="slices per run (default 32 CPU, 128 CUDA)")
    p.add_argument("--reference-slices", type=int, default=None,
                   help="slices of the batch-1 reference loop (default: --slices; fewer keeps GPU runs short)")
    p.add_argument("--batch-size", type=int, default=None, help="project batch (default 32 CPU, 64 CUDA)")
    p.add_argument("-N", type=int, default=None, help="diffusion range (default 4 CPU, 25 CUDA)")
    p.add_argument("--steps", type=int, default=100, help="respaced chain length K (default 100)")
    p.add_argument("--amp", default=None, help="project autocast on CUDA: bf16 (default) or fp32; CPU: fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    presets = a.presets or (["tiny", "paper128"] if cuda else ["tiny"])
    n_slices = a.slices or (128 if cuda else 32)
    batch = a.batch_size or (64 if cuda else 32)
    N = a.N or (25 if cuda else 4)
    amp = a.amp or ("bf16" if cuda else None)
    amp = None if amp == "fp32" else amp
    print(f"adapt_throughput: device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, D=2 tau=6 K={a.steps} N={N}", flush=True)
    ratio = float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            ratio = run_config(preset, device, n_slices, batch, N, a.steps, amp if cuda else None, Path(tmp),
                               reference_slices=a.reference_slices or 0)
    print(f"speedup_vs_reference: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
