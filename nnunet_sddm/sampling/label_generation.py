"""New anatomies from a label-map generator (``nnUNetv2_sddm_generate_labels``).

Notation: N maps are drawn in batches of ``B`` (case ``i`` in batch ``b = i // B``). Draw ``r``
(0, 1, ..) of batch ``b`` samples, with the respaced chain of K steps, one map for each of the
batch's cases still pending, all random numbers from a CPU generator seeded with
``SeedSequence([seed, b, r])``. Each sample ``(C, S, S)`` is decoded (argmax, diffusion/label_maps.py),
brought to the output grid (``SliceGeometry``, nearest-neighbour), cleaned
(data/label_cleaning.py) and accepted if it holds every structure; the others wait for draw
``r + 1``, up to ``max_draws`` draws (then ``SDDMError``, nothing written). The result is a pure
function of (model, seed, N, B, K, geometry).

Output (built in a staging folder, renamed at the end)::

    OUT/labelsTr/<case>.nii.gz   one slice per file, a (1, h, w) volume (NIfTI x, y, z = w, h, 1) of
                                 the geometry's spacing, axis-aligned, origin 0
    OUT/cases.json               settings, model, geometry, labels, and per case its batch, draws and
                                 the structures each rejected draw lacked
    OUT/shape_report.md, OUT/shape_stats.csv   evaluation/label_shapes.py (vs --real when given)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

import nnunet_sddm
from nnunet_sddm.data.label_cleaning import clean_label_map, missing_structures
from nnunet_sddm.data.raw_dataset import make_nifti
from nnunet_sddm.data.volumes import save_nifti
from nnunet_sddm.diffusion.conditioning import dataset_labels, require_label_generator
from nnunet_sddm.diffusion.label_maps import (SliceGeometry, dataset_geometry, decode_label_maps, label_names,
                                              model_geometry, to_slice_grid)
from nnunet_sddm.diffusion.model_folder import LoadedModel, load_model
from nnunet_sddm.utilities.devices import resolve_device
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import read_json, staging_dir, write_json
from nnunet_sddm.utilities.nnunet_paths import find_raw_dataset
from nnunet_sddm.utilities.progress import progress_bar

PathLike = Union[str, os.PathLike]

#: The record of a generation run in its output folder.
CASES_FILE = "cases.json"


def read_map_records(out_dir: Union[str, os.PathLike]) -> Optional[List[dict]]:
    """The per-map records (``cases``) of a generator output's ``OUT/cases.json``; None when
    ``out_dir`` has no such record (a raw dataset's ``cases.json`` is a list of records).
    ``SDDMError`` naming the file when it is not valid JSON or its ``cases`` are not records."""
    p = Path(out_dir) / CASES_FILE
    data = read_json(p) if p.is_file() else None
    if not isinstance(data, dict) or "cases" not in data:
        return None
    if not isinstance(data["cases"], list) or not all(isinstance(r, dict) and "case" in r for r in data["cases"]):
        raise SDDMError(f"{p}: expected the generator's 'cases' to be records, each with a 'case' key")
    return data["cases"]


@dataclass(frozen=True)
class GenerationSettings:
    """``n`` maps, ``seed``, ``steps`` of the respaced chain (None: ``diffusion.sample_respacing``),
    ``batch_size`` maps per batch, at most ``max_draws`` draws per case."""

    n: int
    seed: int = 0
    steps: Optional[int] = None
    batch_size: int = 16
    max_draws: int = 20

    def check(self) -> None:
        for name in ("n", "batch_size", "max_draws"):
            if int(getattr(self, name)) < 1:
                raise SDDMError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class GeneratedMap:
    """One accepted map: ``case``, its ``batch``, the ``draws`` it took and, per rejected draw, the
    missing structure values; ``label_map (h, w)`` int16 on the output grid."""

    case: str
    batch: int
    draws: int
    rejected: List[List[int]]
    label_map: np.ndarray


def draw_generator(seed: int, batch: int, draw: int) -> torch.Generator:
    """The CPU generator of draw ``draw`` of batch ``batch``."""
    state = np.random.SeedSequence([int(seed), int(batch), int(draw)]).generate_state(2, np.uint64)[0] >> 1
    return torch.Generator().manual_seed(int(state))


def case_names(n: int) -> List[str]:
    """``gen_0000`` .. (at least 4 digits)."""
    width = max(4, len(str(max(0, n - 1))))
    return [f"gen_{i:0{width}d}" for i in range(n)]


@torch.no_grad()
def sample_label_maps(loaded: LoadedModel, settings: GenerationSettings, geometry: SliceGeometry,
                      progress: bool = True) -> List[GeneratedMap]:
    """The N accepted, cleaned maps of the module docstring (``SDDMError`` naming the cases that
    found no valid map in ``max_draws`` draws)."""
    settings.check()
    require_label_generator(loaded.config, loaded.model_dir)
    values = [int(v) for v in loaded.config["model"]["label_values"]]
    spaced = loaded.spaced_diffusion(settings.steps)
    device = next(loaded.model.parameters()).device
    size, channels = loaded.image_size, loaded.in_channels
    names = case_names(settings.n)
    out: List[Optional[GeneratedMap]] = [None] * settings.n
    rejected: Dict[int, List[List[int]]] = {i: [] for i in range(settings.n)}
    bs = int(settings.batch_size)
    batches = range(0, settings.n, bs)
    for b, start in enumerate(progress_bar(batches, desc="label maps", unit="batch", disable=not progress)):
        pending = list(range(start, min(start + bs, settings.n)))
        for r in range(int(settings.max_draws)):
            if not pending:
                break
            x = spaced.p_sample_loop(loaded.model, (len(pending), channels, size, size),
                                     generator=draw_generator(settings.seed, b, r), device=device)
            maps = to_slice_grid(decode_label_maps(x, values), geometry)
            still = []
            for i, lab in zip(pending, maps):
                lab = clean_label_map(lab, values)
                missing = missing_structures(lab, values)
                if missing:
                    rejected[i].append(missing)
                    still.append(i)
                else:
                    out[i] = GeneratedMap(names[i], b, r + 1, rejected[i], lab)
            pending = still
        if pending:
            raise SDDMError(f"{loaded.model_dir}: no map with every structure {values} in {settings.max_draws} draws "
                            f"for cases {[names[i] for i in pending][:10]} (seed {settings.seed}); train the model "
                            f"longer or allow more draws (--max-draws)")
    return [m for m in out if m is not None]


def _reference_labels(dataset: Path, labels: Dict[str, int], role: str) -> None:
    fg = {k: v for k, v in dataset_labels(dataset).items() if v != 0}
    if fg != labels:
        raise SDDMError(f"{role} {dataset}: its dataset.json labels {fg} differ from the model's {labels}")


def generate_label_maps(model: Union[PathLike, LoadedModel], out_dir: PathLike, settings: GenerationSettings,
                        like: Optional[str] = None, real: Optional[str] = None, overwrite: bool = False,
                        device: Optional[str] = None, progress: bool = True) -> Path:
    """Sample, clean and write ``settings.n`` label maps into ``out_dir`` (module docstring). The
    grid: the median slice geometry of raw dataset ``like`` (``dataset_geometry``), else the model's
    ``data.label_geometry``; ``real``: a raw dataset whose ``labelsTr`` slices the shape report
    compares with (same labels as the model). ``SDDMError`` before any work for an existing
    ``out_dir`` without ``overwrite``, an image model, or datasets with other labels."""
    from nnunet_sddm.adaptation.pipeline import weights_digest
    from nnunet_sddm.evaluation.label_shapes import folder_stats, write_shape_report

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SDDMError(f"{out_dir} already exists; use --overwrite to replace it")
    settings.check()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, resolve_device(device))
    require_label_generator(loaded.config, loaded.model_dir)
    labels = label_names(loaded.config)
    like_folder = find_raw_dataset(like) if like is not None else None
    geometry = dataset_geometry(like_folder) if like_folder is not None else model_geometry(loaded.config,
                                                                                            loaded.model_dir)
    real_folder = find_raw_dataset(real) if real is not None else None
    if real_folder is not None:
        _reference_labels(real_folder, labels, "--real dataset")
    maps = sample_label_maps(loaded, settings, geometry, progress=progress)
    steps = settings.steps or loaded.config["diffusion"].get("sample_respacing") or loaded.diffusion.num_timesteps
    record: Dict[str, Any] = {
        "package_version": nnunet_sddm.__version__, "model": str(Path(loaded.model_dir).resolve()),
        "weights": weights_digest(loaded), "seed": int(settings.seed), "n": int(settings.n), "steps": int(steps),
        "batch_size": int(settings.batch_size), "max_draws": int(settings.max_draws),
        "geometry": {**geometry.to_json(), "from": f"--like {like_folder.name}" if like_folder else "model"},
        "labels": {"background": 0, **labels}, "total_draws": int(sum(m.draws for m in maps)),
        "cases": [{"case": m.case, "file": f"labelsTr/{m.case}.nii.gz", "batch": m.batch, "draws": m.draws,
                   "rejected_missing": m.rejected} for m in maps],
    }
    dtype = np.uint8 if max(labels.values()) <= 255 else np.int16
    with staging_dir(out_dir, overwrite=overwrite) as tmp:
        for m in maps:
            save_nifti(make_nifti(m.label_map[None], geometry.spacing, dtype), tmp / "labelsTr" / f"{m.case}.nii.gz")
        write_json(record, tmp / CASES_FILE)
        generated = folder_stats(tmp / "labelsTr", labels)
        real_stats = folder_stats(real_folder / "labelsTr", labels) if real_folder is not None else None
        write_shape_report(tmp, generated, real_stats, generated_from=str(out_dir / "labelsTr"),
                           real_from=None if real_folder is None else str(real_folder / "labelsTr"))
    return out_dir
