"""One adaptation pipeline: open the diffusion model once, check once, adapt arrays or files.

Every adaptation path of the package is a thin caller of :class:`Adapter`:

- ``nnUNetv2_sddm_adapt`` (``folders.adapt_folder``): a folder of images into a folder;
- ``nnUNetv2_sddm_synthesize`` (``synthesize.synthesize_dataset``): a raw dataset into a new one;
- ``nnUNetv2_sddm_sweep`` (``sweep.sweep_grid``): one slice under many settings;
- ``nnUNetv2_sddm_predict`` (``predictor.sddm_predict``): arrays inside nnU-Net's prediction.

``Adapter.open`` does the opening they share: the process's place under ``torchrun``, the device,
the model (EMA weights of a model folder or ``DATASET[:PRESET]``), the model-versus-settings
check (single-channel model, image size, N and steps within the chain). ``check_images`` is the one
input validation (every image read as the adaptation will read it: 3D, finite, not constant; in
spacing mode also a valid in-plane voxel spacing), run before anything is written. The voxel
spacing of every volume reaches the sampler's data path: ``adapt_files`` reads it with the image,
``adapt_arrays`` takes it as ``spacings`` (required only by a model in spacing mode). ``adapt_files`` writes outputs atomically with the input's geometry
and enters each finished output in the run's :class:`~nnunet_sddm.adaptation.record.RunRecord`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import nnunet_sddm
from nnunet_sddm.adaptation.record import RunRecord, sha256_file
from nnunet_sddm.adaptation.volumes import VolumeItem, default_batch_size, iter_adapted
from nnunet_sddm.data.raw_dataset import case_of
from nnunet_sddm.data.slices import IntensityWindow, configured_percentiles, inplane_spacing, working_spacing
from nnunet_sddm.data.volumes import read_volume, write_like
from nnunet_sddm.diffusion.model_folder import EMA_FILE, RAW_FILE, LoadedModel, load_model, resolve_model_dir
from nnunet_sddm.sampling.guided import AMP_DTYPES, SamplerSettings
from nnunet_sddm.utilities import distributed as dist_utils
from nnunet_sddm.utilities.devices import DeviceLike, resolve_device
from nnunet_sddm.utilities.errors import SDDMError

PathLike = Union[str, os.PathLike]

#: What ``Adapter.open`` takes as the model: a loaded model, a model folder or ``DATASET[:PRESET]``.
ModelSpec = Union[LoadedModel, PathLike]


def load_spec(model: ModelSpec, device: torch.device) -> LoadedModel:
    """A ``LoadedModel`` on ``device``: the given one (moved), or the EMA weights of a model
    folder / ``DATASET[:PRESET]`` spec (conditional or not)."""
    if isinstance(model, LoadedModel):
        model.model.to(device)
        return model
    return load_model(resolve_model_dir(str(model)), device, use_ema=True)


def open_model(model: ModelSpec, device: torch.device) -> LoadedModel:
    """``load_spec`` of an unconditional model (adaptation calls the network without a condition;
    ``SDDMError`` naming the folder for a mask-conditioned one)."""
    from nnunet_sddm.diffusion.conditioning import require_unconditional

    if isinstance(model, LoadedModel):
        require_unconditional(model.config, model.model_dir, "adaptation")
    loaded = load_spec(model, device)
    require_unconditional(loaded.config, loaded.model_dir, "adaptation")
    return loaded


def weights_digest(loaded: LoadedModel) -> Optional[Dict[str, str]]:
    """``{file name: sha256}`` of the weight files of the model's folder (``ema.safetensors``, which
    adaptation loads, and ``model.safetensors``, its fallback); ``None`` if it holds none."""
    files = [Path(loaded.model_dir) / name for name in (EMA_FILE, RAW_FILE)]
    digest = {f.name: sha256_file(f) for f in files if f.is_file()}
    return digest or None


def model_identity(loaded: LoadedModel) -> Dict[str, Any]:
    """The model part of a run's identity: package version, model folder, the digest of its
    weights and its ``config.json``."""
    return {
        "package_version": nnunet_sddm.__version__,
        "model": str(Path(loaded.model_dir).resolve()),
        "weights": weights_digest(loaded),
        "model_config": loaded.config,
    }


@dataclasses.dataclass(frozen=True)
class Adapter:
    """An opened diffusion model with checked sampler settings, ready to adapt.

    Attributes:
        loaded: the model (eval mode) on its device.
        settings: sampler settings, checked against the model.
        ranks: this process's place under ``torchrun`` (a single process otherwise).
        batch_size: slices per sampler call (``None``: 16 on CPU/MPS, 64 on CUDA).
        amp: ``None`` (fp32), ``"bf16"`` or ``"fp16"`` (CUDA) autocast of the network.
        progress: show progress bars (on rank 0).
    """

    loaded: LoadedModel
    settings: SamplerSettings
    ranks: dist_utils.Ranks = dist_utils.Ranks()
    batch_size: Optional[int] = None
    amp: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise SDDMError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise SDDMError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {self.amp!r}")
        if self.loaded.in_channels != 1:
            raise SDDMError(f"{self.name} expects {self.loaded.in_channels} input channels but the images are "
                            f"single-channel (cine MR): use a model trained on 1-channel slices")
        self.settings.check_model(self.loaded.image_size, self.loaded.diffusion.num_timesteps, name=self.name)

    @classmethod
    def open(cls, model: ModelSpec, settings: SamplerSettings, *, device: DeviceLike = None,
             batch_size: Optional[int] = None, amp: Optional[str] = None, progress: bool = True,
             ranks: Optional[dist_utils.Ranks] = None) -> "Adapter":
        """Join ``torchrun``'s process group if there is one, choose the device (``auto``: CUDA,
        MPS, CPU; under torchrun this rank's GPU), load the model and check it with ``settings``."""
        ranks = ranks or dist_utils.init_from_env(None if device is None else str(device))
        loaded = open_model(model, resolve_device(device, ranks.local_rank))
        return cls(loaded, settings, ranks, None if batch_size is None else int(batch_size), amp, bool(progress))

    def with_settings(self, settings: SamplerSettings) -> "Adapter":
        """The same model with other (checked) settings: e.g. another seed or D/N/tau."""
        return dataclasses.replace(self, settings=settings)

    # ------------------------------------------------------------------ facts
    @property
    def name(self) -> str:
        return f"model {self.loaded.model_dir}"

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    @property
    def percentiles(self) -> Tuple[float, float]:
        """The intensity percentiles ``(lo, hi)`` the model's training slices were normalised with
        (``data.percentiles``; default 0.5 / 99.5): adaptation uses the same."""
        return configured_percentiles(self.loaded.data_config)

    @property
    def spacing(self) -> Optional[float]:
        """The model's in-plane working spacing in mm (``data.spacing``; None: resize mode)."""
        return working_spacing(self.loaded.data_config)

    @property
    def effective_batch_size(self) -> int:
        return int(self.batch_size or default_batch_size(self.device))

    def identity(self, **extra: Any) -> Dict[str, Any]:
        """The JSON-able description of a run with this adapter (package version, model folder and
        the digest of its weights, settings, amp; ``batch_size`` only where it changes results:
        DDA's batch-wide norm), plus ``extra``."""
        rec: Dict[str, Any] = {**model_identity(self.loaded), "settings": self.settings.to_dict(), "amp": self.amp}
        if self.settings.reference_behaviour:
            rec["batch_size"] = self.batch_size
        rec.update(extra)
        return rec

    # ------------------------------------------------------------------ inputs
    def check_images(self, paths: Sequence[PathLike], reader_writer: Any = None) -> List[int]:
        """Read every image as the adaptation will (3D, finite, not constant: ``SDDMError`` naming
        the file otherwise); returns their slice counts."""
        counts = []
        for p in paths:
            vol = read_volume(p, reader_writer) if reader_writer is not None else read_volume(p)
            IntensityWindow.fit(vol.data, self.percentiles, name=str(p))
            if self.spacing is not None:
                inplane_spacing(vol.spacing, name=str(p))
            counts.append(vol.num_slices)
        return counts

    # ------------------------------------------------------------------ arrays
    def iter_adapted(self, volumes: Iterable[VolumeItem], total_slices: Optional[int] = None,
                     desc: str = "adapting", pad_batches: bool = True) -> Iterator[Tuple[str, np.ndarray]]:
        """``(case, (z, y, x))`` or ``(case, (z, y, x), spacing (z, y, x) mm)`` -> ``(case, adapted
        (z, y, x) float32)`` as each volume is done (see ``volumes.iter_adapted``)."""
        return iter_adapted(volumes, self.loaded, self.settings, self.percentiles, batch_size=self.batch_size, amp=self.amp,
                            progress=self.progress and self.ranks.is_main, total_slices=total_slices, desc=desc,
                            pad_batches=pad_batches)

    def adapt_arrays(self, volumes: Mapping[str, np.ndarray],
                     spacings: Optional[Mapping[str, Sequence[float]]] = None,
                     pad_batches: bool = True) -> Dict[str, np.ndarray]:
        """Adapt ``{case: (z, y, x)}`` (any intensity units) -> ``{case: (z, y, x) float32}`` in the
        input's units, shape and order; slices of all volumes share sampler batches.
        ``spacings``: ``{case: (z, y, x) voxel spacing in mm}``, needed by a model in spacing mode
        (``SDDMError`` naming the case if one is missing)."""
        spacings = spacings or {}
        total = sum(int(np.shape(v)[0]) for v in volumes.values() if np.ndim(v) == 3)
        items = ((case, v, spacings.get(case)) for case, v in volumes.items())
        done = dict(self.iter_adapted(items, total_slices=total, pad_batches=pad_batches))
        return {case: done[case] for case in volumes}

    # ------------------------------------------------------------------ files
    def adapt_files(self, pairs: Sequence[Tuple[PathLike, PathLike]], record: RunRecord,
                    seed_keys: Optional[Sequence[str]] = None,
                    slice_counts: Optional[Mapping[Path, int]] = None) -> List[Path]:
        """Adapt ``(input image, output path)`` pairs whose outputs ``record`` does not list as
        finished; each output gets the input's exact geometry, is written atomically and is then
        entered in ``record``. ``seed_keys`` name each pair's random streams (default: the input's
        case id). With several ranks the pairs are split over them. Returns the outputs this
        process wrote. The caller has opened ``record`` (rank 0) or loaded it (other ranks).
        ``slice_counts``: ``{input: slices}`` from the caller's ``check_images`` (those inputs are
        not read and checked again)."""
        def results(items: Sequence[Tuple[Path, str]], total: int, desc: str) -> Iterator[Tuple[str, np.ndarray]]:
            def volumes() -> Iterator[VolumeItem]:
                for i, k in items:
                    vol = read_volume(i)
                    yield k, vol.data, vol.spacing

            return self.iter_adapted(volumes(), total_slices=total, desc=desc)

        return run_file_jobs(pairs, record, self.ranks, self.check_images, results, seed_keys=seed_keys,
                             slice_counts=slice_counts, desc="adapting")


#: ``(input, key) pairs, their total slices, a progress label`` -> ``(key, result (z, y, x))`` as each is done.
FileResults = Callable[[Sequence[Tuple[Path, str]], int, str], Iterator[Tuple[str, np.ndarray]]]


def run_file_jobs(pairs: Sequence[Tuple[PathLike, PathLike]], record: RunRecord, ranks: dist_utils.Ranks,
                  check: Callable[[List[Path]], List[int]], results: FileResults,
                  seed_keys: Optional[Sequence[str]] = None, slice_counts: Optional[Mapping[Path, int]] = None,
                  desc: str = "adapting") -> List[Path]:
    """The file loop of every run into a recorded folder (``Adapter.adapt_files``, label-conditioned
    synthesis): the ``(input, output)`` pairs whose outputs ``record`` does not list as finished are
    checked (``check``: slice counts, ``SDDMError`` naming the file; skipped for inputs in
    ``slice_counts``), split over the ranks and computed by ``results``; each result is written
    atomically with its input's geometry (``write_like``) and entered in ``record``. ``seed_keys``
    name each pair's random streams (default: the input's case id). Returns the outputs this
    process wrote."""
    pairs = [(Path(i), Path(o)) for i, o in pairs]
    keys = list(seed_keys) if seed_keys is not None else [case_of(i) for i, _ in pairs]
    if len(set(keys)) != len(keys):
        raise SDDMError("two inputs share a case id (their random streams would coincide)")
    for i, o in pairs:
        if i.resolve() == o.resolve():
            raise SDDMError(f"{o}: output would overwrite its own input")
    todo = [(i, o, k) for (i, o), k in zip(pairs, keys) if not record.is_finished(o)]
    if not todo:
        return []
    known = dict(slice_counts or {})
    unchecked = [i for i, _, _ in todo if i not in known]
    known.update(zip(unchecked, check(unchecked)))
    counts = [known[i] for i, _, _ in todo]
    dist_utils.barrier(ranks)  # every rank has listed its work before anyone writes
    mine = dist_utils.shard(list(zip(todo, counts)), ranks)
    by_key = {k: (i, o) for (i, o, k), _ in mine}
    written = []
    desc = desc + (f" [rank {ranks.rank}]" if ranks.distributed else "")
    for key, result in results([(i, k) for (i, _, k), _ in mine], sum(c for _, c in mine), desc):
        src, out = by_key[key]
        write_like(result, src, out)
        record.mark_finished(out)
        written.append(out)
    return written


def adapt_arrays(volumes: Mapping[str, np.ndarray], model: ModelSpec, settings: SamplerSettings,
                 batch_size: Optional[int] = None, device: DeviceLike = None, amp: Optional[str] = None,
                 progress: bool = True, pad_batches: bool = True,
                 spacings: Optional[Mapping[str, Sequence[float]]] = None) -> Dict[str, np.ndarray]:
    """Adapt many volumes ``{case: (z, y, x)}`` with slices batched across volumes (one process).

    Args:
        volumes: arrays in any intensity units (finite, not constant), nnU-Net axis order.
        model: a ``LoadedModel``, a model folder or a ``DATASET[:PRESET]`` spec.
        settings: sampler settings (checked against the model).
        batch_size: slices per sampler call (default 16 on CPU, 64 on CUDA).
        device: where to run (default: where a given ``LoadedModel`` is, else the CPU).
        amp: None, ``"bf16"`` or ``"fp16"`` (CUDA) autocast of the network.
        pad_batches: pad the last batch to ``batch_size`` (bit-identical results for a given
            batch size however the slices are grouped; see ``volumes.iter_adapted``).
        spacings: ``{case: (z, y, x) voxel spacing in mm}``; required by a model in spacing mode
            (``data.spacing``), unused in resize mode.

    Returns:
        ``{case: (z, y, x) float32}`` in the input's intensity units and shape, in input order.
    """
    if device is None:
        device = next(model.model.parameters()).device if isinstance(model, LoadedModel) else "cpu"
    adapter = Adapter.open(model, settings, device=device, batch_size=batch_size, amp=amp, progress=progress,
                           ranks=dist_utils.Ranks())
    return adapter.adapt_arrays(volumes, spacings=spacings, pad_batches=pad_batches)
