"""STUDY.json: the settings of a study, their defaults, the ``--quick`` preset, and the typed,
frozen configuration (:class:`StudyConfig`) they are parsed into once, before anything runs.

A study configuration is a JSON object; every key is optional (defaults below). Example::

    {
      "output": "sddm_study",
      "source": {"dataset": "27"},                        # an existing nnU-Net raw dataset
      "target": {"dataset": "114", "split": "Tr"},        # its labelled images are the test set
      "segmenters": ["2d", "3d_fullres", "vanilla"],
      "epochs": 250,
      "diffusion": {"preset": "paper128", "iterations": 120000},
      "sampler": {"D": 2, "N": 25, "tau": 6, "steps": 100, "seed": 0},
      "device": "cuda"
    }

Datasets (``source``, ``target``) are either an existing raw dataset (``"dataset"``: id,
``DatasetXXX_Name`` or folder, looked up in the user's ``$nnUNet_raw``) or phantoms generated
by the study (``"phantom"``: vendor letter, with ``subjects``, ``matrix``, ``seed``, ``id``).
The target's test images are ``images<split>`` with labels ``labels<split>`` (``split`` ``Tr``
or ``Ts``). The source's ``imagesTr``/``labelsTr`` train the diffusion model and the segmenters.

nnU-Net folders (``nnunet.folders``): ``"study"`` (default) gives the study its own
``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` under the output folder (existing
source/target datasets are linked into it, never modified), so a study never touches or clashes
with the user's datasets and results; ``"environment"`` uses the user's ``$nnUNet_*`` folders
(the generated datasets' ids must then be free there).

Segmenters: ``2d`` (nnU-Net 2D), ``3d_fullres`` (nnU-Net 3D) and ``vanilla`` (the paper's
Appendix-A 2D U-Net), trained by the plugin's no-augmentation trainers for ``epochs`` epochs
(``nnUNetTrainer_SDDM_NoDA_<N>ep`` / ``nnUNetTrainer_SDDM_VanillaUNet_<N>ep``; with
``iterations_per_epoch`` M: ``..._<N>ep_<M>it``; ``"quick"`` = the ``_Quick`` test trainers, whose
fixed schedule ignores ``iterations_per_epoch``)
unless ``trainers`` names others.

The generative rows (``generative``, off by default; ``config_tree.GenerativeConfig``) add
``UDA-syn`` and ``Gen-only`` to the table: with ``rows`` false the section is only type-checked,
and nothing of it reaches a stage fingerprint.

Parsing (:func:`build_config`) validates every key (``SDDMError`` naming the file or layer and the
key) and builds the typed tree (``config_tree``) from the library's own validated settings objects
(``SamplerSettings``, ``EmptyPolicy``); the stages read its typed fields. Indexing a
:class:`StudyConfig` (``cfg["sampler"]``) gives (a copy of) the JSON value of a key, as written to
``study.json`` and hashed into the stage fingerprints.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Container, Dict, Mapping, Optional

from nnunet_sddm.data.phantoms import VENDORS
from nnunet_sddm.diffusion.presets import PRESETS, apply_overrides, preset_config, validate_config
from nnunet_sddm.evaluation.metrics import EmptyPolicy
from nnunet_sddm.sampling.guided import SamplerSettings
from nnunet_sddm.data.raw_dataset import CARDIAC_LABELS
from nnunet_sddm.adaptation.synthesize_labels import LABEL_SOURCES
from nnunet_sddm.study.config_tree import (APPROACHES, POSTPROCESSING, PSEUDO_LABELLERS, SEGMENTERS, TESTS,
                                           AlternativesConfig, DatasetConfig, DiffusionConfig, EvaluationConfig,
                                           FiguresConfig, GenerativeConfig, NnunetConfig, SamplerConfig, StudyConfig,
                                           SweepConfig, SynthesisConfig, diffusion_overrides, read_only, trainer_name,
                                           trainer_of)
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import read_json

__all__ = ["APPROACHES", "DEFAULTS", "QUICK", "SEGMENTERS", "StudyConfig", "build_config", "parse_config",
           "read_config_file", "trainer_of"]

DEFAULTS: Dict[str, Any] = {
    "name": "sddm-study",
    "output": "sddm_study",
    "source": {"phantom": "A", "subjects": 20, "test_subjects": 0, "matrix": None, "seed": 0, "id": 970,
               "labels": None},
    "target": {"phantom": "B", "subjects": 10, "test_subjects": 0, "matrix": None, "seed": 1, "id": 971,
               "labels": None, "split": "Tr"},
    "segmenters": ["2d", "3d_fullres", "vanilla"],
    "epochs": 250,
    "iterations_per_epoch": None,
    "trainers": {},
    "fold": "all",
    "diffusion": {"preset": "tiny", "iterations": None, "batch_size": None, "set": {}, "model": None},
    "sampler": {"D": 2, "N": 25, "tau": 6.0, "steps": 100, "seed": 0, "batch_size": None, "amp": None,
                "reference_behaviour": False, "guidance": "gradient"},
    "synthesis": {"id": 972, "copies": 1},
    "device": "auto",
    "nnunet": {"folders": "study", "num_processes": 2, "step_size": 0.5, "spacing": None, "batch_size": None},
    "alternatives": {"histmatch": True, "fda": True, "nnunet_aug": True, "fda_beta": 0.01},
    "postprocess": "lcc",
    "evaluation": {"alpha": 0.01, "empty_policy": "diagonal", "num_processes": None, "test": "wilcoxon"},
    "figures": {"sweep": {"D": [2, 4, 8], "N": [10, 25, 50], "tau": [0.0, 6.0, 20.0]}, "tsne": True},
    "generative": {"rows": False, "pseudo_id": 973, "generated_id": 974, "merged_id": 975, "copies": 1,
                   "labels": "deformed", "guidance_scale": 1.0, "pseudo_labeller": "baseline",
                   "diffusion": {"preset": None, "iterations": None, "batch_size": None, "set": {}}},
    "seed": 0,
    "repeats": 1,
}

#: ``--quick``: the embedded default on a 2-core CPU, calibrated from the baselines alone
#: (``benchmarks/baseline_calibration.py``; docs/benchmarks.md): phantoms A -> B at 64 x 64 with 5
#: held-out source subjects (the in-domain test), the 2D nnU-Net only (the 3D nnU-Net and the 2D
#: U-Net cost about three times as much per iteration) at batch size 4 (nnU-Net plans 8), 1 epoch of
#: 400 iterations: the cheapest setting measured whose baseline reaches in-domain Dice >= 0.85, and
#: vendor B the one target whose baseline lands in [0.3, 0.75]. The tiny diffusion model gets the
#: iterations the 20-minute budget leaves (set from the stage times, not from the method's results).
QUICK: Dict[str, Any] = {
    "name": "sddm-quick",
    "output": "sddm_quick",
    "source": {"phantom": "A", "subjects": 8, "test_subjects": 5, "matrix": 64, "seed": 0},
    "target": {"phantom": "B", "subjects": 5, "matrix": 64, "seed": 1, "split": "Tr"},
    "segmenters": ["2d"],
    "epochs": 1,
    "iterations_per_epoch": 400,
    "nnunet": {"batch_size": 4},
    "diffusion": {"preset": "tiny", "iterations": 250},
    "sampler": {"D": 2, "N": 12, "tau": 6.0, "steps": 50},
    "device": "cpu",
    "figures": {"sweep": {"D": [2, 4], "N": [6, 12], "tau": [0.0, 6.0]}},
}


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` with ``update`` applied recursively (dicts merged, everything else replaced)."""
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k not in ("set", "trainers"):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_config_file(path: os.PathLike) -> Dict[str, Any]:
    """The JSON object of a STUDY.json (``SDDMError`` naming the file if unreadable)."""
    p = Path(path)
    if not p.is_file():
        raise SDDMError(f"{p}: study configuration not found")
    cfg = read_json(p)
    if not isinstance(cfg, dict):
        raise SDDMError(f"{p}: expected a JSON object at the top level")
    return cfg


def _check_keys(given: Mapping[str, Any], allowed: Mapping[str, Any], where: str, origin: str) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise SDDMError(f"{origin}: unknown key(s) {', '.join(repr(k) for k in unknown)} in {where}; "
                        f"allowed: {', '.join(sorted(allowed))}")


def _check_unknown(cfg: Mapping[str, Any], origin: str) -> None:
    _check_keys(cfg, DEFAULTS, "the study configuration", origin)
    for section in ("diffusion", "sampler", "synthesis", "nnunet", "evaluation", "figures", "alternatives",
                    "generative"):
        if section in cfg:
            if not isinstance(cfg[section], Mapping):
                raise SDDMError(f"{origin}: {section!r} must be an object")
            _check_keys(cfg[section], DEFAULTS[section], f"'{section}'", origin)
    gen_dif = cfg.get("generative", {}).get("diffusion")
    if gen_dif is not None:
        if not isinstance(gen_dif, Mapping):
            raise SDDMError(f"{origin}: 'generative.diffusion' must be an object")
        _check_keys(gen_dif, DEFAULTS["generative"]["diffusion"], "'generative.diffusion'", origin)
    for side in ("source", "target"):
        if side in cfg:
            if not isinstance(cfg[side], Mapping):
                raise SDDMError(f"{origin}: {side!r} must be an object")
            allowed = dict(DEFAULTS["target"], dataset=None)
            _check_keys(cfg[side], allowed, f"'{side}'", origin)


# ----------------------------------------------------------------------------- layers and parsing
def build_config(file_config: Optional[Mapping[str, Any]] = None, overrides: Optional[Mapping[str, Any]] = None,
                 quick: bool = False, origin: str = "study configuration") -> StudyConfig:
    """Defaults <- ``--quick`` preset <- file <- command-line ``overrides``, parsed once into the
    typed :class:`StudyConfig`.

    A dataset given as ``{"dataset": ...}`` replaces the phantom settings of that side.
    ``SDDMError`` naming ``origin`` and the key for anything invalid.
    """
    cfg = copy.deepcopy(DEFAULTS)
    layers = ([("--quick", QUICK)] if quick else []) + [(origin, file_config or {}), ("command line", overrides or {})]
    for name, layer in layers:
        _check_unknown(layer, name)
        for side in ("source", "target"):
            if "dataset" in layer.get(side, {}) and layer[side]["dataset"] is not None:
                cfg[side]["phantom"] = None
            if layer.get(side, {}).get("phantom"):
                cfg[side]["dataset"] = None
        cfg = deep_merge(cfg, layer)
    return parse_config(cfg, origin)


def _is_name_in(value: Any, names: Container[str]) -> bool:
    """``value`` is a string and one of ``names`` (a JSON list or object is not: it cannot be a name,
    and it is unhashable for a dict or set of names)."""
    return isinstance(value, str) and value in names


class _Check:
    """Typed reads of a JSON object; ``SDDMError`` naming ``origin`` and ``where.key`` otherwise."""

    def __init__(self, origin: str):
        self.origin = origin

    def fail(self, message: str) -> SDDMError:
        return SDDMError(f"{self.origin}: {message}")

    def int(self, d: Mapping[str, Any], key: str, where: str, lo: int = 0, allow_none: bool = False) -> Optional[int]:
        v = d.get(key)
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise self.fail(f"{where}.{key} must be an integer >= {lo}, got {v!r}")
        return v

    def number(self, d: Mapping[str, Any], key: str, where: str) -> float:
        """The finite JSON number ``d[key]``, as given (an int stays an int: JSON and fingerprints)."""
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise self.fail(f"{where}.{key} must be a number, got {v!r}")
        return v

    def bool(self, d: Mapping[str, Any], key: str, where: str) -> bool:
        if not isinstance(d.get(key), bool):
            raise self.fail(f"{where}.{key} must be true or false (a JSON boolean), got {d.get(key)!r}")
        return d[key]


def _parse_side(side: str, d: Dict[str, Any], ck: _Check) -> DatasetConfig:
    """Check ``d`` (normalised in place: vendor letter upper case) and type it."""
    d.setdefault("dataset", None)
    if (d.get("phantom") is None) == (d.get("dataset") is None):
        raise ck.fail(f"{side} needs exactly one of 'phantom' (a vendor letter) or 'dataset'")
    if d.get("phantom") is not None:
        if str(d["phantom"]).upper() not in VENDORS:
            raise ck.fail(f"{side}.phantom {d['phantom']!r} is not a phantom vendor ({', '.join(VENDORS)})")
        d["phantom"] = str(d["phantom"]).upper()
        ck.int(d, "subjects", side, lo=1)
        ck.int(d, "test_subjects", side)
        ck.int(d, "seed", side)
        ck.int(d, "matrix", side, lo=32, allow_none=True)
        ck.int(d, "id", side, lo=1)
        if d["id"] > 999:
            raise ck.fail(f"{side}.id must be in 1..999, got {d['id']}")
        labels = d.get("labels")
        if labels is not None:
            known = [k for k in CARDIAC_LABELS if k != "background"]
            if not isinstance(labels, list) or not labels or any(k not in known for k in labels) \
                    or len(set(labels)) != len(labels):
                raise ck.fail(f"{side}.labels must be null (all) or a list of distinct structures of "
                              f"{', '.join(known)}, got {labels!r}")
    elif d.get("labels") is not None:
        raise ck.fail(f"{side}.labels applies to phantoms only (an existing dataset's labels are its "
                      f"dataset.json's)")
    if side == "target" and d.get("split") not in ("Tr", "Ts"):
        raise ck.fail(f"target.split must be 'Tr' or 'Ts', got {d.get('split')!r}")
    return DatasetConfig(phantom=d["phantom"], dataset=d["dataset"], subjects=d.get("subjects"),
                         test_subjects=d.get("test_subjects"), matrix=d.get("matrix"), seed=d.get("seed"),
                         id=d.get("id"), split=d.get("split"),
                         labels=tuple(d["labels"]) if d.get("labels") else None)


def _parse_generative(cfg: Mapping[str, Any], ck: _Check, ids: Mapping[str, int],
                      nnunet_aug: bool) -> GenerativeConfig:
    """The ``generative`` section: every key checked; with ``rows`` also its dataset ids against
    ``ids`` (``{"source.id": ..}`` of the study's other datasets), the conditional diffusion
    model's settings against its preset and the ``aug`` pseudo-labeller against ``nnunet_aug``
    (whether the study trains that segmenter); off: nothing of it is used, nothing more is checked."""
    gen = cfg["generative"]
    rows = ck.bool(gen, "rows", "generative")
    keys = ("pseudo_id", "generated_id", "merged_id")
    for k in keys:
        ck.int(gen, k, "generative", lo=1)
        if gen[k] > 999:
            raise ck.fail(f"generative.{k} must be in 1..999, got {gen[k]}")
    copies = ck.int(gen, "copies", "generative", lo=1)
    if gen["labels"] not in LABEL_SOURCES:
        raise ck.fail(f"generative.labels must be one of {', '.join(LABEL_SOURCES)}, got {gen['labels']!r}")
    if not _is_name_in(gen["pseudo_labeller"], PSEUDO_LABELLERS):
        raise ck.fail(f"generative.pseudo_labeller must be one of {', '.join(PSEUDO_LABELLERS)}, "
                      f"got {gen['pseudo_labeller']!r}")
    w = ck.number(gen, "guidance_scale", "generative")
    if w < 0:
        raise ck.fail(f"generative.guidance_scale must be >= 0 (1: no guidance), got {w!r}")
    dif, study_dif = gen["diffusion"], cfg["diffusion"]
    ck.int(dif, "iterations", "generative.diffusion", lo=1, allow_none=True)
    ck.int(dif, "batch_size", "generative.diffusion", lo=1, allow_none=True)
    if not isinstance(dif["set"], Mapping):
        raise ck.fail("generative.diffusion.set must map SECTION.KEY to values")
    preset = dif["preset"] if dif["preset"] is not None else study_dif["preset"]
    seed = cfg["seed"] if type(cfg["seed"]) is int else 0  # checked by the caller
    inherited = study_dif["set"] if dif["preset"] is None and isinstance(study_dif["set"], Mapping) else {}
    set_ = {**inherited, **dif["set"], "model.condition": "labels"}
    overrides = diffusion_overrides(set_, dif["iterations"] if dif["iterations"] is not None else
                                    study_dif["iterations"],
                                    dif["batch_size"] if dif["batch_size"] is not None else study_dif["batch_size"],
                                    seed)
    if rows:
        if not _is_name_in(preset, PRESETS):
            raise ck.fail(f"generative.diffusion.preset {preset!r} does not exist; choose one of "
                          f"{', '.join(sorted(PRESETS))}")
        try:
            model_cfg = apply_overrides(preset_config(preset), overrides)
            validate_config(model_cfg)
        except SDDMError as e:
            raise ck.fail(f"generative.diffusion: {e}") from None
        if w != 1 and not float(model_cfg["training"].get("label_dropout") or 0.0):
            raise ck.fail(f"generative.guidance_scale {w!r} needs a model trained with label dropout "
                          f"(generative.diffusion training.label_dropout is 0): use guidance scale 1 or a dropout > 0")
        if gen["pseudo_labeller"] == "aug" and not nnunet_aug:
            raise ck.fail("generative.pseudo_labeller 'aug' is the nnU-Net aug segmenter, which this study does not "
                          "train (alternatives.nnunet_aug is false, in STUDY.json or by --method without nnunet_aug): "
                          "switch nnunet_aug on or use 'baseline'")
        seen = {v: k for k, v in ids.items()}
        for k in keys:
            if gen[k] in seen:
                raise ck.fail(f"generative.{k} and {seen[gen[k]]} are both dataset id {gen[k]}; ids must differ")
            seen[gen[k]] = f"generative.{k}"
    return GenerativeConfig(rows=rows, pseudo_id=gen["pseudo_id"], generated_id=gen["generated_id"],
                            merged_id=gen["merged_id"], copies=copies, labels=gen["labels"], guidance_scale=w,
                            pseudo_labeller=gen["pseudo_labeller"], preset=preset, overrides=read_only(overrides))


def parse_config(cfg: Mapping[str, Any], origin: str = "study configuration") -> StudyConfig:
    """The typed configuration of the merged JSON object ``cfg`` (every key present, as after
    :func:`build_config`'s layers); ``SDDMError`` naming ``origin`` and the offending key."""
    cfg = copy.deepcopy(dict(cfg))
    ck = _Check(origin)
    sides = {side: _parse_side(side, cfg[side], ck) for side in ("source", "target")}
    src, tgt = sides["source"], sides["target"]
    if src.phantom and tgt.phantom and src.phantom == tgt.phantom and src.seed == tgt.seed:
        raise ck.fail(f"source and target are the same phantoms (vendor {src.phantom}, seed {src.seed}); choose "
                      f"another target vendor or seed")
    syn = cfg["synthesis"]
    synthesis = SynthesisConfig(id=ck.int(syn, "id", "synthesis", lo=1), copies=ck.int(syn, "copies", "synthesis", lo=1))
    if synthesis.id > 999:
        raise ck.fail(f"synthesis.id must be in 1..999, got {synthesis.id}")
    ids = {f"{s}.id": d.id for s, d in sides.items() if d.phantom is not None}
    ids["synthesis.id"] = synthesis.id
    seen: Dict[int, str] = {}
    for k, v in ids.items():
        if v in seen:
            raise ck.fail(f"{k} and {seen[v]} are both dataset id {v}; ids must differ")
        seen[v] = k

    segs = cfg["segmenters"]
    if isinstance(segs, str):
        segs = cfg["segmenters"] = [s for s in segs.split(",") if s]
    if not isinstance(segs, list) or not segs:
        raise ck.fail(f"segmenters must be a non-empty list of {', '.join(SEGMENTERS)}")
    for s in segs:
        if not _is_name_in(s, SEGMENTERS):
            raise ck.fail(f"unknown segmenter {s!r}; choose from {', '.join(SEGMENTERS)}")
    if len(set(segs)) != len(segs):
        raise ck.fail(f"segmenters {segs} lists one twice")
    ep = cfg["epochs"]
    if ep != "quick" and (isinstance(ep, bool) or not isinstance(ep, int) or not 1 <= ep <= 99999):
        raise ck.fail(f"epochs must be an integer in 1..99999 or \"quick\", got {ep!r}")
    its = cfg["iterations_per_epoch"]
    if its is not None and (isinstance(its, bool) or not isinstance(its, int) or not 1 <= its <= 99999):
        raise ck.fail(f"iterations_per_epoch must be null (nnU-Net's 250) or an integer in 1..99999, got {its!r}")
    trainers = cfg["trainers"]
    if not isinstance(trainers, Mapping):
        raise ck.fail("trainers must map segmenter names to trainer class names")
    for s, tr in trainers.items():
        if s not in SEGMENTERS:
            raise ck.fail(f"trainers: unknown segmenter {s!r}")
        if not isinstance(tr, str) or not tr.startswith("nnUNetTrainer"):
            raise ck.fail(f"trainers.{s} must be an nnU-Net trainer class name, got {tr!r}")
    models: Dict[tuple, str] = {}
    for s in segs:  # one results folder per (configuration, trainer): two segmenters would share it
        key = (SEGMENTERS[s][0], trainer_name(s, trainers, ep, its))
        if key in models:
            raise ck.fail(f"segmenters {models[key]!r} and {s!r} are both {key[1]} on {key[0]}; they would be one "
                          f"model (give one of them another trainer)")
        models[key] = s
    fold = cfg["fold"]
    if isinstance(fold, bool) or str(fold) not in ("all", "0", "1", "2", "3", "4"):
        raise ck.fail(f"fold must be 'all' (train on every case, as the paper) or one of nnU-Net's five "
                      f"cross-validation folds 0..4, got {fold!r}")
    fold = cfg["fold"] = "all" if str(fold) == "all" else int(fold)

    dif = cfg["diffusion"]
    # checked even when diffusion.model is given: the generative model inherits them
    ck.int(dif, "iterations", "diffusion", lo=1, allow_none=True)
    ck.int(dif, "batch_size", "diffusion", lo=1, allow_none=True)
    if dif["model"] is None:
        if not _is_name_in(dif["preset"], PRESETS):
            raise ck.fail(f"diffusion.preset {dif['preset']!r} does not exist; choose one of "
                          f"{', '.join(sorted(PRESETS))}")
        if not isinstance(dif["set"], Mapping):
            raise ck.fail("diffusion.set must map SECTION.KEY to values")
        seed = cfg["seed"] if type(cfg["seed"]) is int else 0  # checked below
        overrides = diffusion_overrides(dif["set"], dif["iterations"], dif["batch_size"], seed)
        try:
            validate_config(apply_overrides(preset_config(dif["preset"]), overrides))
        except SDDMError as e:
            raise ck.fail(f"diffusion: {e}") from None
    elif not isinstance(dif["model"], str):
        raise ck.fail("diffusion.model must be a model folder or DATASET[:PRESET]")
    diffusion = DiffusionConfig(preset=dif["preset"], iterations=dif["iterations"], batch_size=dif["batch_size"],
                                set=read_only(dif["set"]), model=dif["model"])

    smp = cfg["sampler"]
    for k in ("D", "N", "steps", "seed"):
        ck.int(smp, k, "sampler")
    ck.int(smp, "batch_size", "sampler", lo=1, allow_none=True)
    ck.number(smp, "tau", "sampler")
    ck.bool(smp, "reference_behaviour", "sampler")
    if smp["amp"] not in (None, "bf16", "fp16"):
        raise ck.fail(f"sampler.amp must be null, 'bf16' or 'fp16', got {smp['amp']!r}")
    try:
        settings = SamplerSettings(D=smp["D"], N=smp["N"], tau=float(smp["tau"]), steps=smp["steps"],
                                   seed=smp["seed"], reference_behaviour=smp["reference_behaviour"],
                                   guidance=smp["guidance"])
    except SDDMError as e:
        raise ck.fail(f"sampler: {e}") from None
    sampler = SamplerConfig(settings=settings, batch_size=smp["batch_size"], amp=smp["amp"])

    sweep = cfg["figures"]["sweep"]
    sweep_cfg = None
    if sweep is not None:
        if not isinstance(sweep, Mapping) or set(sweep) - {"D", "N", "tau", "case", "slice"}:
            raise ck.fail("figures.sweep must be null or an object with D, N, tau lists")
        for k in ("D", "N", "tau"):
            vals = sweep.get(k, [])
            if not isinstance(vals, list) or not vals:
                raise ck.fail(f"figures.sweep.{k} must be a non-empty list")
            for v in vals:
                if k == "tau" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise ck.fail(f"figures.sweep.tau value {v!r} is not a number")
                try:
                    settings.replace(**{k: v})
                except (SDDMError, TypeError) as e:
                    raise ck.fail(f"figures.sweep.{k} value {v!r}: {e}") from None
        if sweep.get("case") is not None and (not isinstance(sweep["case"], str) or not sweep["case"]):
            raise ck.fail(f"figures.sweep.case must be null (the first target test case) or a case name, "
                          f"got {sweep['case']!r}")
        ck.int(sweep, "slice", "figures.sweep", lo=0, allow_none=True)
        sweep_cfg = SweepConfig(D=tuple(sweep["D"]), N=tuple(sweep["N"]), tau=tuple(sweep["tau"]),
                                case=sweep.get("case"), slice=sweep.get("slice"))
    figures = FiguresConfig(sweep=sweep_cfg, tsne=ck.bool(cfg["figures"], "tsne", "figures"))
    if cfg["device"] not in ("auto", "cpu", "cuda", "mps"):
        raise ck.fail(f"device must be auto, cpu, cuda or mps, got {cfg['device']!r}")
    nn = cfg["nnunet"]
    if nn["folders"] not in ("study", "environment"):
        raise ck.fail("nnunet.folders must be 'study' or 'environment'")
    ck.int(nn, "num_processes", "nnunet", lo=1)
    step = nn["step_size"]
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
        raise ck.fail(f"nnunet.step_size must be a number in (0, 1], got {step!r}")
    spacing = nn["spacing"]  # null, an in-plane spacing or [z, y, x], in mm
    values = spacing if isinstance(spacing, list) and len(spacing) == 3 else [spacing]
    if spacing is not None and any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.05 <= v <= 100
                                   for v in values):
        raise ck.fail(f"nnunet.spacing must be null (nnU-Net's own plans), an in-plane target spacing in mm (a "
                      f"number from 0.05 to 100) or a list [z, y, x] of three such numbers, got {spacing!r}")
    if spacing is not None:
        spacing = tuple(float(v) for v in values) if isinstance(spacing, list) else float(spacing)
    ck.int(nn, "batch_size", "nnunet", lo=1, allow_none=True)
    nnunet = NnunetConfig(folders=nn["folders"], num_processes=nn["num_processes"], step_size=step, spacing=spacing,
                          batch_size=nn["batch_size"])
    ev = cfg["evaluation"]
    alpha = ev["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ck.fail(f"evaluation.alpha must be in (0, 1), got {alpha!r}")
    ck.int(ev, "num_processes", "evaluation", lo=1, allow_none=True)
    policy = ev["empty_policy"]
    if isinstance(policy, bool) or not isinstance(policy, (str, int, float)):
        raise ck.fail(f"evaluation.empty_policy must be 'diagonal', 'nan' or a penalty in mm, got {policy!r}")
    try:
        empty_policy = EmptyPolicy(policy)
    except SDDMError as e:
        raise ck.fail(f"evaluation.empty_policy {policy!r}: {e}") from None
    if ev["test"] not in TESTS:
        raise ck.fail(f"evaluation.test must be one of {', '.join(TESTS)}, got {ev['test']!r}")
    evaluation = EvaluationConfig(alpha=alpha, empty_policy=empty_policy, num_processes=ev["num_processes"],
                                  test=ev["test"])
    alt = cfg["alternatives"]
    for k in ("histmatch", "fda", "nnunet_aug"):
        ck.bool(alt, k, "alternatives")
    beta = ck.number(alt, "fda_beta", "alternatives")
    if not 0 <= beta < 0.5:
        raise ck.fail(f"alternatives.fda_beta must be in [0, 0.5) (the low-frequency window's half-width as a "
                      f"fraction of the slice size), got {beta!r}")
    alternatives = AlternativesConfig(histmatch=alt["histmatch"], fda=alt["fda"], nnunet_aug=alt["nnunet_aug"],
                                      fda_beta=beta)
    generative = _parse_generative(cfg, ck, ids, alternatives.nnunet_aug)
    overridden = sorted(s for s in trainers if s in segs)
    if alternatives.nnunet_aug and overridden:
        raise ck.fail(f"trainers gives its own trainer for {', '.join(overridden)}, but the nnU-Net aug row trains "
                      f"the plugin's augmented family with epochs/iterations_per_epoch, which would not be the same "
                      f"schedule; set alternatives.nnunet_aug to false (--method without nnunet_aug) or set the "
                      f"schedule with epochs and iterations_per_epoch instead of trainers")
    if cfg["postprocess"] is not None and not _is_name_in(cfg["postprocess"], POSTPROCESSING):
        raise ck.fail(f"postprocess must be null or one of {', '.join(POSTPROCESSING)}, got {cfg['postprocess']!r}")
    ck.int(cfg, "repeats", "study", lo=1)
    ck.int(cfg, "seed", "study")
    if not isinstance(cfg["output"], str) or not cfg["output"]:
        raise ck.fail("output must be a folder path")
    return StudyConfig(name=cfg["name"], output=cfg["output"], source=src, target=tgt, segmenters=tuple(segs),
                       epochs=ep, iterations_per_epoch=its, trainers=read_only(trainers), fold=fold,
                       diffusion=diffusion, sampler=sampler, synthesis=synthesis, device=cfg["device"],
                       nnunet=nnunet, evaluation=evaluation, figures=figures, seed=cfg["seed"],
                       repeats=cfg["repeats"], alternatives=alternatives, postprocess=cfg["postprocess"],
                       generative=generative, raw=read_only(cfg))
