"""Model folders: save/load round trip, resolution of DATASET[:PRESET], bad inputs."""
from __future__ import annotations

import json

import pytest
import torch

from nnunet_sddm.diffusion import create_model_folder, load_model, resolve_model_dir
from nnunet_sddm.diffusion.model_folder import EMA_FILE, RAW_FILE, load_weights, save_weights
from nnunet_sddm.diffusion.respace import SpacedDiffusion
from nnunet_sddm.utilities.errors import SDDMError


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is faster


SMALL = {"model.image_size": 16, "model.channel_mult": [1, 2], "model.attention_resolutions": [8],
         "diffusion.steps": 100}


def test_create_and_load_model_folder(tmp_path):
    d = create_model_folder(tmp_path / "m", preset="tiny", overrides=SMALL, seed=3)
    cfg = json.loads((d / "config.json").read_text())
    assert {"model", "diffusion", "data", "training", "package_version"} <= set(cfg)
    lm = load_model(d)
    assert not lm.model.training and lm.image_size == 16 and lm.in_channels == 1
    assert lm.diffusion.num_timesteps == 100
    sd = lm.spaced_diffusion(10)
    assert isinstance(sd, SpacedDiffusion) and sd.num_timesteps == 10 and sd.timestep_map[-1] == 99
    x = torch.randn(2, 1, 16, 16)
    assert lm.model(x, torch.tensor([1, 2])).shape == (2, 2, 16, 16)
    # same seed -> same weights
    d2 = create_model_folder(tmp_path / "m2", preset="tiny", overrides=SMALL, seed=3)
    a, b = load_weights(d / EMA_FILE), load_weights(d2 / RAW_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resolve_model_dir(nnunet_env, tmp_path):
    (nnunet_env["raw"] / "Dataset042_Phantom").mkdir()
    with pytest.raises(SDDMError, match="no trained model"):
        resolve_model_dir("42")
    target = nnunet_env["results"] / "Dataset042_Phantom" / "sddm__tiny"
    create_model_folder(target, overrides=SMALL)
    assert resolve_model_dir("42") == target
    assert resolve_model_dir("Dataset042_Phantom:tiny") == target
    assert resolve_model_dir(str(target)) == target
    with pytest.raises(SDDMError, match="no trained model"):
        resolve_model_dir("42:paper128")
    with pytest.raises(SDDMError, match="not a model folder"):
        resolve_model_dir(tmp_path)


def test_load_model_bad_weights(tmp_path):
    d = create_model_folder(tmp_path / "m", overrides=SMALL)
    state = load_weights(d / EMA_FILE)
    state.pop("out.2.bias")
    save_weights(state, d / EMA_FILE)
    with pytest.raises(SDDMError, match="do not match"):
        load_model(d)
    load_model(d, use_ema=False)  # raw weights are intact
    (d / RAW_FILE).write_bytes(b"garbage")
    with pytest.raises(SDDMError, match="cannot read weights"):
        load_model(d, use_ema=False)
