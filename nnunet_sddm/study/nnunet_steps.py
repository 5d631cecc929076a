"""nnU-Net's own commands in a study: plan + preprocess and train, and the model folder layout.

Planning and training run nnU-Net's console scripts in subprocesses (``nnunetv2.paths`` reads the
folders from the environment at import, and nnU-Net uses spawn pools: a fresh process with the
study's environment is the robust way). The environment of these processes has the study's
``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``, ``nnUNet_extTrainer`` pointing at the
plugin's trainers, ``nnUNet_compile=0`` off CUDA and, for training on the CPU only,
``nnUNet_n_proc_DA=0`` (it breaks preprocessing). Each command's output goes to a log file; a
failure raises ``SDDMError`` with the end of that log.

A coarser target spacing (``nnunet.spacing``) goes through nnU-Net's own plans mechanism:
nnU-Net's default planner plans once more with ``-overwrite_target_spacing`` (which sets the
``3d_fullres`` spacing; the ``2d`` configuration is planned with its in-plane part) under a plans
name of its own (:func:`plans_name`), so that patch and batch size are re-planned for the smaller
arrays; preprocessing and training then use that plans name (``-plans_name``, ``-p``).
A batch size (``nnunet.batch_size``) is an edit of the plans, as nnU-Net's documentation advises for
changing it: the planned plans (nnU-Net's default, or those of the target spacing) are written under
a plans name of their own with ``batch_size`` set in the study's configurations, before
preprocessing; everything else (patch, network, spacing) stays as nnU-Net planned it.

Prediction and ensembling are not here: the study predicts with the code of
``nnUNetv2_sddm_predict`` (``nnunet_sddm.adaptation.predictor``, see ``stage_predict``).
"""
from __future__ import annotations

import copy
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import read_json, write_json
from nnunet_sddm.utilities.nnunet_paths import (FINAL_VALIDATION_ENV_VAR, SEED_ENV_VAR, datasets_with_id,
                                             ensure_trainer_path_in_env)

PathLike = Union[str, os.PathLike]
#: nnU-Net's default plans identifier (``nnunet.spacing`` null).
PLANS = "nnUNetPlans"
#: ``nnunet.spacing``: None (nnU-Net's own plans), an in-plane spacing in mm, or (z, y, x) in mm in
#: the axis order of nnU-Net's fingerprint (z, y, x for NIfTI read by SimpleITK).
Spacing = Optional[Union[float, Tuple[float, float, float]]]
#: The key the study adds to a plans file it planned with a target spacing: what was asked for.
SPACING_RECORD = "sddm_spacing"
#: The key the study adds to a plans file whose batch size it set: what was asked for, what was planned.
BATCH_RECORD = "sddm_batch_size"


def nnunet_env(folders: Mapping[str, Path], device: str, training: bool = False,
               base: Optional[Mapping[str, str]] = None, num_processes: Optional[int] = None,
               seed: Optional[int] = None, final_validation: bool = True) -> Dict[str, str]:
    """Environment of an nnU-Net subprocess (see the module docstring). ``num_processes`` sets
    ``nnUNet_def_n_proc`` (nnU-Net's default worker count, 8, e.g. for the preprocessing workers,
    each a process start-up); ``seed`` sets the SD-DM trainers' training seed
    (``nnUNet_sddm_seed``); ``final_validation=False`` makes them skip nnU-Net's final validation
    (``nnUNet_sddm_final_validation=0``)."""
    env = dict(os.environ if base is None else base)
    if seed is not None:
        env[SEED_ENV_VAR] = str(int(seed))
    if not final_validation:
        env[FINAL_VALIDATION_ENV_VAR] = "0"
    if num_processes is not None:
        env["nnUNet_def_n_proc"] = str(int(num_processes))
    env["nnUNet_raw"] = str(folders["raw"])
    env["nnUNet_preprocessed"] = str(folders["preprocessed"])
    env["nnUNet_results"] = str(folders["results"])
    if device != "cuda":
        env["nnUNet_compile"] = "0"
    env.pop("nnUNet_n_proc_DA", None)
    if training and device == "cpu":
        env["nnUNet_n_proc_DA"] = "0"
    ensure_trainer_path_in_env(env)
    return env


def run_command(cmd: Sequence[object], env: Mapping[str, str], log_file: Path) -> float:
    """Run ``cmd`` with its output appended to ``log_file``; returns the wall time in seconds.
    ``SDDMError`` with the log's last lines if it fails."""
    cmd = [str(c) for c in cmd]
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_file, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            r = subprocess.run(cmd, env=dict(env), stdout=f, stderr=subprocess.STDOUT)
        except FileNotFoundError:
            raise SDDMError(f"{cmd[0]}: command not found (is nnunetv2 installed in this environment?)") from None
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SDDMError(f"{cmd[0]} failed with exit code {r.returncode} (full log: {log_file}):\n{tail}")
    return dt


def plans_name(spacing: Spacing, batch_size: Optional[int] = None) -> str:
    """The plans identifier of ``spacing`` and ``batch_size``: nnU-Net's ``nnUNetPlans`` for neither,
    else ``nnUNetPlansSDDM_`` + ``<s>mm`` for an in-plane spacing or ``<z>x<y>x<x>mm`` for three (a
    decimal point written ``p``: 2.5 -> ``nnUNetPlansSDDM_2p5mm``), + ``bs<B>`` for a batch size,
    joined by ``_`` (``nnUNetPlansSDDM_2p5mm_bs4``). One name per override: models of two overrides
    never share a folder, and no nnU-Net plans name has the prefix."""
    parts = []
    if spacing is not None:
        values = [spacing] if isinstance(spacing, (int, float)) else list(spacing)
        parts.append("x".join(_mm_token(v) for v in values) + "mm")
    if batch_size is not None:
        parts.append(f"bs{int(batch_size)}")
    return "nnUNetPlansSDDM_" + "_".join(parts) if parts else PLANS


def _mm_token(value: float) -> str:
    """``value`` in a file name, exactly (``repr``): 2.5 -> ``2p5``, 3.0 -> ``3``, 1e-05 -> ``1em05``."""
    text = repr(float(value))
    text = text[:-2] if text.endswith(".0") else text
    return text.replace(".", "p").replace("e-", "em").replace("e+", "e")


def override_spacing(default_plans: Mapping[str, Any], spacing: Spacing) -> List[float]:
    """The target spacing (fingerprint axis order) to give nnU-Net's planner for ``spacing``: three
    values as given, or for an in-plane spacing the ``3d_fullres`` spacing of nnU-Net's
    ``default_plans`` with its two in-plane axes (the ``2d`` configuration's, ``transpose_forward[1:]``)
    replaced."""
    if not isinstance(spacing, (int, float)):
        return [float(v) for v in spacing]
    fullres = default_plans["configurations"].get("3d_fullres")
    if fullres is None:
        raise SDDMError(f"nnunet.spacing {spacing!r}: dataset {default_plans['dataset_name']} has no 3d_fullres "
                        f"configuration to take the through-plane spacing from; give nnunet.spacing as "
                        f"[z, y, x] in mm")
    forward = default_plans["transpose_forward"]
    target = [0.0, 0.0, 0.0]
    for i, axis in enumerate(forward):  # fullres["spacing"] is in the transposed order
        target[axis] = float(fullres["spacing"][i]) if i == 0 else float(spacing)
    return target


def check_override_plans(default_plans: Mapping[str, Any], plans: Mapping[str, Any], target: Sequence[float],
                         configurations: Sequence[str], where: PathLike) -> None:
    """``SDDMError`` naming ``where`` unless nnU-Net planned every configuration of
    ``configurations`` that its default plans have at ``target`` (``2d``: the in-plane part)
    and kept the default plans' axis order (with a coarser spacing than the slice distance nnU-Net
    would slice the ``2d`` configuration along another axis)."""
    forward = list(default_plans["transpose_forward"])
    if list(plans["transpose_forward"]) != forward:
        raise SDDMError(f"{where}: nnunet.spacing gives the target spacing {list(target)} mm, whose coarsest axis "
                        f"is not the through-plane axis of nnU-Net's default plans (transpose_forward {forward}); "
                        f"nnU-Net would slice the 2d configuration along another axis. Choose an in-plane spacing "
                        f"finer than the through-plane spacing {target[forward[0]]} mm")
    transposed = [float(target[a]) for a in forward]
    for c in configurations:
        if c not in default_plans["configurations"]:
            continue  # nnU-Net has no such configuration for this dataset (as without nnunet.spacing)
        want = transposed[1:] if c == "2d" else transposed
        got = plans["configurations"].get(c, {}).get("spacing")
        if got is None or len(got) != len(want) or not np.allclose(got, want, rtol=1e-6):
            raise SDDMError(f"{where}: configuration {c} was planned at spacing {got}, not at the requested "
                            f"{want} mm (nnunet.spacing)")


def set_batch_size(plans: Dict[str, Any], batch_size: int, configurations: Sequence[str], name: str,
                   where: PathLike) -> Dict[str, Any]:
    """``plans`` renamed ``name`` (its ``plans_name`` and the ``data_identifier`` of every
    configuration, as nnU-Net's planner names them) with ``batch_size`` in each of
    ``configurations``; the request and the planned batch sizes are recorded under
    ``BATCH_RECORD``. A configuration the plans lack is an error naming ``where``."""
    out = copy.deepcopy(dict(plans))
    planned = {}
    for c in configurations:
        conf = out["configurations"].get(c)
        if conf is None:
            raise SDDMError(f"{where}: nnunet.batch_size: the plans have no configuration {c!r}")
        planned[c] = conf.get("batch_size")
        conf["batch_size"] = int(batch_size)
    out["plans_name"] = name
    for c, conf in out["configurations"].items():
        if "data_identifier" in conf:
            conf["data_identifier"] = f"{name}_{c}"
    out[BATCH_RECORD] = {"nnunet.batch_size": int(batch_size), "planned": planned,
                         "planned_plans": plans.get("plans_name", PLANS)}
    return out


def plan_and_preprocess(dataset_ids: Sequence[int], configurations: Sequence[str], env: Mapping[str, str],
                        num_processes: int, log_file: Path, spacing: Spacing = None,
                        batch_size: Optional[int] = None) -> float:
    """``nnUNetv2_plan_and_preprocess -d IDS -c CONFIGS -np N -npfp N`` (default planner and plans;
    ``-npfp``: nnU-Net's default of 8 fingerprint workers costs 8 process start-ups per dataset).

    With a target ``spacing`` or a ``batch_size`` (see the module docstring): fingerprints and
    nnU-Net's default plans (``--no_pp``); for a spacing, ``nnUNetv2_plan_experiment -d IDS
    -overwrite_target_spacing Z Y X -overwrite_plans_name NAME`` (:func:`override_spacing`; the
    plans are checked by :func:`check_override_plans` and record the request under
    ``SPACING_RECORD``); for a batch size, :func:`set_batch_size` on those plans; then
    ``nnUNetv2_preprocess -d IDS -plans_name NAME -c CONFIGS -np N``."""
    n = [num_processes] * len(configurations)
    if spacing is None and batch_size is None:
        cmd = ["nnUNetv2_plan_and_preprocess", "-d", *dataset_ids, "-c", *configurations, "-np", *n,
               "-npfp", num_processes]
        return run_command(cmd, env, log_file)
    name = plans_name(spacing, batch_size)
    seconds = run_command(["nnUNetv2_plan_and_preprocess", "-d", *dataset_ids, "-npfp", num_processes, "--no_pp"],
                          env, log_file)
    folders = {i: _preprocessed_dataset(Path(env["nnUNet_preprocessed"]), i) for i in dataset_ids}
    defaults = {i: read_json(folders[i] / f"{PLANS}.json") for i in dataset_ids}
    if spacing is not None:
        targets = {i: override_spacing(defaults[i], spacing) for i in dataset_ids}
        for target in dict.fromkeys(tuple(t) for t in targets.values()):  # one planner run per target spacing
            ids = [i for i in dataset_ids if tuple(targets[i]) == target]
            seconds += run_command(["nnUNetv2_plan_experiment", "-d", *ids, "-overwrite_target_spacing", *target,
                                    "-overwrite_plans_name", name], env, log_file)
    for i in dataset_ids:
        plans_file = folders[i] / f"{name}.json"
        if spacing is not None:
            plans = read_json(plans_file)
            check_override_plans(defaults[i], plans, targets[i], configurations, plans_file)
            plans[SPACING_RECORD] = {"nnunet.spacing": spacing if isinstance(spacing, (int, float)) else list(spacing),
                                     "target_spacing": targets[i], "default_plans": PLANS}
        else:
            plans = defaults[i]
        if batch_size is not None:
            plans = set_batch_size(plans, batch_size, configurations, name, plans_file)
        write_json(plans, plans_file)
    cmd = ["nnUNetv2_preprocess", "-d", *dataset_ids, "-plans_name", name, "-c", *configurations, "-np", *n]
    return seconds + run_command(cmd, env, log_file)


def _preprocessed_dataset(root: Path, dataset_id: int) -> Path:
    """The one ``DatasetXXX_*`` folder of ``dataset_id`` under ``root`` (``$nnUNet_preprocessed``)."""
    found = datasets_with_id(dataset_id, root)
    if len(found) != 1:
        raise SDDMError(f"expected one preprocessed folder of dataset {dataset_id} in {root}, found "
                        f"{[p.name for p in found]}")
    return found[0]


def model_folder(results: Path, dataset_name: str, trainer: str, configuration: str, plans: str = PLANS) -> Path:
    """``$nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>``."""
    return Path(results) / dataset_name / f"{trainer}__{plans}__{configuration}"


def fold_folder(model_dir: Path, fold: Union[int, str]) -> Path:
    return Path(model_dir) / f"fold_{fold}"


def is_trained(model_dir: Path, fold: Union[int, str]) -> bool:
    return (fold_folder(model_dir, fold) / "checkpoint_final.pth").is_file()


def train(dataset_id: int, configuration: str, fold: Union[int, str], trainer: str, device: str,
          env: Mapping[str, str], log_file: Path, resume: bool = False, plans: str = PLANS) -> float:
    """``nnUNetv2_train ID CONFIG FOLD -tr TRAINER -p PLANS -device DEV`` (``--c`` to continue
    from ``checkpoint_latest.pth`` when resuming)."""
    cmd = ["nnUNetv2_train", dataset_id, configuration, fold, "-tr", trainer, "-p", plans, "-device", device]
    if resume:
        cmd.append("--c")
    return run_command(cmd, env, log_file)
