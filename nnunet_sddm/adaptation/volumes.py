"""Adaptation of whole 3D volumes (arrays): slices of many volumes batched through the sampler.

Per volume ``(z, y, x)`` (docs/explanation/algorithm.md, "The data path"):

1. intensity window: the volume's 0.5 / 99.5 percentiles ``[lo, hi]``, clip, map to [-1, 1];
2. every slice ``volume[k]`` padded to a centred square (value -1) and resized to the model side;
3. guided sampling (``sampling.guided``), the slices of several volumes sharing one batch, each
   with its own random stream keyed ``"<case>/<k>"``;
4. the resize and padding inverted, the slices restacked in order and mapped back to
   ``[lo, hi]`` (original intensity units, float32, the input's shape, clipped to the window).

With ``N = 0`` the sampler is the identity and the output is the input clipped to its window,
without the (lossy) resize round trip.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch

from nnunet_sddm.data.slices import PERCENTILES, IntensityWindow, SquareResize, model_slices_to_volume, \
    volume_to_model_slices
from nnunet_sddm.diffusion.model_folder import LoadedModel
from nnunet_sddm.sampling.guided import SamplerSettings, guided_sample
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.progress import progress_bar

#: Default slices per sampler batch on each device type.
DEFAULT_BATCH = {"cpu": 16, "cuda": 64, "mps": 16}


def default_batch_size(device: torch.device) -> int:
    return DEFAULT_BATCH.get(torch.device(device).type, 16)


def window_only(volume: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """The exact result of N = 0: the volume clipped to its intensity window (float32)."""
    return np.clip(np.asarray(volume, dtype=np.float32), np.float32(window.lo), np.float32(window.hi))


@dataclass
class _InFlight:
    window: IntensityWindow
    resize: SquareResize
    slices: torch.Tensor            # (z, 1, S, S) model-space references
    out: torch.Tensor               # (z, 1, S, S) adapted
    remaining: int = field(default=0)


def iter_adapted(volumes: Iterable[Tuple[str, np.ndarray]], loaded: LoadedModel, settings: SamplerSettings,
                 percentiles: Tuple[float, float] = PERCENTILES,
                 batch_size: Optional[int] = None, amp: Optional[str] = None, progress: bool = True,
                 total_slices: Optional[int] = None, desc: str = "adapting",
                 pad_batches: bool = True) -> Iterator[Tuple[str, np.ndarray]]:
    """Adapt ``(case, volume (z, y, x))`` pairs, yielding ``(case, adapted (z, y, x) float32)`` as soon
    as each volume's last slice is done. Volumes are pulled lazily, only when the batch needs more
    slices, so memory stays bounded for any number of volumes. Case names must be unique.
    ``loaded`` and ``settings`` must have been checked together (``pipeline.Adapter`` does);
    ``percentiles``: the intensity window the model was trained with.

    ``pad_batches``: fill the last, partial batch up to ``batch_size`` with throw-away copies, so
    that every sampler call has the same shape. Batched kernels (oneDNN, cuDNN) may round
    differently for different batch SHAPES but give a slice the same bits whatever its batch
    neighbours; padding therefore makes results bit-identical for a given batch size however the
    slices are grouped: resumed runs, other case subsets, other rank counts. Costs at most one
    batch per call. Never done with ``settings.reference_behaviour``: DDA's single batch-wide norm
    would include the copies (the last batch is sampled as it is, as DDA does).
    """
    device = next(loaded.model.parameters()).device
    batch_size = int(batch_size or default_batch_size(device))
    if batch_size < 1:
        raise SDDMError(f"--batch-size must be >= 1, got {batch_size}")
    size = int(loaded.image_size)
    source = iter(volumes)
    queue: deque = deque()
    state: Dict[str, _InFlight] = {}
    seen = set()
    bar = progress_bar(total=total_slices, desc=desc, unit="slice", disable=not progress)
    exhausted = False
    try:
        while True:
            while not exhausted and len(queue) < batch_size:
                try:
                    case, volume = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if case in seen:
                    raise SDDMError(f"case {case!r} given twice")
                seen.add(case)
                volume = np.asarray(volume)
                if volume.ndim != 3:
                    raise SDDMError(f"{case}: expected a 3D volume (z, y, x), got shape {volume.shape}")
                window = IntensityWindow.fit(volume, percentiles, name=case)
                if settings.N == 0:
                    bar.update(volume.shape[0])
                    yield case, window_only(volume, window)
                    continue
                slices, window, resize = volume_to_model_slices(volume, size, window=window, name=case)
                state[case] = _InFlight(window, resize, slices, torch.empty_like(slices), volume.shape[0])
                queue.extend((case, z) for z in range(volume.shape[0]))
            if not queue:
                break
            batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
            y0 = torch.cat([state[c].slices[z:z + 1] for c, z in batch])
            keys = [f"{c}/{z}" for c, z in batch]
            n_pad = batch_size - len(batch) if pad_batches and not settings.reference_behaviour else 0
            if n_pad:
                y0 = torch.cat([y0, y0[:1].expand(n_pad, -1, -1, -1)])
                keys += [f"\x00padding/{j}" for j in range(n_pad)]
            x = guided_sample(loaded, y0.to(device, non_blocking=True), settings, keys, amp=amp)[:len(batch)].cpu()
            for (c, z), xs in zip(batch, x):
                s = state[c]
                s.out[z] = xs
                s.remaining -= 1
                if s.remaining == 0:
                    del state[c]
                    yield c, model_slices_to_volume(s.out, s.window, s.resize)
            bar.update(len(batch))
    finally:
        bar.close()
