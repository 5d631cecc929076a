"""``nnunet.spacing``: the study's segmenters on a coarser target spacing through nnU-Net's own
plans mechanism (``nnUNetv2_plan_experiment -overwrite_target_spacing ... -overwrite_plans_name``,
``nnUNetv2_preprocess -plans_name``, ``nnUNetv2_train -p``), on tiny phantoms: vendor A at a 48 px
matrix has 10 mm slices and 330 / 48 = 6.875 mm in-plane; the study plans it at 9 mm in-plane."""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import blosc2
import numpy as np
import pytest

from nnunet_sddm.study import nnunet_steps
from nnunet_sddm.study.config import build_config
from nnunet_sddm.study.context import StudyContext, make_context, nnunet_environment
from nnunet_sddm.study.stage_data import run_data
from nnunet_sddm.study.stage_preprocess import preprocess_inputs, preprocess_outputs, run_preprocess
from nnunet_sddm.study.stage_train import run_train
from nnunet_sddm.utilities.errors import SDDMError

INPLANE = 9.0
PLANS = "nnUNetPlansSDDM_9mm"


def _context(out: Path, **nnunet) -> StudyContext:
    cfg = build_config({"output": str(out), "device": "cpu", "epochs": "quick", "segmenters": ["2d", "3d_fullres"],
                        "source": {"phantom": "A", "subjects": 2, "matrix": 48},
                        "target": {"phantom": "B", "subjects": 1, "matrix": 32},
                        "nnunet": {"num_processes": 1, **nnunet}})
    return make_context(cfg, progress=False, log=lambda message: None)


@pytest.mark.parametrize("value", [0, -2.5, True, "3", [3, 3], [10, 3, 0], [10, "3", 3], float("nan"),
                                   float("inf"), {"y": 3}, 1e-6, 150])
def test_bad_spacings_are_refused_naming_the_key(value):
    with pytest.raises(SDDMError, match=r"^my\.json: nnunet\.spacing must be null \(nnU-Net's own plans\), an "
                                        r"in-plane target spacing in mm"):
        build_config({"nnunet": {"spacing": value}}, origin="my.json")


def test_spacing_key_types_and_plans_names():
    assert build_config().nnunet.spacing is None and build_config()["nnunet"]["spacing"] is None
    inplane = build_config({"nnunet": {"spacing": 3}})
    assert inplane.nnunet.spacing == 3.0 and inplane["nnunet"]["spacing"] == 3  # study.json keeps the JSON
    assert build_config({"nnunet": {"spacing": [10, 2.5, 2.5]}}).nnunet.spacing == (10.0, 2.5, 2.5)
    assert nnunet_steps.plans_name(None) == "nnUNetPlans"
    assert nnunet_steps.plans_name(3.0) == nnunet_steps.plans_name(3) == "nnUNetPlansSDDM_3mm"
    assert nnunet_steps.plans_name(2.5) == "nnUNetPlansSDDM_2p5mm"
    assert nnunet_steps.plans_name((10.0, 2.5, 2.5)) == "nnUNetPlansSDDM_10x2p5x2p5mm"
    assert nnunet_steps.plans_name(2.25) != nnunet_steps.plans_name(2.2500001)


def test_model_folders_train_commands_and_fingerprint_follow_the_plans(tmp_path, monkeypatch):
    """Model folders are ``<trainer>__<plans>__<configuration>``, nnUNetv2_train gets ``-p <plans>``,
    the preprocess outputs are the plans' files, and the key is in the preprocess fingerprint."""
    commands = []
    monkeypatch.setattr(nnunet_steps, "run_command", lambda cmd, env, log: commands.append(list(map(str, cmd))) or 0.0)
    default, coarse = _context(tmp_path / "default"), _context(tmp_path / "coarse", spacing=INPLANE)
    for ctx, plans in ((default, "nnUNetPlans"), (coarse, PLANS)):
        folders = [m.folder for m in ctx.models()]
        assert folders and all(f.name.split("__")[1] == plans for f in folders)
        assert all(f.name.split("__")[2] in ("2d", "3d_fullres") for f in folders)
        commands.clear()
        run_train(ctx, resume=False)
        assert len(commands) == len(folders)
        for cmd, model in zip(commands, ctx.models()):
            assert cmd[0] == "nnUNetv2_train" and cmd[cmd.index("-p") + 1] == plans
            assert cmd[cmd.index("-tr") + 1] == model.folder.name.split("__")[0]
        names = {p.name for p in preprocess_outputs(ctx)}
        assert {f"{plans}.json", "nnUNetPlans.json", f"{plans}_2d", f"{plans}_3d_fullres"} <= names
    assert "spacing" not in preprocess_inputs(default)  # studies made before the key keep their fingerprint
    assert preprocess_inputs(coarse)["spacing"] == nnunet_steps.plans_name(INPLANE)  # 3 and 3.0: the same plans
    calls = []
    monkeypatch.setattr(nnunet_steps, "plan_and_preprocess",
                        lambda ids, configurations, env, n, log, spacing=None, batch_size=None:
                        calls.append((list(ids), spacing, batch_size)) or 0.0)
    assert run_preprocess(coarse, resume=False)["plans"] == PLANS
    assert calls == [([coarse.dataset_id("source"), coarse.dataset_id("synthetic")], INPLANE, None)]  # one override


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """The study's data step, then its preprocess step's nnU-Net commands at 9 mm in-plane, on the
    source dataset only: the stage makes the same call with the synthetic dataset's id added (see
    the test above), and each dataset costs nnU-Net process pools, the bulk of this test's time."""
    ctx = _context(tmp_path_factory.mktemp("spacing") / "study", spacing=INPLANE)
    with nnunet_environment(ctx):
        run_data(ctx, resume=False)
    seconds = nnunet_steps.plan_and_preprocess([ctx.dataset_id("source")], ctx.cfg.configurations(), ctx.nnunet_env(),
                                               ctx.cfg.nnunet.num_processes, ctx.out / "logs" / "preprocess.log",
                                               spacing=ctx.cfg.nnunet.spacing)
    print(f"[timing] plan + preprocess at {INPLANE} mm in-plane: {seconds:.1f} s")
    return ctx


@pytest.mark.timeout(300)
def test_the_spacing_reaches_nnunets_plans_and_preprocessed_data(preprocessed):
    ctx = preprocessed
    base = ctx.folders["preprocessed"] / ctx.dataset_name("source")
    assert all(p.exists() for p in preprocess_outputs(ctx) if p.parent == base)
    default = json.loads((base / "nnUNetPlans.json").read_text())
    plans = json.loads((base / f"{PLANS}.json").read_text())
    assert plans["plans_name"] == PLANS
    z = default["configurations"]["3d_fullres"]["spacing"][0]  # nnU-Net's own through-plane spacing
    assert z == pytest.approx(10.0)
    assert plans["configurations"]["2d"]["spacing"] == pytest.approx([INPLANE, INPLANE])
    assert plans["configurations"]["3d_fullres"]["spacing"] == pytest.approx([z, INPLANE, INPLANE])
    assert plans[nnunet_steps.SPACING_RECORD] == {"nnunet.spacing": INPLANE, "target_spacing": [z, INPLANE, INPLANE],
                                                  "default_plans": "nnUNetPlans"}
    for c in ("2d", "3d_fullres"):  # nnU-Net re-planned the patch for the smaller arrays
        new, old = plans["configurations"][c]["patch_size"], default["configurations"][c]["patch_size"]
        assert np.prod(new) < np.prod(old) and all(a <= b for a, b in zip(new, old)), (c, new, old)
        assert plans["configurations"][c]["data_identifier"] == f"{PLANS}_{c}"
    for c in ("2d", "3d_fullres"):  # the preprocessed arrays are at 9 mm in-plane (nnU-Net's rounding)
        cases = sorted((base / f"{PLANS}_{c}").glob("*_seg.b2nd"))
        assert len(cases) == 4  # 2 subjects, ED and ES
        for seg in cases:
            props = pickle.loads(Path(str(seg).replace("_seg.b2nd", ".pkl")).read_bytes())
            shape = blosc2.open(str(seg).replace("_seg.b2nd", ".b2nd"), mode="r").shape
            cropped, spacing = props["shape_after_cropping_and_before_resampling"], props["spacing"]
            expected = [round(n * s / INPLANE) for n, s in zip(cropped[1:], spacing[1:])]
            assert list(shape[-2:]) == expected and max(expected) < 48, (c, seg.name, shape, expected)

def test_overrides_are_checked_against_nnunets_default_plans(preprocessed):
    """The in-plane form keeps nnU-Net's through-plane spacing; plans whose axis order or spacing
    differ from the request are refused (a spacing coarser than the slice distance would make
    nnU-Net slice the 2d configuration along another axis)."""
    ctx = preprocessed
    base = ctx.folders["preprocessed"] / ctx.dataset_name("source")
    default = json.loads((base / "nnUNetPlans.json").read_text())
    plans = json.loads((base / f"{PLANS}.json").read_text())
    target = nnunet_steps.override_spacing(default, INPLANE)
    assert target == pytest.approx([10.0, INPLANE, INPLANE])
    assert nnunet_steps.override_spacing(default, (8, 7, 7)) == [8.0, 7.0, 7.0]
    nnunet_steps.check_override_plans(default, plans, target, ["2d", "3d_fullres"], base)
    turned = copy.deepcopy(plans)
    turned["transpose_forward"] = [1, 0, 2]
    with pytest.raises(SDDMError, match=r"would slice the 2d configuration along another axis"):
        nnunet_steps.check_override_plans(default, turned, target, ["2d"], base)
    with pytest.raises(SDDMError, match=r"configuration 2d was planned at spacing"):
        nnunet_steps.check_override_plans(default, plans, [10.0, 5.0, 5.0], ["2d"], base)
    flat = {"dataset_name": "Dataset001_Flat", "transpose_forward": [0, 1, 2], "configurations": {"2d": {}}}
    with pytest.raises(SDDMError, match=r"nnunet\.spacing 3: .* has no 3d_fullres .* give nnunet\.spacing as "
                                        r"\[z, y, x\]"):
        nnunet_steps.override_spacing(flat, 3)


@pytest.mark.parametrize("value", [0, -1, 2.5, "4", True, [4]])
def test_bad_batch_sizes_are_refused_naming_the_key(value):
    with pytest.raises(SDDMError, match=r"^my\.json: .*nnunet.*batch_size"):
        build_config({"nnunet": {"batch_size": value}}, origin="my.json")


def test_batch_size_names_its_own_plans_and_enters_the_fingerprint(tmp_path):
    assert nnunet_steps.plans_name(None, 4) == "nnUNetPlansSDDM_bs4"
    assert nnunet_steps.plans_name(2.5, 4) == "nnUNetPlansSDDM_2p5mm_bs4"
    assert nnunet_steps.plans_name(2.5, None) == "nnUNetPlansSDDM_2p5mm"  # spacing-only names unchanged
    assert build_config().nnunet.plans == "nnUNetPlans"
    ctx = _context(tmp_path / "bs", batch_size=4)
    assert ctx.cfg.nnunet.batch_size == 4 and ctx.cfg.nnunet.plans == "nnUNetPlansSDDM_bs4"
    assert all(m.folder.name.split("__")[1] == "nnUNetPlansSDDM_bs4" for m in ctx.models())
    assert preprocess_inputs(ctx)["batch_size"] == 4 and "spacing" not in preprocess_inputs(ctx)
    assert "batch_size" not in preprocess_inputs(_context(tmp_path / "default"))


def test_set_batch_size_edits_only_the_batch(preprocessed):
    base = preprocessed.folders["preprocessed"] / preprocessed.dataset_name("source")
    plans = json.loads((base / f"{PLANS}.json").read_text())
    name = nnunet_steps.plans_name(INPLANE, 3)
    edited = nnunet_steps.set_batch_size(plans, 3, ["2d"], name, base)
    assert edited["plans_name"] == name and edited["configurations"]["2d"]["batch_size"] == 3
    assert edited["configurations"]["3d_fullres"]["batch_size"] == plans["configurations"]["3d_fullres"]["batch_size"]
    assert all(c["data_identifier"] == f"{name}_{k}" for k, c in edited["configurations"].items())
    assert edited[nnunet_steps.BATCH_RECORD] == {"nnunet.batch_size": 3, "planned_plans": PLANS,
                                                 "planned": {"2d": plans["configurations"]["2d"]["batch_size"]}}
    for k in ("patch_size", "spacing", "architecture"):
        assert edited["configurations"]["2d"][k] == plans["configurations"]["2d"][k]
    assert plans["plans_name"] == PLANS and nnunet_steps.BATCH_RECORD not in plans  # the input is not changed
    with pytest.raises(SDDMError, match=r"nnunet.batch_size: the plans have no configuration '3d_lowres'"):
        nnunet_steps.set_batch_size(plans, 3, ["3d_lowres"], name, base)


@pytest.mark.timeout(300)
def test_the_batch_size_reaches_nnunets_plans_manager(tmp_path):
    """nnU-Net's default plans, edited to batch 3 in ``2d`` under their own name and preprocessed
    with ``-plans_name``: nnU-Net's own PlansManager reads the batch size from them."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    ctx = _context(tmp_path / "study", batch_size=3)
    with nnunet_environment(ctx):
        run_data(ctx, resume=False)
    nnunet_steps.plan_and_preprocess([ctx.dataset_id("source")], ["2d"], ctx.nnunet_env(), 1,
                                     ctx.out / "logs" / "preprocess.log", batch_size=3)
    base = ctx.folders["preprocessed"] / ctx.dataset_name("source")
    default = json.loads((base / "nnUNetPlans.json").read_text())
    manager = PlansManager(str(base / "nnUNetPlansSDDM_bs3.json"))
    assert manager.plans_name == "nnUNetPlansSDDM_bs3"
    conf = manager.get_configuration("2d")
    assert conf.batch_size == 3 != default["configurations"]["2d"]["batch_size"]
    assert conf.patch_size == default["configurations"]["2d"]["patch_size"]
    assert len(list((base / "nnUNetPlansSDDM_bs3_2d").glob("*_seg.b2nd"))) == 4  # preprocessed under the new name
