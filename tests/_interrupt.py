"""Simulated interruptions of adaptation runs (Ctrl-C after some outputs are written)."""
from __future__ import annotations

from typing import List


def interrupt_after_writes(monkeypatch, n: int = 1) -> List:
    """Make the adaptation's writer (``pipeline.write_like``) raise KeyboardInterrupt once ``n``
    outputs are written; returns the list of the outputs written so far."""
    import nnunet_sddm.adaptation.pipeline as pipeline

    real_write, calls = pipeline.write_like, []

    def interrupted(data, template, path):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(path)
        return real_write(data, template, path)

    monkeypatch.setattr(pipeline, "write_like", interrupted)
    return calls
