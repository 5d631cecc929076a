"""``nnUNetv2_sddm_pseudo_label``: pseudo-labelled target datasets.

The pure functions (largest components, confidence mask, the pseudo-label of a probability map)
are tested on generated arrays. The end-to-end test uses a 2-epoch nnU-Net 2d model
(``nnUNetTrainer_SDDM_NoDA_Quick`` on 3 vendor-A phantom subjects at 32 px), trained once per test
session by :func:`trained_source` (``tests/test_mask_adherence.py`` uses the same model), and
vendor-B phantom targets.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from scipy import ndimage

from nnunet_sddm.adaptation.pseudo_labels import (check_pseudo_label_dataset, confidence_mask, largest_components,
                                                  pseudo_label)
from nnunet_sddm.utilities.errors import SDDMError

SOURCE_ID, TARGET_ID, NEW_ID = 631, 632, 633
TRAINER = "nnUNetTrainer_SDDM_NoDA_Quick"
LABELS = {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_compile")


def _run(cmd, env, timeout=300):
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def trained_source(tmp_path_factory) -> dict:
    """nnU-Net folders with the vendor-A phantom source (id 631, 3 subjects, 32 px), its 2d
    ``nnUNetTrainer_SDDM_NoDA_Quick`` model (fold 0) and a vendor-B target (id 632, 1 subject):
    built once per session under the session's temporary folder, reused by later calls."""
    from plugin_trainers.discovery import ensure_trainer_path_in_env

    from nnunet_sddm.data.phantoms import generate_phantom_dataset

    root = tmp_path_factory.getbasetemp() / "pseudo_label_model"
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        env[var] = str(root / sub)
    env["nnUNet_compile"] = "0"
    env.pop("nnUNet_n_proc_DA", None)
    ensure_trainer_path_in_env(env)
    world = {"root": root, "env": env}
    if (root / "done").is_file():
        return world
    for sub in ("raw", "preprocessed", "results"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(var, env[var])
        generate_phantom_dataset(SOURCE_ID, "A", n_cases=3, seed=0, matrix=32)
        generate_phantom_dataset(TARGET_ID, "B", n_cases=1, seed=1, matrix=32)
    _run(["nnUNetv2_plan_and_preprocess", "-d", SOURCE_ID, "-c", "2d", "-np", "1", "-npfp", "1"], env)
    _run(["nnUNetv2_train", SOURCE_ID, "2d", "0", "-tr", TRAINER, "-device", "cpu"], {**env, "nnUNet_n_proc_DA": "0"})
    (root / "done").write_text("trained\n")
    return world


def use_world(world: dict, monkeypatch) -> None:
    """Point this process's nnU-Net variables at the session's model folders."""
    for var in NNUNET_ENV:
        monkeypatch.setenv(var, world["env"][var])


# ---------------------------------------------------------------------- pure functions
def _blob(shape, centre, radius):
    z, y, x = np.indices(shape)
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


def test_largest_components_keep_the_largest_per_structure():
    shape = (12, 24, 24)
    seg = np.zeros(shape, np.uint8)
    seg[_blob(shape, (6, 6, 6), 4)] = 1          # LV: large
    seg[_blob(shape, (6, 18, 18), 2)] = 1        # LV: small, disconnected
    seg[_blob(shape, (6, 6, 18), 3)] = 3         # RV: one component only
    seg[0, 0, 23] = 3                            # RV: one isolated voxel
    small = int(_blob(shape, (6, 18, 18), 2).sum())
    out, removed = largest_components(seg, [1, 2, 3])
    assert removed == {1: small, 2: 0, 3: 1}
    for v in (1, 3):
        assert ndimage.label(out == v, structure=np.ones((3, 3, 3)))[1] == 1
    np.testing.assert_array_equal(out == 1, _blob(shape, (6, 6, 6), 4))
    assert np.count_nonzero(out != seg) == small + 1 and not out[seg != out].any()


def test_confidence_mask_marks_exactly_the_low_confidence_voxels():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([0.5, 0.5, 0.5, 0.5], size=(5, 7, 9)).transpose(3, 0, 1, 2).astype(np.float32)
    for t in (0.4, 0.7, 1.0):
        mask = confidence_mask(p, t)
        expected = np.array([[[max(p[:, k, j, i]) < t for i in range(9)] for j in range(7)] for k in range(5)])
        np.testing.assert_array_equal(mask, expected)
    assert confidence_mask(p, 1.0).all() and 0 < confidence_mask(p, 0.7).sum() < p[0].size
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(SDDMError, match="threshold"):
            confidence_mask(p, bad)


def test_pseudo_label_of_generated_probabilities():
    """argmax, largest component per structure, then the ignore label C exactly where max P < t."""
    rng = np.random.default_rng(1)
    shape = (6, 20, 20)
    seg = np.zeros(shape, np.uint8)
    seg[_blob(shape, (3, 6, 6), 3)] = 1
    seg[_blob(shape, (3, 14, 14), 3)] = 2
    seg[3, 16, 2] = 1  # a stray LV voxel, removed by the largest-component step
    logits = rng.normal(0.0, 0.3, (4, *shape)) + 3.0 * (np.arange(4)[:, None, None, None] == seg[None])
    p = (np.exp(logits) / np.exp(logits).sum(0, keepdims=True)).astype(np.float32)
    lm = LabelManager(LABELS, regions_class_order=None)

    plain = pseudo_label(p, lm)
    expected, _ = largest_components(p.argmax(0).astype(np.uint8), [1, 2, 3])
    np.testing.assert_array_equal(plain.seg, expected)
    assert plain.removed[1] == 1 and plain.ignored_fraction == 0.0 and 4 not in np.unique(plain.seg)
    assert plain.mean_confidence == pytest.approx(float(p.max(0)[expected > 0].mean()), rel=1e-6)

    t = 0.8
    th = pseudo_label(p, lm, threshold=t)
    low = p.max(0) < t
    assert 0 < low.sum() < low.size
    np.testing.assert_array_equal(th.seg == 4, low)
    np.testing.assert_array_equal(th.seg[~low], expected[~low])
    assert th.ignored_fraction == pytest.approx(low.mean())
    with pytest.raises(SDDMError, match="one channel per label"):
        pseudo_label(p[:3], lm)


def _dataset_json(folder: Path, labels: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz",
                                                     "channel_names": {"0": "MR"}}))
    return folder


def test_check_pseudo_label_dataset(tmp_path):
    source = _dataset_json(tmp_path / "source", LABELS)
    check_pseudo_label_dataset(_dataset_json(tmp_path / "same", LABELS), source)
    check_pseudo_label_dataset(_dataset_json(tmp_path / "ignore", {**LABELS, "ignore": 4}), source)
    bad_ignore = _dataset_json(tmp_path / "bad_ignore", {**LABELS, "ignore": 7})
    with pytest.raises(SDDMError, match="bad_ignore.*max label"):
        check_pseudo_label_dataset(bad_ignore, source)
    other = _dataset_json(tmp_path / "other", {"background": 0, "LV": 1, "MYO": 2})
    with pytest.raises(SDDMError, match="other.*differ"):
        check_pseudo_label_dataset(other, source)
    other_ignore = _dataset_json(tmp_path / "other_ignore", {"background": 0, "LV": 1, "RV": 2, "ignore": 3})
    with pytest.raises(SDDMError, match="other_ignore.*differ"):
        check_pseudo_label_dataset(other_ignore, source)


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return trained_source(tmp_path_factory)


def cli(args, capsys):
    from nnunet_sddm.cli.prediction import pseudo_label_main

    with pytest.raises(SystemExit) as e:
        pseudo_label_main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


@pytest.mark.timeout(400)
def test_pseudo_label_dataset_end_to_end(world, monkeypatch, capsys):
    import torch
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from nnunet_sddm.cli.prediction import pseudo_label_main
    from nnunet_sddm.data.volumes import same_geometry

    use_world(world, monkeypatch)
    raw = Path(world["env"]["nnUNet_raw"])
    args = ["-i", TARGET_ID, "-o", NEW_ID, "-d", SOURCE_ID, "-c", "2d", "-tr", TRAINER, "-f", "0",
            "-chk", "checkpoint_final.pth", "checkpoint_best.pth", "--threshold", "0.3", "-device", "cpu",
            "-np", "0", "--disable_progress_bar"]
    threads = torch.get_num_threads()
    try:
        assert pseudo_label_main([str(a) for a in args]) == 0
    finally:
        torch.set_num_threads(threads)
    out = raw / f"Dataset{NEW_ID}_PhantomBPseudoLabel"
    target = raw / f"Dataset{TARGET_ID}_PhantomB"
    assert sorted(p.name for p in raw.iterdir()) == sorted([out.name, target.name, f"Dataset{SOURCE_ID}_PhantomA"])
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {**LABELS, "ignore": 4} and dj["numTraining"] == 2
    assert dj["sddm_pseudo_label"]["model"]["checkpoints"] == ["checkpoint_final.pth", "checkpoint_best.pth"]
    records = json.loads((out / "cases.json").read_text())
    assert [r["case"] for r in records] == ["PhB0000_ED", "PhB0000_ES"]
    for r in records:
        image = out / "imagesTr" / f"{r['case']}_0000.nii.gz"
        label = out / "labelsTr" / f"{r['case']}.nii.gz"
        assert image.read_bytes() == (target / "imagesTr" / image.name).read_bytes()
        assert r["source_image"] == str((target / "imagesTr" / image.name).resolve())
        assert same_geometry(image, label)
        seg = np.asarray(nib.load(str(label)).dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2, 3, 4}
        assert r["ignored_fraction"] == pytest.approx(float((seg == 4).mean()))
        for v in (1, 2, 3):
            assert ndimage.label(seg == v, structure=np.ones((3, 3, 3)))[1] <= 1
        assert r["pseudo_label"] is True and r["threshold"] == 0.3 and r["subject"] == "PhB0000"
        assert set(r["lcc_removed_voxels"]) == {"LV", "MYO", "RV"}
        assert r["mean_confidence"] is None or 0.0 < r["mean_confidence"] <= 1.0
        assert r["model"]["dataset"] == f"Dataset{SOURCE_ID}_PhantomA" and r["model"]["folds"] == [0]
    check_pseudo_label_dataset(out, target)
    verify_dataset_integrity(str(out), num_processes=1)

    # bad input: the id exists, the model's own id, missing folds; nothing is changed
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = cli(args, capsys)
    assert code == 2 and f"Dataset{NEW_ID}" in err and "--overwrite" in err
    code, err = cli([*args[:3], SOURCE_ID, *args[4:]], capsys)
    assert code == 2 and "model's dataset" in err
    code, err = cli([*args[:3], 634, *args[4:10], "-f", "3", *args[12:]], capsys)
    assert code == 2 and "fold_3" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not any(p.name.startswith(".") for p in raw.iterdir())
