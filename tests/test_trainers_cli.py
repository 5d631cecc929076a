"""End to end through nnU-Net's real console scripts: plan+preprocess once per module, then
``nnUNetv2_train`` (quick trainers) and ``nnUNetv2_predict`` for 2d/3d_fullres NoDA and 2d vanilla
U-Net, the 3D refusal of the vanilla U-Net, and RealPlusSynthetic on a faked synthetic dataset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from _trainer_data import make_fake_synthetic, make_raw_dataset, write_patient_splits
from nnunet_sddm.utilities.errors import SDDMError
from plugin_trainers.discovery import ensure_trainer_path_in_env

DATASET_ID, NAME = 501, "SDDMTrainerToy"
DATASET = f"Dataset{DATASET_ID:03d}_{NAME}"


def _run(cmd, env, timeout=400):
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    print(f"[timing] {' '.join(str(c) for c in cmd[:5])}: {wall:.1f} s")
    return r


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ)
    folders = {}
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        folders[sub] = root / sub
        folders[sub].mkdir()
        env[var] = str(folders[sub])
    env["nnUNet_compile"] = "0"
    env.pop("nnUNet_n_proc_DA", None)  # breaks plan_and_preprocess; set for training only
    ensure_trainer_path_in_env(env)
    raw = make_raw_dataset(folders["raw"], DATASET_ID, NAME, n_subjects=5, vendor="A", n_test_subjects=1)
    _run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "2d", "3d_fullres", "-np", "2"], env)
    splits = write_patient_splits(raw, folders["preprocessed"] / DATASET)
    return {"env": env, "dataset": raw, "splits": splits, **folders}


def _train_predict_check(planned, trainer: str, configuration: str, tmp_path: Path) -> Path:
    env = dict(planned["env"], nnUNet_n_proc_DA="0")
    _run(["nnUNetv2_train", DATASET_ID, configuration, "0", "-tr", trainer, "-device", "cpu"], env)
    fold = planned["results"] / DATASET / f"{trainer}__nnUNetPlans__{configuration}" / "fold_0"
    # nnU-Net pickles its checkpoint (init_args); reading it needs weights_only=False, as nnU-Net does
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == trainer
    assert ck["inference_allowed_mirroring_axes"] is None
    assert ck["current_epoch"] == 2  # quick trainers: 2 epochs
    assert not (fold / "validation").exists()  # final validation skipped

    out = tmp_path / "pred"
    _run(["nnUNetv2_predict", "-i", planned["dataset"] / "imagesTs", "-o", out, "-d", DATASET_ID, "-c", configuration,
          "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"],
         planned["env"])
    inputs = sorted((planned["dataset"] / "imagesTs").glob("*_0000.nii.gz"))
    assert len(inputs) == 2
    for img_file in inputs:
        pred_file = out / img_file.name.replace("_0000.nii.gz", ".nii.gz")
        img, pred = sitk.ReadImage(str(img_file)), sitk.ReadImage(str(pred_file))
        assert pred.GetSize() == img.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), img.GetSpacing(), rtol=1e-5)
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}
    return fold


@pytest.mark.timeout(600)
def test_noda_2d_train_predict(planned, tmp_path):
    _train_predict_check(planned, "nnUNetTrainer_SDDM_NoDA_Quick", "2d", tmp_path)


@pytest.mark.timeout(600)
def test_noda_3d_fullres_train_predict(planned, tmp_path):
    _train_predict_check(planned, "nnUNetTrainer_SDDM_NoDA_Quick", "3d_fullres", tmp_path)


@pytest.mark.timeout(600)
def test_vanilla_unet_2d_train_predict(planned, tmp_path):
    fold = _train_predict_check(planned, "nnUNetTrainer_SDDM_VanillaUNet_Quick", "2d", tmp_path)
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # the planned 2d patch (40 x 40 here) is not a multiple of 16: the network pads internally
    plans = json.loads((fold.parent / "plans.json").read_text())
    assert any(s % 16 for s in plans["configurations"]["2d"]["patch_size"])
    assert ck["network_weights"]["bottleneck.0.weight"].shape == (1024, 512, 3, 3)
    assert ck["network_weights"]["head.weight"].shape == (4, 64, 1, 1)


@pytest.mark.timeout(300)
def test_vanilla_unet_refuses_3d(planned, monkeypatch):
    from plugin_trainers.vanilla_unet_trainer import nnUNetTrainer_SDDM_VanillaUNet

    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        monkeypatch.setenv(var, str(planned[sub]))
    pp = planned["preprocessed"] / DATASET
    plans = json.loads((pp / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dj = json.loads((pp / "dataset.json").read_text())
    with pytest.raises(SDDMError, match=r"2D only .* '3d_fullres' has a 3D patch size"):
        nnUNetTrainer_SDDM_VanillaUNet(plans, "3d_fullres", 0, dj, torch.device("cpu"))
    assert not (planned["results"] / DATASET / "nnUNetTrainer_SDDM_VanillaUNet__nnUNetPlans__3d_fullres").exists()


@pytest.mark.timeout(600)
def test_real_plus_synthetic(planned, tmp_path):
    syn = make_fake_synthetic(planned["dataset"], planned["raw"], DATASET_ID + 1, NAME + "Syn", copies=1)
    env = planned["env"]
    _run([sys.executable, "-m", "plugin_trainers.synthetic_data", "-d", DATASET_ID, "-s", syn.name, "-c", "2d",
          "--fraction", "0.3"], env)
    pp = planned["preprocessed"] / DATASET
    link = json.loads((pp / "sddm_synthetic.json").read_text())
    assert link["synthetic_dataset"] == syn.name and link["fraction"] == 0.3 and link["cases"] == 10
    syn_pp = pp / "sddm_synthetic" / syn.name / "nnUNetPlans_2d"
    assert len(list(syn_pp.glob("*.pkl"))) == 10
    assert not any("_syn" in p.name for p in (pp / "nnUNetPlans_2d").iterdir())  # real folder untouched

    trainer = "nnUNetTrainer_SDDM_RealPlusSynthetic_Quick"
    _run(["nnUNetv2_train", DATASET_ID, "2d", "0", "-tr", trainer, "-device", "cpu"],
         dict(env, nnUNet_n_proc_DA="0"))
    fold = planned["results"] / DATASET / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    rec = json.loads((fold / "sddm_real_plus_synthetic.json").read_text())
    val = planned["splits"][0]["val"]
    val_subjects = {c.rsplit("_", 1)[0] for c in val}
    assert rec["n_real_val"] == len(val) and rec["n_real_train"] == 10 - len(val)
    assert rec["synthetic_excluded"] == sorted(f"{c}_syn0" for c in val)  # both phases of val patients
    assert rec["n_synthetic_used"] == 10 - len(val)
    assert rec["synthetic_used"] == sorted(f"{c}_syn0" for c in planned["splits"][0]["train"])
    assert not {c.rsplit("_", 2)[0] for c in rec["synthetic_used"]} & val_subjects
    assert rec["fraction_requested"] == 0.3 and abs(rec["fraction_effective"] - 0.3) <= 1e-3
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == trainer and ck["inference_allowed_mirroring_axes"] is None


def test_prepare_synthetic_bad_inputs(planned, monkeypatch, tmp_path):
    from plugin_trainers.synthetic_data import prepare_synthetic

    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        monkeypatch.setenv(var, str(planned[sub]))
    bad = make_fake_synthetic(planned["dataset"], tmp_path, DATASET_ID + 2, "BadLabels", copies=1)
    dj = json.loads((bad / "dataset.json").read_text())
    dj["labels"] = {"background": 0, "heart": 1}
    (bad / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(SDDMError, match=r"dataset.json: labels .* differ"):
        prepare_synthetic(DATASET_ID, bad)
    nocases = make_fake_synthetic(planned["dataset"], tmp_path, DATASET_ID + 3, "NoCases", copies=1)
    (nocases / "cases.json").unlink()
    with pytest.raises(SDDMError, match=r"cases.json: missing or empty"):
        prepare_synthetic(DATASET_ID, nocases)
    with pytest.raises(SDDMError, match=r"fraction must be in \[0, 1\]"):
        prepare_synthetic(DATASET_ID, nocases, fraction=2)
    with pytest.raises(SDDMError, match=r"no configuration '3d_lowres'"):
        ok = make_fake_synthetic(planned["dataset"], tmp_path, DATASET_ID + 4, "Ok", copies=1)
        prepare_synthetic(DATASET_ID, ok, configurations=("3d_lowres",))
    assert not (planned["preprocessed"] / DATASET / "sddm_synthetic" / bad.name).exists()


def _train_into(planned, results: Path, seed: str, trainer: str = "nnUNetTrainer_SDDM_NoDA_Quick") -> dict:
    """Train fold 0 of the 2d configuration into the results folder ``results`` with
    ``nnUNet_sddm_seed=seed`` (single-threaded augmentation, as the study trains on the CPU)."""
    results.mkdir(parents=True, exist_ok=True)
    env = dict(planned["env"], nnUNet_n_proc_DA="0", nnUNet_results=str(results), nnUNet_sddm_seed=seed)
    _run(["nnUNetv2_train", DATASET_ID, "2d", "0", "-tr", trainer, "-device", "cpu"], env)
    fold = results / DATASET / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    return torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)


@pytest.mark.timeout(900)
def test_seeded_training_is_bit_identical_on_cpu(planned, tmp_path):
    """The same command twice gives bit-identical weights (network initialisation, patch sampling and
    nnU-Net's standard augmentation, the study's nnU-Net aug row: the trainers share one seeding, and
    the augmented trainer draws the most random numbers); another nnUNet_sddm_seed gives other weights;
    the seed is recorded in the checkpoint; the augmented checkpoint keeps nnU-Net's mirroring axes."""
    trainer = "nnUNetTrainer_SDDM_Aug_Quick"
    a = _train_into(planned, tmp_path / "a", "7", trainer)
    b = _train_into(planned, tmp_path / "b", "7", trainer)
    c = _train_into(planned, tmp_path / "c", "8", trainer)
    assert a["trainer_name"] == trainer
    assert a["init_args"]["sddm_seed"] == 7 and c["init_args"]["sddm_seed"] == 8
    assert tuple(a["inference_allowed_mirroring_axes"]) == (0, 1)
    wa, wb, wc = a["network_weights"], b["network_weights"], c["network_weights"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same seed, different weights"
    assert not all(torch.equal(wa[k], wc[k]) for k in wa), "another seed gave the same weights"


def test_trainer_seed_from_the_environment():
    from plugin_trainers.seeding import DEFAULT_SEED, trainer_seed

    assert trainer_seed({}) == DEFAULT_SEED == 0
    assert trainer_seed({"nnUNet_sddm_seed": "12"}) == 12
    with pytest.raises(SDDMError, match="nnUNet_sddm_seed"):
        trainer_seed({"nnUNet_sddm_seed": "-1"})
