"""Timestep respacing: sample with K of the T training steps (guided-diffusion's rule).

The kept indices ``S = {s_0 < ... < s_{K-1}}`` define a shorter chain whose betas are rebuilt so
that its abar equals the original abar at the kept indices:
``beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}`` (``abar_{s_{-1}} = 1``). The network is always called
with the ORIGINAL index ``s_k`` (``timestep_map``), rescaled by ``1000 / T_original`` if the
process uses ``rescale_timesteps``.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Union

import numpy as np
import torch

from nnunet_sddm.diffusion.gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: Union[int, str, Sequence[int]]) -> List[int]:
    """Kept original indices, sorted.

    ``section_counts``: an int K, a comma string ``"10,15,20"`` or a list: the T steps are cut
    into equal sections and each section keeps its count of evenly strided steps (first and
    last of the section included): exactly guided-diffusion's rule, the float stride added up
    step by step and each sum rounded with Python's ``round``. T = 1000, K = 100 ->
    ``0, 10, 20, ..., 999``; T = 2000, K = 25 keeps 999 (not ``round(12 * 1999 / 24) = 1000``).
    """
    if isinstance(section_counts, str):
        section_counts = [int(x) for x in section_counts.split(",") if x.strip()]
    elif isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    section_counts = list(section_counts)
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"respacing counts must be positive, got {section_counts}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} of {num_timesteps} steps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0  # guided-diffusion adds the stride up in floats; round(k * stride) differs at times
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


class SpacedDiffusion(GaussianDiffusion):
    """A ``GaussianDiffusion`` over the kept steps ``use_timesteps`` of the chain ``betas``.

    Chain indices ``t`` (0..K-1) index this shorter chain; ``timestep_map[t]`` is the original
    index the network sees. Other keyword arguments as ``GaussianDiffusion``.
    """

    def __init__(self, use_timesteps: Iterable[int], betas: Sequence[float], **kwargs):
        self.use_timesteps = sorted(set(int(s) for s in use_timesteps))
        base = GaussianDiffusion(betas, **{**kwargs, "rescale_timesteps": False})
        self.original_num_steps = base.num_timesteps
        if not self.use_timesteps or self.use_timesteps[0] < 0 or self.use_timesteps[-1] >= base.num_timesteps:
            raise ValueError(f"kept timesteps must lie in 0..{base.num_timesteps - 1}")
        new_betas, last = [], 1.0
        for i in self.use_timesteps:
            new_betas.append(1.0 - base.alphas_cumprod[i] / last)
            last = base.alphas_cumprod[i]
        self.timestep_map = np.asarray(self.use_timesteps, dtype=np.int64)
        super().__init__(np.asarray(new_betas), **kwargs)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original index ``timestep_map[t]`` (float ``* 1000/T_original`` if rescaled)."""
        orig = torch.from_numpy(self.timestep_map).to(t.device)[t]
        if self.rescale_timesteps:
            return orig.float() * (1000.0 / self.original_num_steps)
        return orig
