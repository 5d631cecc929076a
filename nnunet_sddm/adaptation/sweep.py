"""Parameter sweeps on one slice: the paper's Fig. 3-5 grids (D, N and tau).

``sweep_grid`` adapts one slice of an image for every combination of the given D, N and tau
values and draws a grid: one row per ``(N, tau)`` pair, column 0 the reference slice, then one
column per D. Every panel is shown in the original slice geometry (the model-space transform of
either mode inverted, pixel aspect from the spacing; in spacing mode the slice is resampled with
the image's spacing and padded for each D) with the volume's intensity window, so panels compare directly.
All panels use the same random stream (key ``"<case>/<z>"``), so differences come from the
settings alone. The settings are recorded in ``OUT.json`` next to ``OUT.png``.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

import nnunet_sddm
from nnunet_sddm.adaptation.pipeline import Adapter, ModelSpec
from nnunet_sddm.adaptation.volumes import model_space_slices
from nnunet_sddm.data.raw_dataset import case_of
from nnunet_sddm.data.slices import IntensityWindow, model_slices_to_volume
from nnunet_sddm.data.volumes import read_volume
from nnunet_sddm.sampling.guided import SamplerSettings, guided_sample
from nnunet_sddm.utilities import distributed as dist_utils
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import write_json
from nnunet_sddm.utilities.plotting import figure, save_figure
from nnunet_sddm.utilities.progress import progress_bar


def sweep_grid(image: Union[str, os.PathLike], model: ModelSpec, out_png: Union[str, os.PathLike],
               Ds: Sequence[int] = (2, 4, 8), Ns: Sequence[int] = (25,), taus: Sequence[float] = (6.0,),
               slice_index: Optional[int] = None, base: Optional[SamplerSettings] = None,
               device: Optional[str] = None, amp: Optional[str] = None, progress: bool = True) -> Path:
    """Write the sweep grid PNG of slice ``slice_index`` (default: the middle one) of ``image``.

    Args:
        image: a 3D image file nnU-Net can read.
        model: ``LoadedModel``, model folder or ``DATASET[:PRESET]``.
        Ds, Ns, taus: the values to sweep (every combination is sampled).
        base: the other sampler settings (steps, seed, reference_behaviour).

    Returns the PNG path.
    """
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise SDDMError(f"{out_png}: the output must be a .png file")
    base = base or SamplerSettings()
    combos = [base.replace(D=int(d), N=int(n), tau=float(t)) for n, t, d in itertools.product(Ns, taus, Ds)]
    if not combos:
        raise SDDMError("nothing to sweep: give at least one value of -D, -N and --tau")
    vol = read_volume(image)
    z = vol.num_slices // 2 if slice_index is None else int(slice_index)
    if not 0 <= z < vol.num_slices:
        raise SDDMError(f"{image}: --slice {z} is outside 0..{vol.num_slices - 1}")
    adapter = Adapter.open(model, combos[0], device=device, amp=amp, progress=progress,
                           ranks=dist_utils.Ranks())
    adapters = [adapter.with_settings(s) for s in combos]  # every combination checked before sampling
    window = IntensityWindow.fit(vol.data, adapter.percentiles, name=str(image))
    key = f"{case_of(Path(image))}/{z}"
    panels = []
    for a in progress_bar(adapters, desc="sweep", unit="setting", disable=not progress):
        # resize mode: the same slices for every D; spacing mode: padded to a multiple of each D
        y0, transform = model_space_slices(vol.data[z:z + 1], window, a.loaded, a.settings.D, vol.spacing,
                                           name=str(image))
        x = guided_sample(a.loaded, y0.to(a.device), a.settings, [key], amp=amp).cpu()
        panels.append(model_slices_to_volume(x, window, transform)[0])
    reference = np.clip(vol.data[z], window.lo, window.hi)
    _draw(out_png, reference, panels, combos, Ds, window, vol.spacing, title=f"{Path(image).name}  slice {z}")
    write_json({"package_version": nnunet_sddm.__version__, "image": str(Path(image).resolve()), "slice": z,
                "model": str(adapter.loaded.model_dir), "D": list(map(int, Ds)),
                "N": list(map(int, Ns)), "tau": list(map(float, taus)), "base_settings": base.to_dict(),
                "amp": amp}, out_png.with_suffix(".json"))
    return out_png


def _draw(out_png: Path, reference: np.ndarray, panels, combos, Ds, window: IntensityWindow, spacing,
          title: str) -> None:
    n_cols = len(Ds) + 1
    n_rows = len(combos) // len(Ds)
    h, w = reference.shape
    aspect = float(spacing[1]) / float(spacing[2]) if len(spacing) == 3 else 1.0
    cell = 2.4
    fig = figure(figsize=(cell * n_cols, (cell * aspect * h / w + 0.35) * n_rows + 0.4))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    kw = dict(cmap="gray", vmin=window.lo, vmax=window.hi, aspect=aspect, interpolation="nearest")
    for r in range(n_rows):
        axes[r, 0].imshow(reference, **kw)
        axes[r, 0].set_title("reference", fontsize=8)
        for c in range(len(Ds)):
            s = combos[r * len(Ds) + c]
            axes[r, c + 1].imshow(panels[r * len(Ds) + c], **kw)
            axes[r, c + 1].set_title(f"D={s.D} N={s.N} tau={s.tau:g}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png, dpi=110)
