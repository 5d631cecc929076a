"""Label-conditioned synthesis (``nnUNetv2_sddm_synthesize --mode labels``): NEW images sampled
from label maps by a mask-conditioned diffusion model, written as image-label pairs.

``synthesize_from_labels(SOURCE, NEW_ID, MODEL)`` writes ``$nnUNet_raw/DatasetNEW_<name>`` with,
for every conditioning label map ``<case>`` and ``k = 0 .. copies-1``:

- ``labelsTr/<case>_gen<k><ending>``: the conditioning label map: a byte copy (``labels="as-is"``)
  or the map deformed by ``data.deformation.deform_pair`` (``"deformed"``: one draw per case and
  copy, seeded ``deformation_seed(seed + k, case)``, its parameters recorded);
- ``imagesTr/<case>_gen<k>_0000<ending>``: slice ``z`` of the image is sampled from noise by pure
  ancestral sampling (K = ``steps`` respaced steps) conditioned on slice ``z`` of that label map
  (one-hot, ``conditioning.encode_labels``), classifier-free guidance scale ``w``
  (``sampling.conditional``), the domain token ``domain`` for a model with ``model.domains``;
  random stream of slice ``z``: ``(seed + k, "<case>/<z>")``;
- the label map goes to model space as the training label maps do (``forward_labels`` of the
  model's slice transform: resize mode or, with ``data.spacing``, spacing mode), the samples come
  back through the inverse of that transform (``slices.model_slices_to_volume``), from model units
  [-1, 1] to ``GENERATED_WINDOW`` [0, 1] (float32, clipped), and the volume is written with the
  label map's geometry.

The label maps are the source's ``labelsTr`` or, with ``labels_from``, a folder of label files
``<name><ending>`` (each with its own geometry; ``cases.json`` records beside them are kept in the
provenance). ``dataset.json`` is the source's (its labels must include the model's
``label_values``); ``cases.json`` records the provenance of every case; the splits are the source's
mapped to the new cases (``labels_from``: patient-level folds over the label maps' subjects).

Staging, resume (the run record ``sddm_synthesize.json``), ranks and publishing are those of
``synthesize.synthesize_dataset``: rank 0 stages the label maps, every rank samples its share.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import nnunet_sddm
from nnunet_sddm.adaptation.pipeline import ModelSpec, PathLike, load_spec, model_identity, run_file_jobs
from nnunet_sddm.adaptation.record import RunRecord
from nnunet_sddm.adaptation.synthesize import (RECORD_FILE, NewDataset, _mapped_splits, _subject_splits,
                                               check_copies, check_splits_free, copy_label, finish_run,
                                               new_dataset, source_record, start_run)
from nnunet_sddm.adaptation.volumes import SliceJob, default_batch_size, iter_sampled, size_multiple
from nnunet_sddm.data.deformation import DeformationSettings, deform_pair
from nnunet_sddm.data.raw_dataset import list_labels, load_cases_json
from nnunet_sddm.data.slices import IntensityWindow, inplane_spacing, model_slices_to_volume, slice_transform, \
    working_spacing
from nnunet_sddm.data.volumes import read_volume, write_like
from nnunet_sddm.diffusion.conditioning import dataset_labels, encode_labels, is_conditional
from nnunet_sddm.diffusion.model_folder import LoadedModel
from nnunet_sddm.sampling.conditional import ClassifierFreeGuidance, sample_from_labels
from nnunet_sddm.sampling.label_generation import read_map_records
from nnunet_sddm.sampling.guided import slice_seed
from nnunet_sddm.utilities import distributed as dist_utils
from nnunet_sddm.utilities.devices import DeviceLike, resolve_device
from nnunet_sddm.utilities.errors import SDDMError

#: Where the label maps come from: the source's labelsTr as they are, or deformed.
LABEL_SOURCES = ("as-is", "deformed")

#: The intensity range generated images are written in: model units [-1, 1] mapped to [0, 1].
GENERATED_WINDOW = IntensityWindow(0.0, 1.0)

#: Record fields that must match for an unfinished staging folder to be continued.
RESUME_KEYS = ("model", "weights", "mode", "labels", "labels_from", "source", "copies", "steps", "seed",
               "guidance_scale", "domain", "deformation")


def generated_case(case: str, copy: int) -> str:
    """Name of copy ``copy`` generated from label map ``case``: ``<case>_gen<copy>``."""
    return f"{case}_gen{int(copy)}"


def deformation_seed(seed: int, case: str) -> int:
    """The seed of ``deform_pair`` for label map ``case`` under base seed ``seed`` (63-bit)."""
    return slice_seed(seed, f"{case}/deformation")


def label_dtype(label: np.ndarray) -> np.dtype:
    """uint8 for label values in 0..255, else int16 (how a written label map is stored)."""
    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    return np.dtype(np.uint8) if 0 <= lo and hi <= 255 else np.dtype(np.int16)


def deform_label_map(label: np.ndarray, spacing: Sequence[float], settings: DeformationSettings, seed: int,
                     name: str):
    """``deform_pair`` of a label map ``(z, y, x)`` (voxel ``spacing`` in mm): a one-slice volume
    (a 2D map stored as ``(1, H, W)``) is deformed as the 2D slice. Returns the ``DeformedPair``
    (its ``label`` ``(z, y, x)``); ``SDDMError`` naming ``name`` when every draw broke a structure."""
    if label.shape[0] == 1:
        pair = deform_pair(None, label[0], tuple(spacing)[1:], settings, seed=seed, name=name)
        return dataclasses.replace(pair, label=pair.label[None])
    return deform_pair(None, label, spacing, settings, seed=seed, name=name)


@dataclass(frozen=True)
class LabelSampler:
    """An opened mask-conditioned model, ready to sample images from label maps.

    Attributes:
        loaded: the conditional model (eval mode) on its device.
        steps: respaced chain length K of the ancestral sampling.
        guidance_scale: classifier-free guidance scale w (finite, >= 0; 1: no guidance).
        domain: the domain of the samples (a name of ``model.domains``; None for a model without).
        ranks: this process's place under ``torchrun``.
        batch_size: slices per sampler call (None: 16 on CPU/MPS, 64 on CUDA).
        progress: show progress bars (on rank 0).
    """

    loaded: LoadedModel
    steps: int = 100
    guidance_scale: float = 1.0
    domain: Optional[str] = None
    ranks: dist_utils.Ranks = dist_utils.Ranks()
    batch_size: Optional[int] = None
    progress: bool = True

    def __post_init__(self) -> None:
        where = self.loaded.model_dir
        if not is_conditional(self.loaded.config):
            raise SDDMError(f"{where}: an unconditional model; --mode labels needs a mask-conditioned model "
                            f"(nnUNetv2_sddm_train --condition labels)")
        if self.loaded.in_channels != 1:
            raise SDDMError(f"{where}: the model samples {self.loaded.in_channels}-channel images; cine MR needs 1")
        if not 1 <= int(self.steps) <= self.loaded.diffusion.num_timesteps:
            raise SDDMError(f"--steps {self.steps}: the model {where} has {self.loaded.diffusion.num_timesteps} "
                            f"diffusion steps (1..{self.loaded.diffusion.num_timesteps})")
        ClassifierFreeGuidance(self.loaded.model, self.guidance_scale)  # checks the scale
        dropout = float((self.loaded.config.get("training") or {}).get("label_dropout") or 0.0)
        if float(self.guidance_scale) != 1.0 and dropout == 0.0:
            raise SDDMError(f"--guidance-scale {self.guidance_scale}: the model {where} was trained without label "
                            f"dropout (training.label_dropout 0), so it never learned the unconditional prediction "
                            f"classifier-free guidance needs; use --guidance-scale 1 or train with --label-dropout > 0")
        domains = self.domains
        if self.domain is not None and not domains:
            raise SDDMError(f"--domain {self.domain}: the model {where} has no domains (trained without "
                            f"--pseudo-labelled)")
        if self.domain is not None and self.domain not in domains:
            raise SDDMError(f"--domain {self.domain}: the model {where} knows the domains {domains}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise SDDMError(f"--batch-size must be >= 1, got {self.batch_size}")

    @classmethod
    def open(cls, model: ModelSpec, steps: int = 100, guidance_scale: float = 1.0, domain: Optional[str] = None,
             *, device: DeviceLike = None, batch_size: Optional[int] = None, progress: bool = True,
             ranks: Optional[dist_utils.Ranks] = None) -> "LabelSampler":
        """Join ``torchrun``'s process group if there is one, choose the device, load the model
        (EMA weights) and check it. ``domain`` None on a model with domains: its first (source)."""
        ranks = ranks or dist_utils.init_from_env(None if device is None else str(device))
        loaded = load_spec(model, resolve_device(device, ranks.local_rank))
        domains = list((loaded.config.get("model") or {}).get("domains") or [])
        if domain is None and domains and is_conditional(loaded.config):
            domain = domains[0]
        return cls(loaded, int(steps), float(guidance_scale), domain, ranks,
                   None if batch_size is None else int(batch_size), bool(progress))

    # ------------------------------------------------------------------ facts
    @property
    def label_values(self) -> List[int]:
        """The foreground label values the model was trained on (``model.label_values``)."""
        return [int(v) for v in self.loaded.config["model"]["label_values"]]

    @property
    def domains(self) -> List[str]:
        return list(self.loaded.config["model"].get("domains") or [])

    @property
    def domain_index(self) -> Optional[int]:
        return None if self.domain is None else self.domains.index(self.domain)

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    def identity(self, **extra: Any) -> Dict[str, Any]:
        """The JSON form of a run with this sampler (model, weights digest, config, K, w, domain)
        plus ``extra``."""
        rec = {**model_identity(self.loaded), "steps": int(self.steps), "guidance_scale": float(self.guidance_scale),
               "domain": self.domain, **extra}
        return json.loads(json.dumps(rec))  # as a record file reads back (tuples -> lists)

    # ------------------------------------------------------------------ inputs
    def check_labels(self, paths: Sequence[PathLike], names: Optional[Sequence[str]] = None) -> List[int]:
        """Read every label map as the sampling will (3D, integer values among ``{0} |
        label_values``; spacing mode: a valid in-plane spacing), ``SDDMError`` naming the case
        otherwise; returns their slice counts."""
        counts = []
        for i, p in enumerate(paths):
            name = f"case {names[i]} ({p})" if names is not None else str(p)
            vol = read_volume(p)
            encode_labels(np.unique(vol.data).reshape(-1, 1, 1), self.label_values, name=name)
            if working_spacing(self.loaded.data_config) is not None:
                inplane_spacing(vol.spacing, name=name)
            counts.append(vol.num_slices)
        return counts

    # ------------------------------------------------------------------ sampling
    def iter_generated(self, maps: Iterable[Tuple[str, np.ndarray, Sequence[float]]], seed: int,
                       total_slices: Optional[int] = None,
                       desc: str = "generating") -> Iterator[Tuple[str, np.ndarray]]:
        """``(key, label map (z, y, x), spacing (z, y, x) mm)`` -> ``(key, image (z, y, x) float32
        in GENERATED_WINDOW)`` as each is done; slice ``z`` from the stream ``(seed, "<key>/<z>")``.
        Slices of several maps share batches (padded to the batch size: results do not depend on
        the grouping)."""
        loaded, values = self.loaded, self.label_values
        size = int(loaded.image_size)

        def jobs() -> Iterator[Tuple[str, SliceJob]]:
            for key, label, spacing in maps:
                label = np.asarray(label)
                transform = slice_transform(loaded.data_config, size, label.shape[1:], spacing,
                                            multiple=size_multiple(loaded, 1), name=key)
                maps_model = transform.forward_labels(torch.from_numpy(np.rint(label).astype(np.float32)))
                cond = encode_labels(maps_model.round(), values, name=key)
                yield key, SliceJob(cond, lambda x, t=transform: model_slices_to_volume(x, GENERATED_WINDOW, t))

        device = self.device

        def sample(cond: torch.Tensor, keys: List[str]) -> torch.Tensor:
            return sample_from_labels(loaded, cond.to(device), keys, seed, self.steps, self.guidance_scale,
                                      self.domain_index)

        batch = int(self.batch_size or default_batch_size(device))
        yield from iter_sampled(jobs(), sample, batch, progress=self.progress and self.ranks.is_main,
                                total_slices=total_slices, desc=desc)

    def generate_files(self, pairs: Sequence[Tuple[PathLike, PathLike]], record: RunRecord, seed: int,
                       seed_keys: Optional[Sequence[str]] = None,
                       slice_counts: Optional[Dict[Path, int]] = None) -> List[Path]:
        """Sample ``(label map file, output image)`` pairs whose outputs ``record`` does not list
        as finished (``pipeline.run_file_jobs``: split over the ranks, written atomically with the
        label map's geometry, entered in ``record``). Returns the outputs this process wrote."""
        def results(items: Sequence[Tuple[Path, str]], total: int, desc: str) -> Iterator[Tuple[str, np.ndarray]]:
            def maps() -> Iterator[Tuple[str, np.ndarray, Sequence[float]]]:
                for path, key in items:
                    vol = read_volume(path)
                    yield key, vol.data, vol.spacing

            return self.iter_generated(maps(), seed, total_slices=total, desc=desc)

        return run_file_jobs(pairs, record, self.ranks, self.check_labels, results, seed_keys=seed_keys,
                             slice_counts=slice_counts, desc="generating")


@dataclass(frozen=True)
class ConditioningMap:
    """One conditioning label map: its case name, file, the subject its copies belong to, the
    source case it is the label of (None for a map of ``labels_from``) and the provenance its
    copies inherit."""

    case: str
    path: Path
    subject: str
    source_case: Optional[str]
    inherited: Dict[str, Any]


def conditioning_maps(ds: NewDataset, labels_from: Optional[PathLike]) -> List[ConditioningMap]:
    """The source's training label maps, or the label files ``<name><ending>`` of ``labels_from``
    (their ``cases.json`` records, where present, kept under ``label_record``)."""
    ending = ds.ending
    if labels_from is None:
        folder = ds.src / "labelsTr"
        labels = list_labels(folder, ending)
        if not labels:
            raise SDDMError(f"{folder}: no label maps with ending {ending} to condition on")
        records = {r["case"]: r for r in load_cases_json(ds.src)}
        return [ConditioningMap(case, path, str(records.get(case, {}).get("subject", case)), case,
                                source_record(records, case)) for case, path in sorted(labels.items())]
    root = folder = Path(labels_from)
    if not folder.is_dir():
        raise SDDMError(f"--labels-from {folder}: not a folder")
    labels = list_labels(folder, ending)
    if not labels and (root / "labelsTr").is_dir():  # nnUNetv2_sddm_generate_labels' OUT (or a raw dataset)
        folder = root / "labelsTr"
        labels = list_labels(folder, ending)
    if not labels:
        raise SDDMError(f"--labels-from {root}: no label maps <name>{ending} (the ending of {ds.src.name}), "
                        f"nor in its labelsTr")
    generated = read_map_records(root)  # nnUNetv2_sddm_generate_labels' record, else a raw dataset's list
    records = {r["case"]: r for r in (load_cases_json(root) if generated is None else generated)}
    return [ConditioningMap(case, path, str(records.get(case, {}).get("subject", case)), None,
                            {"label_record": records.get(case)}) for case, path in sorted(labels.items())]


def check_dataset_labels(ds: NewDataset, sampler: LabelSampler) -> None:
    """``SDDMError`` unless the source's ``dataset.json`` labels include every label value of the
    model (the new dataset keeps the source's ``dataset.json``)."""
    known = set(dataset_labels(ds.src).values())
    missing = [v for v in sampler.label_values if v not in known]
    if missing:
        raise SDDMError(f"{ds.src / 'dataset.json'}: its labels {dataset_labels(ds.src)} lack the values {missing} "
                        f"the model {sampler.loaded.model_dir} was trained on")


def synthesize_from_labels(source: Union[int, str, os.PathLike], new_id: int, model: ModelSpec, *,
                           labels: str = "as-is", labels_from: Optional[PathLike] = None,
                           domain: Optional[str] = None, guidance_scale: float = 1.0, copies: int = 1,
                           steps: int = 100, seed: int = 0, deformation: Optional[DeformationSettings] = None,
                           name: Optional[str] = None, overwrite: bool = False, batch_size: Optional[int] = None,
                           device: DeviceLike = None, progress: bool = True,
                           ranks: Optional[dist_utils.Ranks] = None) -> Path:
    """Build ``DatasetNEW_<name>`` (default ``<source name>SDDMGen``) of images sampled from label
    maps (module docstring).

    Args:
        source: raw dataset (id, ``DatasetXXX_Name`` or folder): its ``dataset.json`` and, unless
            ``labels_from``, its ``labelsTr`` label maps.
        new_id: id of the new dataset (must differ from the source's).
        model: a mask-conditioned model (``LoadedModel``, folder or ``DATASET[:PRESET]``).
        labels: ``"as-is"`` (byte copies) or ``"deformed"`` (``deformation`` settings, default
            ``DeformationSettings()``).
        labels_from: a folder of label maps to condition on instead of the source's labelsTr.
        domain: domain name for a model with ``model.domains`` (default its first, "source").
        guidance_scale: classifier-free guidance scale w (1: none). copies: samples per map
            (seeds ``seed + k``). steps: respaced chain length K.

    Returns the new raw dataset folder.
    """
    copies = check_copies(copies)
    if labels not in LABEL_SOURCES:
        raise SDDMError(f"--labels must be one of {', '.join(LABEL_SOURCES)}, got {labels!r}")
    if labels == "as-is" and deformation is not None:
        raise SDDMError("deformation settings need --labels deformed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SDDMError(f"--seed must be an integer >= 0, got {seed!r}")
    deformation = (deformation or DeformationSettings()) if labels == "deformed" else None
    ds = new_dataset(source, new_id, name, "SDDMGen", overwrite)
    maps = conditioning_maps(ds, labels_from)
    sampler = LabelSampler.open(model, steps, guidance_scale, domain, device=device, batch_size=batch_size,
                                progress=progress, ranks=ranks)
    ranks = sampler.ranks
    check_dataset_labels(ds, sampler)

    new_cases = {m.case: [generated_case(m.case, k) for k in range(copies)] for m in maps}
    subjects = {m.case: m.subject for m in maps}
    splits = _mapped_splits(ds.src, new_cases, subjects) if labels_from is None else \
        _subject_splits(new_cases, subjects)
    check_splits_free(ds, splits, overwrite)

    labels_from_path = None if labels_from is None else str(Path(labels_from).resolve())
    identity = sampler.identity(mode="labels", labels=labels, labels_from=labels_from_path,
                                source=str(ds.src.resolve()), dataset=ds.folder_name, copies=copies, seed=seed,
                                deformation=None if deformation is None else dataclasses.asdict(deformation))
    partial, ending = ds.partial, ds.ending

    def staged(m: ConditioningMap, k: int) -> Path:
        return partial / "labelsTr" / f"{generated_case(m.case, k)}{ending}"

    def image(m: ConditioningMap, k: int) -> Path:
        return partial / "imagesTr" / f"{generated_case(m.case, k)}_0000{ending}"

    record = RunRecord(partial / RECORD_FILE, identity, RESUME_KEYS, ranks)
    drawn: Dict[Tuple[str, int], dict] = {}

    def stage() -> None:
        """Rank 0: the conditioning label map of every case and copy into the staging labelsTr."""
        for m in maps:
            vol = read_volume(m.path) if deformation is not None else None
            for k in range(copies):
                if deformation is None:
                    copy_label(m.path, staged(m, k))
                    continue
                pair = deform_label_map(np.rint(vol.data), vol.spacing, deformation,
                                        deformation_seed(seed + k, m.case), name=f"case {m.case} ({m.path})")
                drawn[(m.case, k)] = pair.to_dict()
                if not staged(m, k).exists():
                    write_like(pair.label, m.path, staged(m, k), dtype=label_dtype(pair.label))

    counts = start_run(ds, record, [image(m, k) for m in maps for k in range(copies)], ranks,
                       lambda: sampler.check_labels([m.path for m in maps], [m.case for m in maps]), stage,
                       RESUME_KEYS)

    new_records: List[dict] = []
    for k in range(copies):
        sampler.generate_files([(staged(m, k), image(m, k)) for m in maps], record, seed + k,
                               seed_keys=[m.case for m in maps],
                               slice_counts={staged(m, k): n for m, n in zip(maps, counts)})
        for m in maps:
            new_records.append({
                **m.inherited, "case": generated_case(m.case, k), "subject": m.subject, "split": "Tr",
                "source_case": m.source_case, "source_dataset": ds.src.name, "label_map": m.case,
                "label_file": str(m.path.resolve()), "labels": labels, "labels_from": labels_from_path,
                "deformation": drawn.get((m.case, k)), "copy": k, "synthetic": True, "generated": True,
                "seed": seed + k, "model": identity["model"], "steps": int(sampler.steps),
                "guidance_scale": float(sampler.guidance_scale), "domain": sampler.domain, "dataset": ds.folder_name})
    maps_of = f"the label maps of {labels_from_path}" if labels_from_path else f"the labels of {ds.src.name}"
    finish_run(ds, record, ranks, {
        "description": f"SD-DM images generated from {maps_of} ({labels}, {copies} cop{'y' if copies == 1 else 'ies'} "
                       f"per label map)",
        "nnunet_sddm_version": nnunet_sddm.__version__,
        "sddm_synthesis": {"mode": "labels", "source": ds.src.name, "model": identity["model"], "labels": labels,
                           "labels_from": labels_from_path, "copies": copies, "steps": int(sampler.steps),
                           "seed": seed, "guidance_scale": float(sampler.guidance_scale), "domain": sampler.domain,
                           "deformation": identity["deformation"]},
    }, new_records, splits, overwrite)
    return ds.final
