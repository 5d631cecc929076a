"""The classical alternatives to SD-DM: histogram standardisation, FDA, the method switch and the
``--method`` options of ``nnUNetv2_sddm_adapt`` / ``nnUNetv2_sddm_predict`` (tiny generated NIfTI
volumes with non-trivial geometry; no network, no model training)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_sddm.adaptation import fda, histmatch
from nnunet_sddm.adaptation.methods import (METHODS, RECORD_FILE, ClassicalAdapter, adapt_folder_classical,
                                            source_images_folder)
from nnunet_sddm.utilities.errors import SDDMError

SPACING = (1.5, 1.25, 8.0)
ORIGIN = (-10.5, 20.25, 3.0)
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def phantom(seed: int, scale: float = 1.0, offset: float = 0.0, shape=(4, 32, 32)) -> np.ndarray:
    """A dark background with a bright disc and a darker ring, noise; float32 ``(z, y, x)``."""
    rng = np.random.default_rng(seed)
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - h / 2 + rng.uniform(-2, 2), xx - w / 2 + rng.uniform(-2, 2))
    base = np.where(r < h / 5, 300.0, np.where(r < h / 3, 150.0, 20.0))
    vol = np.stack([base * (1 + 0.1 * k) for k in range(z)]) + rng.normal(0, 10, shape)
    return (vol * scale + offset).astype(np.float32)


def write_image(arr: np.ndarray, path: Path) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path


@pytest.fixture
def folders(tmp_path):
    """``source`` (a raw dataset folder with imagesTr, 3 cases) and ``target`` (2 cases, other units)."""
    src = tmp_path / "Dataset901_Src"
    for k in range(3):
        write_image(phantom(k), src / "imagesTr" / f"src{k}_0000.nii.gz")
    tgt = tmp_path / "target"
    write_image(phantom(10, 0.4, 50.0), tgt / "tA_0000.nii.gz")
    write_image(phantom(11, 0.5, 80.0, shape=(3, 32, 28)), tgt / "tB_0000.nii.gz")
    return src, tgt


# ---------------------------------------------------------------------- histogram standardisation
def test_standard_fitted_on_itself_is_the_identity():
    v = phantom(0)
    std = histmatch.fit_standard([v])
    np.testing.assert_allclose(std.landmarks, histmatch.volume_landmarks(v), rtol=1e-12)
    np.testing.assert_allclose(histmatch.apply_standard(v, std), v, rtol=0, atol=1e-3)


def test_affine_target_comes_back_as_the_source():
    v = phantom(1)
    std = histmatch.fit_standard([v])
    out = histmatch.apply_standard(0.37 * v.astype(np.float64) + 120.0, std)
    np.testing.assert_allclose(out, v, rtol=0, atol=1e-3)


def test_standard_of_affine_copies_is_their_mean_landmarks():
    v = phantom(2).astype(np.float64)
    std = histmatch.fit_standard([v, 2 * v + 10])
    np.testing.assert_allclose(std.landmarks, (histmatch.volume_landmarks(v) * 3 + 10) / 2, rtol=1e-10)
    np.testing.assert_allclose(std.scale_landmarks[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(std.scale_landmarks[-1], 100.0, atol=1e-12)


def test_monotone_shape_dtype_and_json():
    std = histmatch.fit_standard([phantom(3), phantom(4, 2.0, -5.0)])
    v = np.round(phantom(5, 0.7, 3.0)).astype(np.int16)
    out = histmatch.apply_standard(v, std)
    assert out.shape == v.shape and out.dtype == np.float32
    order = np.argsort(v.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)
    lo, hi = v.min(), v.max()  # extrapolated ends keep increasing
    assert out.ravel()[order][0] == out[v == lo].min() and out[v == hi].max() == out.max()
    again = histmatch.HistogramStandard.from_dict(json.loads(json.dumps(std.to_dict())))
    assert again == std


def test_histmatch_refuses_empty_and_constant_input():
    with pytest.raises(SDDMError, match="no source volumes"):
        histmatch.fit_standard([])
    with pytest.raises(SDDMError, match="flat.nii.gz: constant image"):
        histmatch.fit_standard([phantom(0), np.full((2, 4, 4), 7.0)], names=["a", "flat.nii.gz"])
    std = histmatch.fit_standard([phantom(0)])
    with pytest.raises(SDDMError, match="constant image"):
        histmatch.apply_standard(np.zeros((2, 4, 4)), std)
    with pytest.raises(SDDMError, match="empty image"):
        histmatch.apply_standard(np.zeros((0, 4, 4)), std)
    with pytest.raises(SDDMError, match="percentiles"):
        histmatch.fit_standard([phantom(0)], percentiles=(50, 10))


# ---------------------------------------------------------------------- FDA
def pool_of(*seeds, shape=(4, 24, 40)):
    return fda.SlicePool.from_arrays({f"s{k}": phantom(k, shape=shape) for k in seeds})


def test_fda_beta_zero_is_the_identity_and_shape_is_kept():
    pool = pool_of(0, 1)
    v = phantom(7, 0.3, 9.0, shape=(4, 32, 28))
    out, choices = fda.fda_volume(v, pool, "case", beta=0.0)
    np.testing.assert_array_equal(out, v)
    assert len(choices) == 4
    out, _ = fda.fda_volume(v, pool, "case", beta=0.09)
    assert out.shape == v.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.allclose(out, v)


def test_fda_slice_swaps_low_amplitudes_and_keeps_the_phase():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(32, 30)), rng.normal(2.0, 3.0, size=(32, 30))
    beta = 0.1
    out = fda.fda_slice(t, s, beta)
    assert fda.window_halfwidth(t.shape, beta) == 3
    sy, sx = fda.window_slices(t.shape, beta)
    fo, ft, fs = (np.fft.fftshift(np.fft.fft2(x)) for x in (out, t, s))
    np.testing.assert_allclose(np.abs(fo)[sy, sx], np.abs(fs)[sy, sx], rtol=1e-9, atol=1e-9)
    outside = np.ones(t.shape, bool)
    outside[sy, sx] = False
    np.testing.assert_allclose(np.abs(fo)[outside], np.abs(ft)[outside], rtol=1e-9, atol=1e-9)
    ok = np.abs(ft) > 1e-6
    dphi = np.angle(fo[ok] * np.conj(ft[ok]))
    np.testing.assert_allclose(dphi, 0.0, atol=1e-8)


def test_fda_volume_windows_match_the_chosen_normalised_source_slices():
    pool = pool_of(0, 1, 2)
    v = phantom(8, 0.5, 40.0, shape=(3, 32, 28))
    beta = 0.05
    out, choices = fda.fda_volume(v, pool, "case", beta=beta, seed=4)
    lo, hi = np.percentile(v, (0.5, 99.5))
    sy, sx = fda.window_slices((32, 28), beta)
    for z, (name, k) in enumerate(choices):
        i = pool.names.index(name)
        src = fda.resample_slice(pool.normalised_slice(i, k), (32, 28))
        fo = np.fft.fftshift(np.fft.fft2((out[z].astype(np.float64) - lo) / (hi - lo)))
        fs = np.fft.fftshift(np.fft.fft2(src))
        np.testing.assert_allclose(np.abs(fo)[sy, sx], np.abs(fs)[sy, sx], rtol=1e-4, atol=1e-3)


def test_fda_choices_are_seeded_and_order_independent():
    pool = pool_of(0, 1, 2)
    a, b = phantom(5), phantom(6, shape=(3, 32, 32))
    first = fda.fda_volumes({"a": a, "b": b}, pool, beta=0.02, seed=3)
    second = fda.fda_volumes({"b": b, "a": a}, pool, beta=0.02, seed=3)
    assert first[1] == {k: second[1][k] for k in first[1]}
    for k in ("a", "b"):
        np.testing.assert_array_equal(first[0][k], second[0][k])
    draws = [fda.choose_slices(pool, "a", 20, seed) for seed in (0, 1)]
    assert draws[0] == fda.choose_slices(pool, "a", 20, 0) and draws[0] != draws[1]
    assert fda.choose_slices(pool, "a", 20, 0) != fda.choose_slices(pool, "b", 20, 0)
    for bad in (-0.1, 0.5, "x"):
        with pytest.raises(SDDMError, match="--beta"):
            fda.check_beta(bad)


# ---------------------------------------------------------------------- the method switch, folders
def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def test_histmatch_folder_geometry_record_and_determinism(folders, tmp_path):
    src, tgt = folders
    rec = adapt_folder_classical("histmatch", tgt, tmp_path / "out1", source_images=src, progress=False)
    assert METHODS == ("sddm", "histmatch", "fda")
    assert sorted(p.name for p in (tmp_path / "out1").iterdir()) == [RECORD_FILE, "tA_0000.nii.gz", "tB_0000.nii.gz"]
    for name in ("tA_0000.nii.gz", "tB_0000.nii.gz"):
        out, inp = read(tmp_path / "out1" / name), read(tgt / name)
        assert out.GetPixelID() == sitk.sitkFloat32 and out.GetSize() == inp.GetSize()
        assert (out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == \
               (inp.GetSpacing(), inp.GetOrigin(), inp.GetDirection())
    stored = json.loads((tmp_path / "out1" / RECORD_FILE).read_text())
    assert stored == json.loads(json.dumps(rec))
    assert stored["method"] == "histmatch" and stored["source"] == str((src / "imagesTr").resolve())
    assert len(stored["standard"]["landmarks"]) == 11 and stored["package_version"]
    assert stored["source_cases"] == ["src0", "src1", "src2"] and stored["cases"] == ["tA", "tB"]
    # the source's foreground distribution in source units (the target's 90th percentile moves there)
    a = sitk.GetArrayFromImage(read(tmp_path / "out1" / "tA_0000.nii.gz"))
    p90 = [np.percentile(x, 90) for x in (a, phantom(0), phantom(10, 0.4, 50.0))]
    assert abs(p90[0] - p90[1]) < 0.1 * abs(p90[2] - p90[1])
    adapt_folder_classical("histmatch", tgt, tmp_path / "out2", source_images=src / "imagesTr", progress=False)
    for name in ("tA_0000.nii.gz", "tB_0000.nii.gz", RECORD_FILE):
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()


def test_fda_folder_choices_overwrite_and_arrays_route(folders, tmp_path):
    src, tgt = folders
    out = tmp_path / "fda"
    rec = adapt_folder_classical("fda", tgt, out, source_images=src, beta=0.05, seed=2, progress=False)
    assert rec["parameters"]["beta"] == 0.05 and rec["seed"] == 2
    assert [len(rec["choices"][c]) for c in ("tA", "tB")] == [4, 3]
    assert all(s in ("src0", "src1", "src2") and 0 <= k < 4 for s, k in rec["choices"]["tA"])
    with pytest.raises(SDDMError, match="exists"):
        adapt_folder_classical("fda", tgt, out, source_images=src, progress=False)
    before = (out / "tA_0000.nii.gz").read_bytes()
    rec2 = adapt_folder_classical("fda", tgt, out, source_images=src, beta=0.05, seed=2, overwrite=True,
                                  progress=False)
    assert rec2 == rec and (out / "tA_0000.nii.gz").read_bytes() == before
    # the arrays route (nnUNetv2_sddm_predict's adapt_fn) gives the same images
    adapter = ClassicalAdapter.open("fda", source_images_folder(src), beta=0.05, seed=2)
    arrays = adapter.adapt_arrays({"tB": sitk.GetArrayFromImage(read(tgt / "tB_0000.nii.gz"))})
    np.testing.assert_array_equal(arrays["tB"], sitk.GetArrayFromImage(read(out / "tB_0000.nii.gz")))
    assert adapter.choices["tB"] == rec["choices"]["tB"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_bad_inputs_are_refused_by_name_and_write_nothing(folders, tmp_path):
    src, tgt = folders
    out = tmp_path / "out"
    bad = tmp_path / "bad"
    write_image(phantom(0), bad / "case.nii.gz")  # no channel suffix
    with pytest.raises(SDDMError, match="case.nii.gz"):
        adapt_folder_classical("histmatch", bad, out, source_images=src, progress=False)
    four_d = tmp_path / "four_d"
    write_image(phantom(0), four_d / "a_0000.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 4, 4), np.float32), isVector=False),
                    str(four_d / "b_0000.nii.gz"))
    with pytest.raises(SDDMError, match="b_0000.nii.gz.*3D"):
        adapt_folder_classical("fda", four_d, out, source_images=src, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x_0000.nii.gz").write_bytes(b"not an image")
    with pytest.raises(SDDMError, match="x_0000.nii.gz"):
        adapt_folder_classical("histmatch", broken, out, source_images=src, progress=False)
    with pytest.raises(SDDMError, match="x_0000.nii.gz"):  # a broken SOURCE image is named as well
        adapt_folder_classical("histmatch", tgt, out, source_images=broken, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SDDMError, match="no nnU-Net source images"):
        adapt_folder_classical("fda", tgt, out, source_images=tmp_path / "empty", progress=False)
    with pytest.raises(SDDMError, match="--method"):
        adapt_folder_classical("sddm", tgt, out, source_images=src, progress=False)
    with pytest.raises(SDDMError, match="input or the source"):
        adapt_folder_classical("fda", tgt, tgt, source_images=src, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------- the commands
def test_adapt_command_methods(folders, tmp_path, capsys):
    from nnunet_sddm.cli import adaptation as cli
    from nnunet_sddm.adaptation import fda as fda_module

    assert cli.METHODS == METHODS and cli.FDA_BETA == fda_module.BETA
    src, tgt = folders
    assert cli.adapt_main(["-i", str(tgt), "-o", str(tmp_path / "h"), "--method", "histmatch",
                           "--source", str(src), "--quiet"]) == 0
    assert json.loads((tmp_path / "h" / RECORD_FILE).read_text())["method"] == "histmatch"
    assert cli.adapt_main(["-i", str(tgt), "-o", str(tmp_path / "f"), "--method", "fda", "--source", str(src),
                           "--beta", "0.02", "--seed", "5", "--quiet"]) == 0
    rec = json.loads((tmp_path / "f" / RECORD_FILE).read_text())
    assert rec["parameters"]["beta"] == 0.02 and rec["seed"] == 5
    capsys.readouterr()
    for argv, message in (
            (["--method", "histmatch"], "needs the source"),
            (["--method", "histmatch", "--source", str(src), "-m", "x"], "does not use -m/--model"),
            (["--method", "histmatch", "--source", str(src), "--beta", "0.1"], "does not use --beta"),
            (["--method", "histmatch", "--source", str(src), "--seed", "1"], "does not use --seed"),
            (["--method", "fda", "--source", str(src), "-D", "4", "--device", "cpu"], "does not use -D, --device"),
            ([], "needs a diffusion model"),
            (["-m", "x", "--source", str(src)], "sddm does not use --source")):
        with pytest.raises(SystemExit) as e:
            cli.adapt_main(["-i", str(tgt), "-o", str(tmp_path / "never"), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "never").exists()


def test_predict_command_checks_method_options(folders, tmp_path, capsys):
    from nnunet_sddm.cli.prediction import predict_main

    src, tgt = folders
    base = ["-i", str(tgt), "-o", str(tmp_path / "p"), "-d", "1", "-c", "2d", "-device", "cpu"]
    for argv, message in ((["--method", "fda", "--source", str(src), "-N", "3"], "does not use -N"),
                          (["--method", "fda"], "needs the source"),
                          ([], "needs a diffusion model")):
        with pytest.raises(SystemExit) as e:
            predict_main(base + argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "p").exists()


def test_predict_with_histmatch_and_lcc(folders, tmp_path, nnunet_env, monkeypatch):
    """``sddm_predict`` wiring without a trained network: the predictor is replaced by one that
    writes a two-blob segmentation per case with the arrays ``adapt_fn`` gives."""
    import nnunet_sddm.adaptation.predictor as pred

    src, tgt = folders
    model = nnunet_env["results"] / "Dataset901_Src" / "nnUNetTrainer__nnUNetPlans__2d"
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    (model / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "LV": 1}, "file_ending": ".nii.gz",
                                                    "channel_names": {"0": "cineMRI"}}))
    (model / "plans.json").write_text(json.dumps({"image_reader_writer": "SimpleITKIO"}))
    seen = {}

    class FakePredictor:
        class configuration_manager:
            previous_stage_name = None

    def fake_load(model_folder, folds, checkpoint, **kw):
        seen["adapt_fn"] = kw["adapt_fn"]
        return FakePredictor()

    def fake_predict_cases(predictor, cases, output_folder, **kw):
        for c in cases:
            img = read(c.files[0])
            seen[c.case_id] = seen["adapt_fn"]({c.case_id: sitk.GetArrayFromImage(img)},
                                               {c.case_id: img.GetSpacing()[::-1]})[c.case_id]
            seg = np.zeros(seen[c.case_id].shape, np.uint8)
            seg[0, 2:8, 2:8] = 1
            seg[-1, 20:22, 20:22] = 1
            out = sitk.GetImageFromArray(seg)
            out.CopyInformation(img)
            sitk.WriteImage(out, c.output_truncated + ".nii.gz", True)
        return [c.case_id for c in cases]

    monkeypatch.setattr(pred, "load_nnunet_predictor", fake_load)
    monkeypatch.setattr(pred, "predict_cases", fake_predict_cases)
    out = tmp_path / "pred"
    pred.sddm_predict(tgt, out, 901, "2d", None, None, folds=["0"], device="cpu", disable_progress_bar=True,
                      method="histmatch", source=src, postprocess="lcc")
    adapted = tmp_path / "adapted"
    adapt_folder_classical("histmatch", tgt, adapted, source_images=src, progress=False)
    for case in ("tA", "tB"):
        np.testing.assert_array_equal(seen[case], sitk.GetArrayFromImage(read(adapted / f"{case}_0000.nii.gz")))
        seg = read(out / f"{case}.nii.gz")
        assert np.count_nonzero(sitk.GetArrayFromImage(seg)) == 36
        inp = read(tgt / f"{case}_0000.nii.gz")
        assert (seg.GetSpacing(), seg.GetOrigin(), seg.GetDirection()) == \
               (inp.GetSpacing(), inp.GetOrigin(), inp.GetDirection())
    rec = json.loads((out / "sddm_predict.json").read_text())
    assert rec["adaptation"] == "histmatch" and rec["postprocess"] == "lcc" and rec["diffusion_model"] is None
    assert rec["method"]["standard"] == json.loads((adapted / RECORD_FILE).read_text())["standard"]
    assert rec["postprocess_removed_voxels"] == {"tA": {"1": 4}, "tB": {"1": 4}}
    with pytest.raises(SDDMError, match="does not use a diffusion model"):
        pred.sddm_predict(tgt, out, 901, "2d", "some_model", None, method="fda", source=src, device="cpu")
