"""The study's typed configuration: a frozen tree of the library's settings objects, parsed once."""
from __future__ import annotations

import dataclasses
import json

import pytest

from nnunet_sddm.evaluation.metrics import EmptyPolicy
from nnunet_sddm.sampling.guided import SamplerSettings
from nnunet_sddm.study import config as C
from nnunet_sddm.study.config import QUICK, StudyConfig, build_config
from nnunet_sddm.utilities.errors import SDDMError


def test_typed_tree_of_the_librarys_settings_objects():
    cfg = build_config({"sampler": {"N": 10, "tau": 3}, "evaluation": {"empty_policy": 40}, "fold": "2"},
                       quick=True)
    assert isinstance(cfg, StudyConfig)
    assert isinstance(cfg.sampler.settings, SamplerSettings)
    assert (cfg.sampler.settings.N, cfg.sampler.settings.tau, cfg.sampler.settings.steps) == (10, 3.0, 50)
    assert cfg.evaluation.empty_policy == EmptyPolicy(40)
    assert cfg.fold == 2 and cfg.segmenters == ("2d",)  # --quick trains the 2D nnU-Net only
    assert cfg.figures.sweep.D == (2, 4) and cfg.source.phantom == "A" and cfg.target.split == "Tr"
    assert cfg.trainer("2d") == "nnUNetTrainer_SDDM_NoDA_1ep_400it"
    assert cfg.configurations() == ["2d"]
    assert cfg.diffusion_overrides() == {"training.iterations": QUICK["diffusion"]["iterations"], "training.seed": 0}
    # the JSON view is what study.json records: the values as given (tau 3 stays an int), normalised fold
    js = cfg.to_dict()
    assert js["sampler"]["tau"] == 3 and isinstance(js["sampler"]["tau"], int) and js["fold"] == 2
    assert js["evaluation"]["empty_policy"] == 40 and json.loads(json.dumps(js)) == js
    assert cfg["sampler"] == js["sampler"]


def test_configuration_is_frozen():
    cfg = build_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.nnunet.step_size = 0.25
    with pytest.raises(TypeError):
        cfg.trainers["2d"] = "nnUNetTrainer_Other"  # a read-only mapping
    with pytest.raises(TypeError):
        cfg.diffusion.set["model.image_size"] = 32
    cfg["sampler"]["N"] = 99  # the JSON view is a copy
    assert cfg["sampler"]["N"] == 25 and cfg.sampler.settings.N == 25


def test_parsed_once(monkeypatch, tmp_path):
    """build_config parses once; the context and every stage's fingerprint read the typed tree."""
    from nnunet_sddm.study.context import make_context
    from nnunet_sddm.study.pipeline import STAGES
    from nnunet_sddm.study.stages import StageRunner

    calls = []
    real = C.parse_config
    monkeypatch.setattr(C, "parse_config", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = build_config({"output": str(tmp_path / "study")})
    assert len(calls) == 1
    ctx = make_context(cfg, progress=False)
    assert ctx.cfg is cfg
    runner = StageRunner(STAGES, ctx.out)
    fingerprints = {s.name: runner.stage_fingerprint(s, ctx) for s in STAGES}
    assert len(set(fingerprints.values())) == len(STAGES) and len(calls) == 1


@pytest.mark.parametrize("layer, message", [
    ({"sampler": {"seed": -1}}, r"sampler\.seed must be an integer >= 0, got -1"),
    ({"sampler": {"amp": "fp8"}}, r"sampler\.amp must be null, 'bf16' or 'fp16', got 'fp8'"),
    ({"source": {"matrix": 16}}, r"source\.matrix must be an integer >= 32, got 16"),
    ({"synthesis": {"copies": 0}}, r"synthesis\.copies must be an integer >= 1, got 0"),
    ({"nnunet": {"folders": "mine"}}, r"nnunet\.folders must be 'study' or 'environment'"),
    ({"evaluation": {"num_processes": 0}}, r"evaluation\.num_processes must be an integer >= 1, got 0"),
    ({"figures": {"sweep": {"D": [], "N": [2], "tau": [0]}}}, r"figures\.sweep\.D must be a non-empty list"),
    ({"diffusion": {"model": 5}}, r"diffusion\.model must be a model folder"),
    ({"seed": "x"}, r"study\.seed must be an integer >= 0, got 'x'"),
    ({"output": ""}, r"output must be a folder path"),
])
def test_bad_values_name_the_key(layer, message):
    with pytest.raises(SDDMError, match=r"^my\.json: " + message):
        build_config(layer, origin="my.json")


def test_sampler_guidance_key():
    assert build_config().sampler.settings.guidance == "gradient"
    cfg = build_config({"sampler": {"guidance": "projection"}}, quick=True)
    assert cfg.sampler.settings.guidance == "projection" and cfg.to_dict()["sampler"]["guidance"] == "projection"
    assert cfg.sampler.inputs()["settings"]["guidance"] == "projection"  # part of the sampling stages' fingerprint
    with pytest.raises(SDDMError, match="sampler.*guidance"):
        build_config({"sampler": {"guidance": "ilvr"}})


def test_the_study_json_reference_lists_every_default():
    """docs/reference/study_json.md's "All keys and their defaults" block is DEFAULTS, key for key."""
    import json
    import re
    from pathlib import Path

    from nnunet_sddm.study.config import DEFAULTS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "study_json.md").read_text()
    block = re.search(r"## All keys and their defaults\s+```json\n(.*?)```", doc, re.S).group(1)
    assert json.loads(block) == json.loads(json.dumps(DEFAULTS))


def test_rows_repeats_and_alternatives():
    """The table's rows follow alternatives and postprocess; repeats give consecutive seeds; the
    nnU-Net aug row trains the augmented families under the same schedule."""
    cfg = build_config({"repeats": 3, "seed": 5}, quick=True)
    assert cfg.seeds() == (5, 6, 7)
    names = [a.name for a in cfg.approaches()]
    assert names[:9] == ["Baseline", "nnU-Net aug", "HistMatch", "FDA", "DA", "DG", "Mixed", "DA+ens", "Mixed+ens"]
    assert names[9:] == [n + "+LCC" for n in names[:9]]
    assert cfg.kinds() == ["real", "synthetic", "real_aug"]
    assert cfg.trainer("2d", augmented=True) == "nnUNetTrainer_SDDM_Aug_1ep_400it"
    assert cfg.trainer("vanilla", augmented=True) == "nnUNetTrainer_SDDM_VanillaUNetAug_1ep_400it"
    full = build_config({})
    assert (full.trainer("3d_fullres", True), full.trainer("vanilla", True)) == (
        "nnUNetTrainer_SDDM_Aug_250ep", "nnUNetTrainer_SDDM_VanillaUNetAug")
    paper = build_config({"alternatives": {"histmatch": False, "fda": False, "nnunet_aug": False},
                          "postprocess": None})
    assert [a.name for a in paper.approaches()] == ["Baseline", "DA", "DG", "Mixed", "DA+ens", "Mixed+ens"]
    assert paper.kinds() == ["real", "synthetic"]
    lvmyo = build_config({"target": {"labels": ["LV", "MYO"]}})
    assert lvmyo.target.labels == ("LV", "MYO") and lvmyo.source.labels is None


@pytest.mark.parametrize("bad,match", [
    ({"repeats": 0}, r"repeats must be an integer >= 1"),
    ({"alternatives": {"fda_beta": 0.5}}, r"alternatives.fda_beta must be in \[0, 0.5\)"),
    ({"alternatives": {"histmatch": "yes"}}, r"alternatives.histmatch must be true or false"),
    ({"alternatives": {"cyclegan": True}}, r"unknown key\(s\) 'cyclegan' in 'alternatives'"),
    ({"postprocess": "crf"}, r"postprocess must be null or one of lcc"),
    ({"postprocess": ["lcc"]}, r"postprocess must be null or one of lcc, got \['lcc'\]"),
    ({"segmenters": [["2d"]]}, r"unknown segmenter \['2d'\]"),
    ({"segmenters": [{"2d": 1}]}, r"unknown segmenter \{'2d': 1\}"),
    ({"diffusion": {"model": "m", "iterations": ["x"]}}, r"diffusion.iterations must be an integer >= 1"),
    ({"figures": {"sweep": {"D": [2], "N": [10], "tau": [6.0], "case": ["PhB0000_ED"]}}},
     r"figures.sweep.case must be null \(the first target test case\) or a case name, got \['PhB0000_ED'\]"),
    ({"figures": {"sweep": {"D": [2], "N": [10], "tau": [6.0], "slice": "mid"}}},
     r"figures.sweep.slice must be an integer >= 0"),
    ({"diffusion": {"preset": ["tiny"]}}, r"diffusion.preset \['tiny'\] does not exist"),
    ({"generative": {"rows": True, "diffusion": {"preset": {"tiny": 1}}}},
     r"generative.diffusion.preset \{'tiny': 1\} does not exist"),
    ({"evaluation": {"test": "mannwhitney"}}, r"evaluation.test must be one of wilcoxon, ttest_rel, welch"),
    ({"target": {"labels": ["LV", "LA"]}}, r"target.labels must be null \(all\) or a list of distinct structures"),
    ({"target": {"dataset": "27", "labels": ["LV"]}}, r"target.labels applies to phantoms only"),
])
def test_new_keys_are_validated(bad, match):
    with pytest.raises(SDDMError, match=match):
        build_config(bad)


def _leaf_keys(d, path=()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaf_keys(v, path + (k,))
        else:
            yield path + (k,)


@pytest.mark.parametrize("value", [["x"], {"a": 1}, [1.5]], ids=["list", "dict", "list-of-float"])
def test_every_key_refuses_a_container_by_name(value):
    """A list or mapping where STUDY.json expects a name or a number is refused with SDDMError (or
    accepted where the key takes one), never a bare TypeError, for every key of the defaults, with
    the generative rows on so that their keys are checked too."""
    for path in _leaf_keys(C.DEFAULTS):
        layer = value
        for key in reversed(path):
            layer = {key: layer}
        if path != ("generative", "rows"):
            layer.setdefault("generative", {}).setdefault("rows", True)
        try:
            build_config(layer)
        except SDDMError:
            pass


def test_the_augmented_row_refuses_trainer_overrides():
    """nnU-Net aug trains the plugin's augmented family with epochs / iterations_per_epoch: with a
    trainer override for a segmenter the two rows would not share a schedule."""
    with pytest.raises(SDDMError, match=r"trainers gives its own trainer for 2d, but the nnU-Net aug row"):
        build_config({"trainers": {"2d": "nnUNetTrainer_SDDM_NoDA_50ep"}})
    cfg = build_config({"trainers": {"2d": "nnUNetTrainer_SDDM_NoDA_50ep"}, "alternatives": {"nnunet_aug": False}})
    assert cfg.trainer("2d") == "nnUNetTrainer_SDDM_NoDA_50ep" and "real_aug" not in cfg.kinds()
