"""M&Ms converter: official 4D layout, pre-split frames, M&Ms-2, domain selection, direction
repair, every bad input, the real sample, nnU-Net integrity."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _datasets_fixtures import (MNMS1_COLUMNS, affine, heart_labels, listing, mnms1_4d_tree,
                                mnms1_frames_tree, mnms2_tree, save, sheared_affine, write_csv)
from dataset_converters import mnms
from dataset_converters.mnms import convert_mnms
from nnunet_sddm.utilities.errors import SDDMError

SUBJECTS_4D = {"AAA001": ("A", 1, True, 0, 3), "BBB002": ("B", 2, True, 1, 4), "CCC003": ("C", 4, False, 0, 2),
               "AAA004": ("A", 6, True, 2, 5), "BBB005": ("B", 3, True, 0, 3), "AAA006": ("A", 1, True, 1, 3),
               "BBB007": ("B", 2, True, 0, 2)}
SUBJECTS_FR = {"S1": ("A", 1, True), "S2": ("B", 2, True), "S3": ("C", 4, True), "S4": ("C", 4, False)}


def _arr(p: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(p)).dataobj)


def _sitk(p: Path):
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(p))
    r.ReadImageInformation()
    return r.GetSize(), r.GetSpacing(), r.GetOrigin(), r.GetDirection()


@pytest.mark.timeout(60)
def test_official_4d_layout(nnunet_env, tmp_path):
    root = mnms1_4d_tree(tmp_path / "MnMs", SUBJECTS_4D)
    out = convert_mnms(root, 114, info_csv=root / "info.csv")
    assert out.name == "Dataset114_MnMs"
    tr = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert len(tr) == 12 and "CCC003_ED_0000.nii.gz" not in tr
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["CCC003_ED_0000.nii.gz", "CCC003_ES_0000.nii.gz"]
    assert not (out / "labelsTs").exists()
    src = root / "Training" / "Labeled" / "BBB002"
    cine, gt = _arr(src / "BBB002_sa.nii.gz"), _arr(src / "BBB002_sa_gt.nii.gz")
    for ph, idx in (("ED", 1), ("ES", 4)):  # the CSV's indices address the last axis directly
        img = out / "imagesTr" / f"BBB002_{ph}_0000.nii.gz"
        assert np.array_equal(_arr(img), cine[..., idx].astype(np.float32))
        assert nib.load(str(img)).get_data_dtype() == np.float32
        lab = out / "labelsTr" / f"BBB002_{ph}.nii.gz"
        assert np.array_equal(_arr(lab), gt[..., idx]) and nib.load(str(lab)).get_data_dtype() == np.uint8
        assert np.array_equal(nib.load(str(img)).affine, nib.load(str(src / "BBB002_sa.nii.gz")).affine)
    records = {r["case"]: r for r in json.loads((out / "cases.json").read_text())}
    assert (records["AAA004_ES"]["vendor"], records["AAA004_ES"]["centre"], records["AAA004_ES"]["frame"]) == ("A", 6, 5)
    assert records["CCC003_ED"]["split"] == "Ts" and records["CCC003_ED"]["vendor"] == "C"
    assert records["BBB002_ED"]["vendor_name"] == "Philips" and records["BBB002_ED"]["layout"] == "4D"
    splits = json.loads((nnunet_env["preprocessed"] / out.name / "splits_final.json").read_text())
    assert len(splits) == 5
    for fold in splits:
        assert {c.split("_")[0] for c in fold["val"]}.isdisjoint({c.split("_")[0] for c in fold["train"]})


def test_vendor_and_centre_selection(nnunet_env, tmp_path):
    root = mnms1_4d_tree(tmp_path / "MnMs", SUBJECTS_4D)
    out = convert_mnms(root, 115, info_csv=root / "info.csv", vendors=["a"])
    assert out.name == "Dataset115_MnMsA"
    assert {r["vendor"] for r in json.loads((out / "cases.json").read_text())} == {"A"}
    out = convert_mnms(root, 116, info_csv=root / "info.csv", vendors=["Philips"], centres=["2"])
    assert sorted({r["subject"] for r in json.loads((out / "cases.json").read_text())}) == ["BBB002", "BBB007"]
    with pytest.raises(SDDMError, match="no subject matches"):
        convert_mnms(root, 117, info_csv=root / "info.csv", vendors=["D"])
    with pytest.raises(SDDMError, match="--info"):
        convert_mnms(root, 117, vendors=["A"])
    assert sorted(p.name for p in nnunet_env["raw"].iterdir()) == ["Dataset115_MnMsA", "Dataset116_MnMsB"]


def test_presplit_frames_and_unlabelled_subject(nnunet_env, tmp_path):
    root = mnms1_frames_tree(tmp_path / "sample", SUBJECTS_FR)
    out = convert_mnms(root, 118, info_csv=root / "info.csv")
    records = json.loads((out / "cases.json").read_text())
    assert {(r["subject"], r["vendor"], r["split"]) for r in records} == {
        ("S1", "A", "Tr"), ("S2", "B", "Tr"), ("S3", "C", "Tr"), ("S4", "C", "Ts")}
    src = root / "S2_sa_ES_gt.nii.gz"
    assert np.array_equal(_arr(out / "labelsTr" / "S2_ES.nii.gz"), _arr(src).astype(np.uint8))
    assert _sitk(out / "labelsTr" / "S2_ES.nii.gz") == _sitk(src)
    # 3 labelled subjects: a patient-level split with as many folds as subjects
    splits = json.loads((nnunet_env["preprocessed"] / out.name / "splits_final.json").read_text())
    assert len(splits) == 3 and all(len(f["val"]) == 2 for f in splits)
    # without a CSV the frames still convert (vendor unknown)
    out = convert_mnms(root, 119)
    assert {r["vendor"] for r in json.loads((out / "cases.json").read_text())} == {None}


def test_mnms2_layout_vendor_names(nnunet_env, tmp_path):
    root = mnms2_tree(tmp_path / "MnM2", n=5)
    out = convert_mnms(root, 120, info_csv=root / "dataset_information.csv", vendors=["GE"])
    records = json.loads((out / "cases.json").read_text())
    assert sorted({r["subject"] for r in records}) == ["002", "005"]  # the fixture's GE subjects
    assert {r["layout"] for r in records} == {"M&Ms-2"} and records[0]["group"] == "NOR"
    out = convert_mnms(root, 121, info_csv=root / "dataset_information.csv")
    assert len(list((out / "imagesTr").iterdir())) == 10  # long-axis files ignored
    assert {r["vendor"] for r in json.loads((out / "cases.json").read_text())} == {"A", "B", "C"}


@pytest.mark.timeout(120)
def test_non_orthonormal_direction_is_repaired_reported_and_nnunet_accepts(nnunet_env, tmp_path, capsys):
    root = mnms1_frames_tree(tmp_path / "sheared", {f"X{i}": ("A", 1, True) for i in range(5)},
                             aff=sheared_affine(), qform=False)
    with pytest.raises(RuntimeError, match="orthonormal"):
        _sitk(root / "X0_sa_ED.nii.gz")  # SimpleITK refuses the source
    out = convert_mnms(root, 122, info_csv=root / "info.csv")
    assert "not orthonormal" in capsys.readouterr().err
    records = json.loads((out / "cases.json").read_text())
    assert all("not orthonormal" in r["direction_repair"] for r in records)
    img, lab = out / "imagesTr" / "X0_ED_0000.nii.gz", out / "labelsTr" / "X0_ED.nii.gz"
    size, spacing, origin, direction = _sitk(img)
    assert _sitk(lab) == (size, spacing, origin, direction)
    d = np.array(direction).reshape(3, 3)
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-6)
    src = nib.load(str(root / "X0_sa_ED.nii.gz"))
    assert np.allclose(nib.load(str(img)).header.get_zooms(), src.header.get_zooms())
    assert np.allclose(nib.load(str(img)).affine[:3, 3], src.affine[:3, 3])  # origin kept
    assert np.allclose(nib.load(str(img)).affine[:3, :3], src.affine[:3, :3], atol=0.05)
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(out), num_processes=1)


def _frames_root(tmp_path: Path) -> Path:
    return mnms1_frames_tree(tmp_path / "fr", {"S1": ("A", 1, True), "S2": ("B", 2, True)})


def _4d_root(tmp_path: Path) -> Path:
    return mnms1_4d_tree(tmp_path / "four", {"AAA001": ("A", 1, True, 0, 3), "BBB002": ("B", 2, True, 1, 4)})


def _break(tmp_path: Path, how: str):
    """Build a broken release; return (root, csv, fragment the message must contain)."""
    if how.startswith("4d_"):
        root = _4d_root(tmp_path)
        csv_path = root / "info.csv"
        d = root / "Training" / "Labeled" / "BBB002"
        rows = [{"External code": "AAA001", "Vendor": "A", "Centre": 1, "ED": 0, "ES": 3},
                {"External code": "BBB002", "Vendor": "B", "Centre": 2, "ED": 1, "ES": 4}]
        if how == "4d_no_csv":
            return root, None, "--info"
        if how == "4d_csv_without_ed":
            write_csv(csv_path, rows, ("External code", "Vendor", "Centre", "ES"))
            return root, csv_path, "ED column"
        if how == "4d_csv_without_subject":
            write_csv(csv_path, rows[:1], MNMS1_COLUMNS)
            return root, csv_path, "BBB002"
        if how == "4d_csv_no_subject_column":
            write_csv(csv_path, [{"Vendor": "A"}], ("Vendor", "ED", "ES"))
            return root, csv_path, "subject column"
        if how == "4d_frame_out_of_range":
            rows[1]["ES"] = 9
            write_csv(csv_path, rows, MNMS1_COLUMNS)
            return root, csv_path, "index 9 is outside the frames"
        if how == "4d_wrong_ed_index":
            rows[1]["ED"] = 2  # an unlabelled frame
            write_csv(csv_path, rows, MNMS1_COLUMNS)
            return root, csv_path, "BBB002_sa_gt.nii.gz"
        if how == "4d_is_3d":
            save(d / "BBB002_sa.nii.gz", np.zeros((24, 20, 4), np.float32), affine(spacing=(1.3, 1.3, 9.0), angle=0.4))
            return root, csv_path, "BBB002_sa.nii.gz"
        if how == "4d_label_shape":
            save(d / "BBB002_sa_gt.nii.gz", np.zeros((24, 20, 4, 5), np.uint8), affine(spacing=(1.3, 1.3, 9.0), angle=0.4))
            return root, csv_path, "BBB002_sa_gt.nii.gz"
        if how == "4d_label_without_image":
            (d / "BBB002_sa.nii.gz").unlink()
            return root, csv_path, "BBB002_sa_gt.nii.gz"
        raise AssertionError(how)
    root = _frames_root(tmp_path)
    csv_path = root / "info.csv"
    img, gt = root / "S2_sa_ED.nii.gz", root / "S2_sa_ED_gt.nii.gz"
    if how == "missing_image":
        img.unlink()
        return root, csv_path, "S2_sa_ED.nii.gz"
    if how == "missing_one_label":
        gt.unlink()
        return root, csv_path, "S2_sa_ED_gt.nii.gz"
    if how == "unreadable":
        img.write_bytes(b"\x1f\x8b broken gzip")
        return root, csv_path, "S2_sa_ED.nii.gz"
    if how == "frame_is_4d":
        save(img, np.zeros((24, 20, 4, 2), np.float64))
        return root, csv_path, "S2_sa_ED.nii.gz"
    if how == "shape_mismatch":
        save(gt, heart_labels(shape=(24, 18, 4)).astype(np.float64))
        return root, csv_path, "S2_sa_ED_gt.nii.gz"
    if how == "geometry_mismatch":
        save(gt, heart_labels().astype(np.float64), affine(origin=(0.0, 0.0, 0.0)))
        return root, csv_path, "S2_sa_ED_gt.nii.gz"
    if how == "label_values":
        lab = heart_labels().astype(np.float64)
        lab[1, 1, 1] = 4
        save(gt, lab)
        return root, csv_path, "S2_sa_ED_gt.nii.gz"
    if how == "label_not_integer":
        lab = heart_labels().astype(np.float64)
        lab[1, 1, 1] = 0.5
        save(gt, lab)
        return root, csv_path, "S2_sa_ED_gt.nii.gz"
    if how == "nan_image":
        data = _arr(img).astype(np.float64)
        data[0, 0, 0] = np.nan
        save(img, data)
        return root, csv_path, "S2_sa_ED.nii.gz"
    if how == "duplicate_subject":
        (root / "copy").mkdir()
        (root / "copy" / "S2_sa_ED.nii.gz").write_bytes(img.read_bytes())
        return root, csv_path, "S2"
    if how == "csv_missing":
        return root, root / "nope.csv", "nope.csv"
    if how == "empty_root":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", None, "empty"
    raise AssertionError(how)


BAD = ["4d_no_csv", "4d_csv_without_ed", "4d_csv_without_subject", "4d_csv_no_subject_column",
       "4d_frame_out_of_range", "4d_wrong_ed_index", "4d_is_3d", "4d_label_shape", "4d_label_without_image",
       "missing_image", "missing_one_label", "unreadable", "frame_is_4d", "shape_mismatch",
       "geometry_mismatch", "label_values", "label_not_integer", "nan_image", "duplicate_subject",
       "csv_missing", "empty_root"]


@pytest.mark.parametrize("how", BAD)
def test_bad_input_clear_error_and_nothing_left(nnunet_env, tmp_path, how):
    root, csv_path, fragment = _break(tmp_path, how)
    with pytest.raises(SDDMError) as e:
        convert_mnms(root, 130, info_csv=csv_path)
    assert fragment in str(e.value), str(e.value)
    assert listing(nnunet_env["raw"]) == [] and listing(nnunet_env["preprocessed"]) == []


def test_cli_refuses_existing_id(nnunet_env, tmp_path, capsys):
    root = _frames_root(tmp_path)
    mnms.main(["-i", str(root), "--info", str(root / "info.csv"), "-d", "131"])
    with pytest.raises(SystemExit) as e:
        mnms.main(["-i", str(root), "--info", str(root / "info.csv"), "-d", "131", "--vendors", "A"])
    assert e.value.code == 2 and "Dataset131_MnMs" in capsys.readouterr().err
    mnms.main(["-i", str(root), "--info", str(root / "info.csv"), "-d", "131", "--vendors", "A", "--overwrite"])
    assert sorted(p.name for p in nnunet_env["raw"].iterdir()) == ["Dataset131_MnMsA"]


@pytest.mark.timeout(120)
def test_real_mnms_sample(nnunet_env, shared_data):
    root = shared_data / "MnMs1-sample"
    out = convert_mnms(root, 114, info_csv=root / "info.csv")
    records = json.loads((out / "cases.json").read_text())
    assert len(records) == 6 and {r["vendor"] for r in records} == {"A", "B", "C"}
    for r in records:
        src_img, src_lab = Path(r["source"]["image"]), Path(r["source"]["label"])
        img, lab = out / "imagesTr" / f"{r['case']}_0000.nii.gz", out / "labelsTr" / f"{r['case']}.nii.gz"
        s = _arr(src_lab)
        assert set(np.unique(s)) <= {0, 1, 2, 3}
        assert np.array_equal(_arr(lab), s.astype(np.uint8))  # M&Ms labels are already 1 LV, 2 MYO, 3 RV
        assert np.array_equal(_arr(img), _arr(src_img).astype(np.float32))
        for out_f, src_f in ((img, src_img), (lab, src_lab)):
            a, b = nib.load(str(out_f)), nib.load(str(src_f))
            assert np.array_equal(a.affine, b.affine) and a.header.get_zooms() == b.header.get_zooms()
            assert _sitk(out_f) == _sitk(src_f)
