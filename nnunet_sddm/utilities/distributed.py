"""``torchrun`` set-up shared by diffusion training and adaptation: one process per device.

Adaptation splits cases over the ranks; every slice's randomness comes from its own
``(seed, "case/z")`` stream (``sampling.guided``), so the split changes nothing but the speed.
Diffusion training splits each batch. Outside ``torchrun`` (no ``WORLD_SIZE`` > 1 in the
environment) everything is a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from nnunet_sddm.utilities.devices import resolve_device
from nnunet_sddm.utilities.errors import SDDMError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place: ``rank`` in ``[0, world_size)``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env() -> Ranks:
    """This process's place from torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (without
    joining a process group)."""
    return Ranks(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: Optional[str] = None) -> Ranks:
    """Join the ``torchrun`` process group if the environment describes one (gloo on the CPU,
    nccl on CUDA when every local rank has its own GPU, gloo otherwise); a single process
    otherwise. Safe to call more than once.

    With CUDA the rank's device (``cuda:LOCAL_RANK`` unless ``device`` names one) is made the
    current device before NCCL starts: NCCL's collectives (``all_gather_object``, ``barrier``) run
    on ``torch.cuda.current_device()``, which would otherwise be ``cuda:0`` on every rank."""
    ranks = ranks_from_env()
    if not ranks.distributed:
        return Ranks()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith(("cuda", "auto")))
        if use_cuda:
            torch.cuda.set_device(resolve_device(device, ranks.local_rank))
        # NCCL refuses two ranks on one GPU: with more local ranks than GPUs, the (CPU) gloo backend
        # carries the few small collectives adaptation needs
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(ranks.world_size)))
        nccl = use_cuda and local_world <= torch.cuda.device_count()
        dist.init_process_group(backend="nccl" if nccl else "gloo")
    return ranks


def shard(items: Sequence[T], ranks: Ranks) -> List[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank``."""
    return list(items[ranks.rank::ranks.world_size])


def barrier(ranks: Ranks) -> None:
    """Wait for all ranks (no-op in a single process)."""
    if ranks.distributed and dist.is_initialized():
        dist.barrier()


def all_ok(ok: bool, message: str, ranks: Ranks) -> None:
    """Raise ``SDDMError(message)`` on every rank if any rank reports ``ok=False``."""
    if ranks.distributed and dist.is_initialized():
        flags = [None] * ranks.world_size
        dist.all_gather_object(flags, (bool(ok), message))
        bad = [m for good, m in flags if not good]
        if bad:
            raise SDDMError(bad[0])
    elif not ok:
        raise SDDMError(message)
