"""Largest connected component per structure (``adaptation.postprocess``) on generated masks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_sddm.adaptation.postprocess import (labels_from_dataset_json, largest_component_per_label,
                                                postprocess_folder)
from nnunet_sddm.utilities.errors import SDDMError

SPACING = (1.25, 1.4, 8.0)
ORIGIN = (12.5, -30.0, 4.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def two_blobs() -> np.ndarray:
    seg = np.zeros((4, 16, 16), dtype=np.uint8)
    seg[0:3, 2:6, 2:6] = 1     # 48 voxels
    seg[1:2, 10:13, 10:13] = 1  # 9 voxels, separate
    seg[0:2, 10:14, 1:3] = 2    # label 2: two pieces, also separate
    seg[3, 0:2, 14:16] = 2
    seg[3, 12:15, 12:15] = 3
    return seg


def test_two_blobs_of_one_label_keep_the_larger():
    seg = two_blobs()
    out = largest_component_per_label(seg, [1])
    assert out.dtype == seg.dtype and out.shape == seg.shape
    assert np.count_nonzero(out == 1) == 48
    assert not out[1, 10:13, 10:13].any()  # the small blob became background
    # other labels untouched
    np.testing.assert_array_equal(out[seg != 1], seg[seg != 1])


def test_every_label_cleaned_and_others_untouched():
    seg = two_blobs()
    out = largest_component_per_label(seg, [1, 2, 3])
    assert np.count_nonzero(out == 2) == 16 and np.count_nonzero(out == 3) == 9
    assert set(np.unique(out[seg != out])) == {0}
    np.testing.assert_array_equal(largest_component_per_label(out, [1, 2, 3]), out)  # idempotent


def test_ties_are_deterministic_first_in_raster_order():
    seg = np.zeros((3, 10, 10), dtype=np.int16)
    seg[2, 0:2, 0:2] = 1  # same size, later in raster order (z = 2)
    seg[0, 6:8, 6:8] = 1  # first in raster order
    out = largest_component_per_label(seg, [1])
    assert out[0, 6:8, 6:8].all() and not out[2].any()
    np.testing.assert_array_equal(out, largest_component_per_label(seg.copy(), [1]))


def test_full_3d_connectivity_by_default():
    seg = np.zeros((2, 5, 5), dtype=np.uint8)
    seg[0, 1, 1] = 1
    seg[0, 1, 2] = 1
    seg[1, 2, 3] = 1  # touches (0, 1, 2) only by a corner across slices
    assert np.count_nonzero(largest_component_per_label(seg, [1])) == 3
    assert np.count_nonzero(largest_component_per_label(seg, [1], connectivity=1)) == 2


def test_2d_absent_labels_and_refusals():
    seg = np.zeros((8, 8), dtype=np.uint8)
    seg[0, 0] = seg[5:7, 5:7] = 1
    out = largest_component_per_label(seg, [1, 7])
    assert out[0, 0] == 0 and out[5:7, 5:7].all()
    with pytest.raises(SDDMError, match="background"):
        largest_component_per_label(seg, [0])
    with pytest.raises(SDDMError, match="connectivity"):
        largest_component_per_label(seg, [1], connectivity=3)
    with pytest.raises(SDDMError, match="2D or 3D"):
        largest_component_per_label(seg[None, None], [1])


def test_labels_from_dataset_json():
    assert labels_from_dataset_json({"labels": {"background": 0, "LV": 1, "MYO": 2, "RV": 3}}) == [1, 2, 3]
    assert labels_from_dataset_json({"labels": {"background": 0}}) is None


def write_seg(arr: np.ndarray, path) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    sitk.WriteImage(img, str(path), True)


def test_postprocess_folder_keeps_geometry_and_records(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    seg = two_blobs()
    write_seg(seg, pred / "caseA.nii.gz")
    write_seg(np.flip(seg, axis=1).copy(), pred / "caseB.nii.gz")
    (pred / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "LV": 1, "MYO": 2, "RV": 3},
                                                   "file_ending": ".nii.gz"}))
    (pred / "caseA.npz").write_bytes(b"not copied")
    out = tmp_path / "pp"
    rec = postprocess_folder(pred, out, progress=False)
    assert rec["labels"] == [1, 2, 3] and rec["removed_voxels"]["caseA"] == {"1": 9, "2": 4, "3": 0}
    assert sorted(p.name for p in out.iterdir()) == ["caseA.nii.gz", "caseB.nii.gz", "dataset.json",
                                                     "postprocess.json"]
    for name, ref in (("caseA.nii.gz", seg), ("caseB.nii.gz", np.flip(seg, axis=1))):
        img, src = sitk.ReadImage(str(out / name)), sitk.ReadImage(str(pred / name))
        assert (img.GetSpacing(), img.GetOrigin(), img.GetDirection()) == \
               (src.GetSpacing(), src.GetOrigin(), src.GetDirection())
        assert np.allclose(img.GetSpacing(), SPACING) and np.allclose(img.GetDirection(), DIRECTION)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), largest_component_per_label(ref, [1, 2, 3]))
    assert json.loads((out / "postprocess.json").read_text())["postprocess"] == "lcc"
    with pytest.raises(SDDMError, match="exists"):
        postprocess_folder(pred, out, progress=False)
    rec = postprocess_folder(pred, out, labels=[1], overwrite=True, progress=False)
    assert rec["removed_voxels"]["caseA"] == {"1": 9}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    with pytest.raises(SDDMError, match="prediction folder"):
        postprocess_folder(out, out, progress=False)
