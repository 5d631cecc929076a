"""M&Ms-1 / M&Ms-2 (multi-centre, multi-vendor cardiac MR) -> nnU-Net raw dataset.

Layouts found anywhere under ROOT (searched recursively):

* M&Ms-1 official: ``<split>/<ID>/<ID>_sa.nii.gz`` (4D cine) + ``<ID>_sa_gt.nii.gz`` (4D, labelled at
  ED and ES); the ED/ES frame indices come from the info CSV (columns ``ED``, ``ES``; they index
  the last axis directly, 0-based).
* pre-split frames: ``<ID>_sa_ED.nii.gz``, ``<ID>_sa_ED_gt.nii.gz``, ``<ID>_sa_ES...``.
* M&Ms-2: ``<ID>_SA_ED.nii.gz``, ``<ID>_SA_ED_gt.nii.gz``, ... (long-axis files are ignored).

Subjects with labels -> imagesTr/labelsTr, without -> imagesTs (images only). Cases are
``<ID>_ED`` / ``<ID>_ES``. The info CSV (official M&Ms-1 columns ``External code``, ``Vendor``,
``Centre``, ``ED``, ``ES``; M&Ms-2 ``SUBJECT_CODE``, ``VENDOR``, ``DISEASE``) gives each subject's
vendor (letter A Siemens, B Philips, C GE, D Canon; names are mapped to letters) and centre;
``vendors``/``centres`` select domains. Labels are already 1 LV, 2 MYO, 3 RV. Images are written
as float32 (M&Ms stores float64), labels uint8, both with the source header geometry; headers
whose direction cosines ITK refuses (non-orthonormal) are repaired and the repair is reported.
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from dataset_converters.common import (check_same_grid, frame, image_dtype, label_array, load_source,
                                       write_with_header)
from nnunet_sddm.data.raw_dataset import RawDatasetBuilder, log
from nnunet_sddm.utilities.errors import SDDMError, cli_entry
from nnunet_sddm.utilities.progress import progress_bar

MNMS_LABELS = {0: 0, 1: 1, 2: 2, 3: 3}
VENDOR_LETTERS = {"siemens": "A", "philips": "B", "ge": "C", "canon": "D", "toshiba": "D"}

_4D_RE = re.compile(r"^(?P<id>.+)_sa(?P<gt>_gt)?\.nii(\.gz)?$")
_FRAME_RE = re.compile(r"^(?P<id>.+)_(?P<sa>sa|SA)_(?P<phase>ED|ES)(?P<gt>_gt)?\.nii(\.gz)?$")
_COLUMNS = {
    "subject": ("External code", "SUBJECT_CODE", "Subject", "ID"),
    "vendor": ("Vendor", "VENDOR", "VendorName"),
    "vendor_name": ("VendorName", "VENDOR"),
    "centre": ("Centre", "Center", "CENTRE", "CENTER"),
    "ed": ("ED",),
    "es": ("ES",),
    "group": ("Pathology", "DISEASE"),
}


def vendor_letter(value: str) -> Optional[str]:
    """``"A"`` / ``"Siemens"`` / ``"GE MEDICAL SYSTEMS"`` -> vendor letter (None if empty)."""
    v = str(value).strip()
    if not v:
        return None
    if len(v) == 1 and v.upper() in "ABCD":
        return v.upper()
    low = v.lower()
    for key, letter in VENDOR_LETTERS.items():
        if low == key or low.startswith(key + " ") or low.startswith(key):
            return letter
    return v


def _norm_id(value: str) -> str:
    v = str(value).strip()
    return str(int(v)) if v.isdigit() else v


def _norm_centre(value) -> Optional[object]:
    v = str(value).strip()
    if not v:
        return None
    try:
        f = float(v)
        return int(f) if f.is_integer() else f
    except ValueError:
        return v


def read_info_csv(path: Path) -> Dict[str, dict]:
    """Read the M&Ms info CSV: normalised subject id -> {vendor, vendor_name, centre, ed, es, group}."""
    path = Path(path)
    if not path.is_file():
        raise SDDMError(f"{path}: info CSV not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SDDMError(f"{path}: cannot read CSV ({e})") from None
    if not rows:
        raise SDDMError(f"{path}: CSV has no data rows")
    header = [h.strip() for h in rows[0].keys() if h is not None]

    def col(key):
        return next((c for c in _COLUMNS[key] if c in header), None)

    cols = {k: col(k) for k in _COLUMNS}
    if cols["subject"] is None:
        raise SDDMError(f"{path}: no subject column (expected one of {list(_COLUMNS['subject'])}); "
                        f"columns are {header}")
    out: Dict[str, dict] = {}
    for i, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()}
        sid = _norm_id(row[cols["subject"]])
        if not sid:
            continue
        if sid in out:
            raise SDDMError(f"{path}: subject {row[cols['subject']]} appears twice (line {i})")
        rec = {"line": i}
        for key in ("vendor", "vendor_name", "centre", "ed", "es", "group"):
            rec[key] = row.get(cols[key], "") if cols[key] else ""
        rec["vendor"] = vendor_letter(rec["vendor"])
        rec["centre"] = _norm_centre(rec["centre"])
        out[sid] = rec
    out["__columns__"] = cols  # type: ignore[assignment]
    return out


def find_subjects(root: Path) -> Dict[str, dict]:
    """Scan ``root`` recursively: subject id -> {"id", "layout", "folder", files...}."""
    root = Path(root)
    if not root.is_dir():
        raise SDDMError(f"{root}: M&Ms root folder not found")
    subjects: Dict[str, dict] = {}

    def entry(sid: str, layout: str, path: Path) -> dict:
        s = subjects.setdefault(sid, {"id": sid, "layout": layout, "folder": path.parent, "files": {}})
        if s["layout"] != layout or s["folder"] != path.parent:
            raise SDDMError(f"{path}: subject {sid} is also present as {s['folder']} ({s['layout']}); "
                            f"each subject must appear once")
        return s

    for p in sorted(root.rglob("*.nii*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        m = _FRAME_RE.match(p.name)
        if m:
            layout = "M&Ms-2" if m.group("sa") == "SA" else "frames"
            key = f"{m.group('phase')}{'_gt' if m.group('gt') else ''}"
            s = entry(m.group("id"), layout, p)
        else:
            m = _4D_RE.match(p.name)
            if not m:
                continue
            key = "4d_gt" if m.group("gt") else "4d"
            s = entry(m.group("id"), "4D", p)
        if key in s["files"]:
            raise SDDMError(f"{p}: duplicate of {s['files'][key]}")
        s["files"][key] = p
    if not subjects:
        raise SDDMError(f"{root}: no M&Ms files found (<ID>_sa.nii.gz, <ID>_sa_ED.nii.gz or "
                        f"<ID>_SA_ED.nii.gz)")
    for sid, s in subjects.items():
        f = s["files"]
        if s["layout"] == "4D":
            if "4d" not in f:
                raise SDDMError(f"{f['4d_gt']}: label file without its image {sid}_sa.nii.gz")
        else:
            sa = "SA" if s["layout"] == "M&Ms-2" else "sa"
            for phase in ("ED", "ES"):
                if phase not in f:
                    other = f.get(f"{phase}_gt") or next(iter(f.values()))
                    raise SDDMError(f"{other.parent / f'{sid}_{sa}_{phase}.nii.gz'}: image file not found")
            labelled = [k for k in ("ED_gt", "ES_gt") if k in f]
            if len(labelled) == 1:
                missing = "ES_gt" if labelled == ["ED_gt"] else "ED_gt"
                raise SDDMError(f"{s['folder'] / (sid + '_' + sa + '_' + missing.replace('_gt', '') + '_gt.nii.gz')}: "
                                f"label file not found (the other phase is labelled)")
    return subjects


def _frame_index(info: dict, key: str, csv_path: Path, sid: str) -> int:
    raw = info.get(key, "")
    try:
        return int(float(raw))
    except ValueError:
        raise SDDMError(f"{csv_path}: subject {sid} has no valid {key.upper()} frame index "
                        f"({raw!r}); needed for its 4D cine") from None


def _select(values: Optional[Sequence[str]], norm) -> Optional[set]:
    return None if not values else {norm(v) for v in values}


def convert_mnms(root: Path, dataset_id: int, info_csv: Optional[Path] = None,
                 vendors: Optional[Sequence[str]] = None, centres: Optional[Sequence[str]] = None,
                 name: Optional[str] = None, overwrite: bool = False) -> Path:
    """Convert M&Ms-1/M&Ms-2 subjects under ``root`` to ``$nnUNet_raw/DatasetXXX_<name>``.

    vendors/centres: keep only these domains (needs ``info_csv``). Default name ``MnMs`` (or
    ``MnMs<vendors>`` when filtered). Returns the dataset folder.
    """
    root = Path(root)
    subjects = find_subjects(root)
    info: Dict[str, dict] = {}
    cols: dict = {}
    if info_csv is not None:
        info = read_info_csv(Path(info_csv))
        cols = info.pop("__columns__")  # type: ignore[assignment]
        missing = sorted(sid for sid in subjects if _norm_id(sid) not in info)
        if missing:
            raise SDDMError(f"{info_csv}: subjects {missing} found under {root} are not in the CSV")
    vsel, csel = _select(vendors, vendor_letter), _select(centres, _norm_centre)
    if vsel or csel:
        if info_csv is None:
            raise SDDMError("--vendors/--centres need --info CSV (it holds each subject's vendor and centre)")
        for key, sel in (("vendor", vsel), ("centre", csel)):
            if sel and cols.get(key) is None:
                raise SDDMError(f"{info_csv}: no {key} column (expected one of {list(_COLUMNS[key])}), "
                                f"needed for --{key}s")
    four_d = [sid for sid, s in subjects.items() if s["layout"] == "4D"]
    if four_d:
        if info_csv is None:
            raise SDDMError(f"{subjects[four_d[0]]['files']['4d']}: 4D cine needs --info CSV with ED and ES "
                            f"frame indices")
        for key in ("ed", "es"):
            if cols.get(key) is None:
                raise SDDMError(f"{info_csv}: no {key.upper()} column, needed for the 4D cines "
                                f"(e.g. {subjects[four_d[0]]['files']['4d']})")

    chosen = []
    for sid in sorted(subjects):
        meta = info.get(_norm_id(sid), {})
        if vsel and meta.get("vendor") not in vsel:
            continue
        if csel and meta.get("centre") not in csel:
            continue
        chosen.append(sid)
    if not chosen:
        raise SDDMError(f"{root}: no subject matches --vendors {vendors or 'any'} --centres {centres or 'any'}")
    if name is None:
        name = "MnMs" + ("".join(sorted(vsel)) if vsel else "")

    repairs = 0
    with RawDatasetBuilder(dataset_id, name, overwrite=overwrite,
                           description="M&Ms cardiac cine MRI, ED/ES frames; labels 1 LV, 2 MYO, 3 RV",
                           extra_json={"source_dataset": "M&Ms", "vendors": sorted(vsel) if vsel else None,
                                       "centres": sorted(map(str, csel)) if csel else None,
                                       "licence": "M&Ms: research use, cite Campello et al. IEEE TMI 2021"}) as b:
        for sid in progress_bar(chosen, desc="M&Ms", unit="subject", disable=None):
            s, meta = subjects[sid], info.get(_norm_id(sid), {})
            f = s["files"]
            pairs = {}
            if s["layout"] == "4D":
                cine = load_source(f["4d"], 4, "4D cine")
                gt = load_source(f["4d_gt"], 4, "4D label") if "4d_gt" in f else None
                if gt is not None:
                    if gt.shape != cine.shape:
                        raise SDDMError(f"{gt.path}: label shape {gt.shape} differs from image {cine.path} "
                                        f"shape {cine.shape}")
                    check_same_grid(cine, gt)
                idx = {ph: _frame_index(meta, ph.lower(), Path(info_csv), sid) for ph in ("ED", "ES")}
                if idx["ED"] == idx["ES"]:
                    raise SDDMError(f"{info_csv}: subject {sid} has ED == ES ({idx['ED']})")
                for ph in ("ED", "ES"):
                    lab = frame(gt, idx[ph], f"{ph} label frame") if gt is not None else None
                    if lab is not None and not np.any(np.asarray(lab.data)):
                        raise SDDMError(f"{gt.path}: {ph} frame {idx[ph]} has no labels (is the {ph} index in "
                                        f"{info_csv} right?)")
                    pairs[ph] = (frame(cine, idx[ph], f"{ph} frame"), lab, idx[ph])
            else:
                for ph in ("ED", "ES"):
                    img = load_source(f[ph], 3, "image")
                    lab = load_source(f[f"{ph}_gt"], 3, "label") if f"{ph}_gt" in f else None
                    if lab is not None:
                        check_same_grid(img, lab)
                    pairs[ph] = (img, lab, None)
            labelled = all(p[1] is not None for p in pairs.values())
            split = "Tr" if labelled else "Ts"
            for ph, (img, lab, index) in pairs.items():
                case = f"{sid}_{ph}"
                out_label = label_array(lab, MNMS_LABELS) if lab is not None else None
                write_with_header(img.data, img, b.image_path(case, split), image_dtype(img))
                if out_label is not None:
                    write_with_header(out_label, img, b.label_path(case, split), "uint8")
                repair = "; ".join(sorted({x.repair for x in (img, lab) if x is not None and x.repair}))
                if repair:
                    repairs += 1
                    log(f"repaired {img.path}{' and its label' if lab is not None and lab.repair else ''}: {repair}")
                b.add_record({
                    "case": case, "subject": sid, "phase": ph, "split": split, "frame": index,
                    "vendor": meta.get("vendor"), "vendor_name": meta.get("vendor_name") or None,
                    "centre": meta.get("centre"), "group": meta.get("group") or None,
                    "layout": s["layout"], "release_folder": str(s["folder"].relative_to(root)),
                    "spacing": [float(z) for z in img.header.get_zooms()[:3]][::-1],
                    "shape": [int(x) for x in img.shape[:3]][::-1], "labelled": lab is not None,
                    "source": {"image": str(img.path), "label": str(lab.path) if lab is not None else None},
                    "direction_repair": repair or None,
                })
    log(f"wrote {b.final} ({b.summary()}); direction repairs: {repairs}; splits: {b.splits_path or 'kept/none'}")
    return b.final


@cli_entry
def main(argv=None) -> int:
    """``nnUNetv2_sddm_convert_mnms``."""
    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_convert_mnms",
        description="Convert M&Ms-1 (4D cines + info CSV, or pre-split ED/ES frames) or M&Ms-2 "
                    "(<ID>_SA_ED.nii.gz) to an nnU-Net raw dataset in $nnUNet_raw; subjects with labels "
                    "-> imagesTr/labelsTr, without -> imagesTs.")
    p.add_argument("-i", "--input", required=True, type=Path, help="release root (searched recursively)")
    p.add_argument("-d", "--dataset-id", required=True, type=int, help="nnU-Net dataset id (1-999)")
    p.add_argument("--info", type=Path, default=None,
                   help="info CSV (External code/Vendor/Centre/ED/ES; M&Ms-2: SUBJECT_CODE/VENDOR); "
                        "required for 4D cines and for --vendors/--centres")
    p.add_argument("--vendors", nargs="+", default=None, help="keep only these vendors (A B C D or names)")
    p.add_argument("--centres", nargs="+", default=None, help="keep only these centres (numbers)")
    p.add_argument("--name", default=None, help="dataset name (default MnMs, or MnMs<vendors> when filtered)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    a = p.parse_args(argv)
    print(convert_mnms(a.input, a.dataset_id, info_csv=a.info, vendors=a.vendors, centres=a.centres,
                       name=a.name, overwrite=a.overwrite))
    return 0


if __name__ == "__main__":
    main()
