"""``nnUNetv2_sddm_predict``: SD-DM adaptation inside nnU-Net prediction.

One module-scoped setup (phantom vendor A source dataset, a 2-epoch nnU-Net 2d model trained with
our ``nnUNetTrainer_SDDM_NoDA_Quick``, a random-init tiny diffusion model, vendor B target images)
is shared by all tests. The reference commands (``nnUNetv2_sddm_adapt``, ``nnUNetv2_predict``) and
the main ``nnUNetv2_sddm_predict`` run are real console scripts in subprocesses; the other
``nnUNetv2_sddm_predict`` runs call the console script's function in-process (same code, no
second torch/nnU-Net start-up) to keep the module within its time budget.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SOURCE_ID, TARGET_ID = 611, 612
TRAINER = "nnUNetTrainer_SDDM_NoDA_Quick"
# a small diffusion model and a short chain keep the sampling cheap on 2 CPU cores
MODEL_OVERRIDES = {"model.image_size": 32, "model.channel_mult": [1, 2], "model.attention_resolutions": []}
SAMPLER = ["-N", "2", "--steps", "10", "-D", "2", "--tau", "6", "--seed", "3"]
NNUNET = ["-d", str(SOURCE_ID), "-c", "2d", "-tr", TRAINER, "-f", "0", "-device", "cpu", "--disable_progress_bar"]


def run(cmd, env, timeout=300):
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}"
                             f"\n--- stderr\n{r.stderr[-4000:]}")
    return r


def seg(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def probs(path: Path) -> np.ndarray:
    return np.load(path)["probabilities"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Source model + diffusion model + target images, and the reference outputs: the target
    adapted by ``nnUNetv2_sddm_adapt`` then predicted by the stock ``nnUNetv2_predict``, and the
    stock prediction of the unadapted target (both with probabilities)."""
    from nnunet_sddm.data.phantoms import generate_phantom_dataset
    from nnunet_sddm.diffusion.model_folder import create_model_folder
    from plugin_trainers.discovery import ensure_trainer_path_in_env

    root = tmp_path_factory.mktemp("sddm_predict")
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (root / sub).mkdir()
        env[var] = str(root / sub)
    env["nnUNet_compile"] = "0"
    env.pop("nnUNet_n_proc_DA", None)
    ensure_trainer_path_in_env(env)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(var, env[var])
        generate_phantom_dataset(SOURCE_ID, "A", n_cases=3, seed=0, matrix=32)
        target_ds = generate_phantom_dataset(TARGET_ID, "B", n_cases=1, seed=1, matrix=32)
        model = create_model_folder(root / "diffusion", "tiny", overrides=MODEL_OVERRIDES, seed=0)
    target = root / "target"  # one vendor-B case keeps the sampling short
    target.mkdir()
    shutil.copy(target_ds / "imagesTr" / "PhB0000_ED_0000.nii.gz", target)

    run(["nnUNetv2_plan_and_preprocess", "-d", SOURCE_ID, "-c", "2d", "-np", "1", "-npfp", "1"], env)
    run(["nnUNetv2_train", SOURCE_ID, "2d", "0", "-tr", TRAINER, "-device", "cpu"], {**env, "nnUNet_n_proc_DA": "0"})

    adapted = root / "adapted_by_adapt"
    run(["nnUNetv2_sddm_adapt", "-i", target, "-o", adapted, "-m", model, "--device", "cpu", *SAMPLER], env)
    # one stock nnUNetv2_predict run for both references: the original image and the adapted copy
    stock_in, stock = root / "stock_in", root / "stock"
    stock_in.mkdir()
    shutil.copy(target / "PhB0000_ED_0000.nii.gz", stock_in / "PhB0000_ED_0000.nii.gz")
    shutil.copy(adapted / "PhB0000_ED_0000.nii.gz", stock_in / "ADAPTED_PhB0000_ED_0000.nii.gz")
    run(["nnUNetv2_predict", "-i", stock_in, "-o", stock, *NNUNET, "-npp", "0", "-nps", "0", "--save_probabilities"],
        env)
    return {"root": root, "env": env, "model": model, "target": target, "adapted": adapted, "case": "PhB0000_ED",
            "ref": stock / "ADAPTED_PhB0000_ED", "plain": stock / "PhB0000_ED"}


def sddm_predict(world, out, *extra):
    """The console script in a subprocess."""
    return run(["nnUNetv2_sddm_predict", "-i", world["target"], "-o", out, *NNUNET, "-m", world["model"], *extra],
               world["env"])


def sddm_predict_here(world, monkeypatch, out, *extra):
    """The console script's function in this process (environment and torch threads restored after)."""
    import torch

    from nnunet_sddm.cli.prediction import predict_main

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_compile"):
        monkeypatch.setenv(var, world["env"][var])
    threads = torch.get_num_threads()
    try:
        assert predict_main(["-i", str(world["target"]), "-o", str(out), *NNUNET, "-m", str(world["model"]),
                             *map(str, extra)]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(400)
def test_equals_adapt_then_stock_predict(world):
    """Same seed -> the same adapted image and the same segmentation and probabilities as
    ``nnUNetv2_sddm_adapt`` followed by ``nnUNetv2_predict`` (nnU-Net's path with an export worker)."""
    root, case = world["root"], world["case"]
    out, keep = root / "sddm_main", root / "sddm_main_adapted"
    sddm_predict(world, out, *SAMPLER, "-npp", "1", "-nps", "1", "--save_probabilities", "--save-adapted", keep)

    ours, ref = seg(out / f"{case}.nii.gz"), seg(f"{world['ref']}.nii.gz")
    assert len(np.unique(ref)) > 1, "degenerate reference segmentation: the check would be vacuous"
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(probs(out / f"{case}.npz"), probs(f"{world['ref']}.npz"), rtol=0, atol=1e-6)

    # --save-adapted: identical to nnUNetv2_sddm_adapt's file, input geometry, and really adapted
    from nnunet_sddm.data.volumes import same_geometry

    name = f"{case}_0000.nii.gz"
    kept, adapted, original = (sitk.ReadImage(str(p / name)) for p in (keep, world["adapted"], world["target"]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(kept), sitk.GetArrayFromImage(adapted))
    assert same_geometry(keep / name, world["target"] / name)
    assert kept.GetSize() == original.GetSize() and kept.GetSpacing() == original.GetSpacing()
    assert kept.GetOrigin() == original.GetOrigin() and kept.GetDirection() == original.GetDirection()
    assert not np.allclose(sitk.GetArrayFromImage(kept), sitk.GetArrayFromImage(original), atol=1e-3)

    import json

    record = json.loads((out / "sddm_predict.json").read_text())
    assert record["sampler"]["N"] == 2 and record["sampler"]["seed"] == 3 and record["nnunet_sddm_version"]


@pytest.mark.timeout(400)
def test_ensemble_original_averages_probabilities(world, monkeypatch):
    """--ensemble-original (sequential path, -npp 0 -nps 0): probabilities are the mean of the adapted and the
    original input's probabilities, the segmentation their argmax; no temporary files are left."""
    root, case = world["root"], world["case"]
    out = root / "sddm_ensemble"
    sddm_predict_here(world, monkeypatch, out, *SAMPLER, "-npp", "0", "-nps", "0", "--save_probabilities",
                      "--ensemble-original")
    p_adapted, p_plain = probs(f"{world['ref']}.npz"), probs(f"{world['plain']}.npz")
    assert not np.allclose(p_adapted, p_plain, atol=1e-3), "adaptation changed nothing: the check would be vacuous"
    p = probs(out / f"{case}.npz")
    np.testing.assert_allclose(p, (p_adapted + p_plain) / 2, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(seg(out / f"{case}.nii.gz"), np.argmax(p, axis=0))
    assert sorted(x.name for x in out.iterdir() if x.name.startswith(".")) == []


@pytest.mark.timeout(400)
def test_n0_equals_plain_nnunet(world, monkeypatch):
    """N = 0: no adaptation; the result is the stock nnUNetv2_predict's."""
    root, case = world["root"], world["case"]
    out = root / "sddm_n0"
    sddm_predict_here(world, monkeypatch, out, "-N", "0", "-npp", "0", "-nps", "0", "--save_probabilities")
    np.testing.assert_array_equal(seg(out / f"{case}.nii.gz"), seg(f"{world['plain']}.nii.gz"))
    np.testing.assert_allclose(probs(out / f"{case}.npz"), probs(f"{world['plain']}.npz"), rtol=0, atol=1e-6)

    # resumable: --continue_prediction skips the finished case and leaves its files alone
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith(case)}
    sddm_predict_here(world, monkeypatch, out, "-N", "0", "-npp", "0", "-nps", "0", "--save_probabilities",
                      "--continue_prediction")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith(case)} == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra, message", [
    (["-m", "{root}/no_such_model"], "no_such_model"),
    (["-D", "3"], "power of 2"),
    (["-D", "32"], "smaller than"),
    (["-N", "20", "--steps", "10"], "exceeds"),
    (["--tau", "-1"], "tau"),
    (["-f", "3"], "fold_3"),
    (["-o", "{target}"], "input folder"),
    (["-i", "{root}/nan_input"], "NaN"),
])
def test_bad_inputs_write_nothing(world, monkeypatch, capsys, extra, message):
    """Clear error, exit code 2, no output folder created."""
    from nnunet_sddm.cli.prediction import predict_main

    root, target = world["root"], world["target"]
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, world["env"][var])
    nan_dir = root / "nan_input"
    if not nan_dir.exists():
        nan_dir.mkdir()
        img = sitk.ReadImage(str(target / "PhB0000_ED_0000.nii.gz"))
        arr = sitk.GetArrayFromImage(img)
        arr[0, 0, 0] = np.nan
        bad = sitk.GetImageFromArray(arr)
        bad.CopyInformation(img)
        sitk.WriteImage(bad, str(nan_dir / "PhB0000_ED_0000.nii.gz"))
    out = root / f"bad_out_{abs(hash(tuple(extra))) % 10**8}"
    argv = ["-i", str(target), "-o", str(out), *NNUNET, "-m", str(world["model"]), *SAMPLER]
    argv += [e.format(root=root, target=target) for e in extra]
    with pytest.raises(SystemExit) as exc:
        predict_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists()
    if "-o" in extra:
        assert sorted(p.name for p in target.iterdir()) == ["PhB0000_ED_0000.nii.gz"]


def test_reorienting_reader_is_refused(tmp_path):
    """nnU-Net's NibabelIOWithReorient gives RAS-ordered arrays; the adapted images are written into
    the original header, so the adaptation path refuses such readers (clear SDDMError)."""
    import nibabel as nib
    import torch
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient

    from nnunet_sddm.adaptation.predictor import SDDMPredictor
    from nnunet_sddm.utilities.errors import SDDMError

    image = tmp_path / "C_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 2)).astype(np.float32),
                             np.diag([-1.0, -1.0, 5.0, 1.0])), str(image))
    predictor = SDDMPredictor(adapt_fn=lambda v, spacings: dict(v), device=torch.device("cpu"))
    predictor.plans_manager = type("Plans", (), {"image_reader_writer_class": NibabelIOWithReorient})()
    predictor.dataset_json = {"file_ending": ".nii.gz"}
    with pytest.raises(SDDMError, match="NibabelIOWithReorient reorients"):
        next(predictor.read_and_adapt([[str(image)]]))
    predictor.adapt_fn = None  # N = 0 without --save-adapted: the stock path, nothing is written
    data, _ = next(predictor.read_and_adapt([[str(image)]]))
    assert data.shape == (1, 2, 8, 8)
    predictor.save_adapted_dir = tmp_path / "saved"
    with pytest.raises(SDDMError, match="reorients"):
        next(predictor.read_and_adapt([[str(image)]]))
    assert not (tmp_path / "saved").exists()


@pytest.mark.timeout(120)
def test_reorienting_reader_refused_before_anything_is_written(world, monkeypatch, capsys):
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_sddm.cli.prediction import predict_main

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, world["env"][var])
    monkeypatch.setattr(PlansManager, "image_reader_writer_class", property(lambda self: NibabelIOWithReorient))
    out = world["root"] / "reorient_out"
    with pytest.raises(SystemExit) as exc:
        predict_main(["-i", str(world["target"]), "-o", str(out), *NNUNET, "-m", str(world["model"]), *SAMPLER])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "plans.json" in err and "NibabelIOWithReorient" in err, err
    assert not out.exists()


@pytest.mark.timeout(300)
def test_predict_and_study_share_one_prediction_module(world, monkeypatch):
    """``nnUNetv2_sddm_predict`` builds its predictor with ``load_nnunet_predictor``, the loader the
    study's predict stage calls (nnUNetv2_predict's construction and thread settings), and
    ``ensemble_folders`` merges ``--ensemble-original``'s probabilities, as the study's ensemble."""
    import nnunet_sddm.adaptation.predictor as shared
    from nnunet_sddm.study import stage_predict

    assert stage_predict.nnunet_prediction is shared
    loads, merges = [], []
    real_load, real_ensemble = shared.load_nnunet_predictor, shared.ensemble_folders

    def load(*a, **k):
        loads.append((a, k))
        return real_load(*a, **k)

    def ensemble(*a, **k):
        merges.append((a, k))
        return real_ensemble(*a, **k)

    monkeypatch.setattr(shared, "load_nnunet_predictor", load)
    monkeypatch.setattr(shared, "ensemble_folders", ensemble)
    out = world["root"] / "sddm_shared"
    sddm_predict_here(world, monkeypatch, out, "-N", "0", "-npp", "0", "-nps", "0", "--ensemble-original")
    assert len(loads) == 1 and len(merges) == 1
    (folder, folds, checkpoint), kw = loads[0]
    assert Path(folder).name == f"{TRAINER}__nnUNetPlans__2d" and folds == [0] and checkpoint == "checkpoint_final.pth"
    assert kw["device"] == "cpu" and kw["step_size"] == 0.5 and kw["adapt_fn"] is None
    assert (out / f"{world['case']}.nii.gz").is_file()
