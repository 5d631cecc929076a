"""Device choice, one rule for every command: ``auto`` means CUDA, then MPS, then the CPU.

Under ``torchrun`` a bare ``cuda`` (or ``auto`` on a CUDA machine) means this process's GPU,
``cuda:LOCAL_RANK``. nnU-Net's own commands take only a device type (``-device cpu|cuda|mps``):
``nnunet_device`` gives it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from nnunet_sddm.utilities.errors import SDDMError

DeviceLike = Union[None, str, torch.device]


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def resolve_device(device: DeviceLike, local_rank: int = 0) -> torch.device:
    """``None``/``"auto"`` -> ``cuda:local_rank`` if CUDA is available, else ``mps``, else ``cpu``;
    ``"cuda"`` -> ``cuda:local_rank`` (modulo the number of GPUs); anything else is passed to
    ``torch.device``. ``SDDMError`` naming the option for an unknown or unavailable device."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        if torch.cuda.is_available():
            device = "cuda"
        elif mps_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SDDMError(f"--device {device!r} is not a valid torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SDDMError("--device cuda requested but CUDA is not available (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", int(local_rank) % max(torch.cuda.device_count(), 1))
    elif dev.type == "mps" and not mps_available():
        raise SDDMError("--device mps requested but MPS is not available (use --device cpu)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise SDDMError(f"--device {device!r}: only cpu, cuda and mps are supported")
    return dev


def nnunet_device(device: DeviceLike) -> str:
    """The device type nnU-Net's ``-device`` takes (``cpu``, ``cuda`` or ``mps``) for ``device``
    resolved by :func:`resolve_device`."""
    return resolve_device(device).type
