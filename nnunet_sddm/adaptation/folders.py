"""Adaptation of image files and folders: nnU-Net reader in, identical geometry and name out.

``adapt_folder(IN, OUT)`` adapts every nnU-Net-named image ``CASE_0000<ending>`` of ``IN`` into
``OUT/CASE_0000<ending>`` (same shape, spacing, origin, direction/affine; float32 voxels) and
records the run in ``OUT/sddm_adapt.json`` (``record.RunRecord``). Every input is checked (3D,
finite, not constant) before anything is written, so a run refused for a bad image leaves
nothing that blocks the retry. Each output is written atomically and then entered in the record
with its digest; an interrupted run is resumed by running the same command again (same input
folder and cases, model folder and weights, settings; checked against the record), and resume
trusts only the outputs the record lists. ``overwrite`` deletes the outputs it will rewrite and
the old record before it writes the new record. Under ``torchrun`` the cases are split over the
ranks; the result equals the single-process one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

from nnunet_sddm.adaptation.pipeline import Adapter, ModelSpec
from nnunet_sddm.adaptation.record import RunRecord
from nnunet_sddm.data.raw_dataset import list_images
from nnunet_sddm.sampling.guided import SamplerSettings
from nnunet_sddm.utilities import distributed as dist_utils
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import remove_stale_temp

RECORD_FILE = "sddm_adapt.json"

#: Record fields that must match for a resumed run to continue an earlier one (``model_config``: an
#: edited ``config.json``, e.g. another ``data.spacing``, with the same weights changes the outputs).
RESUME_KEYS = ("model", "weights", "model_config", "settings", "amp", "input", "cases")


def adapt_folder(in_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], model: ModelSpec,
                 settings: SamplerSettings, batch_size: Optional[int] = None,
                 device: Optional[str] = None, amp: Optional[str] = None, overwrite: bool = False,
                 progress: bool = True, ranks: Optional[dist_utils.Ranks] = None) -> List[Path]:
    """Adapt every ``CASE_0000<ending>`` image of ``in_dir`` into ``out_dir`` (same file names).

    Args:
        model: a ``LoadedModel``, a model folder or a ``DATASET[:PRESET]`` spec.
        device: ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
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
    cases = dict(sorted(list_images(in_dir).items()))
    if not cases:
        raise SDDMError(f"{in_dir}: no nnU-Net images (CASE_0000.nii.gz, ...) found")
    adapter = Adapter.open(model, settings, device=device, batch_size=batch_size, amp=amp, progress=progress,
                           ranks=ranks)
    ranks = adapter.ranks
    pairs = [(p, out_dir / p.name) for p in cases.values()]
    record = RunRecord(out_dir / RECORD_FILE, adapter.identity(input=str(in_dir.resolve()), cases=list(cases)),
                       RESUME_KEYS, ranks)
    ok, msg, counts = True, "", {}
    try:
        inputs = [p for p, _ in pairs]
        counts = dict(zip(inputs, adapter.check_images(inputs)))  # before anything is written
        if ranks.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp(out_dir)  # leftovers of a killed run (nnU-Net must never see half-written files)
            record.open([o for _, o in pairs], overwrite=overwrite)
    except SDDMError as e:
        ok, msg = False, str(e)
    dist_utils.all_ok(ok, msg, ranks)
    if not ranks.is_main:
        record.load()  # rank 0 wrote it before all_ok
    written = adapter.adapt_files(pairs, record, seed_keys=list(cases), slice_counts=counts)
    dist_utils.barrier(ranks)
    if ranks.is_main and ranks.distributed:
        record.merge_ranks()
    return written
