"""ACDC converter: layout, label harmonisation, geometry, every bad input, real sample."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _datasets_fixtures import acdc_tree, affine, heart_labels, listing, save
from dataset_converters import acdc
from dataset_converters.acdc import convert_acdc
from nnunet_sddm.utilities.errors import SDDMError


#: the harmonisation table of the spec: ACDC 1 RV, 2 MYO, 3 LV -> M&Ms 1 LV, 2 MYO, 3 RV
ACDC_TO_MNMS = {0: 0, 1: 3, 2: 2, 3: 1}


def _arr(p: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(p)).dataobj)


def _sitk_geometry(p: Path):
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(p))
    r.ReadImageInformation()
    return r.GetSize(), r.GetSpacing(), r.GetOrigin(), r.GetDirection()


def _assert_same_geometry(out: Path, src: Path):
    a, b = nib.load(str(out)), nib.load(str(src))
    assert a.shape == b.shape
    assert np.array_equal(a.affine, b.affine)
    assert np.array_equal(a.header.get_zooms(), b.header.get_zooms())
    for k in ("qform_code", "sform_code"):
        assert a.header[k] == b.header[k]
    assert _sitk_geometry(out) == _sitk_geometry(src)


@pytest.mark.timeout(60)
def test_converts_layout_labels_geometry_and_splits(nnunet_env, tmp_path):
    root = acdc_tree(tmp_path / "ACDC", n_train=5, n_test=1, four_d_for=("patient002",))
    out = convert_acdc(root, 27)
    assert out == nnunet_env["raw"] / "Dataset027_ACDC"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        f"patient{i:03d}_{ph}_0000.nii.gz" for i in range(1, 6) for ph in ("ED", "ES")]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["patient006_ED_0000.nii.gz",
                                                                    "patient006_ES_0000.nii.gz"]
    assert len(list((out / "labelsTs").iterdir())) == 2
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "LV": 1, "MYO": 2, "RV": 3} and dj["numTraining"] == 10
    for pid, ph, frame in (("patient001", "ED", 1), ("patient003", "ES", 4), ("patient006", "ED", 1)):
        split = "Ts" if pid == "patient006" else "Tr"
        src_img = root / ("testing" if split == "Ts" else "training") / pid / f"{pid}_frame{frame:02d}.nii.gz"
        src_lab = src_img.with_name(src_img.name.replace(".nii.gz", "_gt.nii.gz"))
        img, lab = out / f"images{split}" / f"{pid}_{ph}_0000.nii.gz", out / f"labels{split}" / f"{pid}_{ph}.nii.gz"
        assert np.array_equal(_arr(img), _arr(src_img)) and nib.load(str(img)).get_data_dtype() == np.int16
        expected = np.vectorize(ACDC_TO_MNMS.get)(_arr(src_lab))
        assert np.array_equal(_arr(lab), expected) and nib.load(str(lab)).get_data_dtype() == np.uint8
        _assert_same_geometry(img, src_img)
        _assert_same_geometry(lab, src_lab)
    # patient002 had no frame files: its frames come from the 4D cine (frame XX = index XX - 1)
    four_d = _arr(root / "training" / "patient002" / "patient002_4d.nii.gz")
    assert np.array_equal(_arr(out / "imagesTr" / "patient002_ES_0000.nii.gz"), four_d[..., 3])
    records = {r["case"]: r for r in json.loads((out / "cases.json").read_text())}
    assert len(records) == 12
    r = records["patient002_ES"]
    assert (r["subject"], r["phase"], r["group"], r["frame"], r["split"]) == ("patient002", "ES", "NOR", 4, "Tr")
    assert r["source"]["image"].endswith("patient002_4d.nii.gz")
    assert r["shape"] == [4, 20, 24] and r["spacing"][0] == pytest.approx(10.0)
    splits = json.loads((nnunet_env["preprocessed"] / out.name / "splits_final.json").read_text())
    assert len(splits) == 5
    for fold in splits:
        assert {c.rsplit("_", 1)[0] for c in fold["val"]}.isdisjoint({c.rsplit("_", 1)[0] for c in fold["train"]})
    assert listing(nnunet_env["raw"])[0] == "Dataset027_ACDC"  # no staging folder left


def test_native_labels_keep_acdc_values(nnunet_env, tmp_path):
    root = acdc_tree(tmp_path / "ACDC", n_train=5, n_test=0)
    out = convert_acdc(root, 28, labels="native")
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    src = root / "training" / "patient001" / "patient001_frame01_gt.nii.gz"
    assert np.array_equal(_arr(out / "labelsTr" / "patient001_ED.nii.gz"), _arr(src))


def _break(root: Path, how: str) -> str:
    """Damage the fixture; return a fragment the error message must contain."""
    d = root / "training" / "patient002"
    img, gt = d / "patient002_frame01.nii.gz", d / "patient002_frame01_gt.nii.gz"
    if how == "no_info":
        (d / "Info.cfg").unlink()
        return "Info.cfg"
    if how == "info_without_es":
        (d / "Info.cfg").write_text("ED: 1\nGroup: NOR\n")
        return "ES"
    if how == "missing_image":
        img.unlink()
        return "patient002_frame01.nii.gz"
    if how == "missing_label":
        gt.unlink()
        return "patient002_frame01_gt.nii.gz"
    if how == "unreadable":
        img.write_bytes(b"this is not a nifti file")
        return "patient002_frame01.nii.gz"
    if how == "shape_mismatch":
        save(gt, heart_labels(shape=(24, 20, 5)), affine(spacing=(1.5, 1.5, 10.0), angle=0.2))
        return "shape"
    if how == "geometry_mismatch":
        save(gt, heart_labels(lv=3, rv=1), affine(spacing=(1.5, 1.5, 10.0), angle=0.7))
        return "geometry"
    if how == "label_values":
        lab = heart_labels(lv=3, rv=1)
        lab[0, 0, 0] = 5
        save(gt, lab, nib.load(str(img)).affine)
        return "[5]"
    if how == "4d_frame":
        save(img, np.zeros((24, 20, 4, 3), np.int16), nib.load(str(img)).affine)
        return "4D"
    if how == "3d_cine":
        img.unlink()
        save(d / "patient002_4d.nii.gz", np.zeros((24, 20, 4), np.int16))
        return "patient002_4d.nii.gz"
    if how == "no_layout":
        shutil.rmtree(root / "training")
        return "training/"
    raise AssertionError(how)


BAD = ["no_info", "info_without_es", "missing_image", "missing_label", "unreadable", "shape_mismatch",
       "geometry_mismatch", "label_values", "4d_frame", "3d_cine", "no_layout"]


@pytest.mark.parametrize("how", BAD)
def test_bad_input_clear_error_and_nothing_left(nnunet_env, tmp_path, how):
    root = acdc_tree(tmp_path / "ACDC", n_train=5, n_test=0)
    fragment = _break(root, how)
    with pytest.raises(SDDMError) as e:
        convert_acdc(root, 29)
    msg = str(e.value)
    assert fragment in msg, msg
    if how not in ("no_layout", "shape_mismatch", "geometry_mismatch", "label_values", "4d_frame"):
        assert "patient002" in msg
    assert listing(nnunet_env["raw"]) == [] and listing(nnunet_env["preprocessed"]) == []


def test_cli_exit_code_and_existing_id(nnunet_env, tmp_path, capsys):
    root = acdc_tree(tmp_path / "ACDC", n_train=5, n_test=0)
    (root / "training" / "patient003" / "Info.cfg").unlink()
    with pytest.raises(SystemExit) as e:
        acdc.main(["-i", str(root), "-d", "30"])
    assert e.value.code == 2 and "patient003" in capsys.readouterr().err
    root = acdc_tree(tmp_path / "ACDC2", n_train=5, n_test=0)
    (nnunet_env["raw"] / "Dataset030_Other").mkdir()
    with pytest.raises(SystemExit) as e:
        acdc.main(["-i", str(root), "-d", "30"])
    assert e.value.code == 2 and "Dataset030_Other" in capsys.readouterr().err
    acdc.main(["-i", str(root), "-d", "30", "--overwrite"])
    assert listing(nnunet_env["raw"])[0] == "Dataset030_ACDC"
    assert not (nnunet_env["raw"] / "Dataset030_Other").exists()


@pytest.mark.timeout(120)
def test_real_acdc_sample_labels_and_geometry(nnunet_env, tmp_path, shared_data):
    root = tmp_path / "ACDC" / "training"
    root.mkdir(parents=True)
    for pid in ("patient001", "patient051", "patient100"):
        (root / pid).symlink_to(shared_data / "ACDC" / "training" / pid)
    out = convert_acdc(tmp_path / "ACDC", 31)
    records = json.loads((out / "cases.json").read_text())
    assert len(records) == 6
    for r in records:
        src_img, src_lab = Path(r["source"]["image"]), Path(r["source"]["label"])
        img, lab = out / "imagesTr" / f"{r['case']}_0000.nii.gz", out / "labelsTr" / f"{r['case']}.nii.gz"
        src = _arr(src_lab)
        assert set(np.unique(src)) <= {0, 1, 2, 3}
        table = np.array([ACDC_TO_MNMS[k] for k in range(4)], np.uint8)
        assert np.array_equal(_arr(lab), table[src])
        assert np.array_equal(_arr(img), _arr(src_img))
        _assert_same_geometry(img, src_img)
        _assert_same_geometry(lab, src_lab)


@pytest.mark.timeout(60)
def test_held_out_patients_per_group_go_to_imagests_with_labels(nnunet_env, tmp_path):
    """--held-out-per-group N: N seeded training patients per diagnostic group move, labelled, to
    imagesTs/labelsTs (an in-domain test set split by patient); the draw repeats for a seed; a group
    must keep a training patient."""
    root = acdc_tree(tmp_path / "ACDC", n_train=5, n_test=0)
    patients = acdc.find_patients(root)
    chosen = acdc.held_out_patients(patients, 2, seed=0)
    assert len(chosen) == 2 and chosen == acdc.held_out_patients(patients, 2, seed=0)
    assert any(acdc.held_out_patients(patients, 2, seed=s) != chosen for s in range(1, 6))
    out = convert_acdc(root, 28, name="ACDCHeld", held_out_per_group=2, seed=0)
    ts = sorted(p.name for p in (out / "labelsTs").iterdir())
    assert ts == sorted(f"{pid}_{ph}.nii.gz" for pid in chosen for ph in ("ED", "ES"))
    assert len(list((out / "imagesTs").iterdir())) == 4 and len(list((out / "imagesTr").iterdir())) == 6
    records = json.loads((out / "cases.json").read_text())
    assert {r["subject"] for r in records if r["held_out"]} == chosen
    assert all(r["split"] == "Ts" for r in records if r["held_out"])
    with pytest.raises(SDDMError, match="group NOR has only 5 training patient"):
        acdc.held_out_patients(patients, 5)


@pytest.mark.timeout(60)
def test_train_per_group_keeps_a_seeded_subset_outside_the_held_out_patients(nnunet_env, tmp_path):
    """--train-per-group N: after the held-out draw, N seeded training patients per group are
    converted and the others are not; the held-out set is the one of --held-out-per-group alone; the
    selection is recorded in dataset.json; asking for more patients than a group has left is refused."""
    root = acdc_tree(tmp_path / "ACDC", n_train=5, n_test=0)
    patients = acdc.find_patients(root)
    held = acdc.held_out_patients(patients, 1, seed=0)
    kept = acdc.training_subset(patients, 2, held, seed=0)
    assert len(kept) == 2 and not kept & held and kept == acdc.training_subset(patients, 2, held, seed=0)
    assert any(acdc.training_subset(patients, 2, held, seed=s) != kept for s in range(1, 8))
    assert len(acdc.training_subset(patients, None, held)) == 4
    out = convert_acdc(root, 29, name="ACDCSubset", held_out_per_group=1, train_per_group=2, seed=0)
    tr = {p.name.rsplit("_", 1)[0] for p in (out / "labelsTr").iterdir()}
    ts = {p.name.rsplit("_", 1)[0] for p in (out / "labelsTs").iterdir()}
    assert tr == kept and ts == held
    assert len(list((out / "imagesTs").iterdir())) == 2 * len(held)
    assert {r["subject"] for r in json.loads((out / "cases.json").read_text()) if r["split"] == "Tr"} == kept
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["numTraining"] == 4
    assert dj["patients"] == {"held_out_per_group": 1, "train_per_group": 2, "seed": 0}
    with pytest.raises(SDDMError, match="group NOR has only 4 training patient"):
        acdc.training_subset(patients, 5, held)
    with pytest.raises(SDDMError, match="--train-per-group must be >= 1"):
        acdc.training_subset(patients, 0, held)
