"""Mask-conditioned diffusion model: the condition enters the UNet, the unconditional model is
unchanged, one-hot encoding, classifier-free guidance, conditional training, bad inputs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from _datasets_fixtures import set_corner_voxel
from _micro_model import MICRO, micro_model_folder
from nnunet_sddm.diffusion import create_diffusion, create_model, load_model, preset_config
from nnunet_sddm.diffusion.conditioning import encode_labels
from nnunet_sddm.diffusion.model_folder import EMA_FILE, RAW_FILE, load_weights
from nnunet_sddm.diffusion.presets import apply_overrides, validate_config
from nnunet_sddm.diffusion.trainer import train_model
from nnunet_sddm.sampling.conditional import ClassifierFreeGuidance
from nnunet_sddm.utilities.errors import SDDMError

pytestmark = pytest.mark.usefixtures("one_thread")

COND = {"model.condition": "labels", "model.label_values": [1, 2, 3]}


def _masks(seed=0, n=2, size=32):
    """Two different random label maps with values 0..3, one-hot."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 4, (n, size, size), generator=g)
    b = torch.randint(0, 4, (n, size, size), generator=g)
    return encode_labels(a, [1, 2, 3]), encode_labels(b, [1, 2, 3])


def _randomise(model, seed=3, std=0.05):
    """Every parameter N(0, std^2): the zero-initialised layers too, so every path is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_untrained_conditional_output_depends_on_the_mask(tmp_path):
    lm = load_model(micro_model_folder(tmp_path / "m", randomise_output=True, overrides=COND))
    assert lm.model.cond_channels == 3 and lm.model.input_blocks[0][0].weight.shape[1] == 1 + 3
    x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 40])
    a, b = _masks()
    with torch.no_grad():
        out_a, out_b = lm.model(x, t, cond=a), lm.model(x, t, cond=b)
        out_null = lm.model(x, t, cond=torch.zeros_like(a))
    assert out_a.shape == (2, 2, 32, 32)
    assert (out_a - out_b).abs().max() > 1e-4 and (out_a - out_null).abs().max() > 1e-4
    cond = a.clone().requires_grad_(True)
    lm.model(x, t, cond=cond).square().sum().backward()
    for k in range(3):  # every label channel reaches the output
        assert cond.grad[:, k].abs().sum() > 0
    with pytest.raises(ValueError, match="needs cond"):
        lm.model(x, t)
    with pytest.raises(ValueError, match="cond has shape"):
        lm.model(x, t, cond=a[:, :2])


def test_domain_token_enters_the_model():
    cfg = apply_overrides(preset_config("tiny"), {**MICRO, **COND, "model.domains": ["source", "target"]})
    torch.manual_seed(0)
    model = _randomise(create_model(cfg)).eval()
    assert model.domain_emb.weight.shape == (3, 4 * cfg["model"]["model_channels"])
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 40])
    a, _ = _masks()
    with torch.no_grad():
        src = model(x, t, cond=a, domain=torch.tensor([0, 0]))
        tgt = model(x, t, cond=a, domain=torch.tensor([1, 1]))
        null = model(x, t, cond=a, domain=torch.tensor([2, 2]))
        assert torch.equal(model(x, t, cond=a), null)  # no domain: the null domain
    assert (src - tgt).abs().max() > 1e-4 and (src - null).abs().max() > 1e-4


# Computed with the code before conditioning existed (main at 68d6c25, torch 2.x CPU): the micro
# model of _micro_model.MICRO, torch.manual_seed(0), output layer N(0, 0.05^2) from generator seed 1,
# then x = randn(2, 1, 32, 32) from that generator, t = [3, 40]. The state hash depends on torch's
# CPU random stream; the output sums allow for other CPUs' float kernels.
_REF_STATE_SHA256 = "c48b8f1ce43043edf4893b1006531d6e01f9b882886e1226869c7df4eec54ee8"
_REF_OUT_SUM, _REF_OUT_ABS_SUM = 77.64428311312577, 95.33069604647108


def _reference_micro_model(cfg):
    torch.manual_seed(0)
    m = create_model(cfg)
    g = torch.Generator().manual_seed(1)
    for k, p in m.named_parameters():
        if k.startswith("out."):
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return m, g


def test_unconditional_model_is_unchanged():
    cfg = apply_overrides(preset_config("tiny"), MICRO)
    assert cfg["model"]["condition"] is None and cfg["model"]["label_values"] is None
    m, g = _reference_micro_model(cfg)
    h = hashlib.sha256()
    for k, v in m.state_dict().items():
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    assert h.hexdigest() == _REF_STATE_SHA256  # same names, shapes, order and initial values
    assert not hasattr(m, "domain_emb") and m.cond_channels == 0
    x, t = torch.randn(2, 1, 32, 32, generator=g), torch.tensor([3, 40])
    with torch.no_grad():
        out = m(x, t)
        assert torch.equal(out, m(x, t, cond=None, domain=None))
    assert out.double().sum().item() == pytest.approx(_REF_OUT_SUM, rel=1e-6)
    assert out.double().abs().sum().item() == pytest.approx(_REF_OUT_ABS_SUM, rel=1e-6)
    with pytest.raises(ValueError, match="unconditional"):
        m(x, t, cond=torch.zeros(2, 3, 32, 32))
    # a conditional model: the same parameters except the wider input convolution (+ domain_emb)
    c = create_model(apply_overrides(cfg, {**COND, "model.domains": ["source", "target"]}))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    cshapes = {k: tuple(v.shape) for k, v in c.state_dict().items()}
    assert set(cshapes) == set(shapes) | {"domain_emb.weight"}
    assert [k for k in shapes if shapes[k] != cshapes[k]] == ["input_blocks.0.0.weight"]
    assert cshapes["input_blocks.0.0.weight"][1] == 4


def test_encode_labels_one_hot_and_unknown_values():
    lab = torch.tensor([[[0, 1], [3, 2]]])
    x = encode_labels(lab, [1, 2, 3])
    assert x.dtype == torch.float32 and x.shape == (1, 3, 2, 2)
    assert torch.equal(x[0, 0], torch.tensor([[0., 1.], [0., 0.]]))
    assert torch.equal(x[0, 1], torch.tensor([[0., 0.], [0., 1.]]))
    assert torch.equal(x[0, 2], torch.tensor([[0., 0.], [1., 0.]]))
    assert torch.equal(x.sum(1), (lab != 0).float())  # background in no channel
    # numpy input, the channel order of label_values (not sorted)
    assert torch.equal(encode_labels(np.array([[[5, 0, 1]]]), [5, 1]),
                       torch.tensor([[[[1., 0., 0.]], [[0., 0., 1.]]]]))
    with pytest.raises(SDDMError, match=r"case X7.*\[4, 9\]"):
        encode_labels(torch.tensor([[[0, 4], [9, 1]]]), [1, 2, 3], name="case X7")
    with pytest.raises(SDDMError, match="non-integer"):
        encode_labels(torch.tensor([[[0.5]]]), [1], name="c")


def test_config_validation():
    base = apply_overrides(preset_config("tiny"), MICRO)
    validate_config(apply_overrides(base, COND))
    for bad, match in (({"model.condition": "mask"}, "model.condition"),
                       ({**COND, "model.label_values": [0, 1]}, "label_values"),
                       ({**COND, "model.label_values": [1, 1]}, "label_values"),
                       ({"model.label_values": [1, 2]}, "model.condition is null"),
                       ({**COND, "model.domains": ["a", "a"]}, "model.domains"),
                       ({**COND, "training.label_dropout": 1.5}, "label_dropout")):
        with pytest.raises(SDDMError, match=match):
            validate_config(apply_overrides(base, bad))
    with pytest.raises(SDDMError, match="label_values is not set"):
        create_model(apply_overrides(base, {"model.condition": "labels"}))


def test_classifier_free_guidance(tmp_path):
    cfg = apply_overrides(preset_config("tiny"), {**MICRO, **COND})
    torch.manual_seed(0)
    model = _randomise(create_model(cfg)).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 40])
    a, b = _masks()
    with torch.no_grad():
        cond, null = model(x, t, cond=a), model(x, t, cond=torch.zeros_like(a))
        assert torch.equal(ClassifierFreeGuidance(model, 1.0)(x, t, cond=a), cond)
        assert torch.equal(ClassifierFreeGuidance(model, 0.0)(x, t, cond=a), null)
        w2 = ClassifierFreeGuidance(model, 2.0)(x, t, cond=a)
    assert torch.allclose(w2[:, :1], null[:, :1] + 2.0 * (cond[:, :1] - null[:, :1]), atol=1e-6)
    assert torch.equal(w2[:, 1:], cond[:, 1:])  # the variance half of the conditional pass
    assert (w2[:, :1] - cond[:, :1]).abs().max() > 1e-5
    # inside the sampling loop (respaced micro chain)
    spaced = create_diffusion(cfg, 5)
    guided = ClassifierFreeGuidance(model, 2.0)
    runs = [spaced.p_sample_loop(guided, (2, 1, 32, 32), generator=torch.Generator().manual_seed(4),
                                 model_kwargs={"cond": m}) for m in (a, a, b)]
    assert runs[0].shape == (2, 1, 32, 32) and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1]) and (runs[0] - runs[2]).abs().max() > 1e-4
    with pytest.raises(SDDMError, match="conditional model"):
        ClassifierFreeGuidance(create_model(apply_overrides(preset_config("tiny"), MICRO)), 2.0)
    with pytest.raises(SDDMError, match="guidance scale"):
        ClassifierFreeGuidance(model, -1.0)


# ----------------------------------------------------------------------------- training
FAST = {**MICRO, "model.model_channels": 8, "model.norm_groups": 4, "diffusion.sample_respacing": 3,
        "training.batch_size": 4, "training.log_interval": 1, "training.num_samples": 2, "training.lr": 1e-3,
        "training.save_interval": 1000, "training.sample_interval": 1000, "training.iterations": 3,
        "training.label_dropout": 0.5, "data.cases": "PhA0000_ED,PhA0001_ES"}


@pytest.fixture
def phantoms(nnunet_env):
    from nnunet_sddm.data.phantoms import generate_phantom_dataset

    return generate_phantom_dataset(11, "A", 2, matrix=32)


def test_conditional_training_records_and_reloads(phantoms, tmp_path):
    d1, status = train_model("11", "tiny", {**FAST, "model.condition": "labels"}, model_dir=tmp_path / "a",
                             progress=False)
    assert status == "finished" and (d1 / "samples.png").is_file()
    cfg = json.loads((d1 / "config.json").read_text())
    labels = json.loads((phantoms / "dataset.json").read_text())["labels"]
    assert cfg["model"]["condition"] == "labels" and cfg["model"]["domains"] is None
    assert cfg["model"]["label_values"] == sorted(v for v in labels.values() if v)
    assert cfg["training"]["label_dropout"] == 0.5
    lm = load_model(d1)
    assert lm.model.cond_channels == len(cfg["model"]["label_values"])
    # label dropout and everything else are seeded: a second run gives identical weights
    d2, _ = train_model("11", "tiny", {**FAST, "model.condition": "labels"}, model_dir=tmp_path / "b",
                        progress=False)
    for f in (RAW_FILE, EMA_FILE):
        a, b = load_weights(d1 / f), load_weights(d2 / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    # ... and the dropout matters: no dropout trains other weights
    d3, _ = train_model("11", "tiny", {**FAST, "model.condition": "labels", "training.label_dropout": 0.0},
                        model_dir=tmp_path / "c", progress=False)
    a, c = load_weights(d1 / RAW_FILE), load_weights(d3 / RAW_FILE)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_pseudo_labelled_dataset(phantoms, tmp_path):
    from nnunet_sddm.data.phantoms import generate_phantom_dataset

    other = generate_phantom_dataset(12, "B", 1, matrix=32)
    d, status = train_model("11", "tiny", {**FAST, "model.condition": "labels", "training.iterations": 2},
                            model_dir=tmp_path / "p", progress=False, pseudo_labelled="12")
    cfg = json.loads((d / "config.json").read_text())
    assert status == "finished" and cfg["model"]["domains"] == ["source", "target"]
    assert cfg["data"]["pseudo_labelled"] == other.name
    assert load_model(d).model.domain_emb.weight.shape[0] == 3
    mismatch = generate_phantom_dataset(13, "B", 1, matrix=32, labels=["LV", "MYO"])
    with pytest.raises(SDDMError, match=f"{mismatch.name}.*differ"):
        train_model("11", "tiny", {**FAST, "model.condition": "labels"}, model_dir=tmp_path / "q",
                    progress=False, pseudo_labelled="13")
    with pytest.raises(SDDMError, match="pseudo_labelled.*model.condition is null"):
        train_model("11", "tiny", FAST, model_dir=tmp_path / "r", progress=False, pseudo_labelled="12")
    # pseudo-labels thresholded into nnU-Net's ignore label: refused, saying why and what to do
    thresholded = generate_phantom_dataset(14, "B", 1, matrix=32)
    dj = json.loads((thresholded / "dataset.json").read_text())
    dj["labels"]["ignore"] = max(dj["labels"].values()) + 1
    (thresholded / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(SDDMError, match=f"{thresholded.name}: has nnU-Net's ignore label .*without --threshold"):
        train_model("11", "tiny", {**FAST, "model.condition": "labels"}, model_dir=tmp_path / "s",
                    progress=False, pseudo_labelled="14")
    assert not any((tmp_path / n).exists() for n in "qrs")


def test_unknown_label_value_names_the_case(phantoms, tmp_path):
    path = phantoms / "labelsTr" / "PhA0001_ES.nii.gz"
    set_corner_voxel(path, 7)
    with pytest.raises(SDDMError, match=r"PhA0001_ES.*\[7\]"):
        train_model("11", "tiny", {**FAST, "model.condition": "labels"}, model_dir=tmp_path / "u", progress=False)
    # a model told other label values refuses the dataset's labels, naming the first case
    with pytest.raises(SDDMError, match=r"PhA0000_ED.*not among the model's labels \[1\]"):
        train_model("11", "tiny", {**FAST, "model.condition": "labels", "model.label_values": [1]},
                    model_dir=tmp_path / "v", progress=False)


def test_spacing_mode_label_maps_share_the_image_grid_and_crops(tmp_path):
    from nnunet_sddm.data.slices import SpacingResample
    from nnunet_sddm.diffusion.slice_dataset import SliceSet
    from nnunet_sddm.diffusion.trainer import Trainer

    t = SpacingResample(20, 30, (1.0, 1.0), 2.0, multiple=4)
    lab = torch.zeros(1, 20, 30)
    lab[0, 4:12, 6:14] = 2
    out = t.forward_labels(lab)
    assert out.shape == (1, *t.shape) and set(out.unique().tolist()) == {0, 2}
    ind = SpacingResample(20, 30, (1.0, 1.0), 2.0, multiple=4, pad_value=0.0).forward((lab > 0).float())[0, 0]
    yy, xx = torch.meshgrid(torch.arange(t.shape[0]).float(), torch.arange(t.shape[1]).float(), indexing="ij")
    for w in (ind, (out[0] > 0).float()):  # the same centre of mass as the bilinear image grid
        assert (w * yy).sum() / w.sum() == pytest.approx(float((ind * yy).sum() / ind.sum()), abs=0.5)
        assert (w * xx).sum() / w.sum() == pytest.approx(float((ind * xx).sum() / ind.sum()), abs=0.5)
    # the trainer crops the label maps with the images' offsets: labels = (image > 0) survive the crop
    g = torch.Generator().manual_seed(0)
    ext = np.array([[40, 24], [20, 36], [32, 32]], dtype=np.int64)
    images = torch.full((3, 1, 40, 36), -1.0)
    for i, (h, w) in enumerate(ext):
        images[i, :, :h, :w] = torch.rand(1, h, w, generator=g) * 2 - 1
    labels = (images[:, 0] > 0).to(torch.int16)
    cfg = apply_overrides(preset_config("tiny"), {**FAST, "model.condition": "labels", "model.label_values": [1],
                                                  "data.spacing": 2.0, "training.batch_size": 3})
    trainer = Trainer(cfg, SliceSet(images, ["a", "b", "c"], [0, 0, 0], 2.0, ext, labels), tmp_path / "m",
                      device="cpu", progress=False)
    seen = []
    trainer._forward_backward = lambda x, gen, kw: seen.append((x, kw)) or {"loss": 0.0, "mse": 0.0, "vb": 0.0}
    for _ in range(3):
        trainer.train_step()
    for x, kw in seen:
        assert kw["cond"].shape == (3, 1, 32, 32) and "domain" not in kw
        dropped = kw["cond"].flatten(1).sum(1) == 0
        assert torch.equal(kw["cond"][~dropped, 0], (x[~dropped, 0] > 0).float())


@pytest.mark.timeout(120)
def test_conditional_resume_equals_uninterrupted(phantoms, tmp_path):
    import os
    import signal

    from nnunet_sddm.data.phantoms import generate_phantom_dataset
    from nnunet_sddm.diffusion.model_folder import load_training_state

    generate_phantom_dataset(12, "B", 1, matrix=32)
    over = {**FAST, "model.condition": "labels", "training.iterations": 4}
    full, _ = train_model("11", "tiny", over, model_dir=tmp_path / "full", progress=False, pseudo_labelled="12")

    def interrupt(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    part, status = train_model("11", "tiny", over, model_dir=tmp_path / "part", progress=False,
                               pseudo_labelled="12", callback=interrupt)
    assert status == "interrupted" and load_training_state(part)["step"] == 2
    generate_phantom_dataset(13, "C", 1, matrix=32)
    with pytest.raises(SDDMError, match="data.pseudo_labelled"):  # other target data: refused
        train_model("11", "tiny", over, model_dir=part, resume=True, progress=False, pseudo_labelled="13")
    # without the option: the stored data.pseudo_labelled, as every other stored setting
    _, status = train_model("11", "tiny", over, model_dir=part, resume=True, progress=False)
    assert status == "finished"
    for f in (RAW_FILE, EMA_FILE):
        a, b = load_weights(full / f), load_weights(part / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f


def test_train_cli_conditional_options(phantoms, capsys):
    from nnunet_sddm.cli.diffusion import train_main
    from nnunet_sddm.data.phantoms import generate_phantom_dataset

    generate_phantom_dataset(12, "B", 1, matrix=32)
    sets = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in FAST.items()
                if k not in ("training.label_dropout", "data.cases")), [])
    assert train_main(["11", "--iterations", "1", "--device", "cpu", "--condition", "labels",
                       "--label-dropout", "0.25", "--pseudo-labelled", "12", "--cases", "PhA0000_ED", *sets]) == 0
    cfg = json.loads((Path(capsys.readouterr().out.strip().splitlines()[-1]) / "config.json").read_text())
    assert (cfg["model"]["condition"], cfg["model"]["domains"], cfg["training"]["label_dropout"]) == \
        ("labels", ["source", "target"], 0.25)
    assert cfg["data"]["pseudo_labelled"] == "Dataset012_PhantomB"


def test_adaptation_refuses_a_conditional_model(tmp_path):
    from nnunet_sddm.adaptation.pipeline import open_model

    folder = micro_model_folder(tmp_path / "m", overrides=COND)
    with pytest.raises(SDDMError, match="mask-conditioned.*adaptation"):
        open_model(folder, torch.device("cpu"))
    with pytest.raises(SDDMError, match="mask-conditioned"):
        open_model(load_model(folder), torch.device("cpu"))


def test_spacing_mode_conditional_training_run(phantoms, tmp_path):
    from nnunet_sddm.diffusion.slice_dataset import load_label_slices, load_slices

    spacing = float(nib.load(str(next((phantoms / "imagesTr").glob("*.nii.gz")))).header.get_zooms()[0]) * 1.5
    data = {"percentiles": [0.5, 99.5], "spacing": spacing, "cases": "PhA0000_ED"}
    s = load_slices(phantoms, 32, data, cache_dir=tmp_path / "cache", progress=False)
    lab = load_label_slices(phantoms, 32, data, s, [1, 2, 3], progress=False)
    assert lab.shape == (len(s), *s.images.shape[-2:]) and lab.dtype == torch.int16
    for i, (h, w) in enumerate(s.extents):  # labels only inside each slice's extent, images' grid
        assert not lab[i, h:].any() and not lab[i, :, w:].any()
    assert lab.any()
    d, status = train_model("11", "tiny", {**FAST, "model.condition": "labels", "data.spacing": spacing,
                                           "training.iterations": 2}, model_dir=tmp_path / "s", progress=False)
    assert status == "finished" and load_model(d).model.cond_channels == 3
