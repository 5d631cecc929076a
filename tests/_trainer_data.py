"""Tiny cardiac-like nnU-Net raw datasets for the trainer tests (generated on the fly).

Each subject has two phases (ED, ES); each case is a (z, y, x) short-axis stack with an LV blood
pool (label 1, bright), a myocardium ring (2, dark) and an RV crescent (3), as in CARDIAC_LABELS.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List

import numpy as np
import SimpleITK as sitk

from nnunet_sddm.data.raw_dataset import CARDIAC_LABELS, patient_level_splits, write_dataset_json


def _write(arr: np.ndarray, spacing_zyx, path: Path) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(img, str(path))


def phantom_case(rng: np.random.Generator, shape=(5, 40, 40), es: bool = False):
    """(image float32, label uint8) of one synthetic heart, both (z, y, x)."""
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    cy, cx = h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3)
    r_lv = (0.16 if es else 0.22) * min(h, w) * rng.uniform(0.9, 1.1)
    label = np.zeros(shape, np.uint8)
    for k in range(z):
        taper = 1.0 - 0.5 * abs(k - (z - 1) / 2) / max(1, z)
        d = np.hypot(yy - cy, xx - cx)
        d_rv = np.hypot(yy - cy, xx - (cx - 1.9 * r_lv))
        sl = label[k]
        sl[(d_rv < 1.3 * r_lv * taper) & (d >= (r_lv + 3) * taper)] = 3
        sl[(d < (r_lv + 3) * taper)] = 2
        sl[d < r_lv * taper] = 1
    return label


def vendor_image(label: np.ndarray, rng: np.random.Generator, vendor: str) -> np.ndarray:
    """Intensities per tissue for a 'vendor' (A: bright blood, B: different contrast + bias field)."""
    tissue = {"A": (60.0, 300.0, 90.0, 240.0), "B": (150.0, 180.0, 40.0, 330.0)}[vendor]
    img = np.choose(label, tissue).astype(np.float32)
    z, h, w = label.shape
    if vendor == "B":
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        img *= (1.0 + 0.4 * (xx / w - 0.5))[None]
    img += rng.normal(0, 20.0, size=img.shape).astype(np.float32)
    return img


def make_raw_dataset(raw_root: Path, dataset_id: int, name: str, n_subjects: int = 5, vendor: str = "A",
                     n_test_subjects: int = 1, seed: int = 0, shape=(5, 40, 40)) -> Path:
    """Write ``DatasetXXX_name`` with imagesTr/labelsTr (ED+ES per subject), imagesTs/labelsTs,
    dataset.json and cases.json; returns the folder."""
    rng = np.random.default_rng(seed)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    spacing = (8.0, 1.5, 1.5)
    records: List[dict] = []
    for s in range(n_subjects + n_test_subjects):
        subject = f"{vendor}{s:03d}"
        split = "Tr" if s < n_subjects else "Ts"
        for phase in ("ED", "ES"):
            case = f"{subject}_{phase}"
            label = phantom_case(rng, shape, es=phase == "ES")
            _write(vendor_image(label, rng, vendor), spacing, folder / f"images{split}" / f"{case}_0000.nii.gz")
            _write(label, spacing, folder / f"labels{split}" / f"{case}.nii.gz")
            if split == "Tr":
                records.append({"case": case, "subject": subject, "phase": phase, "vendor": vendor})
    write_dataset_json(folder, len(records), name=name, labels=CARDIAC_LABELS)
    (folder / "cases.json").write_text(json.dumps(records, indent=1))
    return folder


def write_patient_splits(raw_folder: Path, preprocessed_folder: Path) -> list:
    """Patient-level 5-fold ``splits_final.json`` in the preprocessed folder (from cases.json)."""
    records = json.loads((raw_folder / "cases.json").read_text())
    splits = patient_level_splits({r["case"]: r["subject"] for r in records}, n_folds=5, seed=1)
    (preprocessed_folder / "splits_final.json").write_text(json.dumps(splits, indent=1))
    return splits


def make_fake_synthetic(real_folder: Path, raw_root: Path, dataset_id: int, name: str, copies: int = 1,
                        seed: int = 1) -> Path:
    """A stand-in for ``nnUNetv2_sddm_synthesize`` output: each real training case copied ``copies``
    times with perturbed intensities (gamma + scale + noise), the source labels, and cases.json
    records ``{case: <src>_syn<k>, subject, source_case, copy, synthetic: true}``."""
    rng = np.random.default_rng(seed)
    out = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir(parents=True)
    src_records = json.loads((real_folder / "cases.json").read_text())
    records = []
    for r in src_records:
        img = sitk.ReadImage(str(real_folder / "imagesTr" / f"{r['case']}_0000.nii.gz"))
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        for k in range(copies):
            case = f"{r['case']}_syn{k}"
            lo, hi = arr.min(), arr.max()
            x = (arr - lo) / max(hi - lo, 1e-6)
            x = x ** rng.uniform(0.7, 1.4) * (hi - lo) * rng.uniform(0.8, 1.2) + lo
            x += rng.normal(0, 10.0, size=x.shape)
            new = sitk.GetImageFromArray(x.astype(np.float32))
            new.CopyInformation(img)
            sitk.WriteImage(new, str(out / "imagesTr" / f"{case}_0000.nii.gz"))
            shutil.copy(real_folder / "labelsTr" / f"{r['case']}.nii.gz", out / "labelsTr" / f"{case}.nii.gz")
            records.append({"case": case, "subject": r["subject"], "source_case": r["case"], "copy": k,
                            "synthetic": True})
    write_dataset_json(out, len(records), name=name, labels=CARDIAC_LABELS)
    (out / "cases.json").write_text(json.dumps(records, indent=1))
    return out
