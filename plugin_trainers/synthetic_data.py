"""Synthetic training cases for ``nnUNetTrainer_SDDM_RealPlusSynthetic``, preprocessed with the
REAL dataset's plans, and the rules that keep them out of validation.

``nnUNetv2_sddm_synthesize`` writes an nnU-Net raw dataset ``DatasetYYY_Name`` whose ``cases.json``
records, per case, ``{"case": "<source_case>_syn<k>", "subject": ..., "source_case": ...,
"synthetic": true, ...}`` and whose labels are the source case's labels. :func:`prepare_synthetic`
preprocesses it with the plans (normalisation, spacing, cropping) of the real dataset, into a
folder BESIDE the real preprocessed data so that no other trainer (or ``fold all``) ever sees it::

    $nnUNet_preprocessed/DatasetXXX_Real/
        nnUNetPlans.json, splits_final.json, nnUNetPlans_2d/ ...     (nnU-Net's, untouched)
        sddm_synthetic.json                                          (the link, see below)
        sddm_synthetic/DatasetYYY_Name/cases.json
        sddm_synthetic/DatasetYYY_Name/nnUNetPlans_2d/<case>.b2nd ...

``sddm_synthetic.json`` (next to the plans) names the synthetic dataset, its folder, the plans and
data identifiers it was preprocessed with, the synthetic sampling fraction, and the real cases'
subjects. Run it as ``python -m plugin_trainers.synthetic_data -d REAL -s SYN -c 2d``.

Leakage rule (:func:`select_synthetic`): for a fold with validation cases V, a synthetic case is
used for training only if neither its ``source_case`` is in V nor its ``subject`` is the subject
of any case in V (copies of a validation patient, of either cardiac phase, never train).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union


import nnunet_sddm
from nnunet_sddm.data.raw_dataset import load_cases_json, load_dataset_json, subjects_of
from nnunet_sddm.utilities.errors import SDDMError, cli_entry
from nnunet_sddm.utilities.files import read_json, write_json
from nnunet_sddm.utilities.nnunet_paths import find_raw_dataset, preprocessed_root, raw_root
from nnunet_sddm.utilities.progress import progress_bar

LINK_FILE = "sddm_synthetic.json"
SYNTHETIC_SUBDIR = "sddm_synthetic"
LINK_FORMAT = 1
DEFAULT_FRACTION = 0.5


# ----------------------------------------------------------------------------------------------
# locating things
# ----------------------------------------------------------------------------------------------
def find_preprocessed_dataset(dataset: Union[int, str]) -> Path:
    """``27`` / ``"Dataset027_X"`` / a folder -> ``$nnUNet_preprocessed/Dataset027_X`` (must exist)."""
    try:
        return find_raw_dataset(dataset, preprocessed_root())
    except SDDMError as e:
        raise SDDMError(f"preprocessed dataset: {e}; run nnUNetv2_plan_and_preprocess -d {dataset} first") from None


def link_path(real_preprocessed: os.PathLike) -> Path:
    """``<real preprocessed dataset>/sddm_synthetic.json``."""
    return Path(real_preprocessed) / LINK_FILE


def load_link(real_preprocessed: os.PathLike) -> dict:
    """Read and validate ``sddm_synthetic.json`` of a real preprocessed dataset."""
    p = link_path(real_preprocessed)
    if not p.is_file():
        raise SDDMError(f"{p} not found: prepare the synthetic cases first with "
                        f"python -m plugin_trainers.synthetic_data -d {Path(real_preprocessed).name} -s SYNTHETIC -c 2d")
    link = read_json(p)
    for key in ("synthetic_dataset", "folder", "plans_identifier", "data_identifiers", "fraction", "cases"):
        if key not in link:
            raise SDDMError(f"{p}: required key {key!r} is missing (re-run the preparation)")
    validate_fraction(link["fraction"], str(p))
    return link


def validate_fraction(fraction: float, where: str = "--fraction") -> float:
    """A synthetic sampling fraction must be a number in [0, 1]."""
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise SDDMError(f"{where}: the synthetic fraction must be a number in [0, 1], got {fraction!r}") from None
    if not 0.0 <= f <= 1.0:
        raise SDDMError(f"{where}: the synthetic fraction must be in [0, 1], got {f}")
    return f


# ----------------------------------------------------------------------------------------------
# selection and weighting (pure functions, used by the trainer)
# ----------------------------------------------------------------------------------------------
def select_synthetic(records: Iterable[dict], val_cases: Iterable[str],
                     real_subjects: Mapping[str, str]) -> Tuple[List[str], List[str]]:
    """Split synthetic cases into (usable for training, excluded) for a fold.

    Excluded: copies whose ``source_case`` is a validation case, or whose ``subject`` is the subject
    of a validation case (from ``real_subjects`` = real case -> subject, and from the synthetic
    records' own ``source_case``/``subject`` pairs). Both lists are sorted.
    """
    records = list(records)
    val = set(val_cases)
    val_subjects = {str(real_subjects[c]) for c in val if c in real_subjects}
    val_subjects |= {str(r["subject"]) for r in records if r.get("source_case") in val}
    used, excluded = [], []
    for r in records:
        leak = r.get("source_case") in val or str(r["subject"]) in val_subjects
        (excluded if leak else used).append(r["case"])
    return sorted(used), sorted(excluded)


def sampling_repeats(n_real: int, n_synthetic: int, fraction: float,
                     max_real_slots: int = 20000, tol: float = 1e-3) -> Tuple[int, int, float]:
    """Repeat counts ``(a, b, f_eff)``: listing every real training case ``a`` times and every
    synthetic case ``b`` times makes nnU-Net's uniform case sampler draw a synthetic case with
    probability ``f_eff = b S / (a R + b S)`` (R, S the case counts), the closest to ``fraction``
    found with ``a R <= max_real_slots`` (within ``tol`` when possible)."""
    f = validate_fraction(fraction)
    if n_synthetic == 0 or f == 0.0:
        return 1, 0, 0.0
    if f == 1.0:
        return 0, 1, 1.0
    if n_real == 0:
        raise SDDMError("no real training cases in this fold: a fraction below 1 cannot be met")
    ratio = f / (1.0 - f) * n_real / n_synthetic  # wanted b / a
    best = None
    for a in range(1, max(1, max_real_slots // n_real) + 1):
        b = max(1, round(ratio * a))
        f_eff = b * n_synthetic / (a * n_real + b * n_synthetic)
        if best is None or abs(f_eff - f) < abs(best[2] - f) - 1e-12:
            best = (a, b, f_eff)
        if abs(f_eff - f) <= tol:
            break
    return best


class RealPlusSyntheticCases:
    """The training "dataset" the nnU-Net data loader samples from: ``identifiers`` (with repeats,
    which weight the uniform sampler) and ``load_case`` dispatching to the real or the synthetic
    preprocessed folder. Only what ``nnUNetDataLoader`` uses; picklable for its worker processes."""

    def __init__(self, real, synthetic, identifiers: Sequence[str]):
        clash = set(real.identifiers) & set(synthetic.identifiers)
        if clash:
            raise SDDMError(f"synthetic case names clash with real ones: {sorted(clash)[:5]}")
        self.real, self.synthetic = real, synthetic
        self.source_folder = real.source_folder
        self.folder_with_segs_from_previous_stage = None
        self.identifiers = list(identifiers)
        self._synthetic_ids = frozenset(synthetic.identifiers)

    def load_case(self, identifier: str):
        """(data, seg, seg_prev, properties) of a real or synthetic case, as nnU-Net's datasets."""
        return (self.synthetic if identifier in self._synthetic_ids else self.real).load_case(identifier)

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)


# ----------------------------------------------------------------------------------------------
# preprocessing with the real dataset's plans
# ----------------------------------------------------------------------------------------------
def _check_synthetic_records(syn_folder: Path, records: List[dict], cases: Iterable[str]) -> None:
    p = syn_folder / "cases.json"
    if not records:
        raise SDDMError(f"{p}: missing or empty; synthetic cases need 'subject' and 'source_case' records "
                        f"so that copies of validation patients can be kept out of training")
    by_case = {r["case"]: r for r in records}
    for case in cases:
        r = by_case.get(case)
        if r is None:
            raise SDDMError(f"{p}: no record for case {case!r} of imagesTr")
        for key in ("subject", "source_case"):
            if key not in r:
                raise SDDMError(f"{p}: record of case {case!r} has no {key!r}")


def _preprocess_cases(dataset: Dict[str, dict], out_dir: Path, plans_manager, configuration_manager,
                      real_dataset_json: dict, overwrite: bool, desc: str) -> None:
    """Preprocess ``dataset`` (case -> {'images', 'label'}) into ``out_dir`` with nnU-Net's own
    preprocessor of the configuration. Built under ``.<name>.partial`` (resumable: finished cases,
    marked by their ``.pkl``, are kept) and renamed into place when complete."""
    partial = out_dir.parent / f".{out_dir.name}.partial"
    if overwrite:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    for case in progress_bar(sorted(dataset), desc=desc, unit="case"):
        if (partial / f"{case}.pkl").is_file():
            continue
        entry = dataset[case]
        for f in [*entry["images"], entry["label"]]:
            if not os.path.isfile(f):
                raise SDDMError(f"{f}: missing file of synthetic case {case!r}")
        # nnU-Net writes the arrays first and the .pkl last: a .pkl marks a finished case
        preprocessor.run_case_save(str(partial / case), entry["images"], entry["label"], plans_manager,
                                   configuration_manager, real_dataset_json)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)


def prepare_synthetic(real: Union[int, str], synthetic: Union[int, str, os.PathLike],
                      configurations: Sequence[str] = ("2d",), plans_identifier: str = "nnUNetPlans",
                      fraction: float = DEFAULT_FRACTION, overwrite: bool = False) -> dict:
    """Preprocess the synthetic raw dataset with the real dataset's plans and write the link file.

    real: id or ``DatasetXXX_Name`` of the real dataset (planned and preprocessed already).
    synthetic: id, name or folder of the raw synthetic dataset (``nnUNetv2_sddm_synthesize`` output).
    Existing preprocessed synthetic folders are reused unless ``overwrite``. Returns the link dict.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    fraction = validate_fraction(fraction)
    real_pp = find_preprocessed_dataset(real)
    plans_file = real_pp / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise SDDMError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess for {real_pp.name} first")
    plans = json.loads(plans_file.read_text())
    real_dj = load_dataset_json(real_pp)
    syn_folder = find_raw_dataset(synthetic)
    syn_dj = load_dataset_json(syn_folder)
    if syn_folder.resolve().name == real_pp.name:
        raise SDDMError(f"{syn_folder}: the synthetic dataset is the real dataset itself")
    if {str(k): int(v) for k, v in syn_dj["labels"].items()} != {str(k): int(v) for k, v in real_dj["labels"].items()}:
        raise SDDMError(f"{syn_folder / 'dataset.json'}: labels {syn_dj['labels']} differ from the real "
                        f"dataset's {real_dj['labels']} ({real_pp / 'dataset.json'})")
    if len(syn_dj.get("channel_names", {})) != len(real_dj.get("channel_names", {})):
        raise SDDMError(f"{syn_folder / 'dataset.json'}: {len(syn_dj.get('channel_names', {}))} channels, the real "
                        f"dataset has {len(real_dj.get('channel_names', {}))}")
    dataset = get_filenames_of_train_images_and_targets(str(syn_folder), syn_dj)
    if not dataset:
        raise SDDMError(f"{syn_folder / 'imagesTr'}: no synthetic cases found")
    records = [r for r in load_cases_json(syn_folder) if r["case"] in dataset]
    _check_synthetic_records(syn_folder, load_cases_json(syn_folder), dataset)

    plans_manager = PlansManager(plans)
    target = real_pp / SYNTHETIC_SUBDIR / syn_folder.name
    data_identifiers = {}
    for configuration in configurations:
        try:
            cm = plans_manager.get_configuration(configuration)
        except RuntimeError:
            raise SDDMError(f"{plans_file}: no configuration {configuration!r} (available: "
                            f"{sorted(plans['configurations'])})") from None
        real_data = real_pp / cm.data_identifier
        if not real_data.is_dir():
            raise SDDMError(f"{real_data} not found: preprocess the real dataset for {configuration!r} first")
        real_ids = {p.name.split(".")[0] for p in real_data.iterdir() if p.suffix == ".pkl"}
        clash = real_ids & set(dataset)
        if clash:
            raise SDDMError(f"{syn_folder}: synthetic case names clash with real cases of {real_pp.name}: "
                            f"{sorted(clash)[:5]}")
        out_dir = target / cm.data_identifier
        done = out_dir.is_dir() and all((out_dir / f"{c}.pkl").is_file() for c in dataset)
        if not done or overwrite:
            _preprocess_cases(dataset, out_dir, plans_manager, cm, real_dj, overwrite,
                              desc=f"{syn_folder.name} -> {real_pp.name} {configuration}")
        data_identifiers[configuration] = cm.data_identifier
    write_json(records, target / "cases.json")

    real_subjects: Dict[str, str] = {}
    try:
        real_raw = raw_root() / real_pp.name
        real_subjects = subjects_of(load_cases_json(real_raw)) if real_raw.is_dir() else {}
    except SDDMError:
        real_subjects = {}

    old = {}
    lp = link_path(real_pp)
    if lp.is_file():
        try:
            old = json.loads(lp.read_text())
        except json.JSONDecodeError:
            old = {}
    if old.get("synthetic_dataset") == syn_folder.name and old.get("plans_identifier") == plans_identifier:
        data_identifiers = {**old.get("data_identifiers", {}), **data_identifiers}
    link = {
        "format": LINK_FORMAT,
        "synthetic_dataset": syn_folder.name,
        "synthetic_raw_folder": str(syn_folder.resolve()),
        "folder": f"{SYNTHETIC_SUBDIR}/{syn_folder.name}",
        "plans_identifier": plans_identifier,
        "data_identifiers": data_identifiers,
        "fraction": fraction,
        "cases": len(dataset),
        "real_subjects": real_subjects,
        "nnunet_sddm_version": nnunet_sddm.__version__,
    }
    write_json(link, lp)
    return link


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m plugin_trainers.synthetic_data -d REAL -s SYNTHETIC [-c 2d ...] [--fraction F]``."""
    parser = argparse.ArgumentParser(
        prog="python -m plugin_trainers.synthetic_data",
        description="Preprocess a synthetic raw dataset (nnUNetv2_sddm_synthesize output) with a REAL dataset's "
                    "nnU-Net plans for nnUNetTrainer_SDDM_RealPlusSynthetic, and set the synthetic sampling "
                    "fraction (written to <nnUNet_preprocessed>/<REAL>/sddm_synthetic.json).")
    parser.add_argument("-d", "--dataset", required=True, help="real dataset id or DatasetXXX_Name (already preprocessed)")
    parser.add_argument("-s", "--synthetic", required=True, help="synthetic raw dataset: id, DatasetYYY_Name or folder")
    parser.add_argument("-c", "--configurations", nargs="+", default=["2d"],
                        help="nnU-Net configurations to preprocess for (default: 2d)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("--fraction", type=float, default=DEFAULT_FRACTION,
                        help="probability that a training sample is drawn from a synthetic case, in [0, 1] "
                             f"(default {DEFAULT_FRACTION}; 1 = synthetic only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="preprocess again even if the synthetic cases were preprocessed already")
    args = parser.parse_args(argv)
    link = prepare_synthetic(args.dataset, args.synthetic, args.configurations, args.plans, args.fraction,
                             args.overwrite)
    print(f"{link['cases']} synthetic cases of {link['synthetic_dataset']} ready for "
          f"{sorted(link['data_identifiers'])}; fraction {link['fraction']}", file=sys.stderr)
    print(link_path(find_preprocessed_dataset(args.dataset)))
    return 0


if __name__ == "__main__":
    main()
