"""Training loop of the source-domain diffusion model (improved DDPM recipe).

AdamW, EMA of the weights, gradient accumulation over micro-batches, bf16/fp16 autocast and
channels_last on CUDA, optional ``torch.compile``, DDP through ``torchrun`` (rank 0 writes),
periodic atomic checkpoints, Ctrl-C checkpointing and exact resumption.

Determinism: the data order of step ``s`` is a pure function of ``(seed, s)`` (one seeded
permutation per epoch of the slice set) and every random draw of step ``s`` (timesteps, noise,
dropout) comes from generators seeded with ``(seed, s, rank)``. A checkpoint therefore needs
only the step, the weights, the EMA, the optimizer (and loss-aware sampler / grad scaler) state
for ``--resume`` to continue exactly as an uninterrupted run. In spacing mode (``data.spacing``)
the random crop of each slice of step ``s`` comes from ``crop_rng(seed, s)``, drawn for the
global batch, so it too is a pure function of ``(seed, s)`` whatever the number of ranks.

Conditional models (``model.condition`` "labels"): each batch carries the one-hot label maps of
its slices (cropped with the images' offsets in spacing mode) and, with ``model.domains``, the
slices' domain indices. Label dropout (``training.label_dropout``) replaces a sample's condition by
the null condition (zero label channels, null domain) with draws from the step's generator, so
it too is a pure function of ``(seed, s, rank)``.

Label-map generators (``model.generates`` "labels", diffusion/label_maps.py): the batch of step
``s`` is the one-hot encoding (background channel included, values in {-1, 1}) of the label maps of
its slices, selected exactly as image slices are, so resumption is exact in this mode as well;
``samples.png`` shows the argmax label index of each sample as grey levels.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import os
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from nnunet_sddm.diffusion.conditioning import (complete_condition_config, encode_labels, is_conditional,
                                                is_label_generator)
from nnunet_sddm.diffusion.label_maps import complete_label_config, encode_label_maps
from nnunet_sddm.diffusion.factory import create_diffusion, create_model
from nnunet_sddm.diffusion.model_folder import (CONFIG_FILE, EMA_FILE, RAW_FILE, default_model_dir, load_config,
                                                load_training_state, load_weights, save_model_folder)
from nnunet_sddm.diffusion.presets import DEFAULT_PRESET, apply_overrides, preset_config, validate_config
from nnunet_sddm.data.slices import working_spacing
from nnunet_sddm.diffusion.slice_dataset import (SliceSet, concat_slice_sets, crop_batch, crop_offsets,
                                                 label_file, load_label_slices, load_slices, select_images)
from nnunet_sddm.diffusion.timestep_sampler import create_named_schedule_sampler
from nnunet_sddm.utilities.devices import resolve_device
from nnunet_sddm.utilities.distributed import barrier, init_from_env, ranks_from_env
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import write_text
from nnunet_sddm.utilities.nnunet_paths import find_raw_dataset
from nnunet_sddm.utilities.progress import progress_bar
from nnunet_sddm.utilities.plotting import figure, save_figure

LOG_FILE = "log.csv"
LOG_FIELDS = ["step", "images_seen", "loss", "mse", "vb", "grad_norm", "lr", "images_per_s", "elapsed_s"]

#: training settings that may change on --resume without changing the run
RESUME_MUTABLE = {"iterations", "log_interval", "save_interval", "sample_interval", "num_samples", "compile"}


# ----------------------------------------------------------------------------- helpers
def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed for the random draws of ``step`` on ``rank``."""
    return int(np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(2, np.uint64)[0] >> 1)


def batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> np.ndarray:
    """Indices into the slice set of the global batch of ``step``: consecutive positions of a
    stream made of one seeded permutation per epoch (epoch ``e`` uses ``default_rng([seed, e])``)."""
    start = step * batch_size
    pos = np.arange(start, start + batch_size)
    epochs, offsets = np.divmod(pos, num_items)
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([int(seed), int(e)]).permutation(num_items)
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out


#: Entropy word of the crop stream (spacing mode), apart from ``step_seed``'s ``(seed, step, rank)``.
_CROP_STREAM = 0x63726F70


def crop_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of the random crops of the global batch of ``step`` (spacing mode)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step), _CROP_STREAM]))


class EMA:
    """Exponential moving average of a model's floating-point parameters:
    ``ema <- rate * ema + (1 - rate) * theta`` after every optimizer step."""

    def __init__(self, model: torch.nn.Module, rate: float):
        self.rate = float(rate)
        self.names = [n for n, p in model.named_parameters()]
        self.params = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        torch._foreach_lerp_(self.params, [p.detach().float() for p in model.parameters()], 1.0 - self.rate)

    def state_dict(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """The model's state dict with parameters replaced by their EMA."""
        sd = dict(model.state_dict())
        for n, p in zip(self.names, self.params):
            sd[n] = p.to(sd[n].dtype)
        return sd

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        for n, p in zip(self.names, self.params):
            p.copy_(state[n].float())


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# ----------------------------------------------------------------------------- figures
def plot_progress(rows: List[Dict[str, Any]], path: Path) -> None:
    """Loss curve (loss, mse, vb against step, log scale) to ``progress.png``, atomically."""
    steps = [r["step"] for r in rows]
    fig = figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for key in ("loss", "mse", "vb"):
        vals = [float(r[key]) for r in rows]
        if any(v > 0 for v in vals):
            ax.plot(steps, vals, label=key, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (mean over log interval)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_image_grid(images: torch.Tensor, path: Path, title: str = "") -> None:
    """``(N, 1, H, W)`` in [-1, 1] -> a grid PNG (grey, -1 black, 1 white), atomically."""
    n = images.shape[0]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig = figure(figsize=(1.6 * cols, 1.6 * rows + 0.3), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i, 0].float().cpu().numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def read_log(path: Path, max_step: int) -> List[Dict[str, Any]]:
    """Rows of ``log.csv`` up to ``max_step`` (later rows belong to an interrupted stretch)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{k: (float(v) if k not in ("step", "images_seen") else int(float(v))) for k, v in r.items()}
                for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= max_step]


def write_log(rows: List[Dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in LOG_FIELDS})
    write_text(buf.getvalue(), path)


# ----------------------------------------------------------------------------- resume checks
def config_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> List[str]:
    """``section.key: stored -> requested`` for every setting that would change the run."""
    diffs = []
    for section in ("model", "diffusion", "data", "training"):
        a, b = stored.get(section, {}), requested.get(section, {})
        for k in sorted(set(a) | set(b)):
            if section == "training" and k in RESUME_MUTABLE:
                continue
            if a.get(k) != b.get(k):
                diffs.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    if stored.get("preset") != requested.get("preset"):
        diffs.append(f"preset: {stored.get('preset')!r} -> {requested.get('preset')!r}")
    return diffs


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Trains ``config``'s model on ``slices`` into ``model_dir``.

    ``run()`` returns ``"finished"`` or ``"interrupted"`` (Ctrl-C: a checkpoint of the last
    completed step was written). ``callback(step)`` is called after every completed step
    (tests use it to simulate an interrupt).
    """

    def __init__(self, config: Dict[str, Any], slices: SliceSet, model_dir: Path, device: Optional[str] = None,
                 resume: bool = False, progress: bool = True, callback: Optional[Callable[[int], None]] = None):
        self.config = copy.deepcopy(config)
        self.tcfg = self.config["training"]
        self.slices = slices
        self.model_dir = Path(model_dir)
        self.progress, self.callback = progress, callback
        ranks = init_from_env(device)  # joins torchrun's process group (gloo on CPU, nccl on CUDA)
        self.rank, self.world = ranks.rank, ranks.world_size
        self.device = resolve_device(device, ranks.local_rank)
        self.distributed = ranks.distributed
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        size = int(self.config["model"]["image_size"])
        self.image_size = size
        spacing = working_spacing(self.config.get("data"))
        if spacing != slices.spacing or (spacing is not None) != (slices.extents is not None):
            raise SDDMError(f"training slices are at working spacing {slices.spacing} mm, the configuration's "
                            f"data.spacing is {spacing}")
        channels = int(self.config["model"]["in_channels"])
        self.generates_labels = is_label_generator(self.config)
        if self.generates_labels:
            values = self.config["model"]["label_values"]
            if slices.labels is None or tuple(slices.labels.shape) != (len(slices), size, size):
                raise SDDMError(f"a label-map generator needs the label map of every training slice at "
                                f"({size}, {size}); got {None if slices.labels is None else tuple(slices.labels.shape)}")
            if channels != len(values) + 1:
                raise SDDMError(f"model.in_channels {channels} != 1 + {len(values)} label values {values}")
        elif spacing is not None:
            if slices.images.shape[1] != channels or len(slices.extents) != len(slices):
                raise SDDMError(f"training slices have shape {tuple(slices.images.shape[1:])} and "
                                f"{len(slices.extents)} extents, the model expects {channels} channel(s)")
        elif tuple(slices.images.shape[1:]) != (channels, size, size):
            raise SDDMError(f"training slices have shape {tuple(slices.images.shape[1:])}, the model expects "
                            f"({self.config['model']['in_channels']}, {size}, {size})")
        m = self.config["model"]
        self.conditional = is_conditional(self.config)
        self.label_values = [int(v) for v in m.get("label_values") or []]
        self.num_domains = len(m.get("domains") or []) if self.conditional else 0
        if self.conditional:
            if slices.labels is None or tuple(slices.labels.shape) != (len(slices), *slices.images.shape[-2:]):
                raise SDDMError(f"a conditional model (model.condition 'labels') needs the label map of every "
                                f"training slice on the images' grid; got "
                                f"{None if slices.labels is None else tuple(slices.labels.shape)}")
            if self.num_domains and (slices.domains is None or len(slices.domains) != len(slices)):
                raise SDDMError(f"model.domains {m['domains']} needs the domain of every training slice")
            self.label_dropout = float(self.tcfg.get("label_dropout") or 0.0)
        self.batch_size = int(self.tcfg["batch_size"])
        if self.batch_size < 1 or self.batch_size % self.world:
            raise SDDMError(f"--batch-size {self.batch_size} must be a positive multiple of the "
                            f"{self.world} processes")
        self.local_batch = self.batch_size // self.world
        mb = self.tcfg.get("microbatch") or self.local_batch
        if int(mb) < 1:
            raise SDDMError(f"--microbatch {mb} must be >= 1")
        self.microbatch = min(int(mb), self.local_batch)
        self.seed = int(self.tcfg["seed"])
        self.iterations = int(self.tcfg["iterations"])

        torch.manual_seed(self.seed)
        self.model = create_model(self.config).to(self.device)
        self.diffusion = create_diffusion(self.config)
        self.sampler = create_named_schedule_sampler(self.tcfg["schedule_sampler"], self.diffusion.num_timesteps)
        amp = str(self.tcfg.get("amp", "off"))
        if amp not in ("bf16", "fp16", "off"):
            raise SDDMError(f"--amp {amp!r}: choose bf16, fp16 or off")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=float(self.tcfg["lr"]),
                                     weight_decay=float(self.tcfg["weight_decay"]))
        self.ema = EMA(self.model, float(self.tcfg["ema_rate"]))
        self.step = 0
        self.rows: List[Dict[str, Any]] = []
        self.elapsed = 0.0
        if resume:
            self._load_checkpoint()
        self.net = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.tcfg.get("compile"):
            self.net = torch.compile(self.net)
        # label-map generators: the int16 label maps (N, S, S), one-hot encoded batch by batch
        self.data = (slices.labels if self.generates_labels else slices.images).to(self.device)
        if self.conditional:
            self.label_data = slices.labels[:, None].to(self.device)  # (N, 1, H, W) int16
            self.domain_data = (torch.from_numpy(np.asarray(slices.domains, dtype=np.int64)).to(self.device)
                                if self.num_domains else None)

    # ------------------------------------------------------------------ checkpoints
    def _load_checkpoint(self) -> None:
        state = load_training_state(self.model_dir)
        if state is None:
            raise SDDMError(f"{self.model_dir}: no training_state.pt to resume from")
        self.model.load_state_dict(load_weights(self.model_dir / RAW_FILE))
        self.ema.load(load_weights(self.model_dir / EMA_FILE))
        self.opt.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state.get("sampler", {}))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.rows = read_log(self.model_dir / LOG_FILE, self.step)

    def save_checkpoint(self) -> None:
        """Atomically write weights, EMA, optimizer state, config and log (rank 0 only)."""
        if self.rank == 0:
            state = {"step": self.step, "optimizer": self.opt.state_dict(), "sampler": self.sampler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                     "elapsed_s": self.elapsed, "images_seen": self.step * self.batch_size}
            save_model_folder(self.model_dir, self.model, self.config, ema_state=self.ema.state_dict(self.model),
                              training_state=state)
            write_log(self.rows, self.model_dir / LOG_FILE)
            if self.rows:
                plot_progress(self.rows, self.model_dir / "progress.png")
        if self.distributed:
            dist.barrier()

    @torch.no_grad()
    def write_samples(self) -> None:
        """``samples.png``: unconditional samples of the EMA model with the respaced chain
        (fixed seed, so successive grids are comparable)."""
        if self.rank != 0:
            return
        n = int(self.tcfg.get("num_samples", 16))
        if n < 1:
            return
        ema_model = create_model(self.config).to(self.device).eval()
        ema_model.load_state_dict(self.ema.state_dict(self.model))
        k = self.config["diffusion"].get("sample_respacing") or self.diffusion.num_timesteps
        spaced = create_diffusion(self.config, int(k))
        size, c = int(self.config["model"]["image_size"]), int(self.config["model"]["in_channels"])
        g = torch.Generator().manual_seed(self.seed + 12345)
        kwargs, what = (self.sample_condition(n), "conditional ") if self.conditional else ({}, "")
        ctx = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        with ctx:
            x = spaced.p_sample_loop(ema_model, (n, c, size, size), generator=g, device=self.device,
                                     model_kwargs=kwargs)
        if self.generates_labels:  # the argmax channel index as a grey level (background black)
            x = (x.float().argmax(dim=1).cpu().float() / max(1, c - 1) * 2.0 - 1.0)[:, None]
            what = "label-map "
        save_image_grid(x.clamp(-1, 1), self.model_dir / "samples.png",
                        title=f"EMA {what}samples, iteration {self.step}, {spaced.num_timesteps} steps")

    def sample_condition(self, n: int) -> Dict[str, torch.Tensor]:
        """The condition of ``samples.png`` (conditional models): the label maps of the first ``n``
        training slices with foreground (in slice-set order; all slices if fewer have any),
        centre-cropped in spacing mode, with their domains; no label dropout (guidance scale 1)."""
        fg = (self.label_data.flatten(1) != 0).any(dim=1).cpu().numpy()
        order = np.concatenate([np.flatnonzero(fg), np.flatnonzero(~fg)])
        idx = np.resize(order, n)
        return self._condition(idx, None if self.slices.extents is None else
                               (self.slices.extents[idx] - self.image_size) // 2)

    def _condition(self, idx: np.ndarray, offsets: Optional[np.ndarray]) -> Dict[str, torch.Tensor]:
        """``{"cond": one-hot (B, K, S, S), "domain": (B,)}`` of the slices ``idx`` (spacing mode:
        cropped at ``offsets`` like their images)."""
        if offsets is None:
            maps = self.label_data[torch.from_numpy(np.asarray(idx)).to(self.device)]
        else:
            maps = crop_batch(self.label_data, self.slices.extents, idx, offsets, self.image_size, fill=0)
        out = {"cond": encode_labels(maps[:, 0], self.label_values, name="training label maps")}
        if self.num_domains:
            out["domain"] = self.domain_data[torch.from_numpy(np.asarray(idx)).to(self.device)]
        return out

    # ------------------------------------------------------------------ one step
    def _forward_backward(self, x: torch.Tensor, gen: torch.Generator,
                          model_kwargs: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, float]:
        model_kwargs = model_kwargs or {}
        t, weights = self.sampler.sample(x.shape[0], self.device, generator=gen)
        noise = torch.randn(x.shape, generator=gen).to(self.device)
        if self.device.type == "cuda":
            x, noise = x.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
        totals = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
        all_t, all_losses = [], []
        n = x.shape[0]
        for i in range(0, n, self.microbatch):
            sl = slice(i, i + self.microbatch)
            last = i + self.microbatch >= n
            sync = nullcontext() if (last or not self.distributed) else self.net.no_sync()
            ac = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
            with sync:
                with ac:
                    terms = self.diffusion.training_losses(self.net, x[sl], t[sl], noise=noise[sl],
                                                           model_kwargs={k: v[sl] for k, v in model_kwargs.items()})
                loss = (terms["loss"].float() * weights[sl]).sum() / n
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            for k in totals:
                totals[k] += float(terms[k].detach().float().sum()) / n
            all_t.append(t[sl])
            all_losses.append(terms["loss"].detach().float())
        self._update_sampler(torch.cat(all_t), torch.cat(all_losses))
        return totals

    def _update_sampler(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        if self.distributed:
            ts = [torch.zeros_like(t) for _ in range(self.world)]
            ls = [torch.zeros_like(losses) for _ in range(self.world)]
            dist.all_gather(ts, t)
            dist.all_gather(ls, losses)
            t, losses = torch.cat(ts), torch.cat(ls)
        self.sampler.update(t, losses)

    def train_step(self) -> Dict[str, float]:
        """One optimizer step on the global batch of ``self.step``; returns mean losses."""
        seed = step_seed(self.seed, self.step, self.rank)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout
        idx = batch_indices(self.step, self.batch_size, len(self.slices), self.seed)
        mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        offsets = None
        if self.slices.extents is None:
            x = self.data[torch.from_numpy(idx[mine]).to(self.device)]
            if self.generates_labels:
                x = encode_label_maps(x, self.config["model"]["label_values"], name="training label maps")
        else:  # spacing mode: random crops, drawn for the global batch
            offsets = crop_offsets(self.slices.extents[idx], self.image_size, crop_rng(self.seed, self.step))
            x = crop_batch(self.data, self.slices.extents, idx[mine], offsets[mine], self.image_size)
        kwargs = None
        if self.conditional:  # the batch's condition, cropped like the images; then label dropout
            kwargs = self._condition(idx[mine], None if offsets is None else offsets[mine])
            drop = (torch.rand(x.shape[0], generator=gen) < self.label_dropout).to(self.device)
            kwargs["cond"] = kwargs["cond"] * (~drop).to(kwargs["cond"].dtype).view(-1, 1, 1, 1)
            if "domain" in kwargs:
                kwargs["domain"] = torch.where(drop, torch.full_like(kwargs["domain"], self.num_domains),
                                               kwargs["domain"])
        self.opt.zero_grad(set_to_none=True)
        terms = self._forward_backward(x, gen, kwargs)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        clip = self.tcfg.get("grad_clip")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   float(clip) if clip else float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.ema.update(self.model)
        self.step += 1
        if self.distributed:  # log the mean over all ranks' samples
            v = torch.tensor([terms["loss"], terms["mse"], terms["vb"]], device=self.device, dtype=torch.float64)
            dist.all_reduce(v)
            terms = dict(zip(("loss", "mse", "vb"), (v / self.world).tolist()))
        terms["grad_norm"] = float(grad_norm)
        return terms

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is True on any (all ranks stop at the same step)."""
        if not self.distributed:
            return flag
        v = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return bool(v.item())

    # ------------------------------------------------------------------ loop
    def run(self) -> str:
        """Train up to ``training.iterations``; checkpoint, plot and sample at the configured
        intervals and at the end. Returns ``"finished"`` or ``"interrupted"``."""
        log_every = max(1, int(self.tcfg["log_interval"]))
        save_every = max(1, int(self.tcfg["save_interval"]))
        sample_every = max(1, int(self.tcfg["sample_interval"]))
        acc: Dict[str, float] = {}
        acc_n, acc_t = 0, time.perf_counter()
        bar = progress_bar(total=self.iterations, initial=self.step, desc="training", unit="it",
                           disable=not self.progress or self.rank != 0)
        status = "finished"
        stop = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):  # first Ctrl-C: finish the step, checkpoint, exit
                if stop.is_set():
                    raise KeyboardInterrupt
                stop.set()
                bar.write("Ctrl-C: stopping after this iteration and saving a checkpoint "
                           "(press again to abort without saving)")

            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            while self.step < self.iterations:
                if self._agree(stop.is_set()):
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                try:
                    terms = self.train_step()
                except RuntimeError as e:
                    if _is_oom(e):
                        raise SDDMError(f"out of memory on {self.device} with batch size {self.batch_size} "
                                        f"(micro-batch {self.microbatch}); use a smaller --batch-size or "
                                        f"--microbatch. Checkpoints in {self.model_dir} are intact.") from None
                    raise
                if not all(math.isfinite(v) for v in terms.values()):
                    raise SDDMError(f"non-finite loss at iteration {self.step} ({terms}); last good checkpoint "
                                    f"in {self.model_dir} is intact; try a lower --lr or --amp off")
                self.elapsed += time.perf_counter() - t0
                for k, v in terms.items():
                    acc[k] = acc.get(k, 0.0) + v
                acc_n += 1
                if self.step % log_every == 0 or self.step == self.iterations:
                    dt = time.perf_counter() - acc_t
                    row = {"step": self.step, "images_seen": self.step * self.batch_size,
                           **{k: v / acc_n for k, v in acc.items()}, "lr": float(self.tcfg["lr"]),
                           "images_per_s": acc_n * self.batch_size / max(dt, 1e-9), "elapsed_s": self.elapsed}
                    self.rows.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
                    acc, acc_n, acc_t = {}, 0, time.perf_counter()
                bar.update(1)
                if self.step % save_every == 0 and self.step < self.iterations:
                    self.save_checkpoint()
                if self.step % sample_every == 0 and self.step < self.iterations:
                    self.write_samples()
                    acc_t = time.perf_counter()
                if self.callback is not None:
                    self.callback(self.step)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        self.save_checkpoint()
        if status == "finished":
            self.write_samples()
        return status


# ----------------------------------------------------------------------------- entry point
def prepare_config(model_dir: Path, preset: Optional[str], overrides: Mapping[str, Any], resume: bool,
                   overwrite: bool) -> Dict[str, Any]:
    """The run's configuration: a preset plus ``overrides`` for a new run; the stored
    ``config.json`` plus ``overrides`` for ``resume`` (``SDDMError`` if anything but the
    iteration count / intervals would change, or if the folder exists without ``--resume`` /
    ``--overwrite``)."""

    model_dir = Path(model_dir)
    if resume:
        if not (model_dir / CONFIG_FILE).is_file():
            raise SDDMError(f"--resume: {model_dir / CONFIG_FILE} not found; nothing to resume")
        stored = load_config(model_dir)
        stored.pop("package_version", None)
        if preset is not None and preset != stored.get("preset"):
            raise SDDMError(f"--resume: {model_dir} was trained with preset {stored.get('preset')!r}, "
                            f"not {preset!r}")
        cfg = apply_overrides(stored, overrides)
        diffs = config_differences(stored, cfg)
        if diffs:
            raise SDDMError(f"--resume: the command's settings differ from {model_dir / CONFIG_FILE}: "
                            + "; ".join(diffs) + ". Resume with the same settings or train into a new folder.")
    else:
        if model_dir.exists() and any(model_dir.iterdir()):
            if not overwrite:
                raise SDDMError(f"{model_dir} already exists; use --resume to continue it or --overwrite "
                                f"to start again")
        cfg = apply_overrides(preset_config(preset or DEFAULT_PRESET), overrides)
    validate_config(cfg)
    return cfg


def _dataset_reference(folder: Path) -> str:
    """``DatasetXXX_Name`` for a folder in ``$nnUNet_raw``, else its absolute path (so that
    ``--resume`` finds it again)."""
    from nnunet_sddm.utilities.nnunet_paths import raw_root

    try:
        if (raw_root() / folder.name).resolve() == folder.resolve():
            return folder.name
    except SDDMError:
        pass
    return str(folder.resolve())


def load_training_slices(cfg: Mapping[str, Any], folder: Path, pseudo_folder: Optional[Path] = None,
                         cache_dir: Optional[os.PathLike] = None, progress: bool = True) -> SliceSet:
    """The training slices of ``cfg`` from raw dataset ``folder``; a conditional model's with their
    label maps, plus (``pseudo_folder``) all ``imagesTr`` cases of the pseudo-labelled dataset, and
    the domain of each slice when ``model.domains`` is set (0 source, 1 target). A label-map
    generator's slices carry the label maps (``labels``) it trains on, on its images' grid."""
    size = int(cfg["model"]["image_size"])
    slices = load_slices(folder, size, cfg["data"], cache_dir=cache_dir, progress=progress)
    if is_label_generator(cfg):
        slices.labels = load_label_slices(folder, size, cfg["data"], slices, cfg["model"]["label_values"],
                                          progress=progress)
        return slices
    if not is_conditional(cfg):
        return slices
    values = cfg["model"]["label_values"]
    slices.labels = load_label_slices(folder, size, cfg["data"], slices, values, progress=progress)
    sets = [slices]
    if pseudo_folder is not None:
        data2 = {**cfg["data"], "include_test": False, "cases": None, "vendor": None, "centre": None}
        target = load_slices(pseudo_folder, size, data2, progress=progress,
                             cache_dir=None if cache_dir is None else Path(cache_dir) / pseudo_folder.name)
        target.labels = load_label_slices(pseudo_folder, size, data2, target, values, progress=progress)
        sets.append(target)
    if cfg["model"].get("domains"):
        for i, s in enumerate(sets):
            s.domains = np.full(len(s), i, dtype=np.int64)
    return concat_slice_sets(sets)


def training_label_files(folder: Path, data_cfg: Mapping[str, Any]) -> List[Path]:
    """The label maps of the training selection of raw dataset ``folder`` (``SDDMError`` naming the
    case of a missing one)."""
    from nnunet_sddm.data.raw_dataset import load_dataset_json

    ending = load_dataset_json(folder)["file_ending"]
    files = []
    for case, image in select_images(folder, data_cfg).items():
        path = label_file(image, ending)
        if not path.is_file():
            raise SDDMError(f"case {case}: label map {path} not found (a label-map generator trains on labelled "
                            f"cases only)")
        files.append(path)
    return files


def train_model(dataset: str, preset: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                model_dir: Optional[os.PathLike] = None, resume: bool = False, overwrite: bool = False,
                device: Optional[str] = None, progress: bool = True, cache_dir: Optional[os.PathLike] = None,
                callback: Optional[Callable[[int], None]] = None, pseudo_labelled: Optional[str] = None) -> tuple:
    """Train (or resume) a diffusion model on the slices of raw dataset ``dataset`` (id, name or
    folder). Default folder: ``$nnUNet_results/DatasetXXX_Name/sddm__<preset>``.

    Conditional model (``model.condition`` "labels", ``--condition labels``): trained on the
    label maps of the cases as well (``model.label_values`` default: ``dataset.json``'s foreground
    labels); ``pseudo_labelled`` (or ``data.pseudo_labelled``): a second raw dataset whose
    ``imagesTr`` / ``labelsTr`` (e.g. target cases with pseudo-labels) join the training slices
    with domain "target", the main dataset's with "source" (``model.domains``); its
    ``dataset.json`` labels must equal the source's.
    Label-map generator (``model.generates`` "labels", ``--generate labels``): trained on the
    one-hot label maps of the cases (diffusion/label_maps.py); ``model.label_values`` /
    ``label_names`` default to ``dataset.json``'s, ``data.label_geometry`` is the median slice grid
    of the training label maps.
    Returns ``(model_dir, status)`` with status ``"finished"`` or ``"interrupted"``."""
    folder = find_raw_dataset(dataset)
    overrides = dict(overrides or {})
    if pseudo_labelled is not None:
        overrides["data.pseudo_labelled"] = _dataset_reference(find_raw_dataset(pseudo_labelled))
    if model_dir is None:
        p = preset
        if p is None and resume:
            raise SDDMError("--resume without -o needs -p PRESET to find the default model folder")
        model_dir = default_model_dir(folder, p or DEFAULT_PRESET)
    model_dir = Path(model_dir)
    overrides.setdefault("data.dataset", folder.name)
    cfg = prepare_config(model_dir, preset, overrides, resume, overwrite)
    pseudo = cfg["data"].get("pseudo_labelled")
    pseudo_folder = find_raw_dataset(pseudo) if pseudo is not None else None
    cfg = complete_condition_config(cfg, folder, pseudo_folder)
    if is_label_generator(cfg):
        cfg = complete_label_config(cfg, folder, training_label_files(folder, cfg["data"]))
    validate_config(cfg)
    if resume:  # the filled-in conditioning must be what the folder was trained with
        diffs = config_differences(load_config(model_dir), cfg)
        if diffs:
            raise SDDMError(f"--resume: the conditioning differs from {model_dir / CONFIG_FILE}: " + "; ".join(diffs))
    ranks = ranks_from_env()
    if ranks.distributed and not ranks.is_main:
        # rank 0 fills the cache first; the others then read it
        barrier(init_from_env(device))
    slices = load_training_slices(cfg, folder, pseudo_folder, cache_dir=cache_dir,
                                  progress=progress and ranks.is_main)
    if ranks.distributed and ranks.is_main:
        barrier(init_from_env(device))
    trainer = Trainer(cfg, slices, model_dir, device=device, resume=resume, progress=progress, callback=callback)
    if ranks.is_main:
        if not resume and overwrite and model_dir.exists():  # only once data and model are ready
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
    return model_dir, trainer.run()
