"""ACDC (Automated Cardiac Diagnosis Challenge) -> nnU-Net raw dataset.

Reads the official layout ``ROOT/{training,testing}/patientNNN/`` (also under ``ROOT/database/``):
``Info.cfg`` (``ED``, ``ES`` frame numbers, 1-based; ``Group``), ``patientNNN_frameXX.nii.gz`` and
``patientNNN_frameXX_gt.nii.gz``; ``patientNNN_4d.nii.gz`` is read only when a frame file is
missing (frame XX = index XX - 1 of its last axis). Training patients go to imagesTr/labelsTr,
testing patients to imagesTs (+ labelsTs where ground truth exists); cases are
``patientNNN_ED`` / ``patientNNN_ES``. ``held_out_per_group`` (``--held-out-per-group N``) moves N
training patients of each diagnostic group (``Group`` of ``Info.cfg``: NOR, MINF, DCM, HCM, RV),
drawn with ``seed``, with their labels to imagesTs/labelsTs: an in-domain test set split by patient
(``held_out: true`` in ``cases.json``). ``train_per_group`` (``--train-per-group N``) then keeps
only N of each group's remaining training patients, drawn with ``seed`` (a smaller source for a CPU
study); the others are not written.

Labels: ACDC stores 1 RV, 2 MYO, 3 LV. ``labels="mnms"`` (default) maps them to this project's
convention 0 background, 1 LV, 2 MYO, 3 RV; ``"native"`` keeps ACDC's values. Images keep their
dtype (int16) and header; labels are uint8 with the image header geometry (spacing, origin,
direction) of the source, so nothing is resampled.
"""
from __future__ import annotations

import argparse
import re
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from dataset_converters.common import (Source, check_same_grid, frame, image_dtype, label_array,
                                       load_source, write_with_header)
from nnunet_sddm.data.raw_dataset import CARDIAC_LABELS, RawDatasetBuilder, log
from nnunet_sddm.utilities.errors import SDDMError, cli_entry
from nnunet_sddm.utilities.progress import progress_bar

#: ACDC label value -> M&Ms-convention value (1 RV -> 3, 2 MYO -> 2, 3 LV -> 1).
ACDC_TO_MNMS: Dict[int, int] = {0: 0, 1: 3, 2: 2, 3: 1}
ACDC_NATIVE_LABELS: Dict[str, int] = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}

_PATIENT_RE = re.compile(r"^patient\d{3}$")


def read_info_cfg(path: Path) -> dict:
    """Parse an ACDC ``Info.cfg`` (``Key: value`` lines); ED and ES must be positive integers."""
    path = Path(path)
    if not path.is_file():
        raise SDDMError(f"{path}: Info.cfg not found (needed for the ED/ES frame numbers)")
    info = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SDDMError(f"{path}: cannot read ({e})") from None
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    for key in ("ED", "ES"):
        if key not in info:
            raise SDDMError(f"{path}: no '{key}:' line (ED and ES frame numbers are required)")
        try:
            info[key] = int(float(info[key]))
        except ValueError:
            raise SDDMError(f"{path}: {key} frame number {info[key]!r} is not an integer") from None
        if info[key] < 1:
            raise SDDMError(f"{path}: {key} frame number must be >= 1 (ACDC frames are 1-based)")
    if info["ED"] == info["ES"]:
        raise SDDMError(f"{path}: ED and ES are the same frame ({info['ED']})")
    return info


def _number(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def find_patients(root: Path) -> List[Tuple[str, Path]]:
    """``[(split, patient_dir)]`` with split ``"Tr"`` (training/) or ``"Ts"`` (testing/)."""
    root = Path(root)
    if not root.is_dir():
        raise SDDMError(f"{root}: ACDC root folder not found")
    found = []
    for base in (root, root / "database"):
        for sub, split in (("training", "Tr"), ("testing", "Ts")):
            d = base / sub
            if d.is_dir():
                found += [(split, p) for p in sorted(d.iterdir()) if p.is_dir() and _PATIENT_RE.match(p.name)]
    if not found:
        raise SDDMError(f"{root}: no training/ or testing/ folder with patientNNN subfolders "
                        f"(expected the official ACDC layout)")
    return found


def _frame_image(pdir: Path, number: int, cache: dict) -> Source:
    pid = pdir.name
    path = pdir / f"{pid}_frame{number:02d}.nii.gz"
    if path.is_file():
        return load_source(path, 3, "image")
    four_d = pdir / f"{pid}_4d.nii.gz"
    if not four_d.is_file():
        raise SDDMError(f"{path}: image file not found (and no {four_d.name} to take frame {number} from)")
    if "4d" not in cache:
        cache["4d"] = load_source(four_d, 4, "4D cine")
    return frame(cache["4d"], number - 1, f"frame {number}")


def training_groups(patients: List[Tuple[str, Path]], exclude: Set[str] = frozenset()) -> Dict[str, List[str]]:
    """Diagnostic group (``Info.cfg``'s ``Group``; none: ``unknown``) -> ids of its training
    patients, in listing order, without those in ``exclude``."""
    groups: Dict[str, List[str]] = {}
    for split, pdir in patients:
        if split == "Tr" and pdir.name not in exclude:
            group = str(read_info_cfg(pdir / "Info.cfg").get("Group") or "unknown")
            groups.setdefault(group, []).append(pdir.name)
    return groups


def held_out_patients(patients: List[Tuple[str, Path]], per_group: int, seed: int = 0) -> Set[str]:
    """The ids of ``per_group`` training patients of each diagnostic group (``Info.cfg``'s
    ``Group``; none: ``unknown``), drawn without replacement with ``seed`` and the group's name (the
    same arguments give the same patients). ``SDDMError`` unless every group keeps a training patient."""
    if per_group < 0:
        raise SDDMError(f"--held-out-per-group must be >= 0, got {per_group}")
    groups = training_groups(patients)
    chosen: Set[str] = set()
    for group, ids in sorted(groups.items()):
        if per_group and per_group >= len(ids):
            raise SDDMError(f"--held-out-per-group {per_group}: group {group} has only {len(ids)} training "
                            f"patient(s); at least one must stay for training")
        rng = np.random.default_rng([int(seed), zlib.crc32(group.encode())])
        chosen |= {ids[i] for i in rng.choice(len(ids), size=per_group, replace=False)}
    return chosen


def training_subset(patients: List[Tuple[str, Path]], per_group: Optional[int], held_out: Set[str],
                    seed: int = 0) -> Set[str]:
    """The ids of the training patients to keep: all (``per_group`` None) or ``per_group`` of each
    diagnostic group's training patients outside ``held_out``, drawn without replacement with
    ``seed`` and the group's name on a stream of its own (independent of the held-out draw).
    ``SDDMError`` if ``per_group`` < 1 or a group has fewer patients left."""
    train = training_groups(patients, exclude=held_out)
    if per_group is None:
        return {pid for ids in train.values() for pid in ids}
    if per_group < 1:
        raise SDDMError(f"--train-per-group must be >= 1, got {per_group}")
    kept: Set[str] = set()
    for group, ids in sorted(train.items()):
        if per_group > len(ids):
            raise SDDMError(f"--train-per-group {per_group}: group {group} has only {len(ids)} training "
                            f"patient(s) left after the held-out draw")
        rng = np.random.default_rng([int(seed), zlib.crc32(group.encode()), 1])
        kept |= {ids[i] for i in rng.choice(len(ids), size=per_group, replace=False)}
    return kept


def convert_acdc(root: Path, dataset_id: int, name: str = "ACDC", labels: str = "mnms",
                 overwrite: bool = False, held_out_per_group: int = 0, seed: int = 0,
                 train_per_group: Optional[int] = None) -> Path:
    """Convert an ACDC release to ``$nnUNet_raw/DatasetXXX_<name>``; returns the folder.

    held_out_per_group: training patients per diagnostic group moved, with their labels, to
    imagesTs/labelsTs (``held_out_patients`` with ``seed``). train_per_group: training patients
    kept per group after that (``training_subset``; None: all). Also writes ``cases.json`` and a
    patient-level 5-fold ``splits_final.json`` of the training patients in
    ``$nnUNet_preprocessed/DatasetXXX_<name>/`` (an existing one is kept).
    """
    if labels not in ("mnms", "native"):
        raise SDDMError(f"--labels must be 'mnms' or 'native', got {labels!r}")
    mapping = ACDC_TO_MNMS if labels == "mnms" else {k: k for k in ACDC_TO_MNMS}
    label_names = CARDIAC_LABELS if labels == "mnms" else ACDC_NATIVE_LABELS
    patients = find_patients(Path(root))
    held_out = held_out_patients(patients, held_out_per_group, seed)
    kept = training_subset(patients, train_per_group, held_out, seed)
    converted = [("Ts" if pdir.name in held_out else split, pdir) for split, pdir in patients
                 if split != "Tr" or pdir.name in held_out | kept]
    dropped, patients = len(patients) - len(converted), converted
    if dropped:
        log(f"--train-per-group {train_per_group}: {len(kept)} training patients kept, {dropped} not converted")
    desc = (f"ACDC cine MRI (University Hospital of Dijon), ED/ES frames; labels "
            f"{'harmonised to 1 LV, 2 MYO, 3 RV' if labels == 'mnms' else 'native ACDC: 1 RV, 2 MYO, 3 LV'}")
    with RawDatasetBuilder(dataset_id, name, overwrite=overwrite, labels=label_names, description=desc,
                           extra_json={"source_dataset": "ACDC", "label_convention": labels,
                                       "patients": {"held_out_per_group": held_out_per_group,
                                                    "train_per_group": train_per_group, "seed": seed},
                                       "licence": "ACDC: research use, cite Bernard et al. IEEE TMI 2018"}) as b:
        for split, pdir in progress_bar(patients, desc="ACDC", unit="patient", disable=None):
            pid = pdir.name
            info = read_info_cfg(pdir / "Info.cfg")
            cache: dict = {}
            for phase in ("ED", "ES"):
                number = info[phase]
                image = _frame_image(pdir, number, cache)
                gt_path = pdir / f"{pid}_frame{number:02d}_gt.nii.gz"
                label: Optional[Source] = None
                if gt_path.is_file():
                    label = load_source(gt_path, 3, "label")
                    check_same_grid(image, label)
                elif split == "Tr":
                    raise SDDMError(f"{gt_path}: label file not found (training patients need ground truth)")
                case = f"{pid}_{phase}"
                out_label = label_array(label, mapping) if label is not None else None
                write_with_header(image.data, image, b.image_path(case, split), image_dtype(image))
                if out_label is not None:
                    write_with_header(out_label, image, b.label_path(case, split), "uint8")
                zooms = [float(z) for z in image.header.get_zooms()[:3]]
                repair = "; ".join(sorted({s.repair for s in (image, label) if s is not None and s.repair}))
                if repair:
                    log(f"{image.path}: {repair}")
                b.add_record({
                    "case": case, "subject": pid, "phase": phase, "split": split, "frame": number,
                    "vendor": "A", "vendor_name": "Siemens", "centre": "Dijon",
                    "group": info.get("Group"), "height": _number(info.get("Height")),
                    "weight": _number(info.get("Weight")),
                    "spacing": zooms[::-1], "shape": [int(s) for s in image.shape[:3]][::-1],
                    "labelled": label is not None, "held_out": pid in held_out,
                    "source": {"image": str(image.path), "label": str(label.path) if label else None},
                    "direction_repair": repair or None,
                })
    log(f"wrote {b.final} ({b.summary()}); splits: {b.splits_path or 'kept/none'}")
    return b.final


@cli_entry
def main(argv=None) -> int:
    """``nnUNetv2_sddm_convert_acdc``."""
    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_convert_acdc",
        description="Convert the ACDC release (training/ and/or testing/ patientNNN folders) to an "
                    "nnU-Net raw dataset in $nnUNet_raw (cases patientNNN_ED / patientNNN_ES).")
    p.add_argument("-i", "--input", required=True, type=Path, help="ACDC root folder")
    p.add_argument("-d", "--dataset-id", required=True, type=int, help="nnU-Net dataset id (1-999)")
    p.add_argument("--name", default="ACDC", help="dataset name (default ACDC)")
    p.add_argument("--labels", choices=("mnms", "native"), default="mnms",
                   help="mnms (default): 1 LV, 2 MYO, 3 RV like M&Ms; native: ACDC's 1 RV, 2 MYO, 3 LV")
    p.add_argument("--held-out-per-group", type=int, default=0, metavar="N",
                   help="move N training patients of each diagnostic group (NOR, MINF, DCM, HCM, RV), with their "
                        "labels, to imagesTs/labelsTs: an in-domain test set split by patient (default 0)")
    p.add_argument("--train-per-group", type=int, default=None, metavar="N",
                   help="keep only N of each group's remaining training patients (a smaller source, e.g. for a "
                        "CPU study); the others are not converted (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out and training draws (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    a = p.parse_args(argv)
    print(convert_acdc(a.input, a.dataset_id, name=a.name, labels=a.labels, overwrite=a.overwrite,
                       held_out_per_group=a.held_out_per_group, seed=a.seed,
                       train_per_group=a.train_per_group))
    return 0


if __name__ == "__main__":
    main()
