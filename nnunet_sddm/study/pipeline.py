"""The stages of a study (the paper's experiment, SDDM_METHOD.md sections 1 and 7).

    data -> diffusion -> synthesis (DG) -> adaptation (DA) -> preprocess -> train -> predict
         -> evaluate -> compare -> figures -> report

Study folder layout (``OUT``)::

    study.json                 the complete configuration + software versions
    study_state.json           stage fingerprints, outputs digests, wall times (stages.py)
    study_created.json         nnunet.folders = environment: the paths the study created in your
                               nnU-Net folders (the only ones it ever deletes there)
    nnUNet_raw/ nnUNet_preprocessed/ nnUNet_results/    (nnunet.folders = "study")
    diffusion_model/           the source diffusion model (config.json, ema.safetensors, samples.png ...)
    adapted/target/            the DA-adapted target test images (nnU-Net names, original geometry)
    predictions/<trained>__<segmenter>__<input>/   trained on real|synthetic source, input
                               original|adapted|ensemble (mean probabilities of the two)
    evaluation/<approach>__<segmenter>/            per_case.csv, summary.json, summary.md
    comparison/                Table-1 tables (md/csv/tex), welch.csv, fig_<metric>.png
    figures/                   sweep.png, domain_shift/ (t-SNE), ci_<segmenter>_<metric>.png
    logs/                      output of nnU-Net's commands
    report.md

Everything runs on the project's Python APIs (phantoms, diffusion training, synthesis,
adaptation, sweep, evaluation, comparison, domain shift); nnU-Net's own steps are in
``nnunet_steps``.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from nnunet_sddm.study import nnunet_steps
from nnunet_sddm.study.config import APPROACHES, SEGMENTERS, configurations, diffusion_overrides, \
    sampler_settings, trainer_of
from nnunet_sddm.study.stages import Stage, StageRunner, file_listing, remove_paths
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import write_json
from nnunet_sddm.utilities.nnunet_paths import parse_dataset_folder_name

SURFACE_METRICS = ("ASD", "ASSD", "HD", "HD95")


# ----------------------------------------------------------------------------- context
@dataclass
class StudyContext:
    """Everything the stages share: the configuration, the study folder, resolved datasets."""

    cfg: Dict[str, Any]
    out: Path
    device: str
    progress: bool = True
    log: Callable[[str], None] = print
    user_env: Dict[str, str] = field(default_factory=dict)
    user_datasets: Dict[str, Path] = field(default_factory=dict)  # side -> existing raw dataset folder
    given_model: Optional[Path] = None  # diffusion.model resolved in the user's environment

    # ---- nnU-Net folders
    @property
    def folders(self) -> Dict[str, Path]:
        if self.cfg["nnunet"]["folders"] == "study":
            return {"raw": self.out / "nnUNet_raw", "preprocessed": self.out / "nnUNet_preprocessed",
                    "results": self.out / "nnUNet_results"}
        try:
            return {k: Path(self.user_env[v]) for k, v in (("raw", "nnUNet_raw"),
                                                            ("preprocessed", "nnUNet_preprocessed"),
                                                            ("results", "nnUNet_results"))}
        except KeyError as e:
            raise SDDMError(f"nnunet.folders = 'environment' but {e.args[0]} is not set") from None

    # ---- datasets
    def dataset_name(self, side: str) -> str:
        """``DatasetXXX_Name`` of ``source``, ``target`` or ``synthetic``."""
        if side == "synthetic":
            _, src = parse_dataset_folder_name(self.dataset_name("source"))
            return f"Dataset{self.cfg['synthesis']['id']:03d}_{src}SDDM"
        d = self.cfg[side]
        if d.get("phantom"):
            return f"Dataset{d['id']:03d}_StudyPhantom{d['phantom']}{side.capitalize()}"
        return self.user_datasets[side].name

    def dataset_id(self, side: str) -> int:
        return parse_dataset_folder_name(self.dataset_name(side))[0]

    def raw(self, side: str) -> Path:
        return self.folders["raw"] / self.dataset_name(side)

    @property
    def target_images(self) -> Path:
        return self.raw("target") / f"images{self.cfg['target']['split']}"

    @property
    def target_labels(self) -> Path:
        return self.raw("target") / f"labels{self.cfg['target']['split']}"

    @property
    def model_dir(self) -> Path:
        return self.given_model if self.given_model is not None else self.out / "diffusion_model"

    @property
    def adapted(self) -> Path:
        return self.out / "adapted" / "target"

    def segmenter_models(self) -> List[Tuple[str, str, Path]]:
        """``(segmenter, trained_on, nnU-Net model folder)`` for every segmenter x {real, synthetic}."""
        out = []
        for s in self.cfg["segmenters"]:
            conf = SEGMENTERS[s][0]
            for kind, side in (("real", "source"), ("synthetic", "synthetic")):
                out.append((s, kind, nnunet_steps.model_folder(self.folders["results"], self.dataset_name(side),
                                                               trainer_of(self.cfg, s), conf)))
        return out

    def prediction_dir(self, kind: str, segmenter: str, inp: str) -> Path:
        return self.out / "predictions" / f"{kind}__{segmenter}__{inp}"

    def entries(self) -> List[Tuple[str, str, str, Path]]:
        """``(approach, segmenter, entry name, prediction folder)`` of every table row."""
        out = []
        for approach, (kind, inp) in APPROACHES.items():  # approach-major, as the paper's Table 1
            for s in self.cfg["segmenters"]:
                out.append((approach, s, f"{approach}/{SEGMENTERS[s][2]}", self.prediction_dir(kind, s, inp)))
        return out

    def evaluation_dir(self, approach: str, segmenter: str) -> Path:
        return self.out / "evaluation" / f"{approach.replace('+', '_')}__{segmenter}"

    def nnunet_env(self, training: bool = False) -> Dict[str, str]:
        return nnunet_steps.nnunet_env(self.folders, self.device, training=training, base=self.user_env,
                                       num_processes=self.cfg["nnunet"]["num_processes"])


@contextlib.contextmanager
def nnunet_environment(ctx: StudyContext) -> Iterator[None]:
    """Point this process's ``nnUNet_*`` variables at the study's folders (restored afterwards);
    the project's APIs read them at call time."""
    saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for key, var in (("raw", "nnUNet_raw"), ("preprocessed", "nnUNet_preprocessed"), ("results", "nnUNet_results")):
        ctx.folders[key].mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(ctx.folders[key])
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: The paths the study created in the user's nnU-Net folders (``nnunet.folders = "environment"``),
#: per stage; clean-up deletes nothing else there.
CREATED_FILE = "study_created.json"


def _path_key(path: Path) -> str:
    return os.path.abspath(os.fspath(path))


def _load_created(ctx: StudyContext) -> Dict[str, List[str]]:
    """The record of created paths (``{stage: [absolute path, ...]}``; empty if none yet)."""
    f = ctx.out / CREATED_FILE
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
        created = data["created"]
        if not isinstance(created, dict) or not all(isinstance(v, list) for v in created.values()):
            raise ValueError("'created' must map stage names to lists of paths")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SDDMError(f"{f}: unreadable record of the paths this study created ({e}); the study deletes "
                        f"nothing in your nnU-Net folders without it. Restore it, or remove the study's "
                        f"datasets/models by hand and delete {f}") from None
    return created


def _present(path: Path) -> bool:
    """Exists, or is a (possibly dangling) link."""
    return Path(path).exists() or Path(path).is_symlink()


def created_by_study(ctx: StudyContext, path: Path, created: Optional[Dict[str, List[str]]] = None) -> bool:
    """True if ``path`` is the study's own: under its own nnU-Net folders (``nnunet.folders =
    "study"``), or recorded in ``CREATED_FILE`` (itself or a parent folder) in environment mode.
    ``created``: that record if already read (else it is read here)."""
    key = Path(_path_key(path))
    if ctx.cfg["nnunet"]["folders"] == "study":
        return key.is_relative_to(_path_key(ctx.out))
    created = _load_created(ctx) if created is None else created
    recorded = {Path(p) for paths in created.values() for p in paths}
    return any(k in recorded for k in (key, *key.parents))


def guard_user_outputs(ctx: StudyContext, stage: str, paths: Sequence[Path]) -> None:
    """Before ``stage`` writes ``paths`` into the user's nnU-Net folders (environment mode): refuse
    (``SDDMError`` naming them) if any exists and was not created by this study; otherwise record
    them as created by ``stage`` (atomically, before they are written, so an interrupted stage's
    partial outputs are the study's too). Nothing happens with ``nnunet.folders = "study"``."""
    if ctx.cfg["nnunet"]["folders"] != "environment":
        return
    created = _load_created(ctx)
    foreign = [str(p) for p in paths if _present(p) and not created_by_study(ctx, p, created)]
    if foreign:
        raise SDDMError(f"stage {stage}: {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} exist(s) in "
                        f"your nnU-Net folders and were not made by this study (not in "
                        f"{ctx.out / CREATED_FILE}); the study never replaces or deletes them. Remove them, "
                        f"choose other dataset ids, or use nnunet.folders = 'study'")
    old = [p for p in created.get(stage, []) if _present(Path(p))]
    created[stage] = sorted(set(old) | {_path_key(p) for p in paths})
    write_json({"version": 1, "created": created}, ctx.out / CREATED_FILE)


def clean_study_outputs(ctx: StudyContext, stage: str, paths: Sequence[Path]) -> None:
    """Delete the old ``paths`` of ``stage`` before it runs afresh; only paths this study created
    are ever deleted (anything else in the way is refused by ``guard_user_outputs``)."""
    guard_user_outputs(ctx, stage, paths)
    existing = [Path(p) for p in paths if _present(p)]
    created = _load_created(ctx) if ctx.cfg["nnunet"]["folders"] == "environment" else None
    if any(not created_by_study(ctx, p, created) for p in existing):  # study mode: outside the study folder
        raise SDDMError(f"stage {stage}: refusing to delete {', '.join(str(p) for p in existing)}: not in the "
                        f"study folder {ctx.out}")
    remove_paths(existing)


# ----------------------------------------------------------------------------- stage: data
def _is_study_phantom(folder: Path) -> bool:
    """A phantom dataset this study generated (safe to delete)."""
    try:
        dj = json.loads((folder / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "StudyPhantom" in folder.name and "phantom" in dj


def _data_outputs(ctx: StudyContext) -> List[Path]:
    out = []
    for side in ("source", "target"):
        if ctx.cfg[side].get("phantom") or ctx.cfg["nnunet"]["folders"] == "study":
            out.append(ctx.raw(side))
    return out


def _data_inputs(ctx: StudyContext) -> Any:
    desc = {}
    for side in ("source", "target"):
        d = dict(ctx.cfg[side])
        if not d.get("phantom"):
            d["files"] = file_listing(ctx.user_datasets[side])
        desc[side] = d
    desc["folders"] = ctx.cfg["nnunet"]["folders"]
    return desc


def _data_clean(ctx: StudyContext) -> None:
    """Remove the generated phantom datasets (and their old splits) and, in study mode, the links
    to the user's datasets; only paths the study created (``clean_study_outputs``)."""
    paths: List[Path] = []
    for side in ("source", "target"):
        p = ctx.raw(side)
        if ctx.cfg[side].get("phantom"):
            if p.is_dir() and not p.is_symlink() and not _is_study_phantom(p):
                raise SDDMError(f"stage data: {p} is not a phantom dataset generated by this study; the study "
                                f"never replaces it. Remove it or choose another {side}.id")
            paths += [p, ctx.folders["preprocessed"] / p.name / "splits_final.json"]
        elif ctx.cfg["nnunet"]["folders"] == "study":
            paths.append(p)  # the link to the user's dataset in the study's nnUNet_raw (unlinked, never followed)
    clean_study_outputs(ctx, "data", paths)


def _check_labelled(images: Path, labels: Path, what: str) -> int:
    from nnunet_sddm.data.raw_dataset import list_images, list_labels, load_dataset_json

    if not images.is_dir():
        raise SDDMError(f"{images}: the {what} has no {images.name} folder")
    ending = load_dataset_json(images.parent)["file_ending"]
    imgs, labs = list_images(images, ending), list_labels(labels, ending)
    if not imgs:
        raise SDDMError(f"{images}: no images (CASE_0000{ending})")
    missing = sorted(set(imgs) - set(labs))
    if missing:
        raise SDDMError(f"{labels}: no label for {len(missing)} {what} image(s): {', '.join(missing[:5])}")
    return len(imgs)


def _check_same_labels(source: Path, target: Path) -> None:
    """``SDDMError`` naming both ``dataset.json`` files and the differing labels unless the source
    and the target datasets have the same ``labels`` (predictions carry the source's label values
    and are scored with the target's)."""
    from nnunet_sddm.data.raw_dataset import load_dataset_json

    a, b = load_dataset_json(source).get("labels"), load_dataset_json(target).get("labels")
    if a == b:
        return
    a, b = a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {}
    diff = [f"{k}: {a[k]!r} (source) vs {b[k]!r} (target)" for k in a if k in b and a[k] != b[k]]
    diff += [f"{k}: only in the source ({a[k]!r})" for k in a if k not in b]
    diff += [f"{k}: only in the target ({b[k]!r})" for k in b if k not in a]
    raise SDDMError(f"{source / 'dataset.json'} and {target / 'dataset.json'}: the source and the target "
                    f"datasets have different labels ({'; '.join(diff) or 'not a labels object'}); the study "
                    f"compares structures by label value, so both must use the same label map")


def run_data(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Generate the phantom datasets, or link existing datasets into the study's nnUNet_raw."""
    from dataset_converters.phantoms import generate_phantom_dataset

    result = {}
    for side in ("source", "target"):
        d = ctx.cfg[side]
        final = ctx.raw(side)
        if d.get("phantom"):
            if resume and final.is_dir() and _is_study_phantom(final):
                pass  # generated before the interruption (datasets are published atomically)
            else:
                name = parse_dataset_folder_name(final.name)[1]
                generate_phantom_dataset(d["id"], d["phantom"], d["subjects"], d["test_subjects"], seed=d["seed"],
                                         name=name, overwrite=False, matrix=d["matrix"])
        elif ctx.cfg["nnunet"]["folders"] == "study":
            src = ctx.user_datasets[side]
            if final.is_symlink() or final.exists():
                remove_paths([final])
            final.symlink_to(src.resolve(), target_is_directory=True)
            splits = Path(ctx.user_env.get("nnUNet_preprocessed", "")) / src.name / "splits_final.json"
            if ctx.user_env.get("nnUNet_preprocessed") and splits.is_file():
                dst = ctx.folders["preprocessed"] / src.name / "splits_final.json"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(splits, dst)
        result[side] = final.name
    _check_same_labels(ctx.raw("source"), ctx.raw("target"))
    n_src = _check_labelled(ctx.raw("source") / "imagesTr", ctx.raw("source") / "labelsTr", "source dataset")
    n_tgt = _check_labelled(ctx.target_images, ctx.target_labels, "target test set")
    syn = ctx.folders["raw"] / ctx.dataset_name("synthetic")
    from nnunet_sddm.utilities.nnunet_paths import datasets_with_id

    clash = [p for p in datasets_with_id(ctx.cfg["synthesis"]["id"], ctx.folders["raw"]) if p.name != syn.name]
    if clash or ctx.cfg["synthesis"]["id"] in (ctx.dataset_id("source"), ctx.dataset_id("target")):
        raise SDDMError(f"synthesis.id {ctx.cfg['synthesis']['id']} is taken ({[p.name for p in clash] or 'source/target'}); "
                        f"choose another id")
    result.update({"source_training_cases": n_src, "target_test_cases": n_tgt})
    return result


# ----------------------------------------------------------------------------- stage: diffusion
def run_diffusion(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Train the source-domain diffusion model (or check a given one)."""
    from nnunet_sddm.diffusion.model_folder import load_config

    dif = ctx.cfg["diffusion"]
    if dif["model"]:
        cfg = load_config(ctx.model_dir)
        return {"model_dir": str(ctx.model_dir), "trained_by_study": False, "preset": cfg.get("preset")}
    from nnunet_sddm.diffusion.trainer import train_model

    resume = resume and (ctx.model_dir / "training_state.pt").is_file()
    model_dir, status = train_model(ctx.dataset_name("source"), preset=dif["preset"], overrides=diffusion_overrides(ctx.cfg),
                                    model_dir=ctx.model_dir, resume=resume, overwrite=not resume,
                                    device=ctx.device, progress=ctx.progress)
    if status != "finished":
        raise KeyboardInterrupt
    cfg = load_config(model_dir)
    last = _last_log_row(model_dir / "log.csv")
    return {"model_dir": str(model_dir), "trained_by_study": True, "preset": cfg.get("preset"),
            "iterations": cfg["training"]["iterations"], "batch_size": cfg["training"]["batch_size"],
            "final_loss": last.get("loss"), "training_seconds": last.get("elapsed_s")}


def _last_log_row(path: Path) -> Dict[str, float]:
    import csv

    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items()} if rows else {}


def _diffusion_outputs(ctx: StudyContext) -> List[Path]:
    return [] if ctx.cfg["diffusion"]["model"] else [ctx.model_dir]


def _diffusion_inputs(ctx: StudyContext) -> Any:
    dif = ctx.cfg["diffusion"]
    if dif["model"]:
        return {"model": str(ctx.model_dir), "files": file_listing(ctx.model_dir)}
    return {"preset": dif["preset"], "overrides": diffusion_overrides(ctx.cfg)}


# ----------------------------------------------------------------------------- stages: DG and DA
def _sampler_inputs(ctx: StudyContext) -> Any:
    s = ctx.cfg["sampler"]
    return {"settings": sampler_settings(ctx.cfg).to_dict(), "amp": s["amp"],
            "batch_size": s["batch_size"] if s["reference_behaviour"] else None}


def run_synthesis(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """DG: the source training set adapted by the diffusion model, with the original labels."""
    from nnunet_sddm.adaptation.synthesize import synthesize_dataset

    s = ctx.cfg["sampler"]
    name = parse_dataset_folder_name(ctx.dataset_name("synthetic"))[1]
    folder = synthesize_dataset(ctx.dataset_name("source"), ctx.cfg["synthesis"]["id"], ctx.model_dir,
                                sampler_settings(ctx.cfg), name=name, copies=ctx.cfg["synthesis"]["copies"],
                                overwrite=False, batch_size=s["batch_size"], device=ctx.device, amp=s["amp"],
                                progress=ctx.progress)
    return {"dataset": folder.name, "cases": len(list((folder / "imagesTr").iterdir()))}


def _synthesis_clean(ctx: StudyContext) -> None:
    name = ctx.dataset_name("synthetic")
    paths = [ctx.folders["raw"] / name, ctx.folders["raw"] / f".{name}.partial", ctx.folders["preprocessed"] / name]
    clean_study_outputs(ctx, "synthesis", paths)


def run_adaptation(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """DA: the target test images adapted to the source domain."""
    from nnunet_sddm.adaptation.folders import adapt_folder

    s = ctx.cfg["sampler"]
    adapt_folder(ctx.target_images, ctx.adapted, ctx.model_dir, sampler_settings(ctx.cfg), batch_size=s["batch_size"],
                 device=ctx.device, amp=s["amp"], overwrite=False, progress=ctx.progress)
    return {"folder": str(ctx.adapted), "images": len(list(ctx.adapted.glob("*_0000.*")))}


# ----------------------------------------------------------------------------- stages: nnU-Net
def _preprocess_outputs(ctx: StudyContext) -> List[Path]:
    out = []
    for side in ("source", "synthetic"):
        base = ctx.folders["preprocessed"] / ctx.dataset_name(side)
        out += [base / "nnUNetPlans.json", base / "dataset.json", base / "dataset_fingerprint.json"]
        out += [base / f"nnUNetPlans_{c}" for c in configurations(ctx.cfg)]
    return out


def run_preprocess(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """nnU-Net planning and preprocessing of the real and the synthetic source datasets."""
    ids = [ctx.dataset_id("source"), ctx.dataset_id("synthetic")]
    seconds = nnunet_steps.plan_and_preprocess(ids, configurations(ctx.cfg), ctx.nnunet_env(),
                                               ctx.cfg["nnunet"]["num_processes"], ctx.out / "logs" / "preprocess.log")
    return {"datasets": ids, "configurations": configurations(ctx.cfg), "seconds": round(seconds, 1)}


def _train_outputs(ctx: StudyContext) -> List[Path]:
    return [nnunet_steps.fold_folder(m, ctx.cfg["fold"]) / "checkpoint_final.pth" for _, _, m in ctx.segmenter_models()]


def _train_clean(ctx: StudyContext) -> None:
    """Remove the study's old models; with a fold number, also claim the splits file nnU-Net
    writes when a dataset has none (an existing one is the user's: used, never deleted)."""
    clean_study_outputs(ctx, "train", [m for _, _, m in ctx.segmenter_models()])
    if ctx.cfg["fold"] != "all":
        splits = [ctx.folders["preprocessed"] / ctx.dataset_name(side) / "splits_final.json"
                  for side in ("source", "synthetic")]
        guard_user_outputs(ctx, "train_splits", [p for p in splits if not p.exists()])


def _preprocess_clean(ctx: StudyContext) -> None:
    clean_study_outputs(ctx, "preprocess", _preprocess_outputs(ctx))


def run_train(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Train every segmenter on the real and on the synthetic source (nnUNetv2_train)."""
    fold = ctx.cfg["fold"]
    result = {}
    for seg, kind, mdir in ctx.segmenter_models():
        key = f"{kind}__{seg}"
        if resume and nnunet_steps.is_trained(mdir, fold):
            ctx.log(f"[study]   {key}: trained before the interruption - kept")
            continue
        side = "source" if kind == "real" else "synthetic"
        ctx.log(f"[study]   training {SEGMENTERS[seg][2]} on the {kind} source ({trainer_of(ctx.cfg, seg)}, "
                f"{SEGMENTERS[seg][0]}, fold {fold})")
        cont = resume and (nnunet_steps.fold_folder(mdir, fold) / "checkpoint_latest.pth").is_file()
        seconds = nnunet_steps.train(ctx.dataset_id(side), SEGMENTERS[seg][0], fold, trainer_of(ctx.cfg, seg),
                                     ctx.device, ctx.nnunet_env(training=True), ctx.out / "logs" / f"train_{key}.log",
                                     resume=cont)
        result[key] = {"model": str(mdir), "trainer": trainer_of(ctx.cfg, seg), "seconds": round(seconds, 1)}
    return result


def run_predict(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Segment the target test images, original and adapted, with every trained model, and the
    ensemble of both (mean class probabilities)."""
    import time

    fold = ctx.cfg["fold"]
    result = {}
    for seg, kind, mdir in ctx.segmenter_models():
        dirs = {inp: ctx.prediction_dir(kind, seg, inp) for inp in ("original", "adapted", "ensemble")}
        if resume and all(d.is_dir() for d in dirs.values()):
            continue
        t0 = time.perf_counter()
        predictor = nnunet_steps.load_predictor(mdir, fold, ctx.device, ctx.cfg["nnunet"]["step_size"])
        for inp, images in (("original", ctx.target_images), ("adapted", ctx.adapted)):
            if not (resume and dirs[inp].is_dir()):
                nnunet_steps.predict_folder(predictor, images, dirs[inp], save_probabilities=True)
        cases = nnunet_steps.ensemble_folders(predictor, [dirs["original"], dirs["adapted"]], dirs["ensemble"])
        result[f"{kind}__{seg}"] = {"cases": len(cases), "seconds": round(time.perf_counter() - t0, 1)}
        ctx.log(f"[study]   predicted with {kind}__{seg}: {len(cases)} cases x 3 inputs")
    return result


# ----------------------------------------------------------------------------- evaluation
def run_evaluate(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """The paper's metrics (DSC, IoU, ASD, ASSD, HD, HD95 per structure) of every table row."""
    from nnunet_sddm.evaluation.evaluate import evaluate_folders

    ev = ctx.cfg["evaluation"]
    result = {}
    for approach, seg, name, pred in ctx.entries():
        out = ctx.evaluation_dir(approach, seg)
        if resume and (out / "per_case.csv").is_file():
            continue
        res = evaluate_folders(ctx.target_labels, pred, dataset_json=ctx.raw("target") / "dataset.json",
                               num_processes=ev["num_processes"], empty_policy=ev["empty_policy"], out_dir=out,
                               overwrite=True, progress=False)
        pooled = res.summary["structures"]["all"]["metrics"]
        result[name] = {m: (d["mean"] if d["mean"] == d["mean"] else None) for m, d in pooled.items()}
    return result


def run_compare(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Welch's t-tests of every approach against its segmenter's baseline; Table 1; CI bars."""
    from nnunet_sddm.evaluation.compare import compare_results

    entries = ctx.entries()
    baselines = [(name, ctx.evaluation_dir(a, s)) for a, s, name, _ in entries if a == "Baseline"]
    candidates = [(name, ctx.evaluation_dir(a, s)) for a, s, name, _ in entries if a != "Baseline"]
    out = compare_results(baselines, candidates, out_dir=ctx.out / "comparison",
                          alpha=float(ctx.cfg["evaluation"]["alpha"]), overwrite=True)
    return {"improvements": surface_verdicts(out["welch"])}


def surface_verdicts(welch_rows: List[dict]) -> Dict[str, Dict[str, str]]:
    """For each candidate, per metric (all structures pooled): ``better (p=...)``,
    ``worse (p=...)`` or ``n.s. (p=...)`` against its baseline at the study's alpha."""
    out: Dict[str, Dict[str, str]] = {}
    for r in welch_rows:
        if r["structure"] != "all":
            continue
        p = r["p"]
        if r["significant"]:
            verdict = "better" if r["candidate_better"] else "worse"
        else:
            verdict = "n.s. " + ("(better mean)" if r["candidate_better"] else "(worse mean)")
        out.setdefault(r["candidate"], {})[r["metric"]] = f"{verdict}, p={p:.2g}" if p == p else verdict
    return out


def run_figures(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """Sweep grid of one target slice, t-SNE of real/target/adapted, per-segmenter CI bar charts."""
    from nnunet_sddm.study.figures import ci_bars, domain_shift_figure, sweep_figure

    fig = ctx.out / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {}
    if ctx.cfg["figures"]["sweep"]:
        result["sweep"] = sweep_figure(ctx, fig / "sweep.png")
    if ctx.cfg["figures"]["tsne"]:
        result["domain_shift"] = domain_shift_figure(ctx, fig / "domain_shift")
    result["ci_bars"] = ci_bars(ctx, fig)
    return result


def run_report(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    from nnunet_sddm.study.report import write_report

    return {"report": str(write_report(ctx))}


# ----------------------------------------------------------------------------- assembly
def build_stages(ctx: StudyContext) -> List[Stage]:
    segs = lambda c: {"segmenters": c.cfg["segmenters"], "trainers": {s: trainer_of(c.cfg, s) for s in c.cfg["segmenters"]},  # noqa: E731
                      "fold": c.cfg["fold"]}
    return [
        Stage("data", "source and target datasets", run_data, _data_inputs, _data_outputs, (), _data_clean),
        Stage("diffusion", "source-domain diffusion model", run_diffusion, _diffusion_inputs, _diffusion_outputs,
              ("data",)),
        Stage("synthesis", "DG: synthetic source training set", run_synthesis,
              lambda c: {"sampler": _sampler_inputs(c), "synthesis": c.cfg["synthesis"]},
              lambda c: [c.folders["raw"] / c.dataset_name("synthetic")], ("data", "diffusion"), _synthesis_clean),
        Stage("adaptation", "DA: adapted target test images", run_adaptation,
              lambda c: {"sampler": _sampler_inputs(c), "split": c.cfg["target"]["split"]},
              lambda c: [c.adapted], ("data", "diffusion")),
        Stage("preprocess", "nnU-Net plan + preprocess (real and synthetic source)", run_preprocess,
              lambda c: {"configurations": configurations(c.cfg)}, _preprocess_outputs, ("data", "synthesis"),
              _preprocess_clean),
        Stage("train", "train every segmenter on real and synthetic source", run_train, segs, _train_outputs,
              ("preprocess",), _train_clean),
        Stage("predict", "predict the target test set (original, adapted, ensemble)", run_predict,
              lambda c: {**segs(c), "step_size": c.cfg["nnunet"]["step_size"]},
              lambda c: [c.out / "predictions"], ("data", "adaptation", "train")),
        Stage("evaluate", "DSC, IoU, ASD, ASSD, HD, HD95 of every approach x model", run_evaluate,
              lambda c: {"evaluation": {k: v for k, v in c.cfg["evaluation"].items() if k != "num_processes"}},
              lambda c: [c.out / "evaluation"], ("data", "predict")),
        Stage("compare", "Welch's t-tests against each baseline, Table 1", run_compare,
              lambda c: {"alpha": c.cfg["evaluation"]["alpha"]}, lambda c: [c.out / "comparison"], ("evaluate",)),
        Stage("figures", "sweep grid, t-SNE, CI bar charts", run_figures, lambda c: {"figures": c.cfg["figures"]},
              lambda c: [c.out / "figures"], ("data", "diffusion", "adaptation", "compare")),
        Stage("report", "report.md", run_report, lambda c: {"config": c.cfg},
              lambda c: [c.out / "report.md"],
              ("data", "diffusion", "synthesis", "adaptation", "preprocess", "train", "predict", "evaluate",
               "compare", "figures")),
    ]


STAGE_NAMES = ("data", "diffusion", "synthesis", "adaptation", "preprocess", "train", "predict", "evaluate",
               "compare", "figures", "report")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` if available else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SDDMError("device cuda: no CUDA device is available (use --device cpu)")
    return device


def software_versions() -> Dict[str, str]:
    """Versions of Python, the platform and the packages a study depends on."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("nnunet-sddm", "nnunetv2", "torch", "numpy", "scipy", "SimpleITK", "nibabel", "MedPy",
                "scikit-learn", "dynamic-network-architectures", "batchgenerators"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import subprocess

        repo = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            out["nnunet-sddm git"] = rev.stdout.strip() + (" (modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def hardware() -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def make_context(cfg: Dict[str, Any], progress: bool = True, log: Callable[[str], None] = print) -> StudyContext:
    """Resolve the device and the user's existing datasets (in the user's ``$nnUNet_raw``)."""
    from nnunet_sddm.utilities.nnunet_paths import find_raw_dataset

    ctx = StudyContext(cfg=cfg, out=Path(cfg["output"]).resolve(), device=resolve_device(cfg["device"]),
                       progress=progress, log=log, user_env=dict(os.environ))
    for side in ("source", "target"):
        if cfg[side].get("dataset") is not None:
            ctx.user_datasets[side] = find_raw_dataset(cfg[side]["dataset"])
    if cfg["diffusion"]["model"]:
        from nnunet_sddm.diffusion.model_folder import resolve_model_dir

        ctx.given_model = resolve_model_dir(cfg["diffusion"]["model"]).resolve()
    if cfg["source"].get("dataset") is not None and cfg["target"].get("dataset") is not None and \
            ctx.user_datasets["source"].resolve() == ctx.user_datasets["target"].resolve():
        raise SDDMError(f"source and target are the same dataset ({ctx.user_datasets['source']})")
    return ctx


def run_study(cfg: Dict[str, Any], from_stage: Optional[str] = None, until: Optional[str] = None,
              progress: bool = True, log: Callable[[str], None] = print,
              on_stage_start: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Run (or resume) the study described by the validated configuration ``cfg``.

    from_stage: re-run from this stage on; until: stop after this stage; on_stage_start(name):
    called before a stage runs (a hook for tests). Returns ``{stage: result}``.
    """
    import nnunet_sddm

    ctx = make_context(cfg, progress=progress, log=log)
    ctx.out.mkdir(parents=True, exist_ok=True)
    record_path = ctx.out / "study.json"
    if record_path.is_file():
        try:
            old = json.loads(record_path.read_text()).get("config", {})
        except json.JSONDecodeError:
            old = {}
        if old and old.get("output") and Path(old["output"]).resolve() != ctx.out:
            log(f"[study] note: {record_path} was written for output {old['output']}")
    write_json({"package_version": nnunet_sddm.__version__, "config": cfg, "device": ctx.device,
                "software": software_versions(), "hardware": hardware()}, record_path)
    runner = StageRunner(build_stages(ctx), ctx.out, log=log, on_stage_start=on_stage_start)
    ctx.runner = runner  # the report reads stage times from it
    with nnunet_environment(ctx):
        return runner.run(ctx, from_stage=from_stage, until=until)
