"""Adaptation of image files and folders: nnU-Net reader in, identical geometry and name out.

``adapt_folder(IN, OUT)`` adapts every nnU-Net-named image ``CASE_0000<ending>`` of ``IN`` into
``OUT/CASE_0000<ending>`` (same shape, spacing, origin, direction/affine; float32 voxels) and
records the run in ``OUT/sddm_adapt.json``. Each output is written atomically; outputs that
exist already are skipped, so an interrupted run is resumed by running the same command again
(same input folder and cases, model folder and weights, settings; checked against the record).
``overwrite`` deletes the outputs it will rewrite and the old record before it writes the new
record, so no output of an earlier run is ever kept under a new record. Every input is checked (3D,
finite, not constant) before any sampling starts. Under ``torchrun`` the cases are split over
the ranks; the result equals the single-process one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

import nnunet_sddm
from nnunet_sddm.utilities import distributed as dist_utils
from nnunet_sddm.utilities.devices import resolve_device
from nnunet_sddm.adaptation.volumes import iter_adapted, load_for_adaptation, model_percentiles
from nnunet_sddm.data.raw_dataset import list_images
from nnunet_sddm.data.slices import IntensityWindow
from nnunet_sddm.data.volumes import read_volume, write_like
from nnunet_sddm.sampling.guided import SamplerSettings
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import remove_stale_temp, write_json

RECORD_FILE = "sddm_adapt.json"

#: Record fields that must match for a resumed run to continue an earlier one.
_RESUME_KEYS = ("model", "weights", "settings", "amp", "input", "cases")


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(loaded) -> Optional[Dict[str, str]]:
    """``{file name: sha256}`` of the weight files in the model folder the ``LoadedModel`` came from
    (``ema.safetensors``, which adaptation loads, and ``model.safetensors``, its fallback); ``None``
    if the model has no folder or the folder holds no weight file (a model built in memory)."""
    from nnunet_sddm.diffusion.model_folder import EMA_FILE, RAW_FILE

    model_dir = getattr(loaded, "model_dir", None)
    if model_dir is None:
        return None
    files = [Path(model_dir) / name for name in (EMA_FILE, RAW_FILE)]
    digest = {f.name: _sha256(f) for f in files if f.is_file()}
    return digest or None


def run_record(loaded, settings: SamplerSettings, amp: Optional[str], batch_size: Optional[int],
               **extra) -> Dict[str, Any]:
    """The JSON-able description of an adaptation run (package version, model folder and the
    digest of its weight files, settings)."""
    rec = {
        "package_version": nnunet_sddm.__version__,
        "model": str(Path(getattr(loaded, "model_dir", "")).resolve()) if getattr(loaded, "model_dir", None) else None,
        "weights": weights_digest(loaded),
        "model_config": getattr(loaded, "config", None),
        "settings": settings.to_dict(),
        "amp": amp,
    }
    if settings.reference_behaviour:  # batch coupling: the batch size changes the result
        rec["batch_size"] = batch_size
    rec.update(extra)
    return rec


def check_resumable(record_path: Path, record: Dict[str, Any], overwrite: bool) -> None:
    """Refuse to continue into a folder written with another model (folder or weights), other
    settings, another input folder or other cases."""
    if overwrite or not record_path.is_file():
        return
    import json

    try:
        old = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SDDMError(f"{record_path}: unreadable run record ({e}); use --overwrite") from None
    keys = _RESUME_KEYS + (("batch_size",) if "batch_size" in record or "batch_size" in old else ())
    diff = [k for k in keys if old.get(k) != record.get(k)]
    if diff:
        raise SDDMError(f"{record_path.parent} holds outputs of a run with different {', '.join(diff)} "
                        f"(see {record_path}); use --overwrite or another output folder")


def _validate_inputs(paths: Sequence[Path], percentiles: Tuple[float, float]) -> List[int]:
    """Read every input once (3D, finite, not constant); returns their slice counts."""
    counts = []
    for p in paths:
        vol = read_volume(p)
        IntensityWindow.fit(vol.data, percentiles, name=str(p))
        counts.append(vol.num_slices)
    return counts


def adapt_files(pairs: Sequence[Tuple[Union[str, os.PathLike], Union[str, os.PathLike]]], loaded,
                settings: SamplerSettings, batch_size: Optional[int] = None, amp: Optional[str] = None,
                overwrite: bool = False, progress: bool = True, seed_keys: Optional[Sequence[str]] = None,
                ranks: Optional[dist_utils.Ranks] = None) -> List[Path]:
    """Adapt ``(input image, output path)`` pairs; outputs get the input's exact geometry.

    ``seed_keys`` names each pair's random streams (default: the input's case id without the
    channel suffix); existing outputs are skipped unless ``overwrite``. With ``ranks`` the pairs
    are split over processes. Returns the outputs this process wrote.
    """
    ranks = ranks or dist_utils.Ranks()
    pairs = [(Path(i), Path(o)) for i, o in pairs]
    if seed_keys is None:
        seed_keys = [case_of(i) for i, _ in pairs]
    if len(set(seed_keys)) != len(seed_keys):
        raise SDDMError("two inputs share a case id (their random streams would coincide)")
    for i, o in pairs:
        if i.resolve() == o.resolve():
            raise SDDMError(f"{o}: output would overwrite its own input")
    todo = [(i, o, k) for (i, o), k in zip(pairs, seed_keys) if overwrite or not o.exists()]
    if not todo:
        return []
    counts = _validate_inputs([i for i, _, _ in todo], model_percentiles(loaded))
    dist_utils.barrier(ranks)  # every rank has listed its work before anyone writes
    mine = dist_utils.shard(list(zip(todo, counts)), ranks)
    by_key = {k: (i, o) for (i, o, k), _ in mine}

    def volumes() -> Iterator[Tuple[str, np.ndarray]]:
        for (i, _, k), _ in mine:
            yield k, read_volume(i).data

    written = []
    for key, adapted in iter_adapted(volumes(), loaded, settings, batch_size=batch_size, amp=amp,
                                     progress=progress and ranks.is_main,
                                     total_slices=sum(c for _, c in mine),
                                     desc="adapting" + (f" [rank {ranks.rank}]" if ranks.distributed else "")):
        src, out = by_key[key]
        write_like(adapted, src, out)
        written.append(out)
    return written


def case_of(path: Path) -> str:
    """``CASE_0000.nii.gz`` -> ``CASE`` (file name without ending and channel suffix)."""
    from nnunet_sddm.data.raw_dataset import split_ending

    stem, _ = split_ending(Path(path).name)
    return stem[:-5] if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem


def adapt_folder(in_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], model,
                 settings: SamplerSettings, batch_size: Optional[int] = None,
                 device: Optional[str] = None, amp: Optional[str] = None, overwrite: bool = False,
                 progress: bool = True, ranks: Optional[dist_utils.Ranks] = None) -> List[Path]:
    """Adapt every ``CASE_0000<ending>`` image of ``in_dir`` into ``out_dir`` (same file names).

    Args:
        model: a ``LoadedModel``, a model folder or a ``DATASET[:PRESET]`` spec.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (default: CUDA if available).
        ranks: process placement (default: from the ``torchrun`` environment).

    Returns the outputs written by this process. Refuses ``out_dir == in_dir``.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise SDDMError(f"input folder {in_dir} does not exist")
    if out_dir.resolve() == in_dir.resolve():
        raise SDDMError(f"output folder {out_dir} is the input folder; choose another one "
                        f"(adapted images keep the input file names)")
    if out_dir.exists() and not out_dir.is_dir():
        raise SDDMError(f"output {out_dir} exists and is not a folder")
    cases = list_images(in_dir)
    if not cases:
        raise SDDMError(f"{in_dir}: no nnU-Net images (CASE_0000.nii.gz, ...) found")
    ranks = ranks or dist_utils.init_from_env(device)
    dev = resolve_device(device, ranks.local_rank)
    loaded = load_for_adaptation(model, dev)
    from nnunet_sddm.adaptation.volumes import check_model_for_data

    check_model_for_data(loaded, settings, name=f"model {getattr(loaded, 'model_dir', model)}")
    record = run_record(loaded, settings, amp, batch_size, input=str(in_dir.resolve()),
                        cases=sorted(cases))
    record_path = out_dir / RECORD_FILE
    ok, msg = True, ""
    if ranks.is_main:
        try:
            check_resumable(record_path, record, overwrite)
        except SDDMError as e:
            ok, msg = False, str(e)
    dist_utils.all_ok(ok, msg, ranks)
    pairs = [(p, out_dir / p.name) for _, p in sorted(cases.items())]
    if ranks.is_main:
        remove_stale_temp(out_dir)  # leftovers of a killed run (nnU-Net must never see half-written files)
        if overwrite:  # old outputs first, then the old record: an interrupted --overwrite can never
            for _, o in pairs:  # leave outputs of the old run under the new record
                if o.is_file():
                    o.unlink()
            if record_path.is_file():
                record_path.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(record, record_path)
    dist_utils.barrier(ranks)  # the other ranks list their work only after rank 0 cleared the folder
    written = adapt_files(pairs, loaded, settings, batch_size=batch_size, amp=amp, overwrite=overwrite,
                          progress=progress, seed_keys=[c for c, _ in sorted(cases.items())], ranks=ranks)
    dist_utils.barrier(ranks)
    return written
