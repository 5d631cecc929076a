"""Label-map generator: encoding, configuration, cleaning, shape statistics on analytic shapes,
training + generation end to end, seeded determinism, resume, refusal by the image commands."""
from __future__ import annotations

import json
import math
import os
import signal

import nibabel as nib
import numpy as np
import pytest
import torch

from _micro_model import MICRO, micro_model_folder
from nnunet_sddm.data.label_cleaning import clean_label_map, fill_background_holes, missing_structures
from nnunet_sddm.diffusion import load_model, preset_config
from nnunet_sddm.diffusion.label_maps import SliceGeometry, decode_label_maps, encode_label_maps, to_slice_grid
from nnunet_sddm.diffusion.model_folder import EMA_FILE, RAW_FILE, load_training_state, load_weights
from nnunet_sddm.diffusion.presets import apply_overrides, validate_config
from nnunet_sddm.diffusion.trainer import train_model
from nnunet_sddm.evaluation.label_shapes import ks_statistic, slice_stats
from nnunet_sddm.sampling.label_generation import GenerationSettings, generate_label_maps
from nnunet_sddm.utilities.errors import SDDMError

pytestmark = pytest.mark.usefixtures("one_thread")

CARDIAC = {"LV": 1, "MYO": 2, "RV": 3}
FAST = {**MICRO, "model.model_channels": 8, "model.norm_groups": 4, "diffusion.sample_respacing": 3,
        "training.batch_size": 4, "training.log_interval": 1, "training.num_samples": 2, "training.lr": 1e-3,
        "training.save_interval": 1000, "training.sample_interval": 1000, "training.iterations": 3,
        "data.cases": "PhA0000_ED,PhA0001_ES", "model.generates": "labels"}


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


# ----------------------------------------------------------------------------- encoding, configuration
def test_encoding_and_decoding():
    lab = torch.tensor([[[0, 1], [3, 2]]])
    x = encode_label_maps(lab, [1, 2, 3])
    assert x.shape == (1, 4, 2, 2) and set(x.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(x[0, 0], torch.tensor([[1., -1.], [-1., -1.]]))  # background channel first
    assert np.array_equal(decode_label_maps(x, [1, 2, 3]), lab.numpy())
    # argmax over the channels: the largest wins wherever the sample is not +-1
    y = torch.zeros(1, 3, 1, 3)
    y[0, :, 0, 0], y[0, :, 0, 1], y[0, :, 0, 2] = torch.tensor([.2, .1, -.3]), torch.tensor([-1, .5, .4]), \
        torch.tensor([.1, .1, .9])
    assert decode_label_maps(y, [5, 7]).tolist() == [[[0, 5, 7]]]
    with pytest.raises(SDDMError, match=r"\[9\]"):
        encode_label_maps(torch.tensor([[[9]]]), [1, 2, 3], name="case X")
    # resize-mode grid and back: nearest-neighbour, values kept
    geo = SliceGeometry((20, 30), (8.0, 1.2, 1.2))
    g = to_slice_grid(np.random.default_rng(0).integers(0, 4, (2, 16, 16)), geo)
    assert g.shape == (2, 20, 30) and g.dtype == np.int16 and set(np.unique(g)) <= {0, 1, 2, 3}


def test_config_validation():
    base = apply_overrides(preset_config("tiny"), {**MICRO, "model.generates": "labels"})
    ok = apply_overrides(base, {"model.label_values": [1, 2, 3], "model.in_channels": 4,
                                "model.label_names": ["LV", "MYO", "RV"]})
    validate_config(ok)
    for bad, match in (({"model.generates": "masks"}, "model.generates"),
                       ({"model.condition": "labels"}, "model.condition.*unconditional"),
                       ({"data.spacing": 1.5}, "resize mode"),
                       ({"model.in_channels": 3}, "4 input channels"),
                       ({"model.label_names": ["LV", "LV", "RV"]}, "label_names"),
                       ({"data.label_geometry": {"shape": [0, 4], "spacing": [1, 1, 1]}}, "label_geometry")):
        with pytest.raises(SDDMError, match=match):
            validate_config(apply_overrides(ok, bad))
    with pytest.raises(SDDMError, match="model.label_names.*generates is 'images'"):
        validate_config(apply_overrides(preset_config("tiny"), {"model.label_names": ["LV"]}))


def test_small_preset_defaults_to_spacing_mode_and_the_generator_says_how_to_leave_it():
    assert preset_config("small")["data"]["spacing"] == 2.0
    assert preset_config("tiny")["data"]["spacing"] is None and preset_config("paper128")["data"]["spacing"] is None
    labels = {"model.generates": "labels", "model.label_values": [1, 2, 3], "model.in_channels": 4}
    with pytest.raises(SDDMError, match=r"data.spacing is 2.0.*--set data.spacing=null"):
        validate_config(apply_overrides(preset_config("small"), labels))
    validate_config(apply_overrides(preset_config("small"), {**labels, "data.spacing": None}))


# ----------------------------------------------------------------------------- cleaning
def test_cleaning_hand_made_maps():
    lab = np.zeros((24, 24), np.int16)
    lab[_disc(lab.shape, 12, 12, 8)] = 2                   # MYO disc ...
    lab[_disc(lab.shape, 12, 12, 5)] = 1                   # ... around the LV: a ring
    lab[10:12, 11:13] = 0                                  # a background hole in the LV
    lab[1:3, 1:3] = 1                                      # a stray LV piece
    lab[0, 20:24] = 3                                      # the RV
    lab[2, 22] = 0                                         # ...
    lab[12, 5] = 0                                         # a background pinhole inside the MYO ring
    clean = clean_label_map(lab, [1, 2, 3])
    assert clean.dtype == lab.dtype and clean.shape == lab.shape
    assert not clean[1:3, 1:3].any()                       # largest component only
    assert (clean[10:12, 11:13] == 1).all()                # LV hole filled with LV
    assert (clean[_disc(lab.shape, 12, 12, 5)] == 1).all()  # the LV is not filled with MYO
    assert clean[12, 5] == 2                               # MYO's background-only hole filled
    # a hole holding another structure stays as it is
    ring = np.zeros((9, 9), np.int16)
    ring[1:8, 1:8] = 2
    ring[3:6, 3:6] = 0
    ring[4, 4] = 3
    assert np.array_equal(fill_background_holes(ring, [2]), ring)
    assert missing_structures(clean, [1, 2, 3]) == [] and missing_structures(clean, [1, 4]) == [4]
    with pytest.raises(SDDMError, match="2D"):
        clean_label_map(lab[None], [1])


# ----------------------------------------------------------------------------- shape statistics
def test_shape_statistics_on_analytic_shapes():
    shape, r, sp = (200, 200), 40, (0.5, 0.25)
    disc = _disc(shape, 100, 100, r).astype(np.int16)
    s = slice_stats(disc, sp, {"LV": 1})
    assert s.areas_mm2["LV"] == pytest.approx(math.pi * r ** 2 * sp[0] * sp[1], rel=0.01)
    assert s.components["LV"] == 1 and math.isnan(s.lv_myo_ratio) and math.isnan(s.myo_holes)
    ring = np.zeros(shape, np.int16)
    ring[_disc(shape, 100, 100, 60)] = 2
    ring[_disc(shape, 100, 100, r)] = 1
    ring[_disc(shape, 100, 170, 20) & (ring == 0)] = 3
    s = slice_stats(ring, (1.0, 1.0), CARDIAC)
    assert (s.myo_encloses_lv, s.myo_holes, s.myo_euler, s.myo_lv_coverage) == (1.0, 1.0, 0.0, 1.0)
    assert s.lv_myo_ratio == pytest.approx(r ** 2 / (60 ** 2 - r ** 2), rel=0.02)
    assert s.rv_lv_ratio == pytest.approx(s.areas_mm2["RV"] / s.areas_mm2["LV"])
    c_shape = ring.copy()
    c_shape[90:111, 100 + r:] = np.where(c_shape[90:111, 100 + r:] == 2, 0, c_shape[90:111, 100 + r:])
    s = slice_stats(c_shape, (1.0, 1.0), CARDIAC)
    assert (s.myo_encloses_lv, s.myo_holes, s.myo_euler) == (0.0, 0.0, 1.0)
    assert 0.8 < s.myo_lv_coverage < 1.0
    two = (_disc(shape, 50, 50, 10) | _disc(shape, 150, 150, 10)).astype(np.int16)
    assert slice_stats(two, (1, 1), {"LV": 1}).components["LV"] == 2
    from scipy.stats import ks_2samp

    a, b = np.random.default_rng(0).normal(size=50), np.random.default_rng(1).normal(0.5, size=70)
    assert ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic)


# ----------------------------------------------------------------------------- training and generation
@pytest.fixture
def phantoms(nnunet_env):
    from nnunet_sddm.data.phantoms import generate_phantom_dataset

    return generate_phantom_dataset(11, "A", 2, matrix=32)


def test_train_and_generate_end_to_end(phantoms, tmp_path, capsys):
    from nnunet_sddm.adaptation.pipeline import open_model
    from nnunet_sddm.cli.diffusion import generate_labels_main, train_main

    sets = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in FAST.items()
                if k not in ("data.cases", "model.generates")), [])
    assert train_main(["11", "--generate", "labels", "--device", "cpu", "--cases", "PhA0000_ED,PhA0001_ES",
                       "-o", str(tmp_path / "m"), *sets]) == 0
    model = tmp_path / "m"
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["model"]["generates"] == "labels" and cfg["model"]["condition"] is None
    assert (cfg["model"]["label_values"], cfg["model"]["label_names"], cfg["model"]["in_channels"]) == \
        ([1, 2, 3], ["LV", "MYO", "RV"], 4)
    ref = nib.load(str(phantoms / "labelsTr" / "PhA0000_ED.nii.gz"))
    assert cfg["data"]["label_geometry"]["shape"] == [int(ref.shape[1]), int(ref.shape[0])]
    assert cfg["data"]["label_geometry"]["spacing"] == pytest.approx(list(ref.header.get_zooms()[::-1]))
    assert load_model(model).model.out[-1].out_channels == 8  # learn_sigma: 2K
    with pytest.raises(SDDMError, match="label-map generator.*adaptation"):
        open_model(model, torch.device("cpu"))
    from nnunet_sddm.cli.adaptation import adapt_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the command: exit 2, the reason, nothing written
        adapt_main(["-i", str(phantoms / "imagesTr"), "-o", str(tmp_path / "adapted"), "-m", str(model),
                    "-N", "1", "--steps", "2", "--device", "cpu", "--quiet"])
    assert e.value.code == 2 and "label-map generator" in capsys.readouterr().err
    assert not (tmp_path / "adapted").exists()

    out = tmp_path / "gen"
    assert generate_labels_main(["-m", str(model), "-n", "5", "-o", str(out), "--seed", "7", "-b", "2",
                                 "--real", "11", "-device", "cpu"]) == 0
    files = sorted((out / "labelsTr").glob("*.nii.gz"))
    assert [f.name for f in files] == [f"gen_000{i}.nii.gz" for i in range(5)]
    record = json.loads((out / "cases.json").read_text())
    assert record["seed"] == 7 and record["labels"] == {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
    assert [c["draws"] for c in record["cases"]] == [1 + len(c["rejected_missing"]) for c in record["cases"]]
    for f in files:
        img = nib.load(str(f))
        data = np.asarray(img.dataobj)
        assert img.shape == (*cfg["data"]["label_geometry"]["shape"][::-1], 1)
        assert img.header.get_zooms() == pytest.approx(cfg["data"]["label_geometry"]["spacing"][::-1])
        assert sorted(np.unique(data).tolist()) == [0, 1, 2, 3]  # exactly the dataset's values
        assert np.array_equal(clean_label_map(data[..., 0].astype(np.int16), [1, 2, 3]), data[..., 0])
    report = (out / "shape_report.md").read_text()
    assert "| area_LV_mm2 | 5 |" in report and "KS D" in report
    assert (out / "shape_stats.csv").read_text().count("\ngenerated,") == 5
    # seeded: the same seed gives the same maps, another seed others; an existing folder is refused
    again = generate_label_maps(model, tmp_path / "again", GenerationSettings(5, seed=7, batch_size=2),
                                real="11", device="cpu", progress=False)
    assert all(f.read_bytes() == (again / "labelsTr" / f.name).read_bytes() for f in files)
    other = generate_label_maps(model, tmp_path / "other", GenerationSettings(5, seed=8, batch_size=2),
                                device="cpu", progress=False)
    assert any(f.read_bytes() != (other / "labelsTr" / f.name).read_bytes() for f in files)
    with pytest.raises(SDDMError, match="already exists"):
        generate_label_maps(model, out, GenerationSettings(1), device="cpu", progress=False)
    # --like: another dataset's median grid
    from nnunet_sddm.data.phantoms import generate_phantom_dataset

    generate_phantom_dataset(12, "B", 1, matrix=40)
    like = generate_label_maps(model, tmp_path / "like", GenerationSettings(2, batch_size=2), like="12",
                               device="cpu", progress=False, overwrite=True)
    ref2 = nib.load(str(next((tmp_path / "nnunet" / "raw" / "Dataset012_PhantomB" / "labelsTr").glob("*.nii.gz"))))
    img = nib.load(str(next((like / "labelsTr").glob("*.nii.gz"))))
    assert img.shape[:2] == ref2.shape[:2] and img.header.get_zooms()[:2] == pytest.approx(ref2.header.get_zooms()[:2])
    assert json.loads((like / "cases.json").read_text())["geometry"]["from"] == "--like Dataset012_PhantomB"


def test_image_model_refused_and_bounded_redraws(phantoms, tmp_path):
    image_model = micro_model_folder(tmp_path / "img")
    with pytest.raises(SDDMError, match="image model.*--generate labels"):
        generate_label_maps(image_model, tmp_path / "o", GenerationSettings(1), device="cpu", progress=False)
    # a generator whose eps output of the RV channel is +50 everywhere: x_0 of that channel is
    # clipped to -1, so no sample holds an RV; the run gives up after --max-draws and writes nothing
    from nnunet_sddm.diffusion.model_folder import save_weights

    gen = micro_model_folder(tmp_path / "gen", overrides={"model.generates": "labels", "model.in_channels": 4,
                                                          "model.label_values": [1, 2, 3],
                                                          "data.label_geometry": {"shape": [32, 32],
                                                                                  "spacing": [8.0, 1.0, 1.0]}})
    ok = generate_label_maps(gen, tmp_path / "ok", GenerationSettings(2, steps=2), device="cpu", progress=False)
    assert len(list((ok / "labelsTr").glob("*.nii.gz"))) == 2
    state = load_weights(gen / EMA_FILE)
    bias = [k for k in state if k.startswith("out.") and k.endswith(".bias")][-1]
    state[bias][3] = 50.0
    save_weights(state, gen / EMA_FILE)
    out = tmp_path / "o2"
    with pytest.raises(SDDMError, match=r"every structure \[1, 2, 3\] in 3 draws.*gen_0000"):
        generate_label_maps(gen, out, GenerationSettings(2, max_draws=3, steps=2), device="cpu", progress=False)
    assert not out.exists() and not list(tmp_path.glob(".o2*"))
    with pytest.raises(SDDMError, match="max_draws"):
        generate_label_maps(gen, tmp_path / "o3", GenerationSettings(1, max_draws=0), device="cpu", progress=False)


@pytest.mark.timeout(120)
def test_resume_equals_uninterrupted(phantoms, tmp_path):
    over = {**FAST, "training.iterations": 4}
    full, _ = train_model("11", "tiny", over, model_dir=tmp_path / "full", progress=False)

    def interrupt(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    part, status = train_model("11", "tiny", over, model_dir=tmp_path / "part", progress=False, callback=interrupt)
    assert status == "interrupted" and load_training_state(part)["step"] == 2
    with pytest.raises(SDDMError, match="model.generates"):  # an image model's settings: refused
        train_model("11", "tiny", {**over, "model.generates": "images"}, model_dir=part, resume=True, progress=False)
    _, status = train_model("11", "tiny", over, model_dir=part, resume=True, progress=False)
    assert status == "finished"
    for f in (RAW_FILE, EMA_FILE):
        a, b = load_weights(full / f), load_weights(part / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    # the labels matter: an image model on the same slices trains other weights
    img, _ = train_model("11", "tiny", {**over, "model.generates": "images"}, model_dir=tmp_path / "img",
                         progress=False)
    assert load_weights(img / RAW_FILE)["input_blocks.0.0.weight"].shape[1] == 1
