"""Small on-the-fly ACDC and M&Ms release layouts for the converter tests."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, Optional, Sequence

import nibabel as nib
import numpy as np

SHAPE = (24, 20, 4)  # x, y, slices
FRAMES = 6


def affine(spacing=(1.5, 1.5, 8.0), origin=(10.0, -5.0, 3.0), angle: float = 0.3) -> np.ndarray:
    """An oblique (rotated about z) voxel-to-world matrix, like a short-axis stack."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot * np.asarray(spacing)
    a[:3, 3] = origin
    return a


def save(path: Path, data: np.ndarray, aff: Optional[np.ndarray] = None, dtype=None,
         qform: bool = True) -> Path:
    """Write a NIfTI file (sform code 1; qform code 1 unless ``qform=False``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = affine() if aff is None else aff
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype or data.dtype), aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff if qform else None, code=1 if qform else 0)
    nib.save(img, str(path))
    return path


def heart_labels(shape=SHAPE, t: float = 0.0, lv=1, myo=2, rv=3) -> np.ndarray:
    """A small ring-shaped LV/MYO with an RV beside it, (x, y, z) uint8; ``t`` shrinks it (ES)."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.hypot(x - 14, y - 10)
    out = np.zeros(shape, np.uint8)
    for k in range(shape[2]):
        sl = np.zeros(shape[:2], np.uint8)
        sl[np.hypot(x - 6, y - 10) < 4.5 - t] = rv
        sl[r < 6 - t] = myo
        sl[r < 3.5 - t] = lv
        out[..., k] = sl
    return out


def image_from(labels: np.ndarray, rng: np.random.Generator, dtype=np.int16, values=None) -> np.ndarray:
    """Intensities from labels (native values) plus noise."""
    values = values or {0: 80, 1: 300, 2: 500, 3: 400}
    img = np.zeros(labels.shape, np.float64)
    for k, v in values.items():
        img[labels == k] = v
    img += rng.normal(0, 10, labels.shape)
    return img.astype(dtype)


# -- ACDC ------------------------------------------------------------------------------------------

def acdc_tree(root: Path, n_train: int = 5, n_test: int = 1, four_d_for: Sequence[str] = (),
              seed: int = 0) -> Path:
    """``root/training/patientNNN`` (+ ``testing/``) with Info.cfg, ED/ES frames and ACDC labels
    (1 RV, 2 MYO, 3 LV). Patients in ``four_d_for`` have only a 4D cine for their image frames."""
    rng = np.random.default_rng(seed)
    n = 0
    for split, count in (("training", n_train), ("testing", n_test)):
        for _ in range(count):
            n += 1
            pid = f"patient{n:03d}"
            d = root / split / pid
            d.mkdir(parents=True)
            ed, es = 1, 4
            (d / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: {FRAMES}\n"
                                        f"Weight: 80.0\n")
            aff = affine(spacing=(1.4 + 0.05 * n, 1.4 + 0.05 * n, 10.0), angle=0.1 * n)
            frames = []
            for f in range(1, FRAMES + 1):
                lab = heart_labels(t=0.0 if f == ed else 1.0, lv=3, myo=2, rv=1)
                img = image_from(lab, rng, values={0: 80, 3: 300, 2: 500, 1: 400})
                frames.append(img)
                if f in (ed, es):
                    if pid not in four_d_for:
                        save(d / f"{pid}_frame{f:02d}.nii.gz", img, aff)
                    save(d / f"{pid}_frame{f:02d}_gt.nii.gz", lab, aff)
            if pid in four_d_for:
                save(d / f"{pid}_4d.nii.gz", np.stack(frames, axis=-1), aff)
    return root


# -- M&Ms ------------------------------------------------------------------------------------------

def write_csv(path: Path, rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


MNMS1_COLUMNS = ("External code", "VendorName", "Vendor", "Centre", "ED", "ES")
VENDOR_NAMES = {"A": "Siemens", "B": "Philips", "C": "GE", "D": "Canon"}


def mnms1_4d_tree(root: Path, subjects: Dict[str, tuple], seed: int = 0) -> Path:
    """Official M&Ms-1 layout. ``subjects``: ID -> (vendor, centre, labelled, ED, ES). Labelled
    subjects under Training/Labeled with a 4D ``_sa_gt`` labelled at ED and ES only."""
    rng = np.random.default_rng(seed)
    rows = []
    for sid, (vendor, centre, labelled, ed, es) in subjects.items():
        d = root / "Training" / ("Labeled" if labelled else "Unlabeled") / sid
        aff = affine(spacing=(1.3, 1.3, 9.0), angle=0.4)
        labs = np.zeros(SHAPE + (FRAMES,), np.float64)
        imgs = np.zeros(SHAPE + (FRAMES,), np.float64)
        for f in range(FRAMES):
            lab = heart_labels(t=0.0 if f == ed else 1.0)
            imgs[..., f] = image_from(lab, rng, dtype=np.float64)
            if f in (ed, es):
                labs[..., f] = lab
        save(d / f"{sid}_sa.nii.gz", imgs, aff)
        if labelled:
            save(d / f"{sid}_sa_gt.nii.gz", labs, aff)
        rows.append({"External code": sid, "VendorName": VENDOR_NAMES[vendor], "Vendor": vendor,
                     "Centre": centre, "ED": ed, "ES": es})
    write_csv(root / "info.csv", rows, MNMS1_COLUMNS)
    return root


def mnms1_frames_tree(root: Path, subjects: Dict[str, tuple], seed: int = 0,
                      aff: Optional[np.ndarray] = None, qform: bool = True) -> Path:
    """Pre-split M&Ms-1 frames ``<ID>_sa_ED.nii.gz`` (+ ``_gt``), float64 like the shared sample.
    ``subjects``: ID -> (vendor, centre, labelled)."""
    rng = np.random.default_rng(seed)
    rows = []
    for sid, (vendor, centre, labelled) in subjects.items():
        for ph, t in (("ED", 0.0), ("ES", 1.0)):
            lab = heart_labels(t=t).astype(np.float64)
            save(root / f"{sid}_sa_{ph}.nii.gz", image_from(lab, rng, dtype=np.float64), aff, qform=qform)
            if labelled:
                save(root / f"{sid}_sa_{ph}_gt.nii.gz", lab, aff, qform=qform)
        rows.append({"External code": sid, "VendorName": VENDOR_NAMES[vendor], "Vendor": vendor,
                     "Centre": centre, "ED": "", "ES": ""})
    write_csv(root / "info.csv", rows, MNMS1_COLUMNS)
    return root


def mnms2_tree(root: Path, n: int = 5, seed: int = 0) -> Path:
    """M&Ms-2 layout ``dataset/<ID>/<ID>_SA_ED.nii.gz`` (+ long-axis files that must be ignored)
    and a CSV with ``SUBJECT_CODE``, ``DISEASE``, ``VENDOR`` (names)."""
    rng = np.random.default_rng(seed)
    names = ["SIEMENS", "Philips Medical Systems", "GE MEDICAL SYSTEMS"]
    rows = []
    for i in range(1, n + 1):
        sid = f"{i:03d}"
        d = root / "dataset" / sid
        for ph, t in (("ED", 0.0), ("ES", 1.0)):
            lab = heart_labels(t=t)
            save(d / f"{sid}_SA_{ph}.nii.gz", image_from(lab, rng, dtype=np.float32), None)
            save(d / f"{sid}_SA_{ph}_gt.nii.gz", lab, None)
            save(d / f"{sid}_LA_{ph}.nii.gz", image_from(lab[..., :1], rng, dtype=np.float32), None)
        rows.append({"SUBJECT_CODE": i, "DISEASE": "NOR", "VENDOR": names[i % 3], "SCANNER": "x", "FIELD": 1.5})
    write_csv(root / "dataset_information.csv", rows, ("SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD"))
    return root


def sheared_affine() -> np.ndarray:
    """A voxel-to-world matrix whose direction cosines are not orthonormal (ITK refuses it)."""
    a = affine(spacing=(1.25, 1.25, 10.0), angle=0.2)
    a[0, 1] += 0.02  # small shear
    return a


def listing(folder: Path) -> list:
    """All entries below ``folder`` (hidden ones included), relative, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def set_corner_voxel(path: Path, value: int) -> None:
    """Overwrite voxel (0, 0, 0) of a NIfTI file with ``value``, keeping its header (e.g. an
    unknown label value in a label map)."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = value
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
