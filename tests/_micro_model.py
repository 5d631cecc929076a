"""A micro diffusion model for tests (untrained ``tiny`` at 32 x 32) and one torch thread while
its tiny tensors are processed (thread synchronisation costs more than it gains on 2 busy cores)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

MICRO = {"model.image_size": 32, "model.channel_mult": [1, 1], "model.attention_resolutions": [],
         "model.num_head_channels": -1, "diffusion.steps": 50}


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """``torch.set_num_threads(1)`` for the block; the previous count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def micro_model_folder(parent: Path, randomise_output: bool = False, overrides: Optional[dict] = None) -> Path:
    """A saved micro model folder under ``parent``. ``randomise_output``: the zero-initialised output
    layer gets N(0, 0.05^2) weights (generator seed 1), so the network's output and its gradient are
    not trivially zero (saved, so that CLIs load the same weights). ``overrides``: further
    ``SECTION.KEY`` settings over ``MICRO`` (e.g. ``{"data.spacing": 2.0}``)."""
    from nnunet_sddm.diffusion.model_folder import EMA_FILE, create_model_folder, load_weights, save_weights

    folder = create_model_folder(parent, "tiny", overrides={**MICRO, **(overrides or {})}, seed=0)
    if randomise_output:
        state = load_weights(folder / EMA_FILE)
        g = torch.Generator().manual_seed(1)
        for k in state:
            if k.startswith("out."):
                state[k] = torch.randn(state[k].shape, generator=g) * 0.05
        save_weights(state, folder / EMA_FILE)
    return folder
