"""Deformable label augmentation: values, topology, image-label coupling, geometry, seeding, retries,
bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from nnunet_sddm.data.deformation import (
    Deformation,
    DeformationSettings,
    deform_pair,
    is_thick_slice_stack,
    sample_deformation,
    topology_preserved,
)
from nnunet_sddm.utilities.errors import SDDMError

LV, MYO, RV = 1, 2, 3
SPACING_2D = (1.5, 1.5)
SPACING_3D = (10.0, 1.5, 1.5)


def heart_slice(n: int = 64, lv_r: float = 10.0, wall: float = 5.0, rv: bool = True, cy: float = 32.0,
                cx: float = 28.0) -> np.ndarray:
    """LV disc inside a myocardial ring, an RV crescent beside the septum; uint8 (y, x)."""
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - cy, xx - cx)
    lab = np.zeros((n, n), np.uint8)
    lab[r < lv_r + wall] = MYO
    lab[r < lv_r] = LV
    if rv:
        lab[(np.hypot(yy - cy, xx - cx - 14) < lv_r + 5) & (r >= lv_r + wall + 2)] = RV
    return lab


def heart_stack() -> np.ndarray:
    """(6, 64, 64) base-to-apex stack: shrinking LV, no RV in the apical slice."""
    slices = [heart_slice(lv_r=10 - 1.2 * k, wall=5, rv=k < 5) for k in range(6)]
    return np.stack(slices)


def topology(mask: np.ndarray, min_voxels: int = DeformationSettings().topology_min_voxels):
    """(components with full connectivity, holes) of a 2D mask, pieces of >= min_voxels voxels,
    computed independently of the module."""
    full = np.ones((3, 3), bool)
    comp, n = ndimage.label(mask, structure=full)
    n = int(np.sum(np.bincount(comp.ravel())[1:] >= min_voxels))
    comp, nc = ndimage.label(~mask)  # face connectivity for the complement
    border = set(np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))) - {0}
    sizes = np.bincount(comp.ravel())
    return n, sum(1 for h in range(1, nc + 1) if h not in border and sizes[h] >= min_voxels)


def blob(shape, centre, radius):
    idx = np.indices(shape)
    d2 = sum((i - c) ** 2 for i, c in zip(idx, centre))
    return (d2 < radius ** 2).astype(np.uint8)


def affine(shape, spacing, angles=None, scale=None, shift=None) -> Deformation:
    nd = len(shape)
    return Deformation(shape=shape, spacing=spacing, angles_deg=angles or ((0.0,) if nd == 2 else (0.0,) * 3),
                       scale=scale or (1.0,) * nd, shift_vox=shift or (0.0,) * nd,
                       control_displacements=np.zeros((nd,) + (1,) * nd))


def com(a: np.ndarray) -> np.ndarray:
    return np.asarray(ndimage.center_of_mass(a.astype(np.float64)))


# ------------------------------------------------------------------------------------------------


def test_values_dtype_and_topology_kept_for_many_seeds_2d():
    lab = heart_slice()
    tries = []
    for seed in range(40):
        out = deform_pair(None, lab, SPACING_2D, seed=seed, name=f"case{seed}")
        assert out.label.dtype == lab.dtype and out.label.shape == lab.shape
        assert set(np.unique(out.label)) == set(np.unique(lab))
        for v in (LV, MYO, RV):
            assert topology(out.label == v) == topology(lab == v), (seed, v)
        assert topology(out.label == MYO)[1] == 1  # still a ring
        assert not np.array_equal(out.label, lab)
        tries.append(out.tries)
    assert max(tries) <= DeformationSettings().max_tries


def test_values_dtype_and_topology_kept_for_many_seeds_3d_thick_stack():
    lab = heart_stack().astype(np.int16)
    assert is_thick_slice_stack(SPACING_3D) and not is_thick_slice_stack((2.0, 1.5, 1.5))
    for seed in range(12):
        out = deform_pair(None, lab, SPACING_3D, seed=seed)
        assert out.label.dtype == np.int16 and out.label.shape == lab.shape
        assert set(np.unique(out.label)) == set(np.unique(lab))
        for k in range(lab.shape[0]):
            for v in (LV, MYO, RV):
                assert topology(out.label[k] == v) == topology(lab[k] == v), (seed, k, v)
        # thick stack, default settings: every slice stays on itself and moves the same way in plane
        g = out.deformation.grid()
        assert np.array_equal(g[0], np.indices(lab.shape)[0])
        assert np.allclose(g[1:], g[1:, :1])
        assert out.deformation.scale[0] == 1.0 and out.deformation.shift_vox[0] == 0.0


def test_thick_stack_tilts_only_when_asked_and_is_then_checked_as_a_volume():
    lab = heart_stack()
    s = DeformationSettings(tilt_deg=3.0)
    d = sample_deformation(lab.shape, SPACING_3D, s, np.random.default_rng(0))
    assert 0 < abs(d.angles_deg[1]) <= 3.0 and 0 < abs(d.angles_deg[2]) <= 3.0 and not d.keeps_slices()
    assert sample_deformation(lab.shape, SPACING_3D, DeformationSettings(), np.random.default_rng(0)).keeps_slices()
    out = deform_pair(None, lab, SPACING_3D, s, seed=0)
    full = np.ones((3, 3, 3), bool)
    for v in (LV, MYO, RV):
        assert ndimage.label(out.label == v, full)[1] == ndimage.label(lab == v, full)[1]


def test_isotropic_3d_volume_is_deformed_along_every_axis():
    lab = np.zeros((24, 24, 24), np.uint8)
    lab[blob(lab.shape, (12, 12, 12), 7) > 0] = 1
    out = deform_pair(None, lab, (1.0, 1.0, 1.0), seed=5)
    d = out.deformation
    assert all(a != 0.0 for a in d.angles_deg) and len(set(d.scale)) == 1 and d.shift_vox[0] != 0.0
    assert not d.keeps_slices()
    assert ndimage.label(out.label == 1)[1] == 1


def test_sampled_parameters_stay_in_their_ranges():
    s = DeformationSettings()
    rng = np.random.default_rng(0)
    for _ in range(50):
        d = sample_deformation((64, 48), (1.0, 2.0), s, rng)
        assert abs(d.angles_deg[0]) <= 8.0
        assert 0.95 <= d.scale[0] == d.scale[1] <= 1.0
        assert abs(d.shift_vox[0]) <= 0.02 * 64 and abs(d.shift_vox[1]) <= 0.02 * 48
        assert d.control_displacements.shape == (2, 4, 4)
    sd = np.std([sample_deformation((64, 64), (1.0, 1.0), s, rng).control_displacements for _ in range(200)])
    assert 1.8 < sd < 2.2  # elastic_sd is the sd of the control-point displacement in voxels


def test_identity_settings_return_the_input_exactly():
    lab = heart_slice()
    img = np.random.default_rng(1).normal(size=lab.shape).astype(np.float32)
    out = deform_pair(img, lab, (1.3, 0.7), DeformationSettings.identity(), seed=9)
    assert out.image.dtype == np.float32 and np.array_equal(out.image, img)
    assert np.array_equal(out.label, lab) and out.tries == 1
    vol = heart_stack()
    img3 = np.random.default_rng(2).normal(size=vol.shape)
    out3 = deform_pair(img3, vol, SPACING_3D, DeformationSettings.identity(), seed=9)
    assert np.array_equal(out3.image, img3) and np.array_equal(out3.label, vol)


def test_image_and_label_move_together():
    lab = heart_slice()
    for seed in (0, 1, 2):
        out = deform_pair(lab.astype(np.float64), lab, SPACING_2D, seed=seed)
        assert not np.array_equal(out.label, lab)
        for v in (0, LV, MYO, RV):
            inner = ndimage.binary_erosion(out.label == v, iterations=2)
            assert inner.sum() > 20
            assert np.max(np.abs(out.image[inner] - v)) < 1e-9, (seed, v)
        # boundaries agree too: the rounded image equals the label on most voxels
        assert np.mean(np.rint(out.image) == out.label) > 0.9


def test_output_shape_equals_input_shape_and_float_labels_are_kept():
    lab = heart_slice(n=50).astype(np.float32)
    out = deform_pair(np.ones((50, 50), np.int32), lab, SPACING_2D, seed=3)
    assert out.label.shape == lab.shape and out.label.dtype == np.float32
    assert out.image.shape == lab.shape and out.image.dtype == np.float32
    assert set(np.unique(out.label)) == {0.0, 1.0, 2.0, 3.0}


@pytest.mark.parametrize("shift", [(3.0, -5.0), (-2.0, 4.0)])
def test_pure_shift_moves_the_centre_of_mass(shift):
    lab = blob((64, 64), (30, 34), 8)
    d = affine((64, 64), (1.0, 2.0), shift=shift)
    moved = com(d.warp_label(lab)) - com(lab)
    assert np.allclose(moved, shift, atol=1e-6)
    frac = (1.4, -2.6)
    moved_img = com(affine((64, 64), (1.0, 2.0), shift=frac).warp_image(lab.astype(float))) - com(lab)
    assert np.allclose(moved_img, frac, atol=0.02)


@pytest.mark.parametrize("theta", [12.0, -20.0])
def test_pure_rotation_rotates_in_mm_space_for_anisotropic_spacing(theta):
    shape, spacing = (96, 64), (1.0, 1.8)  # (y, x) mm: x voxels are 1.8x wider
    c = (np.asarray(shape) - 1) / 2
    centre = (c[0] + 20, c[1] + 12)  # off-centre along both axes: 20 mm in y, 21.6 mm in x
    img = blob(shape, centre, 4).astype(np.float64)
    img = ndimage.gaussian_filter(img, 1.0)
    d = affine(shape, spacing, angles=(theta,))
    out = d.warp_image(img)
    v0 = (com(img) - c) * spacing
    v1 = (com(out) - c) * spacing
    ang = math.degrees(math.atan2(v1[0], v1[1]) - math.atan2(v0[0], v0[1]))
    assert ang == pytest.approx(theta, abs=0.5)  # from +x towards +y, in mm
    assert np.linalg.norm(v1) == pytest.approx(np.linalg.norm(v0), rel=0.02)


def test_scale_below_one_shrinks_the_anatomy_about_the_centre():
    lab = blob((64, 64), (31.5, 31.5), 16)
    out = affine((64, 64), (1.0, 1.0), scale=(0.9, 0.9)).warp_label(lab)
    assert out.sum() / lab.sum() == pytest.approx(0.81, rel=0.03)


def test_same_seed_same_bytes_different_seed_differs():
    lab = heart_stack()
    img = np.random.default_rng(0).normal(size=lab.shape).astype(np.float32)
    a = deform_pair(img, lab, SPACING_3D, seed=11)
    b = deform_pair(img.copy(), lab.copy(), SPACING_3D, seed=11)
    c = deform_pair(img, lab, SPACING_3D, seed=12)
    assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert a.image.tobytes() != c.image.tobytes() and a.label.tobytes() != c.label.tobytes()


def test_deformation_record_is_json_and_replays_the_same_field():
    lab = heart_slice()
    out = deform_pair(lab.astype(float), lab, SPACING_2D, seed=4)
    rec = json.loads(json.dumps(out.to_dict()))
    assert rec["name"] == "label" and rec["seed"] == 4 and rec["tries"] == out.tries
    d = Deformation.from_dict(rec["deformation"])
    assert np.array_equal(d.grid(), out.deformation.grid())
    assert np.array_equal(d.warp_label(lab), out.label)
    with pytest.raises(SDDMError, match="shape"):
        d.grid((32, 32))


def test_retries_follow_the_seeded_sequence_of_draws():
    """Thin (1-2 pixel) ring under elastic noise on a fine control grid: most first draws break it
    and are redrawn; the accepted draw is the first of the seeded sequence that keeps the topology."""
    yy, xx = np.mgrid[:48, :48]
    r = np.hypot(yy - 23.5, xx - 23.5)
    lab = ((r > 12) & (r <= 13.5)).astype(np.uint8) * MYO
    assert topology(lab == MYO) == (1, 1)
    s = DeformationSettings(elastic_grid=6, elastic_sd=1.0, scale=(0.97, 1.0), max_tries=40, topology_min_voxels=1)
    retried = 0
    for seed in range(8):
        try:
            out = deform_pair(None, lab, (1.0, 1.0), s, seed=seed, name=f"thin{seed}")
        except SDDMError as e:
            assert f"thin{seed}" in str(e) and "label 2" in str(e)
            continue
        assert topology(out.label == MYO, 1) == (1, 1)
        rng = np.random.default_rng(seed)
        for k in range(out.tries):
            d = sample_deformation(lab.shape, (1.0, 1.0), s, rng)
            ok, reason = topology_preserved(lab, d.warp_label(lab), min_voxels=1)
            assert ok == (k == out.tries - 1), (seed, k, reason)
        assert np.array_equal(d.grid(), out.deformation.grid())
        retried += out.tries > 1
    assert retried >= 4


def test_a_structure_that_every_draw_destroys_raises_naming_case_and_structure():
    lab = np.zeros((40, 40), np.uint8)
    lab[20, 4:36:3] = 2  # 11 single-pixel dots, 3 px apart
    lab[5:12, 5:12] = 1
    halve = DeformationSettings(rotation_deg=0.0, scale=(0.5, 0.5), shift_fraction=0.0, elastic_sd=0.0, max_tries=3,
                                topology_min_voxels=1)
    with pytest.raises(SDDMError, match=r"patient007.*3 deformations.*label 2 \(MYO\)"):
        deform_pair(None, lab, (1.0, 1.0), halve, seed=0, name="patient007", label_names={1: "LV", 2: "MYO"})


def test_specks_below_min_voxels_may_come_and_go_but_a_structure_may_not_vanish():
    lab = heart_slice()
    speck = lab.copy()
    speck[2:4, 2:4] = RV  # a 4-voxel RV speck appears
    assert topology_preserved(lab, speck)[0] is False  # default min_voxels=1: every voxel counts
    assert topology_preserved(lab, speck, min_voxels=5) == (True, "")
    ok, why = topology_preserved(lab, speck, min_voxels=4)
    assert not ok and "label 3" in why
    pin = lab.copy()
    pin[32, 50] = 0  # a pinhole in the RV
    assert lab[31:34, 49:52].min() == RV
    assert not topology_preserved(lab, pin)[0] and topology_preserved(lab, pin, min_voxels=2)[0]
    tiny = np.zeros((32, 32), np.uint8)
    tiny[10:12, 10:12] = 1
    gone = np.zeros_like(tiny)
    ok, why = topology_preserved(tiny, gone, min_voxels=5)
    assert not ok and "label 1 vanished" in why
    with pytest.raises(SDDMError, match="min_voxels"):
        topology_preserved(tiny, gone, min_voxels=0)
    # deform_pair applies settings.topology_min_voxels: halving the content loses one of two specks
    disc = blob((40, 40), (20, 20), 8)
    disc[4, 4] = disc[5, 35] = 1
    halve = dict(rotation_deg=0.0, scale=(0.5, 0.5), shift_fraction=0.0, elastic_sd=0.0, max_tries=2)
    out = deform_pair(None, disc, (1.0, 1.0), DeformationSettings(**halve), seed=0)
    assert out.tries == 1 and ndimage.label(out.label, np.ones((3, 3)))[1] < 3
    with pytest.raises(SDDMError, match="label 1 lost or merged pieces"):
        deform_pair(None, disc, (1.0, 1.0), DeformationSettings(**halve, topology_min_voxels=1), seed=0)


def test_structure_absent_from_input_and_empty_label_map():
    lab = heart_slice()
    lab[lab == MYO] = 0  # values {0, 1, 3}: no MYO, nothing to preserve for it
    out = deform_pair(None, lab, SPACING_2D, seed=1)
    assert set(np.unique(out.label)) == {0, LV, RV}
    empty = np.zeros((32, 32), np.uint8)
    img = np.random.default_rng(0).normal(size=empty.shape)
    never = DeformationSettings(max_tries=1, elastic_sd=6.0)
    out = deform_pair(img, empty, SPACING_2D, never, seed=2)
    assert out.tries == 1 and not out.label.any() and out.label.dtype == np.uint8
    assert not np.allclose(out.image, img)


def test_topology_check_detects_vanish_split_merge_hole_new_value_and_dtype():
    lab = heart_slice()
    assert topology_preserved(lab, lab.copy()) == (True, "")
    gone = lab.copy()
    gone[gone == LV] = MYO
    ok, why = topology_preserved(lab, gone)
    assert not ok and "label 1 vanished" in why
    split = lab.copy()
    split[:, 44:46][split[:, 44:46] == RV] = 0  # cut the RV crescent in two
    ok, why = topology_preserved(lab, split)
    assert not ok and "label 3 split" in why
    opened = lab.copy()
    opened[30:35, 14:22] = 0  # cut through the myocardial wall: the ring opens
    ok, why = topology_preserved(lab, opened)
    assert not ok and "label 2" in why and "holes" in why
    two = np.zeros((20, 20), np.uint8)
    two[2:6, 2:6] = two[2:6, 10:14] = 1
    merged = two.copy()
    merged[2:6, 2:14] = 1
    assert not topology_preserved(two, merged)[0]
    new = lab.copy()
    new[0, 0] = 7
    assert topology_preserved(lab, new) == (False, "new label value(s) [7]")
    assert not topology_preserved(lab, lab.astype(np.int32))[0]
    # 3D per slice: a structure that moves into a slice where it was absent
    vol = heart_stack()
    moved = vol.copy()
    moved[5][moved[4] == RV] = RV
    ok, why = topology_preserved(vol, moved)
    assert not ok and "slice 5" in why
    assert topology_preserved(vol, moved, per_slice=False)[0] is True


def test_bad_input_raises_sddm_error_naming_the_argument():
    lab = heart_slice(n=32)
    with pytest.raises(SDDMError, match=r"case1: image shape \(32, 31\) differs from label shape"):
        deform_pair(np.zeros((32, 31)), lab, SPACING_2D, seed=0, name="case1")
    with pytest.raises(SDDMError, match="case2: label holds non-integer values"):
        deform_pair(None, lab + 0.5, SPACING_2D, seed=0, name="case2")
    with pytest.raises(SDDMError, match="case3: label is 1D"):
        deform_pair(None, lab[0], (1.0,), seed=0, name="case3")
    with pytest.raises(SDDMError, match="case4: label is 4D"):
        deform_pair(None, lab[None, None], (1.0,) * 4, seed=0, name="case4")
    with pytest.raises(SDDMError, match="spacing"):
        deform_pair(None, lab, (1.0, 1.0, 1.0), seed=0)
    with pytest.raises(SDDMError, match="spacing"):
        deform_pair(None, lab, (1.0, -1.0), seed=0)
    with pytest.raises(SDDMError, match="image holds non-finite"):
        deform_pair(np.full(lab.shape, np.nan), lab, SPACING_2D, seed=0)
    with pytest.raises(SDDMError, match="seed"):
        deform_pair(None, lab, SPACING_2D, seed=-1)
    with pytest.raises(SDDMError, match=r"DeformationSettings\.scale"):
        DeformationSettings(scale=(1.0, 0.9))
    with pytest.raises(SDDMError, match=r"DeformationSettings\.max_tries"):
        DeformationSettings(max_tries=0)
    with pytest.raises(SDDMError, match=r"DeformationSettings\.elastic_sd"):
        DeformationSettings(elastic_sd=-1.0)
    with pytest.raises(SDDMError, match="shape"):
        sample_deformation((4, 5, 6, 7), (1.0,) * 4, DeformationSettings(), np.random.default_rng(0))
    with pytest.raises(SDDMError, match="after: shape"):
        topology_preserved(lab, lab[:-1])
