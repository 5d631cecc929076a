"""The 22 DSMRI features (finite on constant, noise and real images), the coif4 filter, the GLCM
properties (= scikit-image's graycoprops) and the domain-shift command (CSV, t-SNE PNG, score)."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from nnunet_sddm.cli.evaluation import domain_shift_main
from nnunet_sddm.evaluation.image_features import (COIF4_DEC_HI, COIF4_DEC_LO, FEATURE_NAMES, dwt_axis,
                                                   glcm_features, select_slices, slice_features,
                                                   volume_features, wavedec2)


def test_feature_names_are_the_22_of_dsmri():
    assert len(FEATURE_NAMES) == 22 and len(set(FEATURE_NAMES)) == 22


def test_coif4_filter_is_an_orthonormal_coiflet():
    h, g = COIF4_DEC_LO, COIF4_DEC_HI
    assert len(h) == 24
    assert h.sum() == pytest.approx(np.sqrt(2), abs=1e-12)
    assert (h ** 2).sum() == pytest.approx(1.0, abs=1e-11)
    for m in range(1, 12):                      # double-shift orthogonality
        assert abs(np.dot(h[:-2 * m], h[2 * m:])) < 1e-10
    k = np.arange(24) - 11.5
    for p in range(4):                          # vanishing moments of the wavelet (low orders: rounding)
        assert abs(np.sum(g * k ** p)) < 1e-7
    assert abs(np.dot(h, g)) < 1e-12
    # constant signal: approximation sqrt(2) c everywhere (symmetric extension), details 0
    c = dwt_axis(np.full(50, 3.0), h, 0)
    assert c.shape == ((50 + 23) // 2,) and np.allclose(c, 3 * np.sqrt(2))
    assert np.allclose(dwt_axis(np.full(50, 3.0), g, 0), 0, atol=1e-9)
    coeffs = wavedec2(np.ones((100, 64)))
    assert len(coeffs) == 2 and coeffs[0].shape == (61, 43)  # level floor(log2(64/23)) = 1


def test_glcm_properties_equal_graycoprops():
    from skimage.feature import graycomatrix, graycoprops

    rng = np.random.default_rng(0)
    F = rng.gamma(2.0, 1.0, (40, 36)) * (rng.random((40, 36)) > 0.3)
    ours = glcm_features(F)
    g = np.rint((F - F.min()) / (F.max() - F.min()) * 255).astype(np.uint8)
    P = graycomatrix(g, [1, 2, 3], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], 256, symmetric=True, normed=True)
    for k, prop in [("Contrast", "contrast"), ("Correlation", "correlation"), ("Energy", "energy"),
                    ("Homogeneity", "homogeneity"), ("Dissimilarity", "dissimilarity"), ("ASM", "ASM")]:
        assert ours[k] == pytest.approx(float(graycoprops(P, prop).mean()), rel=1e-9, abs=1e-12)


def test_features_finite_on_constant_noise_and_structured_images():
    rng = np.random.default_rng(1)
    for vol in (np.full((3, 48, 40), 7.0), np.zeros((2, 30, 30)), rng.normal(100, 20, (3, 48, 40))):
        f = volume_features(vol)
        assert set(f) == set(FEATURE_NAMES) and all(np.isfinite(v) for v in f.values())
    yy, xx = np.mgrid[:64, :64]
    disc = 200.0 * (np.hypot(yy - 30, xx - 34) < 18) + rng.normal(0, 5, (64, 64))
    f = slice_features(disc)
    assert all(np.isfinite(v) for v in f.values())
    assert f["SNR1"] > 1 and f["CJV"] > 0 and 0 < f["EFC"] <= 1 and f["MEAN"] > 100
    raw = volume_features(disc[None].repeat(2, 0), normalization="none")
    assert raw["MEAN"] > 100 and volume_features(disc[None].repeat(2, 0))["MEAN"] <= 1.0
    assert select_slices(10, "all") == list(range(10))
    assert select_slices(10, "central:50:2") == [2, 4, 6]
    with pytest.raises(ValueError):
        select_slices(10, "every")


@pytest.mark.timeout(60)
def test_features_finite_on_a_real_frame(shared_data):
    img = nib.load(str(shared_data / "ACDC" / "training" / "patient001" / "patient001_frame01.nii.gz"))
    vol = np.asarray(img.dataobj, dtype=np.float64).transpose(2, 1, 0)[4:6]
    f = volume_features(vol)
    assert all(np.isfinite(v) for v in f.values())
    assert 0 < f["MEAN"] < 1 and f["SNR1"] > 1 and 0 < f["Correlation"] <= 1


def write_domain(folder, rng, n, noise, blur):
    from scipy import ndimage

    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:40, :40]
    for i in range(n):
        vol = np.stack([150.0 * (np.hypot(yy - 20 - rng.integers(-3, 4), xx - 20) < 10 + k) for k in range(3)])
        vol = ndimage.gaussian_filter(vol, (0, blur, blur)) + rng.normal(0, noise, vol.shape)
        nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0).astype(np.float32), np.eye(4)),
                 str(folder / f"c{i:02d}_0000.nii.gz"))


@pytest.mark.timeout(120)
def test_domain_shift_cli_outputs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_domain(tmp_path / "A", rng, 6, noise=2.0, blur=0.5)
    write_domain(tmp_path / "B", rng, 6, noise=25.0, blur=2.0)
    out = tmp_path / "ds"
    domain_shift_main(["-i", f"A={tmp_path / 'A'}", f"B={tmp_path / 'B'}/*.nii.gz", "-o", str(out),
                       "-np", "1", "--quiet", "--trees", "40"])
    with open(out / "features.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and set(FEATURE_NAMES) <= set(rows[0])
    assert all(np.isfinite(float(r[k])) for r in rows for k in FEATURE_NAMES)
    png = (out / "tsne.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    sep = json.loads((out / "separability.json").read_text())
    assert sep["folds"] == 5 and sep["separability"] > 0.8      # very different domains
    cfg = json.loads((out / "domain_shift.json").read_text())
    assert cfg["tsne"]["perplexity"] == 11 and cfg["slices"] == "all"
    # bad input: one domain, missing folder, existing output, malformed item
    for args in (["-i", f"A={tmp_path / 'A'}"],
                 ["-i", f"A={tmp_path / 'A'}", f"B={tmp_path / 'missing'}"],
                 ["-i", f"A={tmp_path / 'A'}", "B"],
                 ["-i", f"A={tmp_path / 'A'}", f"B={tmp_path / 'B'}", "--slices", "every:5"]):
        with pytest.raises(SystemExit) as e:
            domain_shift_main(args + ["-o", str(tmp_path / "bad"), "--quiet"])
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        domain_shift_main(["-i", f"A={tmp_path / 'A'}", f"B={tmp_path / 'B'}", "-o", str(out), "--quiet"])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_separability_grouped_by_subject():
    from nnunet_sddm.evaluation.domain_shift import separability, subject_ids
    from nnunet_sddm.utilities.errors import SDDMError

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (12, 22)), rng.normal(3, 1, (12, 22))])
    domains = ["A"] * 12 + ["B"] * 12
    cases = [f"patient{i // 2:03d}_frame{i % 2:02d}" for i in range(12)] + [f"S{i // 2}XYZ_sa_E{'DS'[i % 2]}" for i in range(12)]
    groups = subject_ids(cases, r"^(patient\d+|S\dXYZ)_")
    assert groups[:2] == ["patient000", "patient000"] and groups[12] == "S0XYZ"
    sep = separability(X, domains, groups=groups, n_trees=40)
    assert sep["grouped_by_subject"] and sep["subjects"] == {"A": 6, "B": 6} and sep["separability"] > 0.9
    with pytest.raises(SDDMError, match="does not match"):
        subject_ids(["oops"], r"^patient")
