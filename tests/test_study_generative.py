"""The study's generative rows (``generative``): UDA-syn (Diffuse-UDA's recipe) and Gen-only
(SynCMRI's utility test) next to the other rows, the mask adherence of the generated images, the
configuration section, optional stages in the runner, and studies without the rows keeping
exactly the stage fingerprints they had before the section existed."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from nnunet_sddm.study import GENERATIVE_STAGES, STAGE_NAMES
from nnunet_sddm.study.config import build_config
from nnunet_sddm.study.stages import STATE_FILE, Stage, StageRunner, fingerprint
from nnunet_sddm.utilities.errors import SDDMError

#: The upstream stages (``after``) of every stage before the generative rows existed.
TODAY_AFTER = {
    "data": (), "diffusion": ("data",), "synthesis": ("data", "diffusion"), "adaptation": ("data", "diffusion"),
    "alternatives": ("data",), "preprocess": ("data", "synthesis"), "train": ("preprocess",),
    "in_domain": ("data", "diffusion", "train"), "predict": ("data", "adaptation", "alternatives", "train"),
    "evaluate": ("data", "predict"), "compare": ("evaluate",),
    "quality": ("data", "diffusion", "synthesis", "adaptation", "in_domain", "compare"),
    "figures": ("data", "diffusion", "adaptation", "alternatives", "compare"),
    "report": ("data", "diffusion", "synthesis", "adaptation", "alternatives", "preprocess", "train", "predict",
               "evaluate", "compare", "quality", "figures"),
}
#: sha256 of every stage's inputs (``stages.fingerprint(stage.inputs(ctx))``) as the code before the
#: generative rows computed them, for the defaults and for ``--quick`` (output "fp_study", CPU).
GOLDEN_INPUTS = {
    "defaults": {
        "data": "a98946bd89f9c159b0413bfbaec53044b65e3f25f2a7366d7f5517251fb00c10",
        "diffusion": "33d6a5dab5de47373ac230ff2d4733413e6cc0d115ca8be2b31c4410c75b9333",
        "synthesis": "4c2368083d66d997a1acc85ea6e3d134cd0a1c735804c64be3d71317068d48d0",
        "adaptation": "5dd5b7623ebd8b81c059a6ef4514698aac15689c1b102ea25710e8205cacb676",
        "alternatives": "addf6be41cfbf73f690ca0f5084c07f2ae90b063d789437d94e57b79ad6513ac",
        "preprocess": "d7ed70033cbc8769360dfb9c0dab89ac74536c261ef6722b31a52b17e2955b81",
        "train": "6b92c19f787c4251be70981ce00a6b8f2cd3dec5bb7763361e20383236af98cc",
        "in_domain": "09f9535a3f2b8a795f0bf69fa336feda802844212660a48410d755cd23c81859",
        "predict": "6f22e2070f876e0c299e79a04dd3bedfbe6ec7c2de7032cb9354b495665336fd",
        "evaluate": "e8d1cb061031dbf4ed01e6a0765c80fe653f47db64ed8784fbbb3d3c7cbacba0",
        "compare": "1993c128ce03ee65c0f9894d355515f8cdfbda35509ef0df7caf388bbe6e46b7",
        "quality": "c628ce23139eec607ea9e93894f8820b0c02fc255e2581a4a885bad916e9fb60",
        "figures": "5dc58a7e7a7854fa74394126776321bbb4b145f0429b5778fd45a258f7c4876a",
        "report": "b5612540d7f650828d08f84b06822fff1f7e60e404066043433933f93abd1405",
    },
    "quick": {
        "data": "81cf2dea828f9cc5fa885fe893e119b45c492388e0addd91e84cffa395a6ad5b",
        "diffusion": "b1b03746339c8ab3f0c697ad00b319fd9e9d6be63ddd263a4218fafbebc16720",
        "synthesis": "d9e49c0f72451bf3f0bdac525bfd4e483b542d513e3c0a159beef2d75f194d4c",
        "adaptation": "257fdc01dcd625b8f3b92907fb656d70b29f619c364a60c7ceda98e2f7000cde",
        "alternatives": "addf6be41cfbf73f690ca0f5084c07f2ae90b063d789437d94e57b79ad6513ac",
        "preprocess": "34860961f483838e421e465e0833b04bfa4eebe0682b49d0a6a4b5d062c6380c",
        "train": "495f7043c7bb38e0e09d68ab95420baf9610d3216c521096af5064914df595a9",
        "in_domain": "e4a3c3cc2bf8b657ac0f1e918edc2f4ceddedd64107a26130808c77728aa2058",
        "predict": "93093726cff27ba7c7178a519fe57fa76663ab77fafc79bad2335963c76b650b",
        "evaluate": "e8d1cb061031dbf4ed01e6a0765c80fe653f47db64ed8784fbbb3d3c7cbacba0",
        "compare": "1993c128ce03ee65c0f9894d355515f8cdfbda35509ef0df7caf388bbe6e46b7",
        "quality": "c628ce23139eec607ea9e93894f8820b0c02fc255e2581a4a885bad916e9fb60",
        "figures": "552ba09e84a09eb4e2d0ff063cd6927c5632a324190db099b98013bb14ea44d9",
        "report": "01410bcb619dd4126f2c5390aadffd8d04e1b0a642b759c980414e1d85d585bf",
    },
}


# ----------------------------------------------------------------------------- configuration
def test_generative_section_defaults_rows_and_kinds():
    off = build_config()
    assert off.generative.rows is False and off["generative"]["copies"] == 1
    assert not {"UDA-syn", "Gen-only"} & {a.name for a in off.approaches()}
    assert "uda_syn" not in off.kinds() and "gen_only" not in off.kinds()
    on = build_config({"generative": {"rows": True, "copies": 2, "guidance_scale": 2,
                                      "diffusion": {"iterations": 7}}, "diffusion": {"iterations": 5}})
    names = [a.name for a in on.approaches()]
    assert names[names.index("Mixed") + 1: names.index("Mixed") + 3] == ["UDA-syn", "Gen-only"]
    assert "UDA-syn+LCC" in names and on.kinds()[-2:] == ["uda_syn", "gen_only"]
    g = on.generative
    assert (g.copies, g.labels, g.guidance_scale, g.preset) == (2, "deformed", 2, "tiny")
    # the conditional model: the study's diffusion settings unless the section overrides them
    assert g.overrides["training.iterations"] == 7 and g.overrides["model.condition"] == "labels"
    assert g.overrides["training.seed"] == on.seed
    inherit = build_config({"generative": {"rows": True},
                            "diffusion": {"iterations": 5, "set": {"model.attention_resolutions": []}}})
    assert inherit.generative.overrides["training.iterations"] == 5
    assert inherit.generative.overrides["model.attention_resolutions"] == []
    # with the rows off, nothing of the section is used, so a clashing id is not an error
    assert build_config({"generative": {"pseudo_id": 972}}).generative.rows is False


@pytest.mark.parametrize("layer, message", [
    ({"generative": {"rows": "yes"}}, r"generative.rows must be true or false"),
    ({"generative": {"copies": 0}}, r"generative.copies must be an integer >= 1, got 0"),
    ({"generative": {"labels": "warped"}}, r"generative.labels must be one of as-is, deformed, got 'warped'"),
    ({"generative": {"guidance_scale": -1}}, r"generative.guidance_scale must be >= 0"),
    ({"generative": {"guidance_scale": "2"}}, r"generative.guidance_scale must be a number, got '2'"),
    ({"generative": {"merged_id": 1000}}, r"generative.merged_id must be in 1..999, got 1000"),
    ({"generative": {"colour": 1}}, r"unknown key\(s\) 'colour' in 'generative'"),
    ({"generative": {"diffusion": {"steps": 3}}}, r"unknown key\(s\) 'steps' in 'generative.diffusion'"),
    ({"generative": {"diffusion": []}}, r"'generative.diffusion' must be an object"),
    ({"generative": {"diffusion": {"iterations": 0}}}, r"generative.diffusion.iterations must be an integer >= 1"),
    ({"generative": {"rows": True, "guidance_scale": 2, "diffusion": {"set": {"training.label_dropout": 0.0}}}},
     r"generative.guidance_scale 2 needs a model trained with label dropout"),
    ({"generative": {"rows": True, "pseudo_id": 972}},
     r"generative.pseudo_id and synthesis.id are both dataset id 972"),
    ({"generative": {"rows": True, "generated_id": 973}},
     r"generative.generated_id and generative.pseudo_id are both dataset id 973"),
    ({"generative": {"pseudo_labeller": "oracle"}},
     r"generative.pseudo_labeller must be one of baseline, aug, got 'oracle'"),
    ({"generative": {"pseudo_labeller": ["aug"]}},
     r"generative.pseudo_labeller must be one of baseline, aug, got \['aug'\]"),
    ({"generative": {"rows": True, "pseudo_labeller": "aug"}, "alternatives": {"nnunet_aug": False}},
     r"generative.pseudo_labeller 'aug' is the nnU-Net aug segmenter, which this study does not train"),
    ({"generative": {"rows": True, "diffusion": {"preset": "huge"}}},
     r"generative.diffusion.preset 'huge' does not exist"),
    ({"generative": {"rows": True, "diffusion": {"set": {"model.image_size": 60}}}},
     r"generative.diffusion: .*not divisible"),
])
def test_bad_generative_settings_name_the_key(layer, message):
    with pytest.raises(SDDMError, match=r"STUDY\.json: .*" + message):
        build_config(layer, origin="STUDY.json")


def test_the_pseudo_labeller_is_the_baseline_or_the_augmented_segmenter(tmp_path):
    from nnunet_sddm.study.context import StudyContext
    from nnunet_sddm.study.stage_pseudo_labels import as_nnunet_model, pseudo_labels_inputs

    def context(layer):
        cfg = build_config({"output": str(tmp_path / "s"), "device": "cpu",
                            "generative": {"rows": True, **layer}}, quick=True)
        return StudyContext(cfg=cfg, out=tmp_path / "s", device="cpu", log=lambda *_: None)

    base, aug = context({}), context({"pseudo_labeller": "aug"})
    assert base.cfg.generative.pseudo_labeller == "baseline" and aug.cfg.generative.pseudo_labeller == "aug"
    assert base.pseudo_labeller() == base.baseline() and base.pseudo_labeller().kind == "real"
    assert aug.pseudo_labeller().kind == "real_aug" and aug.pseudo_labeller() in aug.models()
    assert aug.pseudo_labeller().folder != aug.baseline().folder
    # the nnU-Net model that labels: the augmented trainer's folder, the source dataset
    m_base, m_aug = as_nnunet_model(base, base.pseudo_labeller()), as_nnunet_model(aug, aug.pseudo_labeller())
    assert m_aug.trainer == aug.cfg.trainer("2d", augmented=True) != m_base.trainer == base.cfg.trainer("2d")
    assert m_aug.dataset == m_base.dataset == base.dataset_name("source")
    # a changed pseudo-labeller reruns the stage (and so everything downstream)
    assert fingerprint(pseudo_labels_inputs(base)) != fingerprint(pseudo_labels_inputs(aug))
    # the DG dataset's adherence is measured by the Baseline whoever pseudo-labels
    from nnunet_sddm.study.stage_adherence import measuring_segmenter
    assert measuring_segmenter(aug, "source") == aug.baseline() and measuring_segmenter(aug, "target") == aug.oracle()
    # the report names the pseudo-labeller
    from nnunet_sddm.study.report import generative_lines
    assert "pseudo-labelled by the 2D nnU-Net of the Baseline row" in generative_lines(base)[0]
    assert "pseudo-labelled by the 2D nnU-Net of the nnU-Net aug row" in generative_lines(aug)[0]
    # ... and says that the conditional model is one training run
    from nnunet_sddm.study.report import generative_scope_lines
    (line,) = generative_scope_lines(aug.cfg)
    assert line.startswith("- **Generative model.** ") and "trained once (seed 0)" in line
    assert generative_scope_lines(build_config({}, quick=True)) == []
    # the seed it names is the one the model trains with
    other = build_config({"generative": {"rows": True, "diffusion": {"set": {"training.seed": 7}}}}, quick=True)
    assert "trained once (seed 7)" in generative_scope_lines(other)[0]


# ----------------------------------------------------------------------------- optional stages
class _Ctx:
    def __init__(self, out: Path):
        self.out, self.on, self.ran, self.cleaned = out, True, [], []


def _stage(name, after=(), optional=False):
    def run(ctx, resume):
        ctx.ran.append(name)
        (ctx.out / name).mkdir(parents=True, exist_ok=True)
        (ctx.out / name / "done").write_text(name)
        return {}

    def clean(ctx):
        ctx.cleaned.append(name)
        if (ctx.out / name).is_dir():
            (ctx.out / name / "done").unlink(missing_ok=True)
            (ctx.out / name).rmdir()

    return Stage(name, name, run, lambda c: {"x": 1}, lambda c: [c.out / name], after, clean,
                 (lambda c: c.on) if optional else None)


def test_an_optional_stage_off_is_not_recorded_and_not_in_downstream_fingerprints(tmp_path):
    ctx, log = _Ctx(tmp_path), []
    stages = lambda opt: [_stage("a"), *([_stage("g", ("a",), optional=True)] if opt else []),  # noqa: E731
                          _stage("b", ("a", "g") if opt else ("a",))]
    ctx.on = False
    StageRunner(stages(True), tmp_path, log=log.append).run(ctx)
    state = json.loads((tmp_path / STATE_FILE).read_text())["stages"]
    assert ctx.ran == ["a", "b"] and set(state) == {"a", "b"} and "[study] g: not part of this study" in log
    # the same fingerprints as a pipeline that never had the optional stage: nothing re-runs
    ctx.ran.clear()
    StageRunner(stages(False), tmp_path, log=log.append).run(ctx)
    assert ctx.ran == []
    # switched on: it runs and its downstream stage with it; off again: its outputs are removed
    ctx.on = True
    StageRunner(stages(True), tmp_path, log=log.append).run(ctx)
    assert ctx.ran == ["g", "b"] and (tmp_path / "g" / "done").is_file()
    ctx.on, ctx.ran = False, []
    StageRunner(stages(True), tmp_path, log=log.append).run(ctx)
    assert ctx.cleaned[-2:] == ["g", "b"] and not (tmp_path / "g").exists() and ctx.ran == ["b"]
    assert "g" not in json.loads((tmp_path / STATE_FILE).read_text())["stages"]


# ----------------------------------------------------------------------------- fingerprints without the rows
def _today_fingerprints(cfg):
    """``{stage: (inputs digest, runner fingerprint, fingerprint with today's upstream)}`` of every
    stage but the generative ones, over a fake state in which every stage is done."""
    from nnunet_sddm.study.context import make_context
    from nnunet_sddm.study.pipeline import STAGES

    ctx = make_context(cfg, progress=False)
    runner = StageRunner(STAGES, ctx.out / "never_written")
    runner.state["stages"] = {s.name: {"status": "done", "fingerprint": f"fp-{s.name}",
                                       "outputs_digest": f"d-{s.name}"} for s in STAGES}
    out = {}
    for s in STAGES:
        if s.name in GENERATIVE_STAGES:
            assert not runner.is_enabled(s.name, ctx)
            continue
        inputs = s.inputs(ctx)
        upstream = {u: [f"fp-{u}", f"d-{u}"] for u in TODAY_AFTER[s.name]}
        out[s.name] = (fingerprint(inputs), runner.stage_fingerprint(s, ctx),
                       fingerprint({"stage": s.name, "inputs": inputs, "upstream": upstream}))
    return out


@pytest.mark.parametrize("preset", ["defaults", "quick"])
def test_without_the_rows_every_stage_keeps_todays_fingerprint(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = preset == "quick"
    plain = build_config({"output": "fp_study", "device": "cpu"}, quick=quick)
    old = plain.to_dict()
    old.pop("generative")  # a study.json written before the section existed
    with_section = {"output": "fp_study", "device": "cpu",
                    "generative": {"rows": False, "copies": 3, "labels": "as-is", "guidance_scale": 2.5,
                                   "pseudo_id": 972, "diffusion": {"iterations": 9}}}
    results = [_today_fingerprints(c) for c in (plain, build_config(old), build_config(with_section, quick=quick))]
    assert results[0] == results[1] == results[2]
    assert list(results[0]) == [n for n in STAGE_NAMES if n not in GENERATIVE_STAGES] == list(TODAY_AFTER)
    for name, (inputs, got, today) in results[0].items():
        assert got == today, name  # the upstream stages are today's
        assert inputs == GOLDEN_INPUTS[preset][name], name  # and so are the inputs


# ----------------------------------------------------------------------------- smoke study with the rows
def _read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(900)
def test_smoke_study_with_the_generative_rows(tmp_path, monkeypatch):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from nnunet_sddm.study.pipeline import run_study
    from test_study import smoke_config

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / "user" / var))  # must stay untouched (own folders)
    out = tmp_path / "study"
    raw = smoke_config(out).to_dict()
    raw.update({"alternatives": {"histmatch": False, "fda": False, "nnunet_aug": False}, "postprocess": None,
                "figures": {"sweep": None, "tsne": False},
                "generative": {"rows": True, "copies": 1, "labels": "deformed", "guidance_scale": 1.5}})
    cfg = build_config(raw)
    log = []
    run_study(cfg, progress=False, log=log.append)
    assert not (tmp_path / "user").exists()
    names = {f"{a}/2D nnU-Net" for a in ("Baseline", "DA", "DG", "Mixed", "UDA-syn", "Gen-only", "DA+ens",
                                         "Mixed+ens")}
    table = _read_csv(out / "comparison" / "table.csv")
    assert {r["name"] for r in table} == names
    for r in table:
        assert 0.0 <= float(r["DSC"]) <= 1.0, r
    tests = _read_csv(out / "comparison" / "tests.csv")
    for row in ("UDA-syn/2D nnU-Net", "Gen-only/2D nnU-Net"):
        mine = [t for t in tests if t["candidate"] == row]
        assert mine and {t["baseline"] for t in mine} == {"Baseline/2D nnU-Net"}
        assert {t["structure"] for t in mine} >= {"all", "LV", "MYO", "RV"}
    per_structure = sorted((out / "comparison").glob("table_*.csv"))
    assert per_structure and all("UDA-syn" in p.read_text() for p in per_structure if "finite" not in p.name)

    # the generated pairs (target domain, deformed maps) and the merged training set pass nnU-Net's check
    raw_root = out / "nnUNet_raw"
    generated = raw_root / "Dataset974_StudyPhantomASourceSDDMGen"
    merged = raw_root / "Dataset975_StudyPhantomASourceUDASyn"
    for folder in (generated, merged):
        verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem
    source = raw_root / "Dataset970_StudyPhantomASource"
    n_source = len(list((source / "imagesTr").glob("*.nii.gz")))
    records = json.loads((generated / "cases.json").read_text())
    assert len(records) == n_source and {r["domain"] for r in records} == {"target"}
    assert all(r["labels"] == "deformed" and r["deformation"] and r["guidance_scale"] == 1.5 for r in records)
    merged_records = json.loads((merged / "cases.json").read_text())
    assert sorted(r["generated"] for r in merged_records) == [False] * n_source + [True] * n_source
    subject = {r["case"]: r["subject"] for r in merged_records}
    splits = json.loads((out / "nnUNet_preprocessed" / merged.name / "splits_final.json").read_text())
    for fold in splits:  # by subject: a subject's real and generated cases are on one side
        assert not {subject[c] for c in fold["train"]} & {subject[c] for c in fold["val"]}
    model = json.loads((out / "generative_model" / "config.json").read_text())
    assert model["model"]["condition"] == "labels" and model["model"]["domains"] == ["source", "target"]

    # mask adherence: the target-style pairs by the oracle (trained on the target's labelled cases), the
    # DG dataset by the Baseline, each against the label maps the images were made from
    sets = json.loads((out / "adherence" / "adherence.json").read_text())["sets"]
    assert set(sets) == {"generated", "dg"}
    for key, segmenter in (("generated", "Dataset971_StudyPhantomBTarget"), ("dg", source.name)):
        adherence = sets[key]
        assert adherence["measurable"] and adherence["n_cases"] == n_source
        assert set(adherence["structures"]) >= {"LV", "MYO", "RV"}
        for d in adherence["structures"].values():
            assert d["mean"] is None or 0.0 <= d["mean"] <= 1.0
        assert (out / "adherence" / key / "adherence.csv").is_file()
        assert adherence["segmenter"]["dataset"] == segmenter

    # the figure of generated pairs: one case per subject first; the target-style panel is the dataset's
    # image, the source-style panel the same map and noise with the other domain token
    from nnunet_sddm.adaptation.synthesize_labels import LabelSampler
    from nnunet_sddm.data.volumes import read_volume
    from nnunet_sddm.study.context import make_context
    from nnunet_sddm.study.figures import generated_pair_panels

    assert (out / "figures" / "generated_pairs.png").is_file()
    panels = generated_pair_panels(make_context(cfg, progress=False, log=lambda _: None), 2)
    assert [p["case"] for p in panels] == ["PhA0000_ED_gen0", "PhA0001_ED_gen0"]  # two subjects, not ED + ES
    first = {r["case"]: r for r in records}[panels[0]["case"]]
    cond = read_volume(generated / "labelsTr" / f"{first['case']}.nii.gz")
    label = read_volume(source / "labelsTr" / f"{first['label_map']}.nii.gz")
    z = panels[0]["z"]
    assert np.array_equal(panels[0]["label"], np.rint(label.data[z]))
    assert not np.array_equal(panels[0]["conditioning"], panels[0]["label"])  # deformed
    for domain, key in (("target", "target_style"), ("source", "source_style")):
        sampler = LabelSampler.open(out / "generative_model", first["steps"], first["guidance_scale"], domain,
                                    device="cpu", progress=False)
        (_, again), = sampler.iter_generated([(first["label_map"], cond.data, cond.spacing)], first["seed"])
        np.testing.assert_allclose(panels[0][key], again[z], atol=1e-5)
    target_image = read_volume(generated / "imagesTr" / f"{first['case']}_0000.nii.gz").data
    np.testing.assert_array_equal(panels[0]["target_style"], target_image[z])
    assert not np.array_equal(panels[0]["source_style"], panels[0]["target_style"])  # the domain token enters

    report = (out / "report.md").read_text()
    assert "## Mask adherence of the generated images" in report and "**UDA-syn**" in report
    assert re.search(r"^\| generative_train \| [\d.]+ (s|min) \|", report, re.M)
    in_domain = {r["trained_on"] for r in _read_csv(out / "in_domain" / "in_domain.csv")}
    assert {"uda_syn", "gen_only"} <= in_domain

    # a second run redoes nothing
    log2 = []
    run_study(cfg, progress=False, log=log2.append)
    assert sum(x.endswith("skipped") for x in log2) == len(STAGE_NAMES)
