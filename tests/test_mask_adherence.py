"""``nnUNetv2_sddm_mask_adherence``: Dice of a real-data segmenter on generated pairs against their labels.

Uses the session's 2-epoch phantom nnU-Net of ``test_pseudo_labels.trained_source``. The real
phantom images and labels act as the "generated" dataset (identity check: the adherence is the
model's in-domain Dice of ``evaluate_folders``); a copy whose label maps are those of other
subjects (mirrored in-plane) is the negative control.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from test_pseudo_labels import SOURCE_ID, TRAINER, trained_source, use_world

ARGS = ["-d", str(SOURCE_ID), "-c", "2d", "-tr", TRAINER, "-f", "0", "-device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return trained_source(tmp_path_factory)


def run_cli(args):
    import torch

    from nnunet_sddm.cli.evaluation import mask_adherence_main

    threads = torch.get_num_threads()
    try:
        return mask_adherence_main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def shuffled_copy(source: Path, dest: Path) -> Path:
    """``source`` with the label map of every case replaced by that of another subject (2 cases on:
    ED/ES pairs), mirrored in-plane, cut or zero-padded to the case's slices, in the case's header."""
    shutil.copytree(source, dest)
    cases = sorted(p.name for p in (source / "labelsTr").iterdir())
    for i, c in enumerate(cases):
        own = nib.load(str(source / "labelsTr" / c))
        other = np.asarray(nib.load(str(source / "labelsTr" / cases[(i + 2) % len(cases)])).dataobj)
        arr = np.zeros(own.shape, other.dtype)
        k = min(own.shape[2], other.shape[2])
        arr[..., :k] = other[::-1, ::-1, :k]
        nib.save(nib.Nifti1Image(arr, own.affine, own.header), str(dest / "labelsTr" / c))
    return dest


@pytest.mark.timeout(400)
def test_adherence_is_in_domain_dice_and_drops_for_foreign_labels(world, monkeypatch, tmp_path, capsys):
    from nnunet_sddm.adaptation.predictor import load_nnunet_predictor, nnunet_model_folder, predict_folder
    from nnunet_sddm.evaluation.evaluate import evaluate_folders

    use_world(world, monkeypatch)
    source = next(Path(world["env"]["nnUNet_raw"]).glob(f"Dataset{SOURCE_ID}_*"))
    out = tmp_path / "adherence"
    assert run_cli(["-s", SOURCE_ID, *ARGS, "-o", out]) == 0
    assert "| LV |" in capsys.readouterr().out
    rec = json.loads((out / "adherence.json").read_text())
    assert set(rec["structures"]) == {"LV", "MYO", "RV"} and rec["n_cases"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["adherence.csv", "adherence.json", "adherence.md",
                                                     "evaluation", "predictions"]
    with open(out / "adherence.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and set(rows[0]) == {"case", "structure", "DSC"}

    # identity: the same model's in-domain Dice, evaluate_folders on nnU-Net's own prediction
    predictor = load_nnunet_predictor(nnunet_model_folder(SOURCE_ID, TRAINER, "nnUNetPlans", "2d"), [0],
                                      device="cpu", allow_tqdm=False)
    stock = tmp_path / "stock"
    predict_folder(predictor, source / "imagesTr", stock)
    direct = evaluate_folders(source / "labelsTr", stock, dataset_json=source / "dataset.json", num_processes=1,
                              progress=False)
    for s in ("LV", "MYO", "RV"):
        d = direct.summary["structures"][s]["metrics"]["DSC"]
        assert rec["structures"][s]["mean"] == pytest.approx(d["mean"], abs=1e-12)
        assert rec["structures"][s]["n"] == d["n"]
    per_case = {(r["case"], r["structure"]): r["DSC"] for r in rec["per_case"]}
    assert per_case == pytest.approx({(r["case"], r["structure"]): r["DSC"] for r in direct.rows}, abs=1e-12)

    # negative control: the label maps of other subjects
    shuffled = shuffled_copy(source, tmp_path / "Dataset699_Shuffled")
    assert run_cli(["-s", shuffled, *ARGS, "-o", tmp_path / "shuffled"]) == 0
    ctrl = json.loads((tmp_path / "shuffled" / "adherence.json").read_text())["structures"]
    mean = np.mean([rec["structures"][s]["mean"] for s in ("LV", "MYO", "RV")])
    ctrl_mean = np.mean([ctrl[s]["mean"] for s in ("LV", "MYO", "RV")])
    print(f"adherence: real labels {mean:.3f}, other subjects' labels {ctrl_mean:.3f}")
    assert ctrl_mean < 0.75 * mean

    # bad input: existing output, a generated image without its label map
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(["-s", SOURCE_ID, *ARGS, "-o", out])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    (shuffled / "labelsTr" / "PhA0001_ES.nii.gz").unlink()
    with pytest.raises(SystemExit) as e:
        run_cli(["-s", shuffled, *ARGS, "-o", tmp_path / "missing"])
    assert e.value.code == 2 and "PhA0001_ES" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
