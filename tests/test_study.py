"""The study: configuration (defaults, --quick, validation), the stage runner (skip, resume,
--from, invalidation) and one end-to-end smoke study on tiny phantoms with an interruption."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from nnunet_sddm.study.config import QUICK, build_config, read_config_file, trainer_of
from nnunet_sddm.study.stages import STATE_FILE, Stage, StageRunner
from nnunet_sddm.utilities.errors import SDDMError


# ----------------------------------------------------------------------------- configuration
def test_defaults_and_quick_are_valid():
    cfg = build_config()
    assert cfg["segmenters"] == ["2d", "3d_fullres", "vanilla"] and cfg["fold"] == "all"
    assert trainer_of(cfg, "2d") == "nnUNetTrainer_SDDM_NoDA_250ep"
    assert trainer_of(cfg, "vanilla") == "nnUNetTrainer_SDDM_VanillaUNet"
    q = build_config(quick=True)
    assert q["source"]["phantom"] == "A" and q["target"]["phantom"] == "B" and q["source"]["test_subjects"] > 0
    assert q.nnunet.batch_size == 4 and q.nnunet.plans == "nnUNetPlansSDDM_bs4"
    assert q["diffusion"]["preset"] == "tiny" and q["device"] == "cpu"
    assert q["segmenters"] == ["2d"]
    assert trainer_of(q, "2d") == f"nnUNetTrainer_SDDM_NoDA_{QUICK['epochs']}ep_{QUICK['iterations_per_epoch']}it"
    assert trainer_of(q, "vanilla") == (f"nnUNetTrainer_SDDM_VanillaUNet_{QUICK['epochs']}ep_"
                                        f"{QUICK['iterations_per_epoch']}it")
    assert trainer_of(build_config({"epochs": "quick"}), "vanilla") == "nnUNetTrainer_SDDM_VanillaUNet_Quick"
    # a file layer overrides --quick, the command line overrides the file
    c = build_config({"sampler": {"N": 10}}, {"sampler": {"tau": 2.0}}, quick=True)
    assert (c["sampler"]["N"], c["sampler"]["tau"], c["sampler"]["steps"]) == (10, 2.0, QUICK["sampler"]["steps"])
    # an existing dataset replaces the phantom of that side
    d = build_config({"source": {"dataset": "27"}})
    assert d["source"]["phantom"] is None and d["source"]["dataset"] == "27"


@pytest.mark.parametrize("layer, message", [
    ({"segmenterz": ["2d"]}, r"unknown key\(s\) 'segmenterz' in the study configuration"),
    ({"sampler": {"DD": 2}}, r"unknown key\(s\) 'DD' in 'sampler'"),
    ({"segmenters": ["2d", "unet"]}, r"unknown segmenter 'unet'"),
    ({"segmenters": []}, r"segmenters must be a non-empty list"),
    ({"sampler": {"D": 3}}, r"sampler: low-pass factor D must be a power of 2"),
    ({"sampler": {"N": 200}}, r"sampler: diffusion range N=200 exceeds"),
    ({"target": {"phantom": "A", "seed": 0}}, r"source and target are the same phantoms"),
    ({"target": {"phantom": "Z"}}, r"target.phantom 'Z' is not a phantom vendor"),
    ({"target": {"split": "Val"}}, r"target.split must be 'Tr' or 'Ts'"),
    ({"synthesis": {"id": 970}}, r"synthesis.id and source.id are both dataset id 970"),
    ({"epochs": 0}, r"epochs must be an integer in 1..99999"),
    ({"iterations_per_epoch": 0}, r"iterations_per_epoch must be null \(nnU-Net's 250\) or an integer"),
    ({"iterations_per_epoch": "100"}, r"iterations_per_epoch must be null"),
    ({"diffusion": {"preset": "huge"}}, r"diffusion.preset 'huge' does not exist"),
    ({"diffusion": {"set": {"model.image_size": 60}}}, r"not divisible"),
    ({"trainers": {"2d": "MyTrainer"}}, r"trainers.2d must be an nnU-Net trainer class name"),
    ({"trainers": {"vanilla": "nnUNetTrainer_SDDM_NoDA_250ep"}},
     r"segmenters '2d' and 'vanilla' are both nnUNetTrainer_SDDM_NoDA_250ep on 2d"),
    ({"device": "tpu"}, r"device must be auto, cpu, cuda or mps"),
    ({"evaluation": {"alpha": 1.5}}, r"evaluation.alpha must be in \(0, 1\)"),
    ({"figures": {"sweep": {"D": [2], "N": [500], "tau": [6]}}}, r"figures.sweep.N value 500"),
    ({"figures": {"sweep": {"D": [2], "N": [2], "tau": ["x"]}}}, r"figures.sweep.tau value 'x' is not a number"),
    ({"evaluation": {"empty_policy": "diagonall"}}, r"evaluation.empty_policy 'diagonall': empty policy: one_empty "
                                                    r"must be 'nan', 'diagonal' or a number of mm"),
    ({"evaluation": {"empty_policy": -3}}, r"evaluation.empty_policy -3: empty policy: penalty must be >= 0 mm"),
    ({"evaluation": {"empty_policy": True}}, r"evaluation.empty_policy must be 'diagonal', 'nan' or a penalty"),
    ({"evaluation": {"alpha": "0.05"}}, r"evaluation.alpha must be in \(0, 1\), got '0.05'"),
    ({"sampler": {"tau": "x"}}, r"sampler.tau must be a number, got 'x'"),
    ({"sampler": {"reference_behaviour": "no"}}, r"sampler.reference_behaviour must be true or false"),
    ({"nnunet": {"step_size": "abc"}}, r"nnunet.step_size must be a number in \(0, 1\], got 'abc'"),
    ({"nnunet": {"step_size": 1.5}}, r"nnunet.step_size must be a number in \(0, 1\], got 1.5"),
    ({"figures": {"tsne": "no"}}, r"figures.tsne must be true or false \(a JSON boolean\), got 'no'"),
    ({"fold": 7}, r"fold must be 'all' \(train on every case, as the paper\) or one of nnU-Net's five "
                  r"cross-validation folds 0..4, got 7"),
    ({"fold": "x"}, r"fold must be 'all' .* got 'x'"),
])
def test_bad_configurations_name_the_problem(layer, message):
    with pytest.raises(SDDMError, match=r"STUDY\.json: .*" + message):
        build_config(layer, origin="STUDY.json")


EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_documented_example_studies_validate(path):
    """Every STUDY.json in docs/examples is a valid configuration (checked as ``-c`` checks it)."""
    cfg = build_config(read_config_file(path))
    assert cfg["source"]["dataset"] and cfg["target"]["dataset"]


def test_the_cpu_recipe_plans_coarse_segmenters_and_a_spacing_mode_small_model():
    """docs/examples/acdc_to_mnms_cpu.json: ACDC -> M&Ms on a CPU: the segmenters at a coarser
    in-plane spacing through nnU-Net's plans, the ``small`` preset in spacing mode."""
    cfg = build_config(read_config_file(EXAMPLES / "acdc_to_mnms_cpu.json"))
    assert cfg["device"] == "cpu" and cfg.nnunet.spacing == 3 and cfg.nnunet.plans.startswith("nnUNetPlansSDDM_3mm")
    assert cfg["diffusion"]["preset"] == "small" and cfg["diffusion"]["set"]["data.spacing"] == 2.0
    assert cfg["sampler"]["steps"] == 50 and cfg["sampler"]["N"] == 12  # about N / K of the paper's 25 / 100


def test_config_file_errors(tmp_path):
    with pytest.raises(SDDMError, match=r"missing\.json: study configuration not found"):
        read_config_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SDDMError, match=r"bad\.json: not valid JSON"):
        read_config_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(SDDMError, match=r"bad\.json: expected a JSON object"):
        read_config_file(bad)


def test_cli_flags_map_to_configuration_keys(tmp_path, capsys):
    from nnunet_sddm.cli.study import study_main

    study_main(["--quick", "--print-config", "-o", str(tmp_path / "o"), "--source", "27", "--target", "phantom:C",
                "--segmenters", "2d", "vanilla", "--epochs", "5", "-N", "10", "--tau", "3", "--trainer",
                "2d=nnUNetTrainer_SDDM_NoDA_50ep", "--fold", "0", "--method", "histmatch", "fda",
                "--repeats", "3", "--postprocess", "none", "--test", "welch", "--fda-beta", "0.02"])
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["alternatives"] == {"histmatch": True, "fda": True, "nnunet_aug": False, "fda_beta": 0.02}
    assert cfg["repeats"] == 3 and cfg["postprocess"] is None and cfg["evaluation"]["test"] == "welch"
    assert cfg["output"] == str(tmp_path / "o")
    assert cfg["source"]["dataset"] == "27" and cfg["source"]["phantom"] is None
    assert cfg["target"]["phantom"] == "C" and cfg["segmenters"] == ["2d", "vanilla"]
    assert cfg["epochs"] == 5 and cfg["sampler"]["N"] == 10 and cfg["sampler"]["tau"] == 3.0
    assert trainer_of(cfg, "2d") == "nnUNetTrainer_SDDM_NoDA_50ep" and cfg["fold"] == 0
    assert trainer_of(cfg, "vanilla") == "nnUNetTrainer_SDDM_VanillaUNet_5ep_400it"  # --quick: 400 per epoch
    with pytest.raises(SystemExit) as e:
        study_main(["--quick", "-D", "6", "--print-config"])
    assert e.value.code == 2
    assert "error: study configuration: sampler: low-pass factor D must be a power of 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study_main(["--quick", "--method", "none", "fda", "--print-config"])
    assert "'none' cannot be combined" in capsys.readouterr().err


# ----------------------------------------------------------------------------- stage runner
class _Ctx:
    def __init__(self, out: Path):
        self.out = out
        self.settings = {"a": 1, "b": 1, "c": 1}
        self.ran = []
        self.resumed = []
        self.fail_in = None


def _stage(name: str, after=()):
    def run(ctx, resume):
        ctx.ran.append(name)
        if resume:
            ctx.resumed.append(name)
        part = ctx.out / name / "part"
        part.parent.mkdir(parents=True, exist_ok=True)
        kept = part.is_file()
        part.write_text("x")
        if ctx.fail_in == name:
            raise RuntimeError(f"simulated crash in {name}")
        (ctx.out / name / "done").write_text(str(ctx.settings[name]))
        return {"kept_partial_work": kept}

    return Stage(name, f"stage {name}", run, lambda c: {"setting": c.settings[name]},
                 lambda c: [c.out / name], after)


def _runner(ctx, log):
    return StageRunner([_stage("a"), _stage("b", ("a",)), _stage("c", ("b",))], ctx.out, log=log.append)


def test_stage_runner_skips_resumes_and_invalidates(tmp_path):
    ctx, log = _Ctx(tmp_path), []
    res = _runner(ctx, log).run(ctx)
    assert ctx.ran == ["a", "b", "c"] and set(res) == {"a", "b", "c"}
    state = json.loads((tmp_path / STATE_FILE).read_text())["stages"]
    assert all(state[s]["status"] == "done" and state[s]["seconds"] >= 0 for s in "abc")

    ctx.ran.clear()
    _runner(ctx, log).run(ctx)
    assert ctx.ran == [] and sum("skipped" in line for line in log) == 3

    # a changed setting re-runs that stage and, through its outputs digest, everything downstream
    ctx.settings["b"] = 2
    _runner(ctx, log).run(ctx)
    assert ctx.ran == ["b", "c"] and ctx.resumed == []

    # deleted outputs of the last stage: only that stage runs
    ctx.ran.clear()
    (tmp_path / "c" / "done").unlink()
    _runner(ctx, log).run(ctx)
    assert ctx.ran == ["c"]

    # --from forces a fresh run from that stage on (old outputs removed first)
    ctx.ran.clear()
    (tmp_path / "b" / "stale").write_text("old")
    _runner(ctx, log).run(ctx, from_stage="b")
    assert ctx.ran == ["b", "c"] and not (tmp_path / "b" / "stale").exists()
    with pytest.raises(SDDMError, match="unknown stage 'x'"):
        _runner(ctx, log).run(ctx, from_stage="x")


def test_stage_runner_resumes_an_interrupted_stage(tmp_path):
    ctx, log = _Ctx(tmp_path), []
    ctx.fail_in = "b"
    with pytest.raises(RuntimeError, match="simulated crash in b"):
        _runner(ctx, log).run(ctx)
    state = json.loads((tmp_path / STATE_FILE).read_text())["stages"]
    assert state["a"]["status"] == "done" and state["b"]["status"] == "running" and "c" not in state
    ctx.fail_in, ctx.ran = None, []
    res = _runner(ctx, log).run(ctx)
    assert ctx.ran == ["b", "c"] and ctx.resumed == ["b"]
    assert res["b"] == {"kept_partial_work": True}  # the interrupted stage kept its partial work
    # an interrupted stage whose settings changed meanwhile starts afresh
    ctx.fail_in = "c"
    with pytest.raises(RuntimeError):
        _runner(ctx, log).run(ctx, from_stage="c")
    ctx.fail_in, ctx.resumed = None, []
    ctx.settings["c"] = 5
    res = _runner(ctx, log).run(ctx)
    assert ctx.resumed == [] and res["c"] == {"kept_partial_work": False}


def test_stage_runner_sees_changes_of_an_upstream_stage_without_outputs(tmp_path):
    """A given diffusion model (no output files of the study's own) replaced in place, or another
    model given: the stages downstream of it re-run, not only the stage itself."""
    ctx, log = _Ctx(tmp_path), []
    model = tmp_path / "given_model"
    model.mkdir()
    (model / "ema.safetensors").write_text("v1")
    ctx.model = model

    def run_given(c, resume):
        c.ran.append("given")
        return {}

    from nnunet_sddm.study.stages import file_listing

    stages = lambda: [Stage("given", "a given model", run_given,  # noqa: E731
                            lambda c: {"model": str(c.model), "files": file_listing(c.model)}, lambda c: []),
                      _stage("a", ("given",)), _stage("b", ("a",))]
    StageRunner(stages(), tmp_path, log=log.append).run(ctx)
    assert ctx.ran == ["given", "a", "b"]
    ctx.ran.clear()
    StageRunner(stages(), tmp_path, log=log.append).run(ctx)
    assert ctx.ran == []
    (model / "ema.safetensors").write_text("v2-retrained")  # replaced in place
    StageRunner(stages(), tmp_path, log=log.append).run(ctx)
    assert ctx.ran == ["given", "a", "b"]
    ctx.ran.clear()
    other = tmp_path / "other_model"  # another model given (-m)
    shutil.copytree(model, other)
    ctx.model = other
    StageRunner(stages(), tmp_path, log=log.append).run(ctx)
    assert ctx.ran == ["given", "a", "b"]


def test_stage_runner_refuses_a_broken_state_file(tmp_path):
    (tmp_path / STATE_FILE).write_text("{")
    with pytest.raises(SDDMError, match=r"study_state.json: unreadable study state"):
        _runner(_Ctx(tmp_path), [])


# ----------------------------------------------------------------------------- smoke study
def smoke_config(out: Path) -> dict:
    """The smallest study that still runs every stage: 2 (+ 1 held out) + 1 phantom subjects at 32 x 32, a
    two-level 32-pixel diffusion model trained 4 iterations, N = 2 of 10 respaced steps, the
    quick nnU-Net trainers (2 epochs x 5 iterations) for the 2D nnU-Net (the 3D nnU-Net and the vanilla
    U-Net run through the same code with another configuration / trainer name: ``--quick`` runs them)."""
    return build_config({
        "name": "smoke", "output": str(out),
        "source": {"phantom": "A", "subjects": 2, "test_subjects": 1, "matrix": 32},
        "target": {"phantom": "B", "subjects": 1, "matrix": 32},
        "segmenters": ["2d"], "epochs": "quick",
        "diffusion": {"preset": "tiny", "iterations": 4, "batch_size": 4,
                      "set": {"model.image_size": 32, "model.channel_mult": [1, 2],
                              "model.attention_resolutions": [], "training.num_samples": 4,
                              "diffusion.sample_respacing": 10}},
        "sampler": {"D": 2, "N": 2, "tau": 6.0, "steps": 10},
        "device": "cpu", "nnunet": {"num_processes": 1},
        "evaluation": {"num_processes": 1},
        "figures": {"sweep": {"D": [2], "N": [2], "tau": [0.0, 6.0]}},
    })


class _Interrupt(Exception):
    pass


@pytest.mark.timeout(900)
def test_smoke_study_interrupted_and_resumed(tmp_path, monkeypatch):
    from nnunet_sddm.study.pipeline import run_study

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / "user" / var))  # must stay untouched (own folders)
    out = tmp_path / "study"
    cfg = smoke_config(out)

    def crash_at_predict(stage):
        if stage == "predict":
            raise _Interrupt("simulated kill")

    log1 = []
    with pytest.raises(_Interrupt):
        run_study(cfg, progress=False, log=log1.append, on_stage_start=crash_at_predict)
    state = json.loads((out / STATE_FILE).read_text())["stages"]
    assert [s for s in state if state[s]["status"] == "done"] == ["data", "diffusion", "synthesis", "adaptation",
                                                                   "alternatives", "preprocess", "train", "in_domain"]
    assert state["predict"]["status"] == "running"

    log2 = []
    res = run_study(cfg, progress=False, log=log2.append)
    ran = [m.group(1) for m in (re.match(r"\[study\] (\w+): .*\((new|resuming an interrupted run)\)$", x)
                                for x in log2) if m]
    assert ran == ["predict", "evaluate", "compare", "quality", "figures", "report"]
    assert sum(x.endswith("skipped") for x in log2) == 8
    assert not (tmp_path / "user").exists()

    # the report: every approach x model row with numbers, stage times, settings
    report = (out / "report.md").read_text()
    approaches = [a.name for a in cfg.approaches()]
    assert len(approaches) == 18 and "nnU-Net aug+LCC" in approaches and "FDA" in approaches
    table1 = report.split("### The same with the NaN policy")[0]
    rows = [r for r in table1.splitlines() if r.startswith("| ") and r.split("|")[1].strip() in approaches]
    models = ("2D nnU-Net",)
    table_rows = [r for r in rows if r.split("|")[2].strip() in models]
    assert len(table_rows) == len(approaches) * len(models)
    for r in table_rows:
        cells = [c.strip() for c in r.strip("|").split("|")[2:]]
        assert len(cells) == 6 and any(re.search(r"\d\.\d", c) for c in cells), r
        dsc = float(re.search(r"\d+\.\d+", cells[0]).group(0))
        assert 0.0 <= dsc <= 1.0
    for stage in ("diffusion", "synthesis", "adaptation", "alternatives", "preprocess", "train", "predict",
                  "evaluate"):
        assert re.search(rf"^\| {stage} \| [\d.]+ (s|min) \|", report, re.M), stage
    assert "nnunetv2" in report and '"N": 2' in report and "sampler seed 0" in report
    for fig in ("figures/sweep.png", "figures/domain_shift/tsne.png", "comparison/fig_HD95.png",
                "figures/ci_2d_HD95.png", "diffusion_model/samples.png"):
        assert (out / fig).is_file() and (out / fig).stat().st_size > 1000, fig
    # DA images keep the target's geometry; DG dataset has the source's labels
    import SimpleITK as sitk

    tgt = sorted((out / "nnUNet_raw" / "Dataset971_StudyPhantomBTarget" / "imagesTr").glob("*.nii.gz"))
    ada = sorted((out / "adapted" / "target").glob("*.nii.gz"))
    assert [p.name for p in tgt] == [p.name for p in ada] and len(tgt) == 2
    a, b = sitk.ReadImage(str(tgt[0])), sitk.ReadImage(str(ada[0]))
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    syn = out / "nnUNet_raw" / "Dataset972_StudyPhantomASourceSDDM"
    assert len(list((syn / "labelsTr").glob("*_syn0.nii.gz"))) == 4
    assert set(res["compare"]["improvements"]) == {f"{a}/{m}" for a in approaches[1:] for m in models}
    for name in ("tests.csv", "structures.csv", "missing.md", "table_finite.md", "fig_missing.png"):
        assert (out / "comparison" / name).is_file(), name
    assert "What this run can and cannot show" in report and "Wilcoxon signed-rank" in report
    assert "Missing and spurious structures" in report
    # the held-out source cases: every model's in-domain Dice, the baselines' round trips, geometry kept
    rows = list(csv.DictReader(open(out / "in_domain" / "in_domain.csv")))
    seen = {(r["trained_on"], r["input"]) for r in rows}
    assert seen == {("real", "original"), ("real", "geometry"), ("real", "adapted"), ("real_aug", "original"),
                    ("synthetic", "original")}
    assert all(r["cases"] == "2" and 0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert all(r["loss"] == "" if r["input"] == "original" else r["loss"] for r in rows)
    src = sorted((out / "nnUNet_raw" / "Dataset970_StudyPhantomASource" / "imagesTs").glob("*.nii.gz"))
    for inp in ("geometry", "adapted"):
        got = sorted((out / "in_domain" / "images" / inp).glob("*.nii.gz"))
        assert [p.name for p in got] == [p.name for p in src]
        a, b = sitk.ReadImage(str(src[0])), sitk.ReadImage(str(got[0]))
        assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
    assert "## In-domain test and the source round trip" in report and "| 2D nnU-Net | geometric round trip" in report
    # the quality reports of the DG dataset and the adapted target images; with one held-out subject the
    # membership inference is skipped and both reports say why
    for key in ("dg", "da"):
        q = json.loads((out / "quality" / key / "quality.json").read_text())
        assert q["slices"]["synthetic"] > 0 and q["paired"]["pairs"] == q["slices"]["synthetic"]
        assert 0.0 < q["paired"]["ssim"]["mean"] < 1.0 and q["privacy"]["synthetic"]["slices"] == q["slices"]["synthetic"]
        assert "membership" not in q and "2 subjects" in q["membership_skipped"]
        md = (out / "quality" / key / "quality.md").read_text()
        assert "2 subjects" in md and "| 2D nnU-Net |" in md.split("## Utility")[1]
    assert "## Quality of the synthetic and adapted images" in report and "(quality/dg/quality.md)" in report
    # a rerun of the finished study skips every stage (fingerprints and outputs digests unchanged)
    log3 = []
    run_study(cfg, progress=False, log=log3.append)
    assert sum(x.endswith("skipped") for x in log3) == 14


def test_in_domain_without_held_out_cases_writes_an_empty_table_and_the_report_says_so(tmp_path):
    """Without imagesTs/labelsTs in the source (the default: source.test_subjects = 0) the stage
    still has its output (a header-only in_domain.csv) and the report says why nothing was measured;
    with rows, both report tables have as many separator cells as header cells."""
    from nnunet_sddm.study import stage_in_domain
    from nnunet_sddm.study.context import StudyContext
    from nnunet_sddm.study.report import in_domain_lines
    from nnunet_sddm.study.stages import digest_paths

    cfg = build_config({"output": str(tmp_path / "study"), "segmenters": ["2d"]})
    ctx = StudyContext(cfg=cfg, out=tmp_path / "study", device="cpu", log=lambda *_: None)
    (ctx.raw("source") / "imagesTr").mkdir(parents=True)
    res = stage_in_domain.run_in_domain(ctx, resume=False)
    assert "no labelled held-out cases" in res["skipped"]
    assert (ctx.out / "in_domain" / "in_domain.csv").read_text() == ",".join(stage_in_domain.CSV_FIELDS) + "\n"
    assert digest_paths(stage_in_domain.in_domain_outputs(ctx), ctx.out) is not None
    assert "No held-out source cases" in in_domain_lines(ctx)[0]
    rows = [{"segmenter": "2d", "trained_on": kind, "seed": 0, "input": inp, "structure": st, "dice": 0.5,
             "cases": 4, "loss": ""} for kind, inputs in (("real", stage_in_domain.INPUTS), ("synthetic", ("original",)))
            for inp in inputs for st in ("LV", "MYO", "all")]
    stage_in_domain._write_csv(ctx.out / "in_domain" / "in_domain.csv", rows)
    lines = in_domain_lines(ctx)
    tables = [i for i, x in enumerate(lines) if x.startswith("| segmenter |")]
    assert len(tables) == 2
    for i in tables:
        assert lines[i].count("|") == lines[i + 1].count("|"), (lines[i], lines[i + 1])
    assert sum(x.startswith("| 2D nnU-Net |") for x in lines) == 2 + 3  # real, synthetic; three round-trip rows


def test_given_diffusion_model_is_used_not_trained(tmp_path, nnunet_env):
    from nnunet_sddm.diffusion.model_folder import create_model_folder
    from nnunet_sddm.study.context import make_context
    from nnunet_sddm.study.stage_diffusion import run_diffusion

    model = create_model_folder(tmp_path / "my_model", "tiny", {"model.image_size": 32, "model.channel_mult": [1, 2],
                                                               "model.attention_resolutions": []})
    cfg = build_config({"output": str(tmp_path / "study"), "diffusion": {"model": str(model)}})
    ctx = make_context(cfg, progress=False)
    assert ctx.model_dir == model.resolve()
    res = run_diffusion(ctx, resume=False)
    assert res["trained_by_study"] is False and res["preset"] == "tiny"
    with pytest.raises(SDDMError, match="does not exist|no trained model"):
        make_context(build_config({"diffusion": {"model": str(tmp_path / "nope")}}), progress=False)


# ----------------------------------------------------------------------------- user data (environment mode)
def _env_folders(tmp_path, monkeypatch):
    folders = {}
    for key, var in (("raw", "nnUNet_raw"), ("pre", "nnUNet_preprocessed"), ("res", "nnUNet_results")):
        folders[key] = tmp_path / key
        folders[key].mkdir()
        monkeypatch.setenv(var, str(folders[key]))
    return folders


def _env_context(tmp_path, cfg, **kw):
    import os

    from nnunet_sddm.study.context import StudyContext

    return StudyContext(cfg=cfg, out=tmp_path / "study", device="cpu", user_env=dict(os.environ), **kw)


def test_environment_mode_never_deletes_the_users_models_or_plans(tmp_path, monkeypatch):
    """The review's scenario: a phantom study in the user's nnU-Net folders, then ``--source 114``
    with the same study folder (which has a ``train`` record): the user's own model and plans of
    dataset 114 are refused by name, never deleted; the study's own phantom models are replaced."""
    from nnunet_sddm.study import stage_data, stage_preprocess, stage_train

    f = _env_folders(tmp_path, monkeypatch)
    env = {"nnunet": {"folders": "environment"}, "segmenters": ["2d"], "device": "cpu"}
    # run 1 (phantom source): the stages claim their outputs, then "train" writes a model
    ctx = _env_context(tmp_path, build_config(env))
    stage_train.train_clean(ctx)
    ours = ctx.models()[0].folder
    (ours / "fold_all").mkdir(parents=True)
    (ours / "fold_all" / "checkpoint_final.pth").write_text("study model")
    ctx.runner = type("Runner", (), {"record": lambda self, s: {"status": "done"}})()
    # run 2 (user's dataset 114): its model and plans are the user's
    user = f["raw"] / "Dataset114_User"
    user.mkdir()
    (user / "dataset.json").write_text("{}")
    model = f["res"] / "Dataset114_User" / "nnUNetTrainer_SDDM_NoDA_250ep__nnUNetPlans__2d" / "fold_all"
    model.mkdir(parents=True)
    (model / "checkpoint_final.pth").write_text("user's own 250-epoch model")
    plans = f["pre"] / "Dataset114_User" / "nnUNetPlans.json"
    plans.parent.mkdir()
    plans.write_text("{}")
    ctx2 = _env_context(tmp_path, build_config(env, {"source": {"dataset": "114"}}), user_datasets={"source": user})
    ctx2.runner = ctx.runner
    with pytest.raises(SDDMError, match=r"stage train: .*Dataset114_User/nnUNetTrainer_SDDM_NoDA_250ep__nnUNetPlans"
                                        r"__2d exist\(s\) in your nnU-Net folders and were not made by this study"):
        stage_train.train_clean(ctx2)
    with pytest.raises(SDDMError, match=r"stage preprocess: .*Dataset114_User/nnUNetPlans\.json exist"):
        stage_preprocess.preprocess_clean(ctx2)
    assert (model / "checkpoint_final.pth").read_text() == "user's own 250-epoch model" and plans.is_file()
    # the user's dataset (here a link into their nnUNet_raw) is never unlinked by the data stage
    link = f["raw"] / "Dataset115_Linked"
    link.symlink_to(user, target_is_directory=True)
    stage_data.data_clean(_env_context(tmp_path, build_config(env, {"source": {"dataset": "115"}}),
                               user_datasets={"source": link}))
    assert link.is_symlink()
    # the study's own model (recorded in study_created.json) is replaced
    stage_train.train_clean(ctx)
    assert not ours.exists()
    assert str(ours) in json.loads((tmp_path / "study" / "study_created.json").read_text())["created"]["train"]


def test_data_stage_refuses_conflicting_label_maps_and_accepts_a_subset(tmp_path, monkeypatch):
    """A source labelled 1 = RV and a target labelled 1 = LV would be compared structure for structure:
    refused. A target labelling fewer structures with the same values (LV and MYO only, like
    Sunnybrook) is accepted; the structures it lacks are named as skipped."""
    from nnunet_sddm.study.stage_data import run_data

    f = _env_folders(tmp_path, monkeypatch)
    maps = {"Dataset114_Src": {"background": 0, "RV": 1, "MYO": 2, "LV": 3},
            "Dataset115_Tgt": {"background": 0, "LV": 1, "MYO": 2, "RV": 3}}
    for name, labels in maps.items():
        for sub, case in (("imagesTr", "c_0000.nii.gz"), ("labelsTr", "c.nii.gz")):
            (f["raw"] / name / sub).mkdir(parents=True)
            (f["raw"] / name / sub / case).write_bytes(b"")
        (f["raw"] / name / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz",
                                                                 "channel_names": {"0": "MRI"}, "numTraining": 1}))
    cfg = build_config({"source": {"dataset": "114"}, "target": {"dataset": "115"}, "device": "cpu"})
    ctx = _env_context(tmp_path, cfg, user_datasets={"source": f["raw"] / "Dataset114_Src",
                                                     "target": f["raw"] / "Dataset115_Tgt"})
    (ctx.out / "nnUNet_raw").mkdir(parents=True)
    with pytest.raises(SDDMError, match=r"Dataset114_Src/dataset\.json and .*Dataset115_Tgt/dataset\.json: the source's "
                                        r"and the target's label maps conflict \(RV: 1 \(source\) vs 3 "
                                        r"\(target\); LV: 3 \(source\) vs 1 \(target\);"):
        run_data(ctx, resume=False)
    (f["raw"] / "Dataset115_Tgt" / "dataset.json").write_text(json.dumps({"labels": maps["Dataset114_Src"],
                                                                         "file_ending": ".nii.gz"}))
    res = run_data(ctx, resume=False)
    assert res["source_training_cases"] == 1 and res["target_test_cases"] == 1
    assert res["structures"] == {"shared": ["RV", "MYO", "LV"], "source_only": [], "target_only": []}
    subset = {"background": 0, "MYO": 2, "LV": 3}
    (f["raw"] / "Dataset115_Tgt" / "dataset.json").write_text(json.dumps({"labels": subset, "file_ending": ".nii.gz"}))
    res = run_data(ctx, resume=False)
    assert res["structures"] == {"shared": ["MYO", "LV"], "source_only": ["RV"], "target_only": []}
    (f["raw"] / "Dataset115_Tgt" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "LA": 1},
                                                                         "file_ending": ".nii.gz"}))
    with pytest.raises(SDDMError, match=r"value 1: RV \(source\) vs LA \(target\)"):
        run_data(ctx, resume=False)


# ----------------------------------------------------------------------------- one prediction path
def test_predict_stage_runs_the_prediction_code_of_nnunetv2_sddm_predict(tmp_path, monkeypatch):
    """The study's predict stage loads, predicts and ensembles through the module behind
    ``nnUNetv2_sddm_predict`` (adaptation.predictor): one model load per segmenter and kind,
    original and adapted folders predicted with probabilities, their ensemble merged; every
    output folder is complete or absent."""
    import nnunet_sddm.adaptation.predictor as shared
    from nnunet_sddm.study import stage_predict

    assert stage_predict.nnunet_prediction is shared
    calls = []

    def load(model_folder, folds, checkpoint="checkpoint_final.pth", **kw):
        calls.append(("load", Path(model_folder).name, list(folds), kw["device"], kw["step_size"]))
        return "predictor"

    def predict(predictor, input_folder, output_folder, save_probabilities=False, **kw):
        calls.append(("predict", Path(input_folder).name, save_probabilities))
        (Path(output_folder) / "c.npz").write_text(str(input_folder))
        return ["c"]

    def ensemble(predictor, folders, output_folder, **kw):
        calls.append(("ensemble", [Path(f).name for f in folders]))
        (Path(output_folder) / "c.nii.gz").write_text("merged")
        return ["c"]

    monkeypatch.setattr(shared, "load_nnunet_predictor", load)
    monkeypatch.setattr(shared, "predict_folder", predict)
    monkeypatch.setattr(shared, "ensemble_folders", ensemble)
    ctx = _env_context(tmp_path, build_config({"segmenters": ["2d"], "nnunet": {"step_size": 0.25}, "postprocess": None,
                                               "alternatives": {"histmatch": False, "fda": False,
                                                                "nnunet_aug": False}}))
    res = stage_predict.run_predict(ctx, resume=False)
    assert set(res) == {"real__2d__seed0", "synthetic__2d__seed0"}
    model = "nnUNetTrainer_SDDM_NoDA_250ep__nnUNetPlans__2d"
    one = [("load", model, ["all"], "cpu", 0.25), ("predict", "imagesTr", True), ("predict", "target", True),
           ("ensemble", ["real__2d__original", "real__2d__adapted"])]
    assert calls[:4] == one and calls[4:][1:] == one[1:3] + [("ensemble", ["synthetic__2d__original",
                                                                           "synthetic__2d__adapted"])]
    for inp in ("original", "adapted", "ensemble"):
        assert (ctx.prediction_dir("real", "2d", inp, seed=0)).is_dir()
    assert not [p for p in (ctx.out / "predictions").rglob(".*")]

    # a failing prediction leaves no output folder (staged, renamed when complete)
    def broken(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(shared, "predict_folder", broken)
    shutil.rmtree(ctx.out / "predictions")
    with pytest.raises(RuntimeError, match="simulated failure"):
        stage_predict.run_predict(ctx, resume=False)
    assert not (ctx.out / "predictions").exists() or not [p for p in (ctx.out / "predictions").rglob("*")
                                                          if p.is_file()]


def _crop_around_heart(folder: Path, side: int = 64) -> None:
    """Crop every image/label pair of a raw dataset in place to ``side x side`` pixels around the
    labelled heart (all slices kept; SimpleITK's region of interest keeps the physical geometry)."""
    import numpy as np
    import SimpleITK as sitk

    for split in ("Tr", "Ts"):
        for lab_path in sorted((folder / f"labels{split}").glob("*.nii.gz")) if (folder / f"labels{split}").is_dir() else []:
            img_path = folder / f"images{split}" / lab_path.name.replace(".nii.gz", "_0000.nii.gz")
            lab, img = sitk.ReadImage(str(lab_path)), sitk.ReadImage(str(img_path))
            arr = sitk.GetArrayFromImage(lab)  # (z, y, x)
            zz, yy, xx = np.nonzero(arr)
            size = lab.GetSize()
            start = [int(np.clip((c.min() + c.max()) // 2 - side // 2, 0, n - side)) for c, n in ((xx, size[0]), (yy, size[1]))]
            roi = dict(size=[side, side, size[2]], index=[start[0], start[1], 0])
            sitk.WriteImage(sitk.RegionOfInterest(lab, **roi), str(lab_path))
            sitk.WriteImage(sitk.RegionOfInterest(img, **roi), str(img_path))
    records = json.loads((folder / "cases.json").read_text())
    for r in records:
        r["shape"] = [r["shape"][0], side, side]
    (folder / "cases.json").write_text(json.dumps(records, indent=2))


@pytest.mark.timeout(900)
def test_smoke_study_on_real_data_crops(tmp_path, monkeypatch, shared_data):
    """Every stage on real cardiac MR: 4 ACDC patients (2 diagnostic groups; one patient per group held
    out as the in-domain test set) as the source, the 3 M&Ms-1 sample subjects (vendors A, B, C) as the
    target, each volume cropped to 64 x 64 pixels around the heart; the smoke settings otherwise."""
    from dataset_converters.acdc import convert_acdc
    from dataset_converters.mnms import convert_mnms
    from nnunet_sddm.study.pipeline import run_study

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / "user" / var).mkdir(parents=True)
        monkeypatch.setenv(var, str(tmp_path / "user" / var))
    root = tmp_path / "ACDC" / "training"
    root.mkdir(parents=True)
    for pid in ("patient001", "patient002", "patient021", "patient022"):
        (root / pid).symlink_to(shared_data / "ACDC" / "training" / pid)
    source = convert_acdc(tmp_path / "ACDC", 81, name="ACDCSmoke", held_out_per_group=1, seed=0)
    mnms = shared_data / "MnMs1-sample"
    target = convert_mnms(mnms, 82, info_csv=mnms / "info.csv")
    for folder in (source, target):
        _crop_around_heart(folder)
    groups = {r["group"] for r in json.loads((source / "cases.json").read_text())}
    assert len(groups) == 2 and len(list((source / "imagesTs").glob("*.nii.gz"))) == 4

    out = tmp_path / "study"
    cfg = smoke_config(out).to_dict()
    cfg["source"] = {"dataset": "81"}
    cfg["target"] = {"dataset": "82", "split": "Tr"}
    # the phantom smoke study covers the augmented segmenter and the figures; here they only cost time
    cfg["alternatives"]["nnunet_aug"] = False
    cfg["figures"] = {"sweep": None, "tsne": False}
    cfg = build_config(cfg)
    res = run_study(cfg, progress=False, log=lambda *_: None)
    state = json.loads((out / STATE_FILE).read_text())["stages"]
    assert all(state[s]["status"] == "done" for s in state) and len(state) == 14
    report = (out / "report.md").read_text()
    # the target table has a number in every row; the in-domain test ran on the 4 held-out ACDC cases
    rows = list(csv.DictReader(open(out / "comparison" / "table.csv")))
    assert len(rows) == len(cfg.approaches()) and all(0.0 <= float(r["DSC"]) <= 1.0 for r in rows)
    in_domain = list(csv.DictReader(open(out / "in_domain" / "in_domain.csv")))
    assert in_domain and all(r["cases"] == "4" for r in in_domain)
    # adapted target images keep the M&Ms geometry exactly
    import SimpleITK as sitk

    for p in sorted((target / "imagesTr").glob("*.nii.gz")):
        a, b = sitk.ReadImage(str(p)), sitk.ReadImage(str(out / "adapted" / "target" / p.name))
        assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
        assert a.GetDirection() == b.GetDirection()
    # the quality reports, with a membership inference (2 training and 2 held-out ACDC patients)
    q = json.loads((out / "quality" / "dg" / "quality.json").read_text())
    assert q["membership"]["members"] > 0 and q["membership"]["folds"] == 2
    assert "## Quality of the synthetic and adapted images" in report and res["report"]
