"""Spacing mode (``data.spacing``): the config key, the resampling round trip, the UNet on other
input sizes, adaptation of whole slices at the working spacing (geometry, determinism, batching),
training on random crops (determinism, resume), and resize mode left as it was."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from _micro_model import MICRO, micro_model_folder, one_torch_thread

from nnunet_sddm.adaptation.folders import adapt_folder
from nnunet_sddm.adaptation.pipeline import Adapter, adapt_arrays
from nnunet_sddm.adaptation.volumes import model_space_slices, size_multiple
from nnunet_sddm.data.slices import (IntensityWindow, SpacingResample, SquareResize, data_round_trip,
                                     slice_transform, volume_to_model_slices,
                                     model_slices_to_volume, working_spacing)
from nnunet_sddm.data.volumes import read_volume, same_geometry
from nnunet_sddm.diffusion.model_folder import (EMA_FILE, RAW_FILE, create_model_folder, load_config, load_model,
                                               load_weights)
from nnunet_sddm.diffusion.presets import apply_overrides, parse_set_options, preset_config, validate_config
from nnunet_sddm.diffusion.slice_dataset import crop_batch, crop_offsets, load_slices
from nnunet_sddm.sampling.guided import SamplerSettings
from nnunet_sddm.utilities.errors import SDDMError

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = SamplerSettings(N=2, steps=10, seed=0)
#: the identity "model": projection guidance with D = 1 returns the reference exactly
IDENTITY = SamplerSettings(N=2, steps=10, seed=0, D=1, guidance="projection")
#: a non-square volume with anisotropic in-plane spacing, (z, y, x) mm
ANISO = (8.0, 1.3, 1.7)


def volume(shape, seed=0, scale=300.0):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    v = scale * ((y ** 2 + x ** 2) < 0.4) + 0.2 * scale * rng.random(shape)
    return v.astype(np.float32)


def write_nifti(path, data_zyx, spacing_zyx, oblique=True):
    """A NIfTI file with the given (z, y, x) spacing and an oblique, shifted affine."""
    rot = np.eye(4)
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        rot[:2, :2] = [[c, -s], [s, c]]
    affine = rot @ np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    affine[:3, 3] = [-40.0, 12.5, 3.0]
    img = nib.Nifti1Image(np.asarray(data_zyx, dtype=np.float32).transpose(2, 1, 0), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def spacing_model_dir(tmp_path_factory):
    """A micro model (random output layer) in spacing mode at 2 mm."""
    with one_torch_thread():
        yield micro_model_folder(tmp_path_factory.mktemp("spacing_micro"), randomise_output=True,
                                 overrides={"data.spacing": 2.0})


@pytest.fixture(scope="module")
def spacing_model(spacing_model_dir):
    return load_model(spacing_model_dir)


# ---------------------------------------------------------------------------------------- config
def test_config_key_validates_and_is_recorded(tmp_path):
    cfg = preset_config("tiny")
    assert cfg["data"]["spacing"] is None and working_spacing(cfg["data"]) is None
    assert working_spacing({}) is None  # model folders written before the key: resize mode
    over = parse_set_options(["data.spacing=1.5"])
    cfg = apply_overrides(cfg, over)
    validate_config(cfg)
    assert cfg["data"]["spacing"] == 1.5 and working_spacing(cfg["data"]) == 1.5
    validate_config(apply_overrides(preset_config("tiny"), {"data.spacing": 2}))  # an int is fine
    for bad in ("1.5mm", True, 0, -1.0, float("nan"), float("inf"), 100.0, [1.5]):
        with pytest.raises(SDDMError, match="data.spacing"):
            validate_config(apply_overrides(preset_config("tiny"), {"data.spacing": bad}))
    folder = create_model_folder(tmp_path / "m", "tiny", overrides={**MICRO, "data.spacing": 1.5})
    assert json.loads((folder / "config.json").read_text())["data"]["spacing"] == 1.5
    assert load_model(folder).data_config["spacing"] == 1.5


def test_missing_or_bad_image_spacing_is_refused_by_name(spacing_model):
    v = volume((2, 20, 24))
    with pytest.raises(SDDMError, match="voxel spacing"):
        adapt_arrays({"nospacing": v}, spacing_model, FAST, progress=False)
    with pytest.raises(SDDMError, match="img.*finite and positive"):
        slice_transform({"spacing": 2.0}, 32, (20, 24), (8.0, 0.0, 1.0), name="img")
    # resize mode needs no spacing
    assert isinstance(slice_transform({"spacing": None}, 32, (20, 24)), SquareResize)


# ---------------------------------------------------------------------------------------- round trip
def test_resample_round_trip_restores_the_grid():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((3, 31, 44)).astype(np.float32))
    t = SpacingResample(31, 44, (1.3, 1.7), 2.0, multiple=8)
    assert t.resampled == (20, 37) and t.shape == (24, 40)  # 20.15 -> 20, 37.4 -> 37; multiples of 8
    m = t.forward(x)
    assert m.shape == (3, 1, 24, 40)
    assert torch.all(m[:, :, :2] == -1) and torch.all(m[:, :, -2:] == -1)  # centred padding of 4 rows
    assert torch.all(m[:, :, :, :1] == -1) and torch.all(m[:, :, :, -2:] == -1)  # 3 columns: 1 left, 2 right
    back = t.inverse(m)
    assert back.shape == (3, 31, 44)
    # the working spacing equals the image's: exact (padding and cropping only)
    same = SpacingResample(31, 44, (2.0, 2.0), 2.0, multiple=16)
    assert same.resampled == (31, 44) and same.shape == (32, 48)
    assert torch.equal(same.inverse(same.forward(x)), x)


def test_smooth_images_survive_a_coarser_spacing():
    yy, xx = np.mgrid[:60, :80].astype(np.float32)
    smooth = 100 + 50 * np.sin(2 * np.pi * yy / 40) * np.cos(2 * np.pi * xx / 50)  # periods of 40-50 mm
    vol = np.stack([smooth, smooth[::-1]]).astype(np.float32)
    out = data_round_trip(vol, 64, {"spacing": 2.0}, (5.0, 1.0, 1.0), name="smooth")
    assert out.shape == vol.shape and out.dtype == np.float32
    inner = (slice(None), slice(3, -3), slice(3, -3))  # borders: half a coarse pixel of extrapolation
    err = np.abs(out - vol)[inner].max() / (vol.max() - vol.min())
    assert err < 0.02, err
    same = data_round_trip(vol, 64, {"spacing": 1.0}, (5.0, 1.0, 1.0))
    lo, hi = np.percentile(vol, (0.5, 99.5))
    np.testing.assert_allclose(same, np.clip(vol, lo, hi), rtol=0, atol=1e-5 * float(vol.max()))


def test_identity_model_restores_grid_and_geometry(spacing_model, tmp_path):
    """Adaptation with an identity sampler writes the input's shape and geometry; with the working
    spacing equal to the image's it returns the input clipped to its window."""
    vin, vout = tmp_path / "in", tmp_path / "out"
    a = volume((3, 31, 44), seed=1)
    b = volume((2, 25, 25), seed=2, scale=1e3)
    write_nifti(vin / "aniso_0000.nii.gz", a, ANISO)
    write_nifti(vin / "same_0000.nii.gz", b, (6.0, 2.0, 2.0), oblique=False)
    adapt_folder(vin, vout, spacing_model, IDENTITY, batch_size=2, device="cpu", progress=False)
    for name, v in (("aniso", a), ("same", b)):
        assert same_geometry(vin / f"{name}_0000.nii.gz", vout / f"{name}_0000.nii.gz"), name
        assert read_volume(vout / f"{name}_0000.nii.gz").data.shape == v.shape
    lo, hi = np.percentile(b, (0.5, 99.5))
    np.testing.assert_allclose(read_volume(vout / "same_0000.nii.gz").data, np.clip(b, lo, hi), rtol=0,
                               atol=1e-5 * float(b.max()))
    # the anisotropic one equals the data path's own round trip
    expect = data_round_trip(a, 32, spacing_model.data_config, ANISO)
    np.testing.assert_allclose(read_volume(vout / "aniso_0000.nii.gz").data, expect, rtol=0, atol=1e-5 * 300)


# ---------------------------------------------------------------------------------------- UNet sizes
def test_unet_takes_other_sizes_with_attention_at_the_same_levels():
    from nnunet_sddm.diffusion.factory import create_model
    from nnunet_sddm.diffusion.unet import AttentionBlock

    torch.manual_seed(0)
    model = create_model(preset_config("tiny")).eval()  # 64 px, 4 levels, attention at 16 px = level 2
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
             for m in model.modules() if isinstance(m, AttentionBlock)]
    with torch.no_grad():
        for h, w in ((64, 64), (48, 40)):
            seen.clear()
            out = model(torch.zeros(1, 1, h, w), torch.zeros(1, dtype=torch.long))
            assert out.shape == (1, 2, h, w)
            # the same blocks run, at 1/4 (attention level) and 1/8 (middle block) of the input
            assert sorted(set(seen)) == sorted({(h // 4, w // 4), (h // 8, w // 8)}), seen
    for hk in hooks:
        hk.remove()


def test_model_space_is_whole_padded_slices(spacing_model):
    v = volume((2, 31, 44))
    window = IntensityWindow.fit(v)
    for D, multiple in ((1, 2), (2, 2), (4, 4)):  # micro UNet: 2 levels, factor 2
        assert size_multiple(spacing_model, D) == multiple
        x, t = model_space_slices(v, window, spacing_model, D, ANISO)
        assert x.shape[:2] == (2, 1) and x.shape[-2] % multiple == 0 and x.shape[-1] % multiple == 0
        assert x.shape[-2:] == t.shape and t.resampled == (20, 37)  # whole slice, no crop


# ---------------------------------------------------------------------------------------- adaptation
def test_adaptation_is_deterministic_and_independent_of_batching(spacing_model):
    vols = {"a": volume((3, 31, 44), seed=1), "b": volume((2, 26, 20), seed=2, scale=50.0),
            "c": volume((3, 31, 44), seed=3)}
    sp = {"a": ANISO, "b": (6.0, 1.1, 2.4), "c": ANISO}
    ref = adapt_arrays(vols, spacing_model, FAST, batch_size=4, progress=False, spacings=sp)
    again = adapt_arrays(vols, spacing_model, FAST, batch_size=4, progress=False, spacings=sp)
    for k, v in vols.items():
        assert ref[k].shape == v.shape and ref[k].dtype == np.float32
        np.testing.assert_array_equal(ref[k], again[k])
        assert not np.allclose(ref[k], v)
    # another grouping of the same slices (each volume alone, other order): bit-identical
    for k in vols:
        alone = adapt_arrays({k: vols[k]}, spacing_model, FAST, batch_size=4, progress=False, spacings=sp)[k]
        np.testing.assert_array_equal(alone, ref[k])
    # other batch sizes: equal up to the rounding of batched kernels
    for bs in (1, 16):
        other = adapt_arrays(vols, spacing_model, FAST, batch_size=bs, progress=False, spacings=sp)
        for k, v in vols.items():
            np.testing.assert_allclose(other[k], ref[k], rtol=0, atol=1e-4 * float(v.max()))
    # N = 0: the input clipped to its window, no resampling
    zero = adapt_arrays(vols, spacing_model, FAST.replace(N=0), progress=False)
    lo, hi = np.percentile(vols["a"], (0.5, 99.5))
    np.testing.assert_array_equal(zero["a"], np.clip(vols["a"], np.float32(lo), np.float32(hi)))


def test_memory_bound_flushes_partial_batches(spacing_model, monkeypatch):
    """Volumes of many shapes never fill a batch: the queue bound samples partial batches, and
    the result equals the unbounded run."""
    import nnunet_sddm.adaptation.volumes as volumes_mod

    # at 2 mm: 10, 12, 14 and 12 rows; unbounded, v1 and v3 share a batch
    vols = {f"v{i}": volume((2, rows, 24), seed=i) for i, rows in enumerate((20, 24, 28, 24))}
    sp = {k: (5.0, 1.0, 1.0) for k in vols}
    batches = []
    sample = volumes_mod.guided_sample

    def recording(loaded, y0, settings, keys, **kw):
        batches.append((tuple(y0.shape), tuple(k for k in keys if not k.startswith("\x00"))))
        return sample(loaded, y0, settings, keys, **kw)

    monkeypatch.setattr(volumes_mod, "guided_sample", recording)
    ref = adapt_arrays(vols, spacing_model, FAST, batch_size=4, progress=False, spacings=sp)
    unbounded, batches[:] = list(batches), []
    monkeypatch.setattr(volumes_mod, "QUEUE_BATCHES", 1)
    bounded = adapt_arrays(vols, spacing_model, FAST, batch_size=4, progress=False, spacings=sp)
    # one shape per batch, always padded to the batch size; other groupings under the bound
    assert all(shape[0] == 4 for shape, _ in unbounded + batches)
    assert len({shape for shape, _ in unbounded}) == 3 and sorted(unbounded) != sorted(batches)
    for k in vols:
        np.testing.assert_array_equal(bounded[k], ref[k])


def test_adapter_checks_image_spacing(spacing_model, tmp_path):
    p = write_nifti(tmp_path / "x_0000.nii.gz", volume((2, 20, 20)), (5.0, 1.0, 1.0))
    adapter = Adapter.open(spacing_model, FAST, device="cpu", progress=False)
    assert adapter.spacing == 2.0 and adapter.check_images([p]) == [2]


# ---------------------------------------------------------------------------------------- training
def test_crops():
    rng = np.random.default_rng(0)
    ext = np.array([[40, 50], [20, 10]])
    off = np.concatenate([crop_offsets(ext, 32, rng) for _ in range(200)])
    big, small = off[0::2], off[1::2]
    assert big[:, 0].min() == 0 and big[:, 0].max() == 8 and big[:, 1].max() == 18
    assert small[:, 0].min() == -12 and small[:, 0].max() == 0 and small[:, 1].min() == -22
    images = torch.full((2, 1, 40, 50), -1.0)
    images[0, 0] = torch.arange(40 * 50, dtype=torch.float32).reshape(40, 50)
    images[1, 0, :20, :10] = 5.0
    crops = crop_batch(images, ext, np.array([0, 1]), np.array([[3, 4], [-5, -7]]), 32)
    assert torch.equal(crops[0, 0], images[0, 0, 3:35, 4:36])
    assert crops[1, 0].sum() == 5.0 * 200 - (32 * 32 - 200) and torch.all(crops[1, 0, 5:25, 7:17] == 5.0)


TRAIN = {"model.image_size": 32, "model.channel_mult": [1, 2], "model.attention_resolutions": [16],
         "diffusion.steps": 100, "diffusion.sample_respacing": 5, "training.batch_size": 4,
         "training.log_interval": 2, "training.num_samples": 1, "training.lr": 2e-3,
         "training.save_interval": 1000, "training.sample_interval": 1000, "data.spacing": 8.0,
         "training.iterations": 4, "model.dropout": 0.1}


@pytest.fixture
def phantoms(nnunet_env):
    from nnunet_sddm.data.phantoms import generate_phantom_dataset

    return generate_phantom_dataset(13, "A", 2, matrix=48)  # 48 x 48 at 6.875 mm


@pytest.mark.timeout(180)
def test_training_on_crops_is_deterministic_and_resumes(phantoms, tmp_path):
    import os
    import signal

    from nnunet_sddm.diffusion.model_folder import load_training_state
    from nnunet_sddm.diffusion.trainer import train_model

    s = load_slices(phantoms, 32, {"spacing": 8.0}, cache_dir=tmp_path / "cache", progress=False)
    assert s.spacing == 8.0 and s.images.shape[2:] == (41, 41) and s.extents.tolist()[0] == [41, 41]
    resized = load_slices(phantoms, 32, {}, cache_dir=tmp_path / "cache", progress=False)
    assert resized.extents is None and resized.images.shape[2:] == (32, 32)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # the spacing is part of the cache key
    cached = load_slices(phantoms, 32, {"spacing": 8.0}, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(cached.images, s.images) and np.array_equal(cached.extents, s.extents)

    a, status = train_model("13", "tiny", TRAIN, model_dir=tmp_path / "a", progress=False, cache_dir=tmp_path / "c")
    assert status == "finished"
    assert json.loads((a / "config.json").read_text())["data"]["spacing"] == 8.0
    b, _ = train_model("13", "tiny", TRAIN, model_dir=tmp_path / "b", progress=False, cache_dir=tmp_path / "c")

    def interrupt(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    part, status = train_model("13", "tiny", TRAIN, model_dir=tmp_path / "p", progress=False,
                               cache_dir=tmp_path / "c", callback=interrupt)
    assert status == "interrupted" and load_training_state(part)["step"] == 2
    train_model("13", "tiny", TRAIN, model_dir=part, resume=True, progress=False, cache_dir=tmp_path / "c")
    for f in (RAW_FILE, EMA_FILE):
        wa, wb, wp = load_weights(a / f), load_weights(b / f), load_weights(part / f)
        assert all(torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wp[k]) for k in wa), f
    # the crops differ from resize mode's slices: another model
    r, _ = train_model("13", "tiny", {**TRAIN, "data.spacing": None}, model_dir=tmp_path / "r", progress=False,
                       cache_dir=tmp_path / "c")
    wr = load_weights(r / RAW_FILE)
    wa = load_weights(a / RAW_FILE)
    assert any(not torch.equal(wa[k], wr[k]) for k in wa)


# ---------------------------------------------------------------------------------------- resize mode
def test_resize_mode_is_unchanged():
    """``slice_transform`` in resize mode is the square resize, and ``volume_to_model_slices`` with
    it equals the call without a transform."""
    v = volume((2, 30, 44))
    t = slice_transform({}, 32, (30, 44), None)
    assert t == SquareResize(30, 44, 32)
    x0, w0, r0 = volume_to_model_slices(v, 32)
    x1, w1, r1 = volume_to_model_slices(v, 32, transform=t)
    assert torch.equal(x0, x1) and r0 == r1
    np.testing.assert_array_equal(model_slices_to_volume(x0, w0, r0), data_round_trip(v, 32, None))


# ---------------------------------------------------------------------------------------- other callers
def test_sweep_and_study_round_trip_use_the_spacing(spacing_model_dir, tmp_path, monkeypatch):
    """The sweep samples the slice at the working spacing (identity sampler: the data path's round
    trip), and the study's geometry round trip is ``data_round_trip`` with the image's spacing."""
    import nnunet_sddm.adaptation.sweep as sweep_mod
    from nnunet_sddm.study.stage_in_domain import geometry_round_trip

    v = volume((3, 31, 44), seed=4)
    image = write_nifti(tmp_path / "imgs" / "case_0000.nii.gz", v, ANISO)
    loaded = load_model(spacing_model_dir)
    expect = data_round_trip(v, 32, loaded.data_config, ANISO)
    seen = {}
    monkeypatch.setattr(sweep_mod, "_draw", lambda out_png, reference, panels, *a, **k: seen.update(panels=panels))
    sweep_mod.sweep_grid(image, loaded, tmp_path / "sweep.png", Ds=(1,), Ns=(2,), taus=(0.0,),
                         base=IDENTITY, device="cpu", progress=False)
    np.testing.assert_allclose(seen["panels"][0], expect[1], rtol=0, atol=1e-5 * 300)

    for model_dir, want in ((spacing_model_dir, expect),
                            (micro_model_folder(tmp_path / "resize"), data_round_trip(v, 32, None))):
        config = load_config(model_dir)
        out = tmp_path / f"geometry_{model_dir.parent.name}"
        geometry_round_trip(image.parent, out, int(config["model"]["image_size"]), config.get("data"))
        assert same_geometry(image, out / image.name)
        np.testing.assert_allclose(read_volume(out / image.name).data, want, rtol=0, atol=1e-5 * 300)


def test_predictor_gives_the_adaptation_nnunets_spacing(spacing_model, tmp_path):
    """``nnUNetv2_sddm_predict``'s adaptation gets each case's spacing from nnU-Net's reader
    properties, and a spacing-mode adapter adapts with it."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_sddm.adaptation.predictor import SDDMPredictor

    v = volume((3, 31, 44), seed=5)
    image = write_nifti(tmp_path / "P_0000.nii.gz", v, ANISO, oblique=False)
    adapter = Adapter.open(spacing_model, IDENTITY, device="cpu", progress=False)
    seen = {}

    def adapt_fn(volumes, spacings):
        seen.update(spacings)
        return adapter.adapt_arrays(volumes, spacings)

    predictor = SDDMPredictor(adapt_fn=adapt_fn, device=torch.device("cpu"))
    predictor.plans_manager = type("Plans", (), {"image_reader_writer_class": SimpleITKIO})()
    predictor.dataset_json = {"file_ending": ".nii.gz"}
    data, _ = next(predictor.read_and_adapt([[str(image)]]))
    np.testing.assert_allclose(seen["P"], ANISO, rtol=1e-6)
    assert data.shape == (1,) + v.shape
    np.testing.assert_allclose(data[0], data_round_trip(v, 32, spacing_model.data_config, ANISO), rtol=0,
                               atol=1e-5 * 300)
