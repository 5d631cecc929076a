"""Domain gap of a 2D SD-DM trainer on the multi-vendor phantoms: train on vendor A, test on A and B.

Runs the stock console scripts (nnUNetv2_plan_and_preprocess, nnUNetv2_train, nnUNetv2_predict)
with ``nnUNet_extTrainer`` set by ``ensure_trainer_path_in_env``, then scores both test sets with
``nnunet_sddm.evaluation.evaluate_folders`` (MedPy Dice per structure). Prints wall times and a
table; writes ``domain_gap.json`` in the work folder.

    python benchmarks/trainer_domain_gap.py --trainer nnUNetTrainer_SDDM_NoDA_1ep --workdir /tmp/gap
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nnunet_sddm.data.phantoms import generate_phantom_dataset
from nnunet_sddm.evaluation.evaluate import evaluate_folders
from nnunet_sddm.utilities.nnunet_paths import ensure_trainer_path_in_env


def run(cmd, env) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    dt = time.perf_counter() - t0
    print(f"[{dt:7.1f} s] {' '.join(str(c) for c in cmd)}", flush=True)
    return dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer", default="nnUNetTrainer_SDDM_NoDA_Quick")
    p.add_argument("--workdir", type=Path, required=True, help="fresh folder for nnUNet_raw/preprocessed/results")
    p.add_argument("--cases", type=int, default=10, help="vendor A training subjects (x2 phases)")
    p.add_argument("--test-cases", type=int, default=5, help="test subjects per vendor (x2 phases)")
    p.add_argument("--matrix", type=int, default=64, help="phantom in-plane matrix")
    p.add_argument("--fold", default="0")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (a.workdir / sub).mkdir(parents=True, exist_ok=True)
        env[var] = os.environ[var] = str(a.workdir / sub)
    env["nnUNet_compile"] = "0"
    env.pop("nnUNet_n_proc_DA", None)
    ensure_trainer_path_in_env(env)
    times = {}
    t0 = time.perf_counter()
    raw = a.workdir / "raw"
    ds_a, ds_b = raw / "Dataset611_GapA", raw / "Dataset612_GapB"
    if not ds_a.is_dir():  # steps already done in this work folder are reused
        generate_phantom_dataset(611, "A", a.cases, a.test_cases, seed=a.seed, matrix=a.matrix, name="GapA")
    if not ds_b.is_dir():
        generate_phantom_dataset(612, "B", 1, a.test_cases, seed=a.seed, matrix=a.matrix, name="GapB")
    times["phantoms"] = time.perf_counter() - t0
    if not (a.workdir / "preprocessed" / ds_a.name / "nnUNetPlans_2d").is_dir():
        times["plan_and_preprocess"] = run(["nnUNetv2_plan_and_preprocess", "-d", "611", "-c", "2d", "-np", "2"],
                                           env)
    fold_dir = a.workdir / "results" / ds_a.name / f"{a.trainer}__nnUNetPlans__2d" / f"fold_{a.fold}"
    if not (fold_dir / "checkpoint_final.pth").is_file():
        times["train"] = run(["nnUNetv2_train", "611", "2d", a.fold, "-tr", a.trainer, "-device", "cpu"],
                             dict(env, nnUNet_n_proc_DA="0"))
    results = {}
    for tag, ds in (("A", ds_a), ("B", ds_b)):
        out = a.workdir / f"pred_{a.trainer}_{tag}"
        times[f"predict_{tag}"] = run(["nnUNetv2_predict", "-i", ds / "imagesTs", "-o", out, "-d", "611", "-c", "2d",
                                       "-f", a.fold, "-tr", a.trainer, "-device", "cpu", "-npp", "0", "-nps", "0",
                                       "--disable_progress_bar"], env)
        res = evaluate_folders(ds / "labelsTs", out, progress=False, num_processes=1)
        results[tag] = {s: res.summary["structures"][s]["metrics"]["DSC"] for s in ("LV", "MYO", "RV", "all")}
    print(f"\ntrainer {a.trainer}, trained on phantom vendor A ({a.cases} subjects x ED/ES, matrix {a.matrix}), "
          f"fold {a.fold}; Dice (mean over {2 * a.test_cases} test cases)")
    print(f"{'test vendor':12s} {'LV':>7s} {'MYO':>7s} {'RV':>7s} {'mean':>7s}")
    for tag in ("A", "B"):
        d = results[tag]
        print(f"{tag:12s} " + " ".join(f"{d[s]['mean']:7.3f}" for s in ("LV", "MYO", "RV", "all")))
    gap = results["A"]["all"]["mean"] - results["B"]["all"]["mean"]
    print(f"gap (A - B) mean Dice: {gap:.3f}")
    print("wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    with open(a.workdir / "domain_gap.json", "w") as f:
        json.dump({"trainer": a.trainer, "args": {k: str(v) for k, v in vars(a).items()}, "dice": results,
                   "gap_mean_dice": gap, "wall_s": times}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
