"""Simulated interruptions of adaptation runs (Ctrl-C after some outputs are written)."""
from __future__ import annotations

from typing import List


def interrupt_after_writes(monkeypatch, n: int = 1) -> List:
    """Make the adaptation's writer (``folders.write_like``) raise KeyboardInterrupt once ``n``
    outputs are written; returns the list of the outputs written so far."""
    import nnunet_sddm.adaptation.folders as folders

    real_write, calls = folders.write_like, []

    def interrupted(data, template, path):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(path)
        return real_write(data, template, path)

    monkeypatch.setattr(folders, "write_like", interrupted)
    return calls
