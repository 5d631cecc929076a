"""Adaptation of arrays and folders: N = 0, batching across volumes, geometry of generated and real
files, bad inputs (nothing written), resume after interruption, simulated ranks, the CLI."""
from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from _interrupt import interrupt_after_writes
from _micro_model import MICRO, micro_model_folder, one_torch_thread

from nnunet_sddm.utilities.distributed import Ranks
from nnunet_sddm.adaptation.folders import RECORD_FILE, adapt_folder
from nnunet_sddm.adaptation.pipeline import adapt_arrays
from nnunet_sddm.data.volumes import read_geometry, same_geometry
from nnunet_sddm.sampling.guided import SamplerSettings
from nnunet_sddm.utilities.errors import SDDMError

FAST = SamplerSettings(N=2, steps=10, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A micro model folder whose output layer is randomised (saved, so CLIs load the same)."""
    with one_torch_thread():
        yield micro_model_folder(tmp_path_factory.mktemp("micro"), randomise_output=True)


@pytest.fixture(scope="module")
def loaded(model_dir):
    from nnunet_sddm.diffusion.model_folder import load_model

    return load_model(model_dir)


def volume(shape, seed=0, scale=300.0):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    v = scale * ((y ** 2 + x ** 2) < 0.4) + 0.2 * scale * rng.random(shape)
    return v.astype(np.float32)


def write_nifti(path, data_zyx, affine=None, dtype=np.float32):
    affine = np.diag([1.25, 1.4, 8.0, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(np.asarray(data_zyx).transpose(2, 1, 0).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def oblique_affine():
    a = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.9, 1.7, 10.0])
    a[:3, 3] = [-100.0, 20.0, 55.5]
    return a


# ---------------------------------------------------------------------------------------- arrays
def test_n0_returns_input_clipped_to_its_window(loaded):
    vols = {"a": volume((3, 40, 30)), "b": volume((1, 17, 50), seed=1)}
    out = adapt_arrays(vols, loaded, FAST.replace(N=0), progress=False)
    for k, v in vols.items():
        lo, hi = np.percentile(v, (0.5, 99.5))
        np.testing.assert_array_equal(out[k], np.clip(v, np.float32(lo), np.float32(hi)))
        assert out[k].dtype == np.float32


def test_window_uses_the_models_training_percentiles(loaded):
    """A model trained with data.percentiles [5, 95] adapts with that window, not 0.5 / 99.5."""
    import copy

    other = copy.copy(loaded)
    other.config = {**loaded.config, "data": {**loaded.config.get("data", {}), "percentiles": [5.0, 95.0]}}
    v = volume((2, 24, 24))
    out = adapt_arrays({"a": v}, other, FAST.replace(N=0), progress=False)["a"]
    lo, hi = np.percentile(v, (5.0, 95.0))
    np.testing.assert_array_equal(out, np.clip(v, np.float32(lo), np.float32(hi)))


def test_arrays_keep_shape_units_and_batching_does_not_matter(loaded):
    vols = {"a": volume((3, 40, 30)), "thin": volume((1, 20, 33), seed=1, scale=5.0),
            "aniso": volume((2, 64, 12), seed=2, scale=1e4)}
    one = adapt_arrays(vols, loaded, FAST, batch_size=1, progress=False)
    many = adapt_arrays(vols, loaded, FAST, batch_size=16, progress=False)
    assert list(one) == list(vols)
    for k, v in vols.items():
        assert one[k].shape == v.shape and one[k].dtype == np.float32
        np.testing.assert_allclose(one[k], many[k], atol=1e-4 * float(v.max()), rtol=0)
        lo, hi = np.percentile(v, (0.5, 99.5))
        assert lo - 0.5 * (hi - lo) < one[k].mean() < hi + 0.5 * (hi - lo)  # original units
        assert not np.allclose(one[k], v)


def test_reference_mode_never_pads_the_last_batch(loaded):
    """DDA's exact mode takes ONE norm over the whole batch: 3 slices with batch size 4 must be the
    3 slices sampled as one batch of 3 (no padding copies in the norm)."""
    ref = FAST.replace(reference_behaviour=True)
    vols = {"a": volume((3, 40, 30), seed=7)}
    padded = adapt_arrays(vols, loaded, ref, batch_size=4, progress=False)["a"]
    exact = adapt_arrays(vols, loaded, ref, batch_size=3, progress=False)["a"]
    np.testing.assert_allclose(padded, exact, rtol=0, atol=1e-6 * float(np.abs(exact).max()))


@pytest.mark.parametrize("bad,match", [
    (np.full((2, 8, 8), 3.0, np.float32), "constant"),
    (np.where(np.eye(8)[None] > 0, np.nan, 1.0).astype(np.float32), "NaN"),
    (np.where(np.eye(8)[None] > 0, np.inf, 1.0).astype(np.float32), "NaN or infinite"),
    (np.ones((8, 8), np.float32), "3D"),
])
def test_bad_arrays(loaded, bad, match):
    with pytest.raises(SDDMError, match=match):
        adapt_arrays({"x": bad}, loaded, FAST, progress=False)


def test_model_checks(tmp_path, loaded):
    from nnunet_sddm.diffusion.model_folder import create_model_folder, load_model

    two = load_model(create_model_folder(tmp_path / "two", "tiny", overrides={**MICRO, "model.in_channels": 2}))
    with pytest.raises(SDDMError, match="input channels"):
        adapt_arrays({"a": volume((1, 8, 8))}, two, FAST, progress=False)
    with pytest.raises(SDDMError, match="smaller than"):
        adapt_arrays({"a": volume((1, 8, 8))}, loaded, FAST.replace(D=32), progress=False)


# ---------------------------------------------------------------------------------------- files
def make_input_folder(folder):
    write_nifti(folder / "thin_0000.nii.gz", volume((1, 30, 24), seed=3))
    write_nifti(folder / "aniso_0000.nii.gz", volume((3, 21, 40), seed=4), affine=oblique_affine())
    write_nifti(folder / "int16_0000.nii.gz", volume((2, 16, 16), seed=5), dtype=np.int16)
    return folder


def test_folder_geometry_names_and_record(tmp_path, model_dir):
    src = make_input_folder(tmp_path / "in")
    written = adapt_folder(src, tmp_path / "out", str(model_dir), FAST, device="cpu", progress=False)
    assert sorted(p.name for p in written) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        out = tmp_path / "out" / p.name
        assert same_geometry(p, out)
        a, b = nib.load(str(p)), nib.load(str(out))
        np.testing.assert_array_equal(a.affine, b.affine)
        assert a.shape == b.shape and int(b.header["qform_code"]) == 1 == int(b.header["sform_code"])
        assert b.get_data_dtype() == np.float32
    rec = json.loads((tmp_path / "out" / RECORD_FILE).read_text())
    assert rec["settings"]["N"] == 2 and rec["cases"] == ["aniso", "int16", "thin"]


def test_folder_bad_inputs_write_nothing(tmp_path, model_dir):
    src = make_input_folder(tmp_path / "in")
    with pytest.raises(SDDMError, match="input folder"):
        adapt_folder(src, src, str(model_dir), FAST, device="cpu", progress=False)
    for name, data, match in [("flat_0000.nii.gz", np.ones((5, 6)), "3D"),
                              ("cine_0000.nii.gz", np.ones((4, 5, 6, 3)), "3D"),
                              ("nan_0000.nii.gz", np.full((2, 5, 6), np.nan), "NaN"),
                              ("const_0000.nii.gz", np.full((2, 5, 6), 7.0), "constant")]:
        bad = tmp_path / f"in_{name.split('_')[0]}"
        make_input_folder(bad)
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(bad / name))
        out = tmp_path / f"out_{name.split('_')[0]}"
        with pytest.raises(SDDMError, match=match) as e:
            adapt_folder(bad, out, str(model_dir), FAST, device="cpu", progress=False)
        assert name in str(e.value)
        assert not any(p.name.endswith(".nii.gz") for p in out.rglob("*")), "nothing may be written"


def test_resume_after_interruption_gives_identical_files(tmp_path, model_dir, monkeypatch):
    import nnunet_sddm.adaptation.pipeline as pipeline
    from nnunet_sddm.data.volumes import write_like

    src = make_input_folder(tmp_path / "in")
    adapt_folder(src, tmp_path / "full", str(model_dir), FAST, device="cpu", batch_size=2, progress=False)
    calls = interrupt_after_writes(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        adapt_folder(src, tmp_path / "resumed", str(model_dir), FAST, device="cpu", batch_size=2, progress=False)
    assert len([p for p in (tmp_path / "resumed").iterdir() if p.name.endswith(".nii.gz")]) == 1
    assert not any(p.name.startswith(".") for p in (tmp_path / "resumed").iterdir())
    # what a SIGKILL during a write leaves (this version's temp folder and an earlier version's temp file)
    (tmp_path / "resumed" / ".aniso_0000.nii.gz.k9x_a2b1.sddm-tmp").mkdir()
    (tmp_path / "resumed" / ".aniso_0000.nii.gz.k9x_a2b1.sddm-tmp" / "aniso_0000.nii.gz").write_bytes(b"half")
    (tmp_path / "resumed" / ".thin_0000.ab12cd_3.nii.gz").write_bytes(b"half")
    monkeypatch.setattr(pipeline, "write_like", write_like)
    again = adapt_folder(src, tmp_path / "resumed", str(model_dir), FAST, device="cpu", batch_size=2,
                         progress=False)
    assert len(again) == 2 and calls[0] not in again
    assert not any(p.name.startswith(".") for p in (tmp_path / "resumed").iterdir()), "stale temp files kept"
    for p in src.iterdir():  # the whole NIfTI (header + voxels); the gzip wrapper stores a temp name/mtime
        full = gzip.decompress((tmp_path / "full" / p.name).read_bytes())
        assert full == gzip.decompress((tmp_path / "resumed" / p.name).read_bytes())
    with pytest.raises(SDDMError, match="different settings"):
        adapt_folder(src, tmp_path / "resumed", str(model_dir), FAST.replace(tau=1.0), device="cpu",
                     progress=False)
    assert adapt_folder(src, tmp_path / "resumed", str(model_dir), FAST, device="cpu", progress=False) == []


def test_resume_refuses_other_input_and_other_weights(tmp_path, model_dir):
    import shutil

    from nnunet_sddm.diffusion.model_folder import EMA_FILE, load_weights, save_weights

    in1 = make_input_folder(tmp_path / "in1")
    in2 = tmp_path / "in2"
    shutil.copytree(in1, in2)
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "out"
    adapt_folder(in1, out, str(model), FAST, device="cpu", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SDDMError, match="different input"):  # same case names, another folder
        adapt_folder(in2, out, str(model), FAST, device="cpu", progress=False)
    (in1 / "extra_0000.nii.gz").write_bytes((in1 / "thin_0000.nii.gz").read_bytes())
    with pytest.raises(SDDMError, match="different cases"):
        adapt_folder(in1, out, str(model), FAST, device="cpu", progress=False)
    (in1 / "extra_0000.nii.gz").unlink()
    state = load_weights(model / EMA_FILE)  # the same model folder, retrained weights
    state = {k: v + 0.01 if k.startswith("out.") else v for k, v in state.items()}
    save_weights(state, model / EMA_FILE)
    with pytest.raises(SDDMError, match="different weights"):
        adapt_folder(in1, out, str(model), FAST, device="cpu", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a refused run must change nothing"
    rec = json.loads((out / RECORD_FILE).read_text())
    assert rec["input"] == str(in1.resolve()) and set(rec["weights"]) == {"ema.safetensors", "model.safetensors"}


def test_interrupted_overwrite_never_keeps_old_outputs_under_the_new_record(tmp_path, model_dir, monkeypatch):
    """seed 0 run; seed 1 with --overwrite killed after one file; seed 1 resumed without --overwrite:
    every file is the seed-1 result (the review's scenario left two seed-0 files)."""
    import nnunet_sddm.adaptation.pipeline as pipeline
    from nnunet_sddm.data.volumes import write_like

    src = make_input_folder(tmp_path / "in")
    seed1 = FAST.replace(seed=1)
    adapt_folder(src, tmp_path / "fresh", str(model_dir), seed1, device="cpu", batch_size=2, progress=False)
    out = tmp_path / "out"
    adapt_folder(src, out, str(model_dir), FAST, device="cpu", batch_size=2, progress=False)
    calls = interrupt_after_writes(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        adapt_folder(src, out, str(model_dir), seed1, device="cpu", batch_size=2, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([calls[0].name, RECORD_FILE])
    monkeypatch.setattr(pipeline, "write_like", write_like)
    again = adapt_folder(src, out, str(model_dir), seed1, device="cpu", batch_size=2, progress=False)
    assert len(again) == 2
    for p in src.iterdir():
        np.testing.assert_array_equal(nib.load(str(out / p.name)).get_fdata(),
                                      nib.load(str(tmp_path / "fresh" / p.name)).get_fdata())


def test_ranks_split_cases_and_reproduce_single_process(tmp_path, model_dir):
    """torchrun simulated in-process: each rank, given its place, adapts only its share; the union
    is bit-identical to the single-process result (same batch size)."""
    src = make_input_folder(tmp_path / "in")
    single = tmp_path / "single"
    adapt_folder(src, single, str(model_dir), FAST, device="cpu", progress=False)
    shares = []
    for r in (0, 1):
        out = tmp_path / f"rank{r}"
        shares.append(adapt_folder(src, out, str(model_dir), FAST, device="cpu", progress=False,
                                   ranks=Ranks(rank=r, world_size=2)))
    assert [sorted(p.name for p in s) for s in shares] == [["aniso_0000.nii.gz", "thin_0000.nii.gz"],
                                                           ["int16_0000.nii.gz"]]
    for p in (q for s in shares for q in s):
        a, b = nib.load(str(single / p.name)).get_fdata(), nib.load(str(p)).get_fdata()
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("device, expected", [(None, "cuda:3"), ("cuda", "cuda:3"), ("auto", "cuda:3"),
                                              ("cuda:1", "cuda:1"), ("cpu", None)])
def test_torchrun_sets_the_rank_device_before_nccl(monkeypatch, device, expected):
    """Under torchrun with CUDA, rank LOCAL_RANK's GPU is made current before the NCCL group starts
    (faked CUDA and process group: no GPU needed)."""
    import torch.distributed as dist

    from nnunet_sddm.utilities.distributed import init_from_env

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(torch.device(d)))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    ranks = init_from_env(device)
    assert (ranks.rank, ranks.world_size, ranks.local_rank) == (3, 4, 3)
    if expected is None:
        assert calls == [("init", "gloo")]
    else:
        assert calls == [("set_device", expected), ("init", "nccl")]


def test_adapt_cli(tmp_path, model_dir, capsys):
    from nnunet_sddm.cli.adaptation import adapt_main

    src = make_input_folder(tmp_path / "in")
    adapt_main(["-i", str(src), "-o", str(tmp_path / "out"), "-m", str(model_dir), "-N", "1", "--steps", "10",
                "--device", "cpu", "--quiet"])
    assert "3 image(s) written" in capsys.readouterr().out
    for argv, match in [(["-D", "3"], "power of 2"), (["-N", "11"], "exceeds"), (["--tau", "-1"], "tau"),
                        (["-D", "32"], "smaller than")]:
        with pytest.raises(SystemExit) as e:
            adapt_main(["-i", str(src), "-o", str(tmp_path / "o2"), "-m", str(model_dir), "--steps", "10",
                        "-N", "1", "--device", "cpu", "--quiet"] + argv)
        assert e.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------- real data
def test_real_acdc_and_mnms_frames_keep_geometry(tmp_path, model_dir, shared_data):
    src = tmp_path / "in"
    src.mkdir()
    acdc = shared_data / "ACDC" / "training" / "patient001"
    frames = sorted(p for p in acdc.glob("patient001_frame*.nii.gz") if not p.name.endswith("_gt.nii.gz"))[:1]
    mnms = [shared_data / "MnMs1-sample" / "G1K1V3_sa_ES.nii.gz"]
    for p in frames + mnms:
        os.symlink(p, src / (p.name.replace(".nii.gz", "") + "_0000.nii.gz"))
    adapt_folder(src, tmp_path / "out", str(model_dir), FAST.replace(N=1), device="cpu", progress=False)
    for p in src.iterdir():
        out = tmp_path / "out" / p.name
        assert same_geometry(p, out), p.name
        ga, gb = read_geometry(p), read_geometry(out)
        assert ga["shape"] == gb["shape"]
        np.testing.assert_allclose(ga["affine"], gb["affine"], atol=1e-6)
        data = nib.load(str(out)).get_fdata()
        assert np.isfinite(data).all() and data.std() > 0
