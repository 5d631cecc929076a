"""STUDY.json: the settings of a study, their defaults, the ``--quick`` preset and validation.

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
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import read_json

#: Segmenter name -> (nnU-Net configuration, trainer family, name in tables).
SEGMENTERS: Dict[str, tuple] = {
    "2d": ("2d", "nnUNetTrainer_SDDM_NoDA", "2D nnU-Net"),
    "3d_fullres": ("3d_fullres", "nnUNetTrainer_SDDM_NoDA", "3D nnU-Net"),
    "vanilla": ("2d", "nnUNetTrainer_SDDM_VanillaUNet", "2D U-Net"),
}

#: Approaches of Table 1 (+ the ensembles with the original image); name -> (trained on, input).
APPROACHES: Dict[str, tuple] = {
    "Baseline": ("real", "original"),
    "DA": ("real", "adapted"),
    "DG": ("synthetic", "original"),
    "Mixed": ("synthetic", "adapted"),
    "DA+ens": ("real", "ensemble"),
    "Mixed+ens": ("synthetic", "ensemble"),
}

DEFAULTS: Dict[str, Any] = {
    "name": "sddm-study",
    "output": "sddm_study",
    "source": {"phantom": "A", "subjects": 20, "test_subjects": 0, "matrix": None, "seed": 0, "id": 970},
    "target": {"phantom": "B", "subjects": 10, "test_subjects": 0, "matrix": None, "seed": 1, "id": 971,
               "split": "Tr"},
    "segmenters": ["2d", "3d_fullres", "vanilla"],
    "epochs": 250,
    "iterations_per_epoch": None,
    "trainers": {},
    "fold": "all",
    "diffusion": {"preset": "tiny", "iterations": None, "batch_size": None, "set": {}, "model": None},
    "sampler": {"D": 2, "N": 25, "tau": 6.0, "steps": 100, "seed": 0, "batch_size": None, "amp": None,
                "reference_behaviour": False},
    "synthesis": {"id": 972, "copies": 1},
    "device": "auto",
    "nnunet": {"folders": "study", "num_processes": 2, "step_size": 0.5},
    "evaluation": {"alpha": 0.01, "empty_policy": "diagonal", "num_processes": None},
    "figures": {"sweep": {"D": [2, 4, 8], "N": [10, 25, 50], "tau": [0.0, 6.0, 20.0]}, "tsne": True},
    "seed": 0,
}

#: ``--quick``: the embedded default on a 2-core CPU (phantoms A -> B, tiny diffusion model, short
#: trainers, all three segmenters).
QUICK: Dict[str, Any] = {
    "name": "sddm-quick",
    "output": "sddm_quick",
    "source": {"phantom": "A", "subjects": 8, "matrix": 64, "seed": 0},
    "target": {"phantom": "B", "subjects": 5, "matrix": 64, "seed": 1, "split": "Tr"},
    "epochs": 1,
    "iterations_per_epoch": 150,
    "diffusion": {"preset": "tiny", "iterations": 800},
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
    for section in ("diffusion", "sampler", "synthesis", "nnunet", "evaluation", "figures"):
        if section in cfg:
            if not isinstance(cfg[section], Mapping):
                raise SDDMError(f"{origin}: {section!r} must be an object")
            _check_keys(cfg[section], DEFAULTS[section], f"'{section}'", origin)
    for side in ("source", "target"):
        if side in cfg:
            if not isinstance(cfg[side], Mapping):
                raise SDDMError(f"{origin}: {side!r} must be an object")
            allowed = dict(DEFAULTS["target"], dataset=None)
            _check_keys(cfg[side], allowed, f"'{side}'", origin)


def build_config(file_config: Optional[Mapping[str, Any]] = None, overrides: Optional[Mapping[str, Any]] = None,
                 quick: bool = False, origin: str = "study configuration") -> Dict[str, Any]:
    """Defaults <- ``--quick`` preset <- file <- command-line ``overrides``, then validated.

    A dataset given as ``{"dataset": ...}`` replaces the phantom settings of that side.
    Returns the complete configuration (JSON-able), ``SDDMError`` naming ``origin`` and the key
    for anything invalid.
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
    validate(cfg, origin)
    return cfg


def _int(cfg: Mapping[str, Any], key: str, where: str, origin: str, lo: int = 0, allow_none: bool = False):
    v = cfg.get(key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise SDDMError(f"{origin}: {where}.{key} must be an integer >= {lo}, got {v!r}")


def _number(cfg: Mapping[str, Any], key: str, where: str, origin: str) -> float:
    """The finite JSON number ``cfg[key]`` (``SDDMError`` naming ``where.key`` otherwise)."""
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise SDDMError(f"{origin}: {where}.{key} must be a number, got {v!r}")
    return float(v)


def _bool(cfg: Mapping[str, Any], key: str, where: str, origin: str) -> None:
    if not isinstance(cfg.get(key), bool):
        raise SDDMError(f"{origin}: {where}.{key} must be true or false (a JSON boolean), got {cfg.get(key)!r}")


def validate(cfg: Dict[str, Any], origin: str = "study configuration") -> None:
    """Check every setting; ``SDDMError`` naming ``origin`` and the offending key."""
    from nnunet_sddm.diffusion.presets import PRESETS

    ids = {}
    for side in ("source", "target"):
        d = cfg[side]
        d.setdefault("dataset", None)
        if (d.get("phantom") is None) == (d.get("dataset") is None):
            raise SDDMError(f"{origin}: {side} needs exactly one of 'phantom' (a vendor letter) or 'dataset'")
        if d.get("phantom") is not None:
            from dataset_converters.phantoms import VENDORS

            if str(d["phantom"]).upper() not in VENDORS:
                raise SDDMError(f"{origin}: {side}.phantom {d['phantom']!r} is not a phantom vendor "
                                f"({', '.join(VENDORS)})")
            d["phantom"] = str(d["phantom"]).upper()
            _int(d, "subjects", side, origin, lo=1)
            _int(d, "test_subjects", side, origin)
            _int(d, "seed", side, origin)
            _int(d, "matrix", side, origin, lo=32, allow_none=True)
            _int(d, "id", side, origin, lo=1)
            if d["id"] > 999:
                raise SDDMError(f"{origin}: {side}.id must be in 1..999, got {d['id']}")
            ids[f"{side}.id"] = d["id"]
        if side == "target" and d.get("split") not in ("Tr", "Ts"):
            raise SDDMError(f"{origin}: target.split must be 'Tr' or 'Ts', got {d.get('split')!r}")
    if cfg["source"].get("phantom") and cfg["target"].get("phantom") and \
            cfg["source"]["phantom"] == cfg["target"]["phantom"] and cfg["source"]["seed"] == cfg["target"]["seed"]:
        raise SDDMError(f"{origin}: source and target are the same phantoms (vendor {cfg['source']['phantom']}, "
                        f"seed {cfg['source']['seed']}); choose another target vendor or seed")
    _int(cfg["synthesis"], "id", "synthesis", origin, lo=1)
    _int(cfg["synthesis"], "copies", "synthesis", origin, lo=1)
    ids["synthesis.id"] = cfg["synthesis"]["id"]
    if cfg["synthesis"]["id"] > 999:
        raise SDDMError(f"{origin}: synthesis.id must be in 1..999, got {cfg['synthesis']['id']}")
    seen: Dict[int, str] = {}
    for k, v in ids.items():
        if v in seen:
            raise SDDMError(f"{origin}: {k} and {seen[v]} are both dataset id {v}; ids must differ")
        seen[v] = k

    segs = cfg["segmenters"]
    if isinstance(segs, str):
        segs = cfg["segmenters"] = [s for s in segs.split(",") if s]
    if not isinstance(segs, list) or not segs:
        raise SDDMError(f"{origin}: segmenters must be a non-empty list of {', '.join(SEGMENTERS)}")
    for s in segs:
        if s not in SEGMENTERS:
            raise SDDMError(f"{origin}: unknown segmenter {s!r}; choose from {', '.join(SEGMENTERS)}")
    if len(set(segs)) != len(segs):
        raise SDDMError(f"{origin}: segmenters {segs} lists one twice")
    ep = cfg["epochs"]
    if ep != "quick" and (isinstance(ep, bool) or not isinstance(ep, int) or not 1 <= ep <= 99999):
        raise SDDMError(f"{origin}: epochs must be an integer in 1..99999 or \"quick\", got {ep!r}")
    its = cfg["iterations_per_epoch"]
    if its is not None and (isinstance(its, bool) or not isinstance(its, int) or not 1 <= its <= 99999):
        raise SDDMError(f"{origin}: iterations_per_epoch must be null (nnU-Net's 250) or an integer in "
                        f"1..99999, got {its!r}")
    if not isinstance(cfg["trainers"], Mapping):
        raise SDDMError(f"{origin}: trainers must map segmenter names to trainer class names")
    for s, tr in cfg["trainers"].items():
        if s not in SEGMENTERS:
            raise SDDMError(f"{origin}: trainers: unknown segmenter {s!r}")
        if not isinstance(tr, str) or not tr.startswith("nnUNetTrainer"):
            raise SDDMError(f"{origin}: trainers.{s} must be an nnU-Net trainer class name, got {tr!r}")
    models: Dict[tuple, str] = {}
    for s in segs:  # one results folder per (configuration, trainer): two segmenters would share it
        key = (SEGMENTERS[s][0], trainer_of(cfg, s))
        if key in models:
            raise SDDMError(f"{origin}: segmenters {models[key]!r} and {s!r} are both {key[1]} on {key[0]}; "
                            f"they would be one model (give one of them another trainer)")
        models[key] = s
    fold = cfg["fold"]
    if isinstance(fold, bool) or str(fold) not in ("all", "0", "1", "2", "3", "4"):
        raise SDDMError(f"{origin}: fold must be 'all' (train on every case, as the paper) or one of nnU-Net's "
                        f"five cross-validation folds 0..4, got {fold!r}")
    cfg["fold"] = "all" if str(fold) == "all" else int(fold)

    dif = cfg["diffusion"]
    if dif["model"] is None:
        if dif["preset"] not in PRESETS:
            raise SDDMError(f"{origin}: diffusion.preset {dif['preset']!r} does not exist; choose one of "
                            f"{', '.join(sorted(PRESETS))}")
        _int(dif, "iterations", "diffusion", origin, lo=1, allow_none=True)
        _int(dif, "batch_size", "diffusion", origin, lo=1, allow_none=True)
        if not isinstance(dif["set"], Mapping):
            raise SDDMError(f"{origin}: diffusion.set must map SECTION.KEY to values")
        from nnunet_sddm.diffusion.presets import apply_overrides, preset_config, validate_config

        try:
            validate_config(apply_overrides(preset_config(dif["preset"]), diffusion_overrides(cfg)))
        except SDDMError as e:
            raise SDDMError(f"{origin}: diffusion: {e}") from None
    elif not isinstance(dif["model"], str):
        raise SDDMError(f"{origin}: diffusion.model must be a model folder or DATASET[:PRESET]")

    smp = cfg["sampler"]
    for k in ("D", "N", "steps", "seed"):
        _int(smp, k, "sampler", origin)
    _int(smp, "batch_size", "sampler", origin, lo=1, allow_none=True)
    _number(smp, "tau", "sampler", origin)
    _bool(smp, "reference_behaviour", "sampler", origin)
    if smp["amp"] not in (None, "bf16", "fp16"):
        raise SDDMError(f"{origin}: sampler.amp must be null, 'bf16' or 'fp16', got {smp['amp']!r}")
    try:
        sampler_settings(cfg)
    except SDDMError as e:
        raise SDDMError(f"{origin}: sampler: {e}") from None
    sweep = cfg["figures"]["sweep"]
    if sweep is not None:
        if not isinstance(sweep, Mapping) or set(sweep) - {"D", "N", "tau", "case", "slice"}:
            raise SDDMError(f"{origin}: figures.sweep must be null or an object with D, N, tau lists")
        for k in ("D", "N", "tau"):
            vals = sweep.get(k, [])
            if not isinstance(vals, list) or not vals:
                raise SDDMError(f"{origin}: figures.sweep.{k} must be a non-empty list")
            for v in vals:
                if k == "tau" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise SDDMError(f"{origin}: figures.sweep.tau value {v!r} is not a number")
                try:
                    sampler_settings(cfg).replace(**{k: v})
                except (SDDMError, TypeError) as e:
                    raise SDDMError(f"{origin}: figures.sweep.{k} value {v!r}: {e}") from None
    _bool(cfg["figures"], "tsne", "figures", origin)
    if cfg["device"] not in ("auto", "cpu", "cuda", "mps"):
        raise SDDMError(f"{origin}: device must be auto, cpu, cuda or mps, got {cfg['device']!r}")
    if cfg["nnunet"]["folders"] not in ("study", "environment"):
        raise SDDMError(f"{origin}: nnunet.folders must be 'study' or 'environment'")
    _int(cfg["nnunet"], "num_processes", "nnunet", origin, lo=1)
    step = cfg["nnunet"]["step_size"]
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
        raise SDDMError(f"{origin}: nnunet.step_size must be a number in (0, 1], got {step!r}")
    alpha = cfg["evaluation"]["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise SDDMError(f"{origin}: evaluation.alpha must be in (0, 1), got {alpha!r}")
    _int(cfg["evaluation"], "num_processes", "evaluation", origin, lo=1, allow_none=True)
    policy = cfg["evaluation"]["empty_policy"]
    if isinstance(policy, bool) or not isinstance(policy, (str, int, float)):
        raise SDDMError(f"{origin}: evaluation.empty_policy must be 'diagonal', 'nan' or a penalty in mm, "
                        f"got {policy!r}")
    from nnunet_sddm.evaluation.metrics import EmptyPolicy

    try:
        EmptyPolicy(policy)
    except SDDMError as e:
        raise SDDMError(f"{origin}: evaluation.empty_policy {policy!r}: {e}") from None
    _int(cfg, "seed", "study", origin)
    if not isinstance(cfg["output"], str) or not cfg["output"]:
        raise SDDMError(f"{origin}: output must be a folder path")


def diffusion_overrides(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``SECTION.KEY`` overrides of the diffusion preset (``set`` + iterations/batch/seed)."""
    dif = cfg["diffusion"]
    out = dict(dif.get("set") or {})
    if dif.get("iterations") is not None:
        out["training.iterations"] = int(dif["iterations"])
    if dif.get("batch_size") is not None:
        out["training.batch_size"] = int(dif["batch_size"])
    out.setdefault("training.seed", int(cfg["seed"]))
    return out


def sampler_settings(cfg: Mapping[str, Any]):
    """``SamplerSettings`` of the study (validated)."""
    from nnunet_sddm.sampling.guided import SamplerSettings

    s = cfg["sampler"]
    return SamplerSettings(D=s["D"], N=s["N"], tau=float(s["tau"]), steps=s["steps"], seed=s["seed"],
                           reference_behaviour=bool(s["reference_behaviour"]))


def trainer_of(cfg: Mapping[str, Any], segmenter: str) -> str:
    """The nnU-Net trainer class name that trains ``segmenter``."""
    if segmenter in cfg["trainers"]:
        return cfg["trainers"][segmenter]
    family = SEGMENTERS[segmenter][1]
    ep = cfg["epochs"]
    its = cfg["iterations_per_epoch"]
    if ep == "quick":
        return f"{family}_Quick"
    if its is not None:
        return f"{family}_{int(ep)}ep_{int(its)}it"
    if family == "nnUNetTrainer_SDDM_VanillaUNet" and int(ep) == 250:
        return family
    return f"{family}_{int(ep)}ep"


def configurations(cfg: Mapping[str, Any]) -> List[str]:
    """nnU-Net configurations the segmenters need (for planning and preprocessing)."""
    return list(dict.fromkeys(SEGMENTERS[s][0] for s in cfg["segmenters"]))
