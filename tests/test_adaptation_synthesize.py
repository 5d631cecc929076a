"""Synthetic datasets (nnU-Net integrity, labels, provenance, splits, copies, staging/resume,
refusals) and the sweep grid, on generated phantoms."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from _interrupt import interrupt_after_writes
from _micro_model import micro_model_folder, one_torch_thread

from nnunet_sddm.adaptation.synthesize import synthesize_dataset
from nnunet_sddm.sampling.guided import SamplerSettings
from nnunet_sddm.utilities.errors import SDDMError

FAST = SamplerSettings(N=1, steps=10, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with one_torch_thread():
        yield micro_model_folder(tmp_path_factory.mktemp("micro"))


@pytest.fixture
def phantoms(nnunet_env):
    from nnunet_sddm.data.phantoms import generate_phantom_dataset

    return generate_phantom_dataset(41, "A", 3, n_test_cases=1, matrix=32)


@pytest.mark.timeout(120)
def test_synthesize_dataset(nnunet_env, phantoms, model_dir):
    from nnunet_sddm.adaptation.folders import adapt_folder
    from nnunet_sddm.cli.adaptation import synthesize_main
    from nnunet_sddm.data.volumes import same_geometry
    from nnunet_sddm.utilities.nnunet_paths import preprocessed_root, raw_root
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    synthesize_main(["-d", "41", "-o", "42", "-m", str(model_dir), "-N", "1", "--steps", "10", "--copies", "2",
                     "--include-test", "--device", "cpu", "--quiet"])
    new = raw_root() / "Dataset042_PhantomASDDM"
    verify_dataset_integrity(str(new), 1)
    assert not list(raw_root().glob(".*")), "staging folder left behind"
    dj = json.loads((new / "dataset.json").read_text())
    assert dj["numTraining"] == 12 and dj["labels"] == json.loads((phantoms / "dataset.json").read_text())["labels"]
    records = {r["case"]: r for r in json.loads((new / "cases.json").read_text())}
    assert len(records) == 14
    r = records["PhA0001_ES_syn1"]
    assert (r["source_case"], r["subject"], r["copy"], r["synthetic"], r["seed"], r["split"]) == \
        ("PhA0001_ES", "PhA0001", 1, True, 1, "Tr")
    assert r["sampler"]["N"] == 1 and r["sampler"]["seed"] == 1 and r["model"] == str(model_dir.resolve())
    assert records["PhA0003_ED_syn0"]["split"] == "Ts" and "PhA0003_ED_syn1" not in records
    for case, rec in records.items():  # original labels, byte for byte; images keep their geometry
        split = rec["split"]
        src_img = phantoms / f"images{split}" / f"{rec['source_case']}_0000.nii.gz"
        assert same_geometry(src_img, new / f"images{split}" / f"{case}_0000.nii.gz")
        assert (new / f"labels{split}" / f"{case}.nii.gz").read_bytes() == \
            (phantoms / f"labels{split}" / f"{rec['source_case']}.nii.gz").read_bytes()
    copies = [nib.load(str(new / "imagesTr" / f"PhA0000_ED_syn{k}_0000.nii.gz")).get_fdata() for k in (0, 1)]
    assert np.abs(copies[0] - copies[1]).max() > 0
    # the source's patient-level splits, mapped to the copies
    src_splits = json.loads((preprocessed_root() / phantoms.name / "splits_final.json").read_text())
    splits = json.loads((preprocessed_root() / new.name / "splits_final.json").read_text())
    assert len(splits) == len(src_splits)
    for s_new, s_src in zip(splits, src_splits):
        assert s_new["val"] == sorted(f"{c}_syn{k}" for c in s_src["val"] for k in (0, 1))
        assert not {records[c]["subject"] for c in s_new["val"]} & {records[c]["subject"] for c in s_new["train"]}
    # copy 0 == nnUNetv2_sddm_adapt of the same image with the same seed
    adapted = adapt_folder(phantoms / "imagesTr", nnunet_env["raw"].parent / "adapted", str(model_dir), FAST,
                           device="cpu", progress=False)
    one = next(p for p in adapted if p.name == "PhA0002_ED_0000.nii.gz")
    np.testing.assert_array_equal(nib.load(str(one)).get_fdata(),
                                  nib.load(str(new / "imagesTr" / "PhA0002_ED_syn0_0000.nii.gz")).get_fdata())

    # refusals: existing id, source id, bad copies; --overwrite replaces
    with pytest.raises(SDDMError, match="exists already"):
        synthesize_dataset(41, 42, str(model_dir), FAST, device="cpu", progress=False)
    with pytest.raises(SDDMError, match="source"):
        synthesize_dataset(41, 41, str(model_dir), FAST, device="cpu", progress=False, overwrite=True)
    with pytest.raises(SDDMError, match="copies"):
        synthesize_dataset(41, 43, str(model_dir), FAST, copies=0, device="cpu", progress=False)
    out = synthesize_dataset(41, 42, str(model_dir), FAST, name="Again", device="cpu", progress=False,
                             overwrite=True)
    assert out.name == "Dataset042_Again" and not new.exists()
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 6


@pytest.mark.timeout(120)
def test_synthesize_resumes_from_its_staging_folder(nnunet_env, phantoms, model_dir, monkeypatch):
    import nnunet_sddm.adaptation.pipeline as pipeline
    from nnunet_sddm.data.volumes import write_like
    from nnunet_sddm.utilities.nnunet_paths import raw_root

    interrupt_after_writes(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        synthesize_dataset(41, 44, str(model_dir), FAST, device="cpu", progress=False, batch_size=2)
    partial = raw_root() / ".Dataset044_PhantomASDDM.partial"
    assert partial.is_dir() and not (raw_root() / "Dataset044_PhantomASDDM").exists()
    first = {p.name: p.stat().st_mtime_ns for p in (partial / "imagesTr").iterdir()}
    assert len(first) == 2
    (partial / "imagesTr" / ".PhA0002_ED_syn0_0000.x1y2z3_4.nii.gz").write_bytes(b"half")  # a killed write
    (partial / "labelsTr" / ".PhA0002_ED_syn0.nii.gz.abcdefgh.sddm-tmp").mkdir()
    monkeypatch.setattr(pipeline, "write_like", write_like)
    out = synthesize_dataset(41, 44, str(model_dir), FAST, device="cpu", progress=False, batch_size=2)
    assert {n: (out / "imagesTr" / n).stat().st_mtime_ns for n in first} == first  # kept, not redone
    assert len(list((out / "imagesTr").iterdir())) == 6 and not partial.exists()
    assert not [p for p in out.rglob(".*")], "stale temp files published into the dataset"


def test_synthesize_bad_source(nnunet_env, phantoms, model_dir):
    (phantoms / "labelsTr" / "PhA0000_ED.nii.gz").unlink()
    with pytest.raises(SDDMError, match="PhA0000_ED"):
        synthesize_dataset(41, 45, str(model_dir), FAST, device="cpu", progress=False)
    with pytest.raises(SDDMError, match="no dataset with id 99"):
        synthesize_dataset(99, 45, str(model_dir), FAST, device="cpu", progress=False)


def test_sweep_grid(nnunet_env, phantoms, model_dir, tmp_path, capsys):
    from nnunet_sddm.cli.adaptation import sweep_main

    image = phantoms / "imagesTr" / "PhA0000_ED_0000.nii.gz"
    out = tmp_path / "sweep.png"
    sweep_main(["-i", str(image), "-m", str(model_dir), "-o", str(out), "-D", "2", "4", "-N", "1", "2",
                "--tau", "6", "--steps", "10", "--slice", "1", "--device", "cpu", "--quiet"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["D"] == [2, 4] and rec["N"] == [1, 2] and rec["slice"] == 1
    import matplotlib.image

    h, w = matplotlib.image.imread(str(out)).shape[:2]
    assert w > h  # 3 columns (reference + 2 D values) x 2 rows
    with pytest.raises(SystemExit) as e:
        sweep_main(["-i", str(image), "-m", str(model_dir), "-o", str(tmp_path / "x.png"), "--slice", "99",
                    "--steps", "10", "-N", "1", "--device", "cpu", "--quiet"])
    assert e.value.code == 2 and "--slice 99" in capsys.readouterr().err


def test_unfinished_synthesis_of_other_weights_is_not_continued(tmp_path):
    """A staging folder left by a run with other weights (same model folder) starts afresh."""
    from nnunet_sddm.adaptation.synthesize import RECORD_FILE, _prepare_partial

    partial = tmp_path / "partial"
    rec = {"model": "/m", "weights": {"ema.safetensors": "aaa"}, "settings": {"N": 2}, "amp": None,
           "source": "/s", "copies": 1, "include_test": False}
    _prepare_partial(partial, rec)
    (partial / "imagesTr" / "X_0000.nii.gz").write_bytes(b"old")
    _prepare_partial(partial, rec)  # same run: kept
    assert (partial / "imagesTr" / "X_0000.nii.gz").exists()
    _prepare_partial(partial, {**rec, "weights": {"ema.safetensors": "bbb"}})
    assert not (partial / "imagesTr" / "X_0000.nii.gz").exists()
    assert json.loads((partial / RECORD_FILE).read_text())["weights"] == {"ema.safetensors": "bbb"}
