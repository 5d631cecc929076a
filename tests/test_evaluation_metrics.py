"""Parity of the project's metrics with medpy.metric.binary (0.5.2) and the empty-mask policy."""
from __future__ import annotations

import math

import numpy as np
import pytest
from medpy.metric import binary as mb
from scipy import ndimage

from nnunet_sddm.evaluation.metrics import METRICS, EmptyPolicy, case_metrics, structure_metrics
from nnunet_sddm.evaluation.surface import bounding_box, surface_distances
from nnunet_sddm.utilities.errors import SDDMError


def medpy_all(p, r, sp):
    return {"DSC": mb.dc(p, r), "IoU": mb.jc(p, r), "ASD": mb.asd(p, r, sp), "ASSD": mb.assd(p, r, sp),
            "HD": mb.hd(p, r, sp), "HD95": mb.hd95(p, r, sp)}


def assert_parity(p, r, sp):
    ours = structure_metrics(p, r, sp)
    ref = medpy_all(p, r, sp)
    for m in METRICS:
        assert abs(ours[m] - ref[m]) <= 1e-9, (m, ours[m], ref[m])


def ellipsoid(shape, centre, radii):
    grids = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) < 1


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (8.0, 1.25, 1.25), (5.0, 0.7, 1.9)])
def test_parity_spheres_shifted_and_eroded(spacing):
    shape = (14, 40, 44)
    a = ellipsoid(shape, (7, 20, 22), (5, 12, 14))
    b = ellipsoid(shape, (7.6, 18, 24), (4.5, 13, 12))
    assert_parity(a, b, spacing)
    assert_parity(b, a, spacing)
    assert_parity(a, np.roll(a, 3, axis=2), spacing)
    assert_parity(a, ndimage.binary_erosion(a, iterations=2), spacing)
    # a far-away island: HD driven by it, crop spans both
    c = a.copy()
    c[1:3, 2:4, 40:43] = True
    assert_parity(c, b, spacing)


def test_parity_masks_touching_the_image_border():
    rng = np.random.default_rng(1)
    shape = (6, 20, 18)
    a = np.zeros(shape, bool)
    a[0:3, 0:8, 5:18] = True            # touches three faces of the image
    b = ellipsoid(shape, (0, 2, 17), (3, 6, 5))
    b |= rng.random(shape) > 0.93       # scattered voxels, many on the border
    for sp in [(1.0, 1.0, 1.0), (10.0, 1.5, 1.5)]:
        assert_parity(a, b, sp)
        assert_parity(b, a, sp)
        full = np.ones(shape, bool)     # everything foreground: its surface is the image border
        assert_parity(full, a, sp)


def test_parity_2d_and_single_voxels():
    a = np.zeros((30, 30), bool)
    a[10:20, 5:12] = True
    b = np.zeros((30, 30), bool)
    b[29, 29] = True
    assert_parity(a, b, (1.3, 0.8))
    assert_parity(b, b, (1.3, 0.8))


def test_surface_distances_directed_sets_equal_medpy_internal():
    shape = (8, 24, 24)
    a = ellipsoid(shape, (4, 12, 11), (3, 8, 6))
    b = ellipsoid(shape, (4, 10, 13), (3.5, 7, 8))
    sp = (6.0, 1.1, 1.1)
    d_ab, d_ba = surface_distances(a, b, sp)
    medpy_sd = getattr(mb, "__surface_distances")
    np.testing.assert_array_equal(d_ab, medpy_sd(a, b, sp))
    np.testing.assert_array_equal(d_ba, medpy_sd(b, a, sp))
    assert bounding_box(np.zeros((3, 3), bool)) is None
    assert bounding_box(a) == tuple(slice(int(np.flatnonzero(np.any(a, axis=tuple(j for j in range(3) if j != i)))[0]),
                                          int(np.flatnonzero(np.any(a, axis=tuple(j for j in range(3) if j != i)))[-1]) + 1)
                                    for i in range(3))


def test_empty_policies():
    shape, sp = (4, 10, 10), (5.0, 1.0, 2.0)
    a = np.zeros(shape, bool)
    a[1:3, 2:5, 2:5] = True
    empty = np.zeros(shape, bool)
    r = structure_metrics(empty, a, sp)
    assert r["pred_empty"] and not r["ref_empty"]
    assert r["DSC"] == 0.0 and r["IoU"] == 0.0 and all(math.isnan(r[m]) for m in ("ASD", "ASSD", "HD", "HD95"))
    diag = math.sqrt(20 ** 2 + 10 ** 2 + 20 ** 2)
    r = structure_metrics(a, empty, sp, EmptyPolicy("diagonal"))
    assert r["ref_empty"] and r["HD"] == pytest.approx(diag) and r["ASSD"] == pytest.approx(diag)
    r = structure_metrics(a, empty, sp, EmptyPolicy(37.5))
    assert r["HD95"] == 37.5
    r = structure_metrics(empty, empty, sp)
    assert all(math.isnan(r[m]) for m in METRICS)
    r = structure_metrics(empty, empty, sp, EmptyPolicy("nan", "perfect"))
    assert (r["DSC"], r["IoU"], r["HD"]) == (1.0, 1.0, 0.0)
    with pytest.raises(SDDMError):
        EmptyPolicy("banana")
    with pytest.raises(SDDMError):
        EmptyPolicy("nan", "maybe")


def test_per_slice_mode_matches_medpy_2d_and_documented_aggregation():
    shape, sp = (5, 24, 24), (8.0, 1.2, 1.4)
    ref = np.zeros(shape, np.int16)
    pred = np.zeros(shape, np.int16)
    ref[1:4][:, ellipsoid((24, 24), (12, 12), (7, 6))] = 1
    pred[1:3][:, ellipsoid((24, 24), (11, 13), (6, 7))] = 1     # slice 3: prediction empty
    pred[4][3:6, 3:6] = 1                                       # slice 4: reference empty
    rows = case_metrics(pred, ref, {"LV": 1}, sp, per_slice=True)
    (row,) = rows
    slices = row["slices"]
    for k in (1, 2):
        ref_k = medpy_all(pred[k] == 1, ref[k] == 1, sp[1:])
        for m in METRICS:
            assert slices[k][m] == pytest.approx(ref_k[m], abs=1e-9)
    assert math.isnan(slices[0]["DSC"])                         # both empty: excluded
    assert slices[3]["DSC"] == 0.0 and math.isnan(slices[3]["HD"])
    assert row["DSC"] == pytest.approx(np.mean([slices[k]["DSC"] for k in (1, 2, 3, 4)]))
    assert row["HD"] == pytest.approx(np.mean([slices[k]["HD"] for k in (1, 2)]))


@pytest.mark.timeout(60)
def test_parity_on_real_masks(shared_data):
    """Real M&Ms and ACDC masks vs shifted/eroded copies. MedPy's full-volume functions take
    seconds per call, so the comparison is on MedPy's own directed distance sets (2 EDTs per
    pair instead of 7) and its formulas; the generated-shape tests compare the full functions."""
    import nibabel as nib

    medpy_sd = getattr(mb, "__surface_distances")
    files = [next((shared_data / "MnMs1-sample").glob("*_sa_ED_gt.nii.gz")),
             shared_data / "ACDC" / "training" / "patient001" / "patient001_frame01_gt.nii.gz"]
    for f in files:
        img = nib.load(str(f))
        lab = np.rint(np.asarray(img.dataobj)).astype(np.int16).transpose(2, 1, 0)
        sp = tuple(float(s) for s in img.header.get_zooms())[::-1]
        box = bounding_box(lab > 0)  # real shapes, less empty field around them (keeps MedPy fast)
        lab = lab[:, max(0, box[1].start - 4):box[1].stop + 4, max(0, box[2].start - 4):box[2].stop + 4]
        for v in (1, 2, 3):
            r = lab == v
            for p in (np.roll(r, (1, 2), axis=(1, 2)), ndimage.binary_erosion(r, iterations=1)):
                d_pr, d_rp = medpy_sd(p, r, sp), medpy_sd(r, p, sp)
                ours = structure_metrics(p, r, sp)
                expected = {"DSC": mb.dc(p, r), "IoU": mb.jc(p, r), "ASD": d_pr.mean(),
                            "ASSD": np.concatenate([d_pr, d_rp]).mean(), "HD": max(d_pr.max(), d_rp.max()),
                            "HD95": np.percentile(np.hstack((d_pr, d_rp)), 95)}
                for m in METRICS:
                    assert abs(ours[m] - expected[m]) <= 1e-9, (f.name, v, m)
                np.testing.assert_allclose(np.sort(surface_distances(p, r, sp)[0]), np.sort(d_pr), atol=1e-9)
