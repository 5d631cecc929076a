"""Figures without pyplot: ``matplotlib.figure.Figure`` objects need no display and no backend
switch (so the library never changes a notebook's backend), hold no global state, and are written
as PNG atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from nnunet_sddm.utilities.files import atomic_path


def figure(**kwargs: Any):
    """A new ``matplotlib.figure.Figure`` (``figsize``, ``dpi`` ... as for ``plt.figure``)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(fig, path: os.PathLike, dpi: Optional[float] = None) -> Path:
    """Write ``fig`` to ``path`` as PNG (temporary name, then rename); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
