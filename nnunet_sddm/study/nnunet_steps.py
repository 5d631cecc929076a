"""nnU-Net's own commands in a study: plan + preprocess and train, and the model folder layout.

Planning and training run nnU-Net's console scripts in subprocesses (``nnunetv2.paths`` reads the
folders from the environment at import, and nnU-Net uses spawn pools: a fresh process with the
study's environment is the robust way). The environment of these processes has the study's
``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``, ``nnUNet_extTrainer`` pointing at the
plugin's trainers, ``nnUNet_compile=0`` off CUDA and, for training on the CPU only,
``nnUNet_n_proc_DA=0`` (it breaks preprocessing). Each command's output goes to a log file; a
failure raises ``SDDMError`` with the end of that log.

Prediction and ensembling are not here: the study predicts with the code of
``nnUNetv2_sddm_predict`` (``nnunet_sddm.adaptation.predictor``, see ``stage_predict``).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.nnunet_paths import SEED_ENV_VAR, ensure_trainer_path_in_env

PathLike = Union[str, os.PathLike]
PLANS = "nnUNetPlans"


def nnunet_env(folders: Mapping[str, Path], device: str, training: bool = False,
               base: Optional[Mapping[str, str]] = None, num_processes: Optional[int] = None,
               seed: Optional[int] = None) -> Dict[str, str]:
    """Environment of an nnU-Net subprocess (see the module docstring). ``num_processes`` sets
    ``nnUNet_def_n_proc`` (nnU-Net's default worker count, 8, e.g. for the final validation's
    export workers, each a process start-up); ``seed`` sets the SD-DM trainers' training seed
    (``nnUNet_sddm_seed``)."""
    env = dict(os.environ if base is None else base)
    if seed is not None:
        env[SEED_ENV_VAR] = str(int(seed))
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


def plan_and_preprocess(dataset_ids: Sequence[int], configurations: Sequence[str], env: Mapping[str, str],
                        num_processes: int, log_file: Path) -> float:
    """``nnUNetv2_plan_and_preprocess -d IDS -c CONFIGS -np N -npfp N`` (default planner and plans;
    ``-npfp``: nnU-Net's default of 8 fingerprint workers costs 8 process start-ups per dataset)."""
    cmd = ["nnUNetv2_plan_and_preprocess", "-d", *dataset_ids, "-c", *configurations,
           "-np", *([num_processes] * len(configurations)), "-npfp", num_processes]
    return run_command(cmd, env, log_file)


def model_folder(results: Path, dataset_name: str, trainer: str, configuration: str) -> Path:
    """``$nnUNet_results/DatasetXXX_Name/<trainer>__nnUNetPlans__<configuration>``."""
    return Path(results) / dataset_name / f"{trainer}__{PLANS}__{configuration}"


def fold_folder(model_dir: Path, fold: Union[int, str]) -> Path:
    return Path(model_dir) / f"fold_{fold}"


def is_trained(model_dir: Path, fold: Union[int, str]) -> bool:
    return (fold_folder(model_dir, fold) / "checkpoint_final.pth").is_file()


def train(dataset_id: int, configuration: str, fold: Union[int, str], trainer: str, device: str,
          env: Mapping[str, str], log_file: Path, resume: bool = False) -> float:
    """``nnUNetv2_train ID CONFIG FOLD -tr TRAINER -device DEV`` (``--c`` to continue from
    ``checkpoint_latest.pth`` when resuming)."""
    cmd = ["nnUNetv2_train", dataset_id, configuration, fold, "-tr", trainer, "-device", device]
    if resume:
        cmd.append("--c")
    return run_command(cmd, env, log_file)
