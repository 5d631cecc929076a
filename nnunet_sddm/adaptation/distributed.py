"""Distributed adaptation under ``torchrun``: one process per device, cases split over ranks.

Every slice's randomness comes from its own ``(seed, "case/z")`` stream (``sampling.guided``), so
a case gives the same output whichever rank adapts it: the split changes nothing but the speed.
Outside ``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment) everything is a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

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


def init_from_env(device: Optional[str] = None) -> Ranks:
    """Join the ``torchrun`` process group if the environment describes one (gloo on the CPU,
    nccl on CUDA); a single process otherwise. Safe to call more than once.

    With CUDA the rank's device (``cuda:LOCAL_RANK`` unless ``device`` names one) is made the
    current device before NCCL starts: NCCL's collectives (``all_gather_object``, ``barrier``) run
    on ``torch.cuda.current_device()``, which would otherwise be ``cuda:0`` on every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    ranks = Ranks(rank=rank, world_size=world, local_rank=local)
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith(("cuda", "auto")))
        if use_cuda:
            torch.cuda.set_device(resolve_device(device, ranks))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ranks


def shard(items: Sequence[T], ranks: Ranks) -> List[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank``."""
    return list(items[ranks.rank::ranks.world_size])


def barrier(ranks: Ranks) -> None:
    """Wait for all ranks (no-op in a single process)."""
    if ranks.distributed and dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's ``obj`` on every rank (identity in a single process)."""
    if not (ranks.distributed and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def resolve_device(device: Optional[str], ranks: Ranks = Ranks()) -> torch.device:
    """``None``/``"auto"``: this rank's CUDA device if there is one, else the CPU; ``"cuda"`` under
    torchrun means ``cuda:LOCAL_RANK``; anything else is passed to ``torch.device``."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SDDMError(f"--device {device!r} is not a valid torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SDDMError("--device cuda requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", ranks.local_rank % max(torch.cuda.device_count(), 1))
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SDDMError("--device mps requested but MPS is not available")
    return dev
