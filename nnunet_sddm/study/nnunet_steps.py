"""nnU-Net's own steps of a study: plan + preprocess, train, predict, ensemble.

Planning and training run nnU-Net's console scripts in subprocesses (``nnunetv2.paths`` reads the
folders from the environment at import, and nnU-Net uses spawn pools: a fresh process with the
study's environment is the robust way). The environment of these processes has the study's
``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``, ``nnUNet_extTrainer`` pointing at the
plugin's trainers, ``nnUNet_compile=0`` off CUDA and, for training on the CPU only,
``nnUNet_n_proc_DA=0`` (it breaks preprocessing). Each command's output goes to a log file; a
failure raises ``SDDMError`` with the end of that log.

Prediction runs in this process through ``nnUNetPredictor`` (the class behind
``nnUNetv2_predict``, same defaults, sequential: no worker processes), which loads each trained
model once for all of its input folders. Ensembles average the exported class probabilities of two
predictions with nnU-Net's own ``merge_files`` (the code of ``nnUNetv2_ensemble``).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import staging_dir

PathLike = Union[str, os.PathLike]
PLANS = "nnUNetPlans"


def nnunet_env(folders: Mapping[str, Path], device: str, training: bool = False,
               base: Optional[Mapping[str, str]] = None, num_processes: Optional[int] = None) -> Dict[str, str]:
    """Environment of an nnU-Net subprocess (see the module docstring). ``num_processes`` sets
    ``nnUNet_def_n_proc`` (nnU-Net's default worker count, 8, e.g. for the final validation's
    export workers, each a process start-up)."""
    from nnunet_sddm.utilities.nnunet_paths import ensure_trainer_path_in_env

    env = dict(os.environ if base is None else base)
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


def load_predictor(model_dir: Path, fold: Union[int, str], device: str, step_size: float = 0.5):
    """An ``nnUNetPredictor`` with nnUNetv2_predict's defaults, loaded from ``model_dir``."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_sddm.utilities.nnunet_paths import ensure_trainer_path_in_env

    ensure_trainer_path_in_env()
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints its trainer lookup
        predictor = nnUNetPredictor(tile_step_size=float(step_size), use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=device == "cuda", device=torch.device(device),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_dir), (fold,), checkpoint_name="checkpoint_final.pth")
    return predictor


def predict_folder(predictor, images_dir: Path, out_dir: Path, save_probabilities: bool = True) -> List[str]:
    """Segment every image of ``images_dir`` into ``out_dir`` (written in a staging folder and
    renamed: a complete folder or none). Returns the case ids."""
    import contextlib
    import io

    out_dir = Path(out_dir)
    with staging_dir(out_dir, overwrite=True) as tmp:
        with contextlib.redirect_stdout(io.StringIO()):
            predictor.predict_from_files_sequential(str(images_dir), str(tmp), save_probabilities=save_probabilities,
                                                    overwrite=True)
    ending = predictor.dataset_json["file_ending"]
    return sorted(p.name[: -len(ending)] for p in out_dir.iterdir() if p.name.endswith(ending))


def ensemble_folders(predictor, folders: Sequence[Path], out_dir: Path) -> List[str]:
    """Average the class probabilities (``.npz``) of the same cases in ``folders`` and write the
    segmentations to ``out_dir`` (nnU-Net's ``merge_files``; staged, then renamed)."""
    from nnunetv2.ensembling.ensemble import merge_files

    ending = predictor.dataset_json["file_ending"]
    cases = [sorted(p.name[:-4] for p in Path(f).glob("*.npz")) for f in folders]
    if not cases[0] or any(c != cases[0] for c in cases):
        raise SDDMError(f"cannot ensemble {', '.join(map(str, folders))}: their probability files (.npz) differ")
    rw = predictor.plans_manager.image_reader_writer_class()
    with staging_dir(out_dir, overwrite=True) as tmp:
        for case in cases[0]:
            merge_files([str(Path(f) / f"{case}.npz") for f in folders], str(tmp / case), ending, rw,
                        predictor.label_manager, False)
    return cases[0]
