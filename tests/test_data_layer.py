"""The shared data layer: raw-dataset helpers, volumes with geometry, model-space slices, utilities."""
from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_sddm.data.raw_dataset import (list_images, load_dataset_json, patient_level_splits,
                                          write_dataset_json, write_splits)
from nnunet_sddm.data.slices import (IntensityWindow, SquareResize, data_round_trip, model_slices_to_volume,
                                     volume_to_model_slices)
from nnunet_sddm.data.volumes import read_volume, same_geometry, write_like
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import atomic_path, remove_stale_temp, staging_dir
from nnunet_sddm.utilities.nnunet_paths import find_raw_dataset


def _oblique_nifti(path, shape=(37, 29, 5), spacing=(1.4, 1.6, 8.0), dtype=np.int16, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 1000, size=shape).astype(dtype)
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-12.5, 40.25, 7.0]
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, str(path))
    return data


def test_write_like_keeps_nifti_geometry(tmp_path):
    src = tmp_path / "case_0000.nii.gz"
    data = _oblique_nifti(src)
    vol = read_volume(src)
    assert vol.data.shape == (5, 29, 37)  # nnU-Net order (z, y, x)
    np.testing.assert_array_equal(vol.data, data.transpose(2, 1, 0).astype(np.float32))
    out = tmp_path / "out" / "case_0000.nii.gz"
    write_like(vol.data * 0.5, src, out)
    assert same_geometry(src, out)
    a, b = nib.load(str(src)), nib.load(str(out))
    assert int(b.header["qform_code"]) == 1 and int(b.header["sform_code"]) == 2
    np.testing.assert_allclose(a.affine, b.affine)
    np.testing.assert_allclose(b.get_fdata(), data * 0.5, rtol=1e-6)
    assert [p.name for p in out.parent.iterdir()] == ["case_0000.nii.gz"]  # no temp left
    assert out.stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044  # readable by others


def test_write_like_keeps_sitk_geometry(tmp_path):
    img = sitk.GetImageFromArray(np.arange(4 * 6 * 7, dtype=np.float32).reshape(4, 6, 7))
    img.SetSpacing((1.3, 1.7, 9.0))
    img.SetOrigin((3.0, -2.0, 11.0))
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    src = tmp_path / "c_0000.nrrd"
    sitk.WriteImage(img, str(src))
    vol = read_volume(src)
    out = tmp_path / "o" / "c_0000.nrrd"
    write_like(vol.data + 1, src, out)
    assert same_geometry(src, out)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), vol.data + 1)


def test_read_volume_rejects_bad_images(tmp_path):
    p2 = tmp_path / "two_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(p2))
    with pytest.raises(SDDMError, match="two_0000.nii.gz.*3D"):
        read_volume(p2)
    p4 = tmp_path / "four_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3, 2), np.float32), np.eye(4)), str(p4))
    with pytest.raises(SDDMError, match="four_0000.nii.gz.*4D"):
        read_volume(p4)
    pn = tmp_path / "nan_0000.nii.gz"
    d = np.ones((8, 8, 3), np.float32)
    d[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(d, np.eye(4)), str(pn))
    with pytest.raises(SDDMError, match="nan_0000.nii.gz.*NaN"):
        read_volume(pn)
    bad = tmp_path / "bad_0000.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(SDDMError, match="bad_0000.nii.gz"):
        read_volume(bad)


def test_intensity_window_round_trip_and_errors():
    rng = np.random.default_rng(1)
    v = rng.normal(100, 20, size=(4, 16, 16)).astype(np.float32)
    w = IntensityWindow.fit(v)
    assert w.lo == pytest.approx(np.percentile(v, 0.5)) and w.hi == pytest.approx(np.percentile(v, 99.5))
    n = w.normalize(v)
    assert n.min() == pytest.approx(-1) and n.max() == pytest.approx(1)
    np.testing.assert_allclose(w.denormalize(n), np.clip(v, w.lo, w.hi), rtol=1e-5, atol=1e-3)
    with pytest.raises(SDDMError, match="constant"):
        IntensityWindow.fit(np.full((2, 4, 4), 7.0))


@pytest.mark.parametrize("h,w,size", [(37, 29, 64), (64, 64, 64), (200, 150, 128), (20, 31, 32)])
def test_square_resize_shapes_and_inverse(h, w, size):
    r = SquareResize(h, w, size)
    x = torch.linspace(-1, 1, h * w).reshape(1, h, w).repeat(3, 1, 1)
    y = r.forward(x)
    assert y.shape == (3, 1, size, size)
    back = r.inverse(y)
    assert back.shape == (3, h, w)
    if max(h, w) == size:
        if h == w:
            torch.testing.assert_close(back, x)
    else:  # smooth ramp survives the round trip up to interpolation error
        assert (back - x)[:, 2:-2, 2:-2].abs().max() < 0.15


def test_volume_model_slices_round_trip():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:48, :40]
    v = (np.sin(yy / 7.0) + np.cos(xx / 9.0))[None].repeat(3, 0) * 50 + 300
    v = v + rng.normal(0, 0.1, v.shape)
    x, win, res = volume_to_model_slices(v.astype(np.float32), 48)
    assert x.shape == (3, 1, 48, 48) and float(x.min()) >= -1 and float(x.max()) <= 1
    back = model_slices_to_volume(x, win, res)
    assert back.shape == v.shape
    np.testing.assert_allclose(back, np.clip(v, win.lo, win.hi), atol=1e-3 * (win.hi - win.lo))


def test_data_round_trip_in_resize_mode_is_the_data_path_alone():
    """The geometric round trip keeps shape and window; at the volume's own square size it is the
    identity up to the window's clip; at a coarser model size fine detail is lost, a smooth ramp not."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:48, :40]
    smooth = ((yy + xx) * 2.0)[None].repeat(2, 0).astype(np.float32) + 100
    fine = smooth + np.where((yy + xx) % 2 == 0, 20.0, -20.0)[None].astype(np.float32)
    win = IntensityWindow.fit(fine)
    same = data_round_trip(fine, 48, None)
    assert same.shape == fine.shape and same.dtype == np.float32
    np.testing.assert_allclose(same, np.clip(fine, win.lo, win.hi), atol=1e-3 * (win.hi - win.lo))
    coarse = data_round_trip(fine, 16, None)
    assert coarse.shape == fine.shape and coarse.min() >= win.lo - 1e-3 and coarse.max() <= win.hi + 1e-3
    assert np.abs(coarse - fine)[:, 4:-4, 4:-4].mean() > 10  # the checkerboard is gone
    ramp = data_round_trip(smooth + rng.normal(0, 0.01, smooth.shape).astype(np.float32), 16, None)
    assert np.abs(ramp - smooth)[:, 4:-4, 4:-4].max() < 0.05 * (smooth.max() - smooth.min())


def test_list_images_and_dataset_json(tmp_path):
    for c in ("a", "b"):
        (tmp_path / f"{c}_0000.nii.gz").write_bytes(b"")
    assert list(list_images(tmp_path)) == ["a", "b"]
    (tmp_path / "b_0001.nii.gz").write_bytes(b"")
    with pytest.raises(SDDMError, match="single-channel"):
        list_images(tmp_path)
    (tmp_path / "b_0001.nii.gz").unlink()
    (tmp_path / "weird.nii.gz").write_bytes(b"")
    with pytest.raises(SDDMError, match="weird.nii.gz"):
        list_images(tmp_path)
    with pytest.raises(SDDMError, match="dataset.json"):
        load_dataset_json(tmp_path)
    write_dataset_json(tmp_path, 2, name="X")
    assert load_dataset_json(tmp_path)["labels"] == {"background": 0, "LV": 1, "MYO": 2, "RV": 3}


def test_patient_level_splits_keep_subjects_together(tmp_path):
    case_to_subject = {f"p{i:03d}_{ph}": f"p{i:03d}" for i in range(12) for ph in ("ED", "ES")}
    splits = patient_level_splits(case_to_subject, n_folds=5, seed=3)
    assert len(splits) == 5
    all_val = [c for s in splits for c in s["val"]]
    assert sorted(all_val) == sorted(case_to_subject)
    for s in splits:
        val_subjects = {case_to_subject[c] for c in s["val"]}
        train_subjects = {case_to_subject[c] for c in s["train"]}
        assert not val_subjects & train_subjects
    assert splits == patient_level_splits(case_to_subject, n_folds=5, seed=3)
    assert write_splits(tmp_path, splits) is not None
    assert write_splits(tmp_path, [{"train": [], "val": []}]) is None  # never overwritten
    with pytest.raises(SDDMError):
        patient_level_splits({"a": "1", "b": "2"}, n_folds=5)


def test_atomic_path_and_staging_dir_leave_nothing_on_error(tmp_path):
    target = tmp_path / "f.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    final = tmp_path / "Dataset001_X"
    with pytest.raises(RuntimeError):
        with staging_dir(final) as d:
            (d / "x").write_text("1")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with staging_dir(final) as d:
        (d / "x").write_text("1")
    assert (final / "x").read_text() == "1"
    with staging_dir(final, overwrite=True) as d:
        (d / "y").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_X"]


def test_atomic_temp_files_never_look_like_nnunet_images(tmp_path):
    """A write killed half-way leaves nothing that nnU-Net's listing takes for an image; the temp
    file keeps the real name (writers that dispatch on the ending work); leftovers are removable."""
    import tempfile

    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "A_0000.nii.gz"))
    killed = atomic_path(tmp_path / "B_0000.nii.gz")  # entered, never left: a SIGKILL mid-write
    tmp = killed.__enter__()
    assert tmp.name == "B_0000.nii.gz" and tmp.parent != tmp_path
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.float32), np.eye(4)), str(tmp))
    assert create_lists_from_splitted_dataset_folder(str(tmp_path), ".nii.gz", num_processes=1) == \
        [[str(tmp_path / "A_0000.nii.gz")]]
    assert list(list_images(tmp_path)) == ["A"]
    with atomic_path(tmp_path / "arr.npy") as t:  # np.save appends .npy to other endings
        np.save(t, np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "arr.npy"), np.arange(3))
    fd, legacy = tempfile.mkstemp(prefix=".C_0000.", suffix=".nii.gz", dir=tmp_path)  # earlier versions' temp
    os.close(fd)
    (tmp_path / ".keep").write_text("mine")
    (tmp_path / ".notes.v1.json").write_text("{}")
    removed = remove_stale_temp(tmp_path)
    assert sorted(p.name for p in removed) == sorted([tmp.parent.name, os.path.basename(legacy)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", ".notes.v1.json", "A_0000.nii.gz", "arr.npy"]


def test_find_raw_dataset(nnunet_env):
    (nnunet_env["raw"] / "Dataset007_Foo").mkdir()
    assert find_raw_dataset(7).name == "Dataset007_Foo"
    assert find_raw_dataset("Dataset007_Foo").name == "Dataset007_Foo"
    with pytest.raises(SDDMError, match="no dataset with id 8"):
        find_raw_dataset(8)
    (nnunet_env["raw"] / "Dataset007_Bar").mkdir()
    with pytest.raises(SDDMError, match="several datasets"):
        find_raw_dataset("7")


def test_cli_entry_exit_codes(tmp_path):
    code = ("from nnunet_sddm.utilities.errors import cli_entry, SDDMError\n"
            "@cli_entry\n"
            "def main():\n"
            "    raise SDDMError('file x.nii.gz: broken')\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert "error: file x.nii.gz: broken" in r.stderr and "Traceback" not in r.stderr
