"""Training: slice dataset, a short run on phantoms, exact resume, CLI, bad inputs, import."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nnunet_sddm.cli.diffusion import import_checkpoint_main, train_main
from nnunet_sddm.diffusion import create_model, load_model, preset_config
from nnunet_sddm.diffusion.model_folder import EMA_FILE, RAW_FILE, load_training_state, load_weights
from nnunet_sddm.diffusion.slice_dataset import load_slices, select_images
from nnunet_sddm.diffusion.trainer import batch_indices, read_log, train_model
from nnunet_sddm.utilities.errors import SDDMError

# 32 px, two levels, short chain: a few hundred ms per step on 2 cores
FAST = {"model.image_size": 32, "model.channel_mult": [1, 2], "model.attention_resolutions": [16],
        "diffusion.steps": 100, "diffusion.sample_respacing": 5, "training.batch_size": 8,
        "training.log_interval": 2, "training.num_samples": 2, "training.lr": 2e-3,
        "training.save_interval": 1000, "training.sample_interval": 1000}


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is faster


@pytest.fixture
def phantoms(nnunet_env):
    from nnunet_sddm.data.phantoms import generate_phantom_dataset

    return generate_phantom_dataset(11, "A", 2, matrix=64)


def _write_dataset(root: Path, arrays: dict, name="Dataset012_Toy"):
    folder = root / name
    (folder / "imagesTr").mkdir(parents=True)
    for case, arr in arrays.items():
        nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), np.eye(4)),
                 folder / "imagesTr" / f"{case}_0000.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0},
                                                     "numTraining": len(arrays), "file_ending": ".nii.gz"}))
    return folder


def test_slice_dataset_and_cache(phantoms, tmp_path):
    s = load_slices(phantoms, 32, {"percentiles": [0.5, 99.5]}, cache_dir=tmp_path / "cache", progress=False)
    n_slices = sum(nib.load(p).shape[2] for p in sorted((phantoms / "imagesTr").glob("*.nii.gz")))
    assert s.images.shape == (n_slices, 1, 32, 32)
    assert s.images.min() >= -1 and s.images.max() <= 1 and s.images.max() > 0.9
    assert s.cases[0] == "PhA0000_ED" and s.slice_index[:3] == [0, 1, 2]
    cached = load_slices(phantoms, 32, {"percentiles": [0.5, 99.5]}, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(cached.images, s.images) and len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert list(select_images(phantoms, {"cases": "PhA0001_ES"})) == ["PhA0001_ES"]
    assert len(select_images(phantoms, {"vendor": "A"})) == 4
    with pytest.raises(SDDMError, match="no training images match"):
        select_images(phantoms, {"vendor": "B"})
    with pytest.raises(SDDMError, match="not among its images"):
        select_images(phantoms, {"cases": ["nope"]})


def test_batch_order_is_a_function_of_step():
    a = np.concatenate([batch_indices(s, 8, 20, seed=3) for s in range(5)])
    # 40 draws = two epochs, each a permutation of the 20 items
    assert sorted(a[:20]) == list(range(20)) and sorted(a[20:]) == list(range(20))
    assert np.array_equal(batch_indices(3, 8, 20, seed=3), a[24:32])


@pytest.mark.timeout(120)
def test_short_training_run_loss_decreases(phantoms):
    model_dir, status = train_model("11", "tiny", {**FAST, "training.iterations": 30}, progress=False)
    assert status == "finished"
    assert model_dir.name == "sddm__tiny" and model_dir.parent.name == "Dataset011_PhantomA"
    for f in ("config.json", EMA_FILE, RAW_FILE, "training_state.pt", "log.csv", "progress.png", "samples.png"):
        assert (model_dir / f).is_file(), f
    rows = read_log(model_dir / "log.csv", 10**9)
    assert [r["step"] for r in rows] == list(range(2, 31, 2))
    first = np.mean([r["mse"] for r in rows[:3]])
    last = np.mean([r["mse"] for r in rows[-3:]])
    assert last < 0.7 * first, (first, last)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["data"]["dataset"] == "Dataset011_PhantomA" and "package_version" in cfg
    lm = load_model("11:tiny")
    assert lm.image_size == 32
    # EMA differs from the raw weights after training
    ema, raw = load_weights(model_dir / EMA_FILE), load_weights(model_dir / RAW_FILE)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


@pytest.mark.timeout(120)
def test_interrupt_and_resume_equals_uninterrupted(phantoms, tmp_path):
    over = {**FAST, "training.iterations": 6, "training.schedule_sampler": "loss-second-moment",
            "model.dropout": 0.1}
    full, _ = train_model("11", "tiny", over, model_dir=tmp_path / "full", progress=False)

    def interrupt(step):  # a real Ctrl-C (SIGINT) right after iteration 2
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    part, status = train_model("11", "tiny", over, model_dir=tmp_path / "part", progress=False, callback=interrupt)
    assert status == "interrupted" and load_training_state(part)["step"] == 2
    # a resume with different settings is refused, the checkpoint is untouched
    with pytest.raises(SDDMError, match="training.lr"):
        train_model("11", "tiny", {**over, "training.lr": 1e-4}, model_dir=part, resume=True, progress=False)
    with pytest.raises(SDDMError, match="already exists"):
        train_model("11", "tiny", over, model_dir=part, progress=False)
    _, status = train_model("11", "tiny", over, model_dir=part, resume=True, progress=False)
    assert status == "finished" and load_training_state(part)["step"] == 6
    for f in (RAW_FILE, EMA_FILE):
        a, b = load_weights(full / f), load_weights(part / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    sa, sb = load_training_state(full), load_training_state(part)
    assert torch.equal(sa["sampler"]["loss_history"], sb["sampler"]["loss_history"])


def test_bad_datasets(nnunet_env):
    empty = _write_dataset(nnunet_env["raw"], {})
    with pytest.raises(SDDMError, match="no training images"):
        train_model(str(empty), "tiny", FAST, progress=False)
    flat = _write_dataset(nnunet_env["raw"], {"a": np.random.rand(16, 16)}, name="Dataset013_Flat")
    with pytest.raises(SDDMError, match="3D"):
        train_model(str(flat), "tiny", FAST, progress=False)
    vol = np.random.rand(16, 16, 3)
    vol[1, 1, 1] = np.nan
    nan = _write_dataset(nnunet_env["raw"], {"a": vol}, name="Dataset014_NaN")
    with pytest.raises(SDDMError, match="NaN"):
        train_model(str(nan), "tiny", FAST, progress=False)
    with pytest.raises(SDDMError, match="unknown preset"):
        train_model(str(nan), "huge", FAST, progress=False)
    with pytest.raises(SDDMError, match="not divisible"):
        train_model(str(nan), "tiny", {**FAST, "model.image_size": 33}, progress=False)
    assert not any(nnunet_env["results"].iterdir())


def test_out_of_memory_is_reported_and_checkpoint_kept(phantoms, monkeypatch, tmp_path):
    from nnunet_sddm.diffusion import trainer as tr

    d, _ = train_model("11", "tiny", {**FAST, "training.iterations": 2}, model_dir=tmp_path / "m", progress=False)
    before = (d / RAW_FILE).read_bytes()

    def oom(self):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tr.Trainer, "train_step", oom)
    with pytest.raises(SDDMError, match="out of memory.*--microbatch"):
        train_model("11", "tiny", {**FAST, "training.iterations": 4}, model_dir=d, resume=True, progress=False)
    assert (d / RAW_FILE).read_bytes() == before and load_training_state(d)["step"] == 2


def test_train_cli(phantoms, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["11", "-p", "nope"])
    assert e.value.code == 2 and "unknown preset" in capsys.readouterr().err
    sets = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in FAST.items() if k not in ("training.batch_size", "training.lr")), [])
    assert train_main(["11", "--iterations", "2", "--batch-size", "4", "--device", "cpu", "--lr", "1e-3",
                       "--ema-rate", "0.9", "--seed", "5", "--microbatch", "2", "--amp", "off", *sets]) == 0
    cfg = json.loads((Path(capsys.readouterr().out.strip().splitlines()[-1]) / "config.json").read_text())
    t = cfg["training"]
    assert (t["iterations"], t["batch_size"], t["lr"], t["ema_rate"], t["seed"], t["microbatch"]) == (2, 4, 1e-3,
                                                                                                    0.9, 5, 2)


def test_import_guided_checkpoint(tmp_path):
    flags = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 16 "
             "--num_head_channels 32 --resblock_updown True --use_scale_shift_norm True --learn_sigma True "
             "--diffusion_steps 200 --noise_schedule cosine --rescale_timesteps True --lr 1e-4")
    cfg = preset_config("tiny")
    cfg["model"].update(image_size=32, model_channels=32, channel_mult=[1, 2], attention_resolutions=[16],
                        num_head_channels=32, norm_groups=32)
    torch.manual_seed(0)
    ref = create_model(cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ckpt = tmp_path / "ema_0.9999_100000.pt"
    torch.save({f"module.{k}" if False else k: v for k, v in ref.state_dict().items()}, ckpt)
    out = tmp_path / "imported"
    assert import_checkpoint_main([str(ckpt), "-o", str(out), "--flags", flags]) == 0
    lm = load_model(out)
    assert lm.diffusion.num_timesteps == 200 and lm.diffusion.rescale_timesteps
    assert lm.config["diffusion"]["noise_schedule"] == "cosine" and lm.config["diffusion"]["loss"] == "hybrid"
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 150])
    with torch.no_grad():
        assert torch.allclose(lm.model(x, t), ref(x, t), atol=1e-6)
    assert lm.spaced_diffusion(10).model_timesteps(torch.tensor([9])).item() == pytest.approx(199 * 1000 / 200)
    # wrong flags: clear error, nothing written
    with pytest.raises(SystemExit) as e:
        import_checkpoint_main([str(ckpt), "-o", str(tmp_path / "bad"), "--flags", flags.replace("1,2", "1,2,2")])
    assert e.value.code == 2 and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        import_checkpoint_main([str(ckpt), "-o", str(out), "--flags", flags])  # exists, no --overwrite
