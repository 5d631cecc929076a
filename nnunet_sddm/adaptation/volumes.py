"""Adaptation of whole 3D volumes (arrays): slices of many volumes batched through the sampler.

Per volume ``(z, y, x)`` (docs/explanation/algorithm.md, "The data path"):

1. intensity window: the volume's 0.5 / 99.5 percentiles ``[lo, hi]``, clip, map to [-1, 1];
2. every slice ``volume[k]`` to model space (``model_space_slices``): resize mode: padded to a
   centred square (value -1) and resized to the model side; spacing mode (``data.spacing`` of the
   model): resampled to the working spacing and padded (centred, value -1) to a multiple of the
   UNet's downsampling factor and of D, sampled whole;
3. guided sampling (``sampling.guided``), the slices of several volumes sharing one batch, each
   with its own random stream keyed ``"<case>/<k>"``; a batch holds slices of one model-space
   shape only (one shape in resize mode);
4. the transform inverted, the slices restacked in order and mapped back to ``[lo, hi]``
   (original intensity units, float32, the input's shape, clipped to the window).

With ``N = 0`` the sampler is the identity and the output is the input clipped to its window,
without the (lossy) resize round trip.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nnunet_sddm.data.slices import (PERCENTILES, IntensityWindow, SliceTransform, model_slices_to_volume,
                                     slice_transform, volume_to_model_slices, working_spacing)
from nnunet_sddm.diffusion.model_folder import LoadedModel
from nnunet_sddm.sampling.guided import SamplerSettings, guided_sample
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.progress import progress_bar

#: Default slices per sampler batch on each device type.
DEFAULT_BATCH = {"cpu": 16, "cuda": 64, "mps": 16}


def default_batch_size(device: torch.device) -> int:
    return DEFAULT_BATCH.get(torch.device(device).type, 16)


#: ``(case, volume (z, y, x))`` or ``(case, volume, spacing (z, y, x) in mm)``; spacing mode needs the spacing.
VolumeItem = Union[Tuple[str, np.ndarray], Tuple[str, np.ndarray, Sequence[float]]]

#: In-flight slices (queued, not yet sampled) per batch slot before a partial batch is sampled
#: to bound memory (spacing mode, where volumes of many shapes wait for batch partners).
QUEUE_BATCHES = 8


def size_multiple(loaded: LoadedModel, D: int) -> int:
    """What spacing-mode slices are padded to a multiple of: the UNet's total downsampling factor
    ``2^(len(channel_mult) - 1)`` and the low-pass factor ``D`` (their least common multiple)."""
    levels = len(loaded.config["model"]["channel_mult"])
    return math.lcm(2 ** (levels - 1), int(D))


def model_space_slices(volume: np.ndarray, window: IntensityWindow, loaded: LoadedModel, D: int,
                       spacing: Optional[Sequence[float]] = None,
                       name: str = "image") -> Tuple[torch.Tensor, SliceTransform]:
    """A volume ``(z, y, x)`` -> the model-space slices the sampler gets, ``(z, 1, H, W)`` in
    [-1, 1], and their transform (for ``model_slices_to_volume``). Resize mode: ``H = W =
    image_size``; spacing mode: the slices at ``data.spacing`` mm (``spacing``: the volume's
    ``(z, y, x)`` voxel spacing in mm), padded to multiples of ``size_multiple(loaded, D)``."""
    transform = slice_transform(loaded.data_config, int(loaded.image_size), np.shape(volume)[1:], spacing,
                                multiple=size_multiple(loaded, D), name=name)
    x, _, transform = volume_to_model_slices(volume, int(loaded.image_size), window=window, name=name,
                                             transform=transform)
    return x, transform


def window_only(volume: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """The exact result of N = 0: the volume clipped to its intensity window (float32)."""
    return np.clip(np.asarray(volume, dtype=np.float32), np.float32(window.lo), np.float32(window.hi))


@dataclass
class SliceJob:
    """One volume's slices waiting for the sampler: ``inputs`` ``(z, C, H, W)`` (the model-space
    references of adaptation, the one-hot conditions of label-conditioned synthesis) and
    ``finish``, which turns the volume's ``(z, 1, H, W)`` samples into its result ``(z, y, x)``."""

    inputs: torch.Tensor
    finish: Callable[[torch.Tensor], np.ndarray]


@dataclass
class _InFlight:
    job: SliceJob
    out: Optional[torch.Tensor] = None  # (z, 1, H, W) samples, allocated with the first one
    remaining: int = field(default=0)


#: A batch sampler: model-space inputs ``(B, C, H, W)`` and their ``B`` slice keys -> ``(B, 1, H, W)``.
BatchSampler = Callable[[torch.Tensor, List[str]], torch.Tensor]


def iter_sampled(jobs: Iterable[Tuple[str, Union[SliceJob, np.ndarray]]], sample: BatchSampler, batch_size: int,
                 pad_batches: bool = True, progress: bool = True, total_slices: Optional[int] = None,
                 desc: str = "adapting") -> Iterator[Tuple[str, np.ndarray]]:
    """The batching of slices of many volumes through a sampler (see ``iter_adapted``).

    ``jobs``: ``(case, SliceJob)``, or ``(case, result (z, y, x))`` for a volume that needs no
    sampling (yielded at once); pulled lazily, only when no batch can be filled yet. Yields
    ``(case, job.finish(samples))`` as soon as a volume's last slice is sampled. Slice ``z`` of
    ``case`` has key ``"<case>/<z>"``. Batches hold slices of one model-space shape; the
    scheduling and ``pad_batches`` are those described in ``iter_adapted``."""
    max_queued = QUEUE_BATCHES * batch_size
    source = iter(jobs)
    queues: Dict[Tuple[int, int], deque] = {}   # model-space shape -> (order, case, z)
    queued = 0
    order = 0
    state: Dict[str, _InFlight] = {}
    seen = set()
    bar = progress_bar(total=total_slices, desc=desc, unit="slice", disable=not progress)
    exhausted = False

    def full() -> bool:
        return any(len(q) >= batch_size for q in queues.values())

    try:
        while True:
            while not exhausted and not full() and queued < max_queued:
                try:
                    case, job = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if case in seen:
                    raise SDDMError(f"case {case!r} given twice")
                seen.add(case)
                if not isinstance(job, SliceJob):
                    bar.update(np.shape(job)[0])
                    yield case, job
                    continue
                z_count = int(job.inputs.shape[0])
                state[case] = _InFlight(job, None, z_count)
                q = queues.setdefault(tuple(job.inputs.shape[-2:]), deque())
                for z in range(z_count):
                    q.append((order, case, z))
                    order += 1
                queued += z_count
            if not queued:
                break
            waiting = [q for q in queues.values() if q]
            ready = [q for q in waiting if len(q) >= batch_size]
            # a full batch (oldest first); else the longest queue (oldest first among equals)
            q = min(ready, key=lambda d: d[0][0]) if ready else min(waiting, key=lambda d: (-len(d), d[0][0]))
            batch = [q.popleft()[1:] for _ in range(min(batch_size, len(q)))]
            queued -= len(batch)
            y0 = torch.cat([state[c].job.inputs[z:z + 1] for c, z in batch])
            keys = [f"{c}/{z}" for c, z in batch]
            n_pad = batch_size - len(batch) if pad_batches else 0
            if n_pad:
                y0 = torch.cat([y0, y0[:1].expand(n_pad, -1, -1, -1)])
                keys += [f"\x00padding/{j}" for j in range(n_pad)]
            x = sample(y0, keys)[:len(batch)].cpu()
            for (c, z), xs in zip(batch, x):
                s = state[c]
                if s.out is None:
                    s.out = torch.empty((int(s.job.inputs.shape[0]), *xs.shape), dtype=xs.dtype)
                s.out[z] = xs
                s.remaining -= 1
                if s.remaining == 0:
                    del state[c]
                    yield c, s.job.finish(s.out)
            bar.update(len(batch))
    finally:
        bar.close()


def iter_adapted(volumes: Iterable[VolumeItem], loaded: LoadedModel, settings: SamplerSettings,
                 percentiles: Tuple[float, float] = PERCENTILES,
                 batch_size: Optional[int] = None, amp: Optional[str] = None, progress: bool = True,
                 total_slices: Optional[int] = None, desc: str = "adapting",
                 pad_batches: bool = True) -> Iterator[Tuple[str, np.ndarray]]:
    """Adapt ``(case, volume (z, y, x))`` pairs, or ``(case, volume, spacing)`` triples (spacing:
    the ``(z, y, x)`` voxel size in mm, required when the model is in spacing mode, unused
    otherwise), yielding ``(case, adapted (z, y, x) float32)`` as soon as each volume's last slice
    is done. Volumes are pulled lazily, only when no batch can be filled yet, so memory stays
    bounded for any number of volumes. Case names must be unique.
    ``loaded`` and ``settings`` must have been checked together (``pipeline.Adapter`` does);
    ``percentiles``: the intensity window the model was trained with.

    Batches: every sampler call holds slices of ONE model-space shape (resize mode has one shape;
    in spacing mode it follows from each volume's size and spacing). Slices queue per shape; a
    full batch is sampled as soon as one exists (the shape whose oldest slice waits longest
    first); once more than ``QUEUE_BATCHES * batch_size`` slices wait, or the input is exhausted,
    the longest queue is sampled as a partial batch.

    ``pad_batches``: fill a partial batch up to ``batch_size`` with throw-away copies, so
    that every sampler call has the same shape. Batched kernels (oneDNN, cuDNN) may round
    differently for different batch SHAPES but give a slice the same bits whatever its batch
    neighbours; padding therefore makes results bit-identical for a given batch size however the
    slices are grouped: resumed runs, other case subsets, other rank counts. Costs at most one
    batch per call and shape. Never done with ``settings.reference_behaviour``: DDA's single
    batch-wide norm would include the copies (the last batch is sampled as it is, as DDA does).
    """
    device = next(loaded.model.parameters()).device
    batch_size = int(batch_size or default_batch_size(device))
    if batch_size < 1:
        raise SDDMError(f"--batch-size must be >= 1, got {batch_size}")
    spacing_mode = working_spacing(loaded.data_config) is not None

    def jobs() -> Iterator[Tuple[str, Union[SliceJob, np.ndarray]]]:
        for item in volumes:
            case, volume = item[0], item[1]
            spacing = item[2] if len(item) > 2 else None
            volume = np.asarray(volume)
            if volume.ndim != 3:
                raise SDDMError(f"{case}: expected a 3D volume (z, y, x), got shape {volume.shape}")
            window = IntensityWindow.fit(volume, percentiles, name=case)
            if settings.N == 0:
                yield case, window_only(volume, window)
                continue
            if spacing_mode and spacing is None:
                raise SDDMError(f"{case}: the diffusion model {loaded.model_dir} works at a fixed spacing "
                                f"(data.spacing in its config.json), so the volume's voxel spacing is needed")
            slices, resize = model_space_slices(volume, window, loaded, settings.D, spacing, name=case)
            yield case, SliceJob(slices, lambda x, w=window, r=resize: model_slices_to_volume(x, w, r))

    def sample(y0: torch.Tensor, keys: List[str]) -> torch.Tensor:
        return guided_sample(loaded, y0.to(device, non_blocking=True), settings, keys, amp=amp)

    yield from iter_sampled(jobs(), sample, batch_size, pad_batches=pad_batches and not settings.reference_behaviour,
                            progress=progress, total_slices=total_slices, desc=desc)
