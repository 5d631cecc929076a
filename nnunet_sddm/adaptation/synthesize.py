"""Synthetic source-style datasets (the paper's DG use): adapted images + the ORIGINAL labels.

``synthesize_dataset(SOURCE, NEW_ID)`` writes ``$nnUNet_raw/DatasetNEW_<name>`` with

- ``imagesTr/<case>_syn<k>_0000<ending>``: source training image ``<case>`` adapted with seed
  ``seed + k`` for ``k = 0 .. copies-1`` (same geometry and header as the source image);
- ``labelsTr/<case>_syn<k><ending>``: a byte copy of the source label (labels are never resampled);
- with ``include_test``: ``imagesTs`` (and ``labelsTs`` when the source has it), one copy (k = 0);
- ``dataset.json`` (the source's, with the new name, ``numTraining`` and a provenance block);
- ``cases.json``: per case ``case``, ``subject``, ``source_case``, ``copy``, ``synthetic: true``,
  ``seed``, ``model``, ``sampler`` (full settings), ``split`` and the source record's fields;
- ``$nnUNet_preprocessed/DatasetNEW_<name>/splits_final.json``: the source's splits mapped to the
  new case names (all copies of a case stay in its fold); without source splits, patient-level
  folds over the recorded subjects.

Case names always carry ``_syn<k>``, also for one copy, so that a synthetic case can never be
mistaken for (or collide with) a real one. Copy 0 with seed ``s`` equals ``nnUNetv2_sddm_adapt
--seed s`` of the same image (the random streams are keyed by the source case).

The dataset is built in ``$nnUNet_raw/.DatasetNEW_<name>.partial`` and renamed into place at the
end; an interrupted run resumes there (same command again): the adapted images that the staging
folder's run record lists as finished (name and digest) are kept, everything else is redone. An
existing dataset with the new id is replaced only with ``overwrite``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import nnunet_sddm
from nnunet_sddm.adaptation.pipeline import Adapter, ModelSpec
from nnunet_sddm.adaptation.record import RunRecord
from nnunet_sddm.utilities import distributed as dist_utils
from nnunet_sddm.data.raw_dataset import (check_target_free, list_images, list_labels, load_cases_json,
                                          load_dataset_json, patient_level_splits, publishable_permissions)
from nnunet_sddm.sampling.guided import SamplerSettings
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import atomic_path, read_json, remove_stale_temp, write_json
from nnunet_sddm.utilities.nnunet_paths import (dataset_folder_name, find_raw_dataset,
                                                parse_dataset_folder_name, preprocessed_root, raw_root)

RECORD_FILE = "sddm_synthesize.json"

#: Record fields that must match for an unfinished staging folder to be continued.
RESUME_KEYS = ("model", "weights", "settings", "amp", "source", "copies", "include_test")


def synthetic_case(case: str, copy: int) -> str:
    """Name of copy ``copy`` of source case ``case``: ``<case>_syn<copy>``."""
    return f"{case}_syn{int(copy)}"


def _partial_folder(folder_name: str) -> Path:
    return raw_root() / f".{folder_name}.partial"


def _source_listing(src: Path, ending: str, include_test: bool) -> List[Tuple[str, str, Path, Optional[Path]]]:
    """``(split, case, image, label)`` of the source; every training image needs its label."""
    out = []
    train = list_images(src / "imagesTr", ending)
    labels = list_labels(src / "labelsTr", ending)
    if not train:
        raise SDDMError(f"{src / 'imagesTr'}: no training images with ending {ending}")
    for case, img in sorted(train.items()):
        if case not in labels:
            raise SDDMError(f"{src / 'labelsTr' / (case + ending)}: label of training case {case} is missing")
        out.append(("Tr", case, img, labels[case]))
    if include_test and (src / "imagesTs").is_dir():
        test_labels = list_labels(src / "labelsTs", ending)
        for case, img in sorted(list_images(src / "imagesTs", ending).items()):
            out.append(("Ts", case, img, test_labels.get(case)))
    return out


def _mapped_splits(src: Path, new_cases: Dict[str, List[str]], subjects: Dict[str, str]) -> Optional[list]:
    """The source's ``splits_final.json`` with every source case replaced by its copies; if the
    source has none, patient-level folds (all copies of a subject together)."""
    p = preprocessed_root() / src.name / "splits_final.json"
    if p.is_file():
        source_splits = read_json(p)
        out = []
        for fold in source_splits:
            out.append({part: sorted(n for c in fold.get(part, []) for n in new_cases.get(c, []))
                        for part in ("train", "val")})
        covered = {n for fold in out for n in fold["val"]}
        missing = sorted(set(n for v in new_cases.values() for n in v) - covered)
        if missing:
            raise SDDMError(f"{p}: source splits do not place {len(missing)} training case(s) in a "
                            f"validation fold (e.g. {missing[0]}); fix the source splits")
        return out
    return _subject_splits(new_cases, subjects)


def _subject_splits(new_cases: Dict[str, List[str]], subjects: Dict[str, str]) -> Optional[list]:
    """Patient-level folds (at most 5) over the new cases, all cases of a subject together; None
    for fewer than 2 subjects."""
    case_to_subject = {n: subjects[c] for c, names in new_cases.items() for n in names}
    n_subjects = len(set(case_to_subject.values()))
    if n_subjects < 2:
        return None
    return patient_level_splits(case_to_subject, n_folds=min(5, n_subjects))


@dataclass(frozen=True)
class NewDataset:
    """The raw dataset a synthesis builds from ``src`` (any mode).

    Attributes:
        src: the source raw dataset folder; dataset_json: its ``dataset.json``.
        folder_name: ``DatasetNEW_<name>``; existing: datasets with the new id (replaced only with
            ``overwrite``).
    """

    src: Path
    dataset_json: dict
    folder_name: str
    existing: List[Path]

    @property
    def ending(self) -> str:
        return self.dataset_json["file_ending"]

    @property
    def final(self) -> Path:
        return raw_root() / self.folder_name

    @property
    def partial(self) -> Path:
        """The staging folder ``$nnUNet_raw/.DatasetNEW_<name>.partial``."""
        return _partial_folder(self.folder_name)

    @property
    def split_path(self) -> Path:
        return preprocessed_root() / self.folder_name / "splits_final.json"


def new_dataset(source: Union[int, str, os.PathLike], new_id: int, name: Optional[str], suffix: str,
                overwrite: bool) -> NewDataset:
    """The source and the new dataset's names (default name ``<source name><suffix>``); ``SDDMError``
    for the source's own id, an existing dataset of the new id without ``overwrite`` or a
    multi-channel source."""
    src = find_raw_dataset(source)
    src_id, src_name = parse_dataset_folder_name(src.name)
    if int(new_id) == src_id:
        raise SDDMError(f"the new dataset id {new_id} is the source's ({src.name}); choose another id")
    folder_name = dataset_folder_name(new_id, name or f"{src_name}{suffix}")
    existing = check_target_free(int(new_id), overwrite)
    dj = load_dataset_json(src)
    if len(dj.get("channel_names", {"0": None})) != 1:
        raise SDDMError(f"{src / 'dataset.json'}: only single-channel datasets can be synthesised")
    return NewDataset(src, dj, folder_name, existing)


def check_splits_free(ds: NewDataset, splits: Optional[list], overwrite: bool) -> None:
    """``SDDMError`` if the new dataset's ``splits_final.json`` would replace a file left there
    (without ``overwrite``)."""
    if splits is not None and ds.split_path.exists() and not overwrite:
        raise SDDMError(f"{ds.split_path} exists already (left from an earlier dataset {ds.folder_name}?); pass "
                        f"--overwrite to replace it")


T = TypeVar("T")


def start_run(ds: NewDataset, record: RunRecord, outputs: Sequence[Path], ranks: dist_utils.Ranks,
              check: Callable[[], T], stage: Optional[Callable[[], None]] = None,
              resume_keys: Sequence[str] = RESUME_KEYS) -> Optional[T]:
    """Open a synthesis run on every rank: ``check()`` the inputs (every rank, before anything is
    written; its result is returned), then rank 0 creates or continues the staging folder (a
    continued one must match the run's identity on ``resume_keys``), removes temporary leftovers
    of a killed run, opens ``record`` for ``outputs`` and calls ``stage`` (files the sampling
    reads). An ``SDDMError`` on any rank is raised on all; other ranks then load the record."""
    ok, msg, result = True, "", None
    try:
        result = check()
        if ranks.is_main:
            _prepare_partial(ds.partial, record.identity, resume_keys)
            for sub in ("", "imagesTr", "labelsTr", "imagesTs", "labelsTs"):  # leftovers of a killed run
                remove_stale_temp(ds.partial / sub)  # would be published into the dataset
            record.open(list(outputs))
            if stage is not None:
                stage()
    except SDDMError as e:
        ok, msg = False, str(e)
    dist_utils.all_ok(ok, msg, ranks)
    if not ranks.is_main:
        record.load()
    return result


def finish_run(ds: NewDataset, record: RunRecord, ranks: dist_utils.Ranks, dataset_json: Dict[str, object],
               records: List[dict], splits: Optional[list], overwrite: bool) -> None:
    """After every rank's share: rank 0 merges the ranks' records, writes ``dataset.json`` (the
    source's with the new name, ``numTraining`` and the entries of ``dataset_json``) and
    ``cases.json`` (``records``, training cases first), publishes the staging folder and writes
    ``splits``."""
    dist_utils.barrier(ranks)
    if ranks.is_main:
        if ranks.distributed:
            record.merge_ranks()
        n_train = sum(1 for r in records if r["split"] == "Tr")
        new_dj = dict(ds.dataset_json)
        new_dj.update({"name": ds.folder_name.split("_", 1)[1], "numTraining": n_train, **dataset_json})
        write_json(new_dj, ds.partial / "dataset.json")
        write_json(sorted(records, key=lambda r: (r["split"] != "Tr", r["case"])), ds.partial / "cases.json")
        _publish(ds.partial, ds.final, ds.existing, overwrite)
        if splits is not None:
            write_json(splits, ds.split_path)
    dist_utils.barrier(ranks)


def synthesize_dataset(source: Union[int, str, os.PathLike], new_id: int, model: ModelSpec, settings: SamplerSettings,
                       name: Optional[str] = None, copies: int = 1, include_test: bool = False,
                       overwrite: bool = False, batch_size: Optional[int] = None, device: Optional[str] = None,
                       amp: Optional[str] = None, progress: bool = True,
                       ranks: Optional[dist_utils.Ranks] = None) -> Path:
    """Build the synthetic dataset ``DatasetNEW_<name>`` from raw dataset ``source``.

    Args:
        source: dataset id, ``DatasetXXX_Name`` or folder in ``$nnUNet_raw``.
        new_id: id of the new dataset (must differ from the source's).
        model: ``LoadedModel``, model folder or ``DATASET[:PRESET]``.
        name: new dataset name (default ``<source name>SDDM``).
        copies: differently seeded copies per training case (seeds ``settings.seed + k``).

    Returns the new raw dataset folder.
    """
    copies = check_copies(copies)
    ds = new_dataset(source, new_id, name, "SDDM", overwrite)
    src, ending, partial = ds.src, ds.ending, ds.partial
    listing = _source_listing(src, ending, include_test)
    records = {r["case"]: r for r in load_cases_json(src)}

    adapter = Adapter.open(model, settings, device=device, batch_size=batch_size, amp=amp, progress=progress,
                           ranks=ranks)
    ranks = adapter.ranks

    subjects = {case: str(records.get(case, {}).get("subject", case)) for _, case, _, _ in listing}
    new_cases = {case: [synthetic_case(case, k) for k in range(copies)] for split, case, _, _ in listing
                 if split == "Tr"}
    splits = _mapped_splits(src, new_cases, subjects)
    check_splits_free(ds, splits, overwrite)

    identity = adapter.identity(source=str(src.resolve()), dataset=ds.folder_name, copies=copies,
                                include_test=bool(include_test))
    jobs = [[(split, case, img, lab) for split, case, img, lab in listing if split == "Tr" or k == 0]
            for k in range(copies)]
    pairs = [[(img, partial / f"images{split}" / f"{synthetic_case(case, k)}_0000{ending}")
              for split, case, img, _ in jobs[k]] for k in range(copies)]
    record = RunRecord(partial / RECORD_FILE, identity, RESUME_KEYS, ranks)
    inputs = [img for _, _, img, _ in listing]
    # slice counts once for all copies, before anything is written
    counts = start_run(ds, record, [o for copy in pairs for _, o in copy], ranks,
                       lambda: dict(zip(inputs, adapter.check_images(inputs))))

    model_name = identity["model"]
    new_records: List[dict] = []
    for k in range(copies):
        copy_settings = settings.replace(seed=settings.seed + k)
        adapter.with_settings(copy_settings).adapt_files(pairs[k], record, seed_keys=[case for _, case, _, _ in jobs[k]],
                                                         slice_counts=counts)
        for split, case, img, lab in jobs[k]:
            new = synthetic_case(case, k)
            base = source_record(records, case)
            subject = subjects[case]
            new_records.append({**base, "case": new, "subject": subject, "split": split,
                                "source_case": case, "source_dataset": src.name, "copy": k, "synthetic": True,
                                "seed": copy_settings.seed, "model": model_name,
                                "sampler": copy_settings.to_dict(), "amp": amp, "dataset": ds.folder_name})
            if ranks.is_main and lab is not None:
                copy_label(lab, partial / f"labels{split}" / f"{new}{ending}")
    finish_run(ds, record, ranks, {
        "description": f"SD-DM synthetic copy of {src.name} ({copies} cop{'y' if copies == 1 else 'ies'} "
                       f"per training case)",
        "nnunet_sddm_version": nnunet_sddm.__version__,
        "sddm_synthesis": {"source": src.name, "model": model_name, "sampler": settings.to_dict(),
                           "copies": copies, "include_test": bool(include_test), "amp": amp},
    }, new_records, splits, overwrite)
    return ds.final


def check_copies(copies: int) -> int:
    """``copies`` as an int; ``SDDMError`` unless >= 1."""
    copies = int(copies)
    if copies < 1:
        raise SDDMError(f"--copies must be >= 1, got {copies}")
    return copies


def source_record(records: Dict[str, dict], case: str) -> dict:
    """The fields of source case ``case``'s ``cases.json`` record that its synthetic cases inherit
    (all but ``case``, ``split`` and ``dataset``; empty without a record)."""
    return {key: v for key, v in records.get(case, {}).items() if key not in ("case", "split", "dataset")}


def copy_label(label: Path, target: Path) -> None:
    """Byte copy of ``label`` to ``target`` (atomic), unless ``target`` exists (a resumed run's)."""
    if not target.exists():
        with atomic_path(target) as tmp:
            shutil.copyfile(label, tmp)


def _prepare_partial(partial: Path, record: dict, resume_keys: Sequence[str] = RESUME_KEYS) -> None:
    """Create the staging folder, or check that an existing one belongs to the same run."""
    rec_path = partial / RECORD_FILE
    if partial.exists():
        try:
            old = json.loads(rec_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        same = old is not None and all(old.get(k) == record.get(k) for k in tuple(resume_keys) + ("batch_size",))
        if same:
            return
        shutil.rmtree(partial)  # a different (or unreadable) unfinished run: start afresh
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (partial / sub).mkdir(parents=True, exist_ok=True)
    write_json(record, rec_path)


def _publish(partial: Path, final: Path, existing: List[Path], overwrite: bool) -> None:
    """Move the finished staging folder into place (replacing same-id datasets if ``overwrite``)."""
    (partial / RECORD_FILE).unlink()
    for sub in ("imagesTs", "labelsTs"):
        if (partial / sub).is_dir() and not any((partial / sub).iterdir()):
            (partial / sub).rmdir()
    publishable_permissions(partial)
    trash = []
    for old in existing:
        if old.exists():
            if not overwrite:
                raise SDDMError(f"{old} appeared while the dataset was being built")
            moved = old.parent / f".{old.name}.old-{os.getpid()}"
            os.replace(old, moved)
            trash.append(moved)
    os.replace(partial, final)
    for t in trash:
        shutil.rmtree(t, ignore_errors=True)
