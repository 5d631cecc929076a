"""Multi-vendor cardiac phantoms: determinism, anatomy, vendor differences, nnU-Net validity."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dataset_converters import phantoms
from nnunet_sddm.data.phantoms import VENDORS, generate_phantom_dataset, generate_subject
from nnunet_sddm.utilities.errors import SDDMError

MATRIX = 48


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _labels(folder: Path):
    for p in sorted((folder / "labelsTr").glob("*.nii.gz")):
        yield p, np.asarray(nib.load(str(p)).dataobj).transpose(2, 1, 0)  # (z, y, x)


@pytest.mark.timeout(120)
def test_same_seed_gives_identical_bytes_and_different_seed_differs(nnunet_env, tmp_path, monkeypatch):
    a = generate_phantom_dataset(501, "A", 5, n_test_cases=1, seed=3, matrix=MATRIX)
    first = _files(a)
    splits = (nnunet_env["preprocessed"] / a.name / "splits_final.json").read_bytes()
    # a second, independent root with the same arguments
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        (tmp_path / "again" / var).mkdir(parents=True)
        monkeypatch.setenv(var, str(tmp_path / "again" / var))
    b = generate_phantom_dataset(501, "A", 5, n_test_cases=1, seed=3, matrix=MATRIX)
    assert _files(b) == first
    for name, blob in first.items():  # gzip header: no time stamp, no (temporary) file name
        if name.endswith(".nii.gz"):
            assert blob[:3] == b"\x1f\x8b\x08" and blob[4:8] == b"\0\0\0\0" and not blob[3] & 0x08, name
    assert (tmp_path / "again" / "nnUNet_preprocessed" / a.name / "splits_final.json").read_bytes() == splits
    c = generate_phantom_dataset(502, "A", 5, n_test_cases=1, seed=4, matrix=MATRIX)
    assert _files(c)["imagesTr/PhA0000_ED_0000.nii.gz"] != first["imagesTr/PhA0000_ED_0000.nii.gz"]
    assert len([k for k in first if k.startswith("imagesTr/")]) == 10
    assert len([k for k in first if k.startswith("labelsTs/")]) == 2


@pytest.mark.timeout(120)
def test_dataset_layout_records_and_patient_level_splits(nnunet_env):
    folder = generate_phantom_dataset(7, "b", 5, n_test_cases=1, seed=0, matrix=MATRIX)
    assert folder.name == "Dataset007_PhantomB"
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "LV": 1, "MYO": 2, "RV": 3} and dj["numTraining"] == 10
    records = json.loads((folder / "cases.json").read_text())
    assert {r["vendor"] for r in records} == {"B"} and {r["seed"] for r in records} == {0}
    assert {r["split"] for r in records} == {"Tr", "Ts"}
    for r in records:
        img = nib.load(str(folder / f"images{r['split']}" / f"{r['case']}_0000.nii.gz"))
        lab = nib.load(str(folder / f"labels{r['split']}" / f"{r['case']}.nii.gz"))
        assert list(img.shape[::-1]) == r["shape"]
        assert np.allclose(img.header.get_zooms()[::-1], r["spacing"])
        assert np.allclose(img.affine, lab.affine)
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        z, dy, dx = r["spacing"]
        assert 6 <= z <= 10 and 8 <= r["shape"][0] <= 12
        assert dx == pytest.approx(VENDORS["B"].fov / MATRIX)
    splits = json.loads((nnunet_env["preprocessed"] / folder.name / "splits_final.json").read_text())
    assert len(splits) == 5
    subject = {r["case"]: r["subject"] for r in records}
    for fold in splits:
        assert not {subject[c] for c in fold["train"]} & {subject[c] for c in fold["val"]}
    assert sorted(c for f in splits for c in f["val"]) == sorted(r["case"] for r in records if r["split"] == "Tr")


def test_default_spacing_is_realistic():
    for v in VENDORS.values():
        assert 1.2 <= v.inplane_spacing <= 1.8 and 6 <= v.slice_spacing <= 10


@pytest.mark.timeout(120)
def test_anatomy_labels_mid_slices_lv_enclosed_rv_on_septum(nnunet_env):
    folder = generate_phantom_dataset(8, "C", 6, seed=1, matrix=64)
    four = ndimage.generate_binary_structure(2, 1)
    for path, lab in _labels(folder):
        mid = lab.shape[0] // 2
        for k in (mid - 1, mid, mid + 1):
            assert set(np.unique(lab[k])) == {0, 1, 2, 3}, f"{path.name} slice {k}"
        for k in range(lab.shape[0]):
            lv, myo, rv = lab[k] == 1, lab[k] == 2, lab[k] == 3
            if lv.any():
                ring = ndimage.binary_dilation(lv, four) & ~lv
                assert myo[ring].all(), f"{path.name} slice {k}: LV touches something other than MYO"
            if rv.any():
                assert (ndimage.binary_dilation(rv, four) & myo).any(), f"{path.name} slice {k}: RV off septum"
    # contraction: the ES cavity is smaller than the ED cavity
    ed = dict(_labels(folder))
    for p, lab in ed.items():
        if p.name.endswith("_ED.nii.gz"):
            es = ed[p.with_name(p.name.replace("_ED", "_ES"))]
            assert (es == 1).sum() < 0.8 * (lab == 1).sum()


def _tissue_stats(vendor: str, n: int = 3):
    ratios, noise = [], []
    for i in range(n):
        s = generate_subject(vendor, i, seed=0, matrix=96)["ED"]
        img, lab = s["image"], s["label"]
        mid = lab.shape[0] // 2
        er = lambda m: ndimage.binary_erosion(m, iterations=1)  # noqa: E731  (avoid partial volume)
        blood = img[mid][er(lab[mid] == 1)]
        myo = img[mid][er(lab[mid] == 2)]
        ratios.append(np.median(blood) / np.median(myo))
        noise.append(np.std(img[mid][:4, :4]) / np.median(blood))  # air corner
    return float(np.mean(ratios)), float(np.mean(noise))


def test_vendor_intensity_statistics_differ_but_stay_segmentable():
    ra, na = _tissue_stats("A")
    rb, nb = _tissue_stats("B")
    assert ra > 1.4 * rb, (ra, rb)  # very different blood/myocardium contrast
    assert rb > 1.3  # blood still brighter than myocardium: B remains segmentable
    assert nb > 1.5 * na, (na, nb)  # B is noisier


def test_bad_arguments_raise_clear_errors(nnunet_env):
    with pytest.raises(SDDMError, match="unknown phantom vendor"):
        generate_phantom_dataset(9, "Z", 5)
    with pytest.raises(SDDMError, match="--cases"):
        generate_phantom_dataset(9, "A", 0)
    with pytest.raises(SDDMError, match="--matrix"):
        generate_phantom_dataset(9, "A", 5, matrix=8)
    assert list(nnunet_env["raw"].iterdir()) == []


@pytest.mark.timeout(120)
def test_cli_refuses_existing_id_and_keeps_splits(nnunet_env, capsys):
    phantoms.main(["-d", "12", "--vendor", "A", "--cases", "5", "--matrix", "32", "--name", "First"])
    first = nnunet_env["raw"] / "Dataset012_First"
    assert first.is_dir()
    splits = nnunet_env["preprocessed"] / "Dataset012_First" / "splits_final.json"
    before = splits.read_bytes()
    with pytest.raises(SystemExit) as e:
        phantoms.main(["-d", "12", "--vendor", "B", "--cases", "5", "--matrix", "32"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Dataset012_First" in err and "--overwrite" in err
    assert sorted(p.name for p in nnunet_env["raw"].iterdir()) == ["Dataset012_First"]
    phantoms.main(["-d", "12", "--vendor", "A", "--cases", "6", "--seed", "1", "--matrix", "32",
                   "--name", "First", "--overwrite"])
    assert len(list((first / "imagesTr").iterdir())) == 12
    assert splits.read_bytes() == before  # an existing split file is never overwritten
    assert "does not list the same training cases" in capsys.readouterr().err
    # replacing with another name removes the old folder of that id
    phantoms.main(["-d", "12", "--vendor", "B", "--cases", "5", "--matrix", "32", "--overwrite"])
    assert sorted(p.name for p in nnunet_env["raw"].iterdir()) == ["Dataset012_PhantomB"]


@pytest.mark.timeout(120)
def test_failed_run_leaves_nothing_that_blocks_the_identical_retry(nnunet_env, monkeypatch, capsys):
    # issue 11: nnUNet_raw set, nnUNet_preprocessed unset -> the dataset was left in nnUNet_raw and
    # the identical retry was refused ("id exists already")
    args = ["-d", "14", "--vendor", "A", "--cases", "5", "--matrix", "32"]
    monkeypatch.delenv("nnUNet_preprocessed")
    with pytest.raises(SystemExit) as e:
        phantoms.main(args)
    assert e.value.code == 2
    assert "nnUNet_preprocessed" in capsys.readouterr().err
    assert list(nnunet_env["raw"].iterdir()) == []  # nothing published, no staging left behind
    # the splits could not be written (nnUNet_preprocessed, or the dataset's folder in it, is a file)
    blocker = nnunet_env["preprocessed"].parent / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("nnUNet_preprocessed", str(blocker))
    with pytest.raises(SystemExit) as e:
        phantoms.main(args)
    assert e.value.code == 2
    assert f"nnUNet_preprocessed={blocker} is not a folder" in capsys.readouterr().err
    assert list(nnunet_env["raw"].iterdir()) == []
    monkeypatch.setenv("nnUNet_preprocessed", str(nnunet_env["preprocessed"]))
    (nnunet_env["preprocessed"] / "Dataset014_PhantomA").write_text("")
    with pytest.raises(SystemExit) as e:
        phantoms.main(args)
    assert e.value.code == 2
    assert "Dataset014_PhantomA: exists and is not a folder" in capsys.readouterr().err
    assert list(nnunet_env["raw"].iterdir()) == []
    (nnunet_env["preprocessed"] / "Dataset014_PhantomA").unlink()
    phantoms.main(args)  # the identical retry succeeds
    assert sorted(p.name for p in nnunet_env["raw"].iterdir()) == ["Dataset014_PhantomA"]
    assert (nnunet_env["preprocessed"] / "Dataset014_PhantomA" / "splits_final.json").is_file()


def test_builder_undoes_its_splits_when_publishing_fails(nnunet_env):
    # another process creates the final folder while the dataset is built: nothing of ours stays
    from nnunet_sddm.data.raw_dataset import RawDatasetBuilder, make_nifti
    from nnunet_sddm.data.volumes import save_nifti

    with pytest.raises(FileExistsError):
        with RawDatasetBuilder(15, "Race") as b:
            for i in range(2):
                case = f"s{i}_ED"
                save_nifti(make_nifti(np.zeros((2, 4, 4), np.float32), (8, 1, 1), np.float32), b.image_path(case, "Tr"))
                save_nifti(make_nifti(np.zeros((2, 4, 4), np.uint8), (8, 1, 1), np.uint8), b.label_path(case, "Tr"))
                b.add_record({"case": case, "subject": f"s{i}", "split": "Tr"})
            b.final.mkdir()
            (b.final / "theirs.txt").write_text("x")
    assert sorted(p.name for p in nnunet_env["raw"].iterdir()) == ["Dataset015_Race"]
    assert [p.name for p in b.final.iterdir()] == ["theirs.txt"]
    assert not (nnunet_env["preprocessed"] / "Dataset015_Race" / "splits_final.json").exists()


@pytest.mark.timeout(180)
def test_nnunet_integrity_check_passes(nnunet_env):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = generate_phantom_dataset(13, "D", 5, n_test_cases=1, seed=0, matrix=MATRIX)
    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem
