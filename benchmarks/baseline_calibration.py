"""Calibrate a phantom study from its BASELINES alone: train the no-augmentation segmenters on
phantom vendor A and report their Dice on held-out vendor-A subjects (in-domain) and on other
vendors (the domain gap), with the training time. Nothing of SD-DM (no diffusion model, no
adaptation, no synthetic data) is run, so the calibration cannot be steered by the method's results.

    python benchmarks/baseline_calibration.py --workdir /tmp/cal --segmenters 2d vanilla \
        --iterations 100 200 --targets B C D

Per segmenter and training length (``<family>_<E>ep_<M>it``, the trainer names of the study with
``epochs: E, iterations_per_epoch: M``): the training wall time (nnUNetv2_train in a subprocess,
final validation skipped as in the study), and the mean Dice over LV/MYO/RV per case (a missed
structure is Dice 0), averaged over the test cases of each vendor; the predictions are made with
the study's code (no mirroring). Steps already done in the work folder are reused. The goals of the
``--quick`` calibration are printed next to the numbers: in-domain Dice >= 0.85, target Dice in
[0.3, 0.75]. Writes ``calibration.json`` in the work folder; a work folder holds the data of one
set of data arguments (``data_args.json``; another set is refused).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from nnunet_sddm.adaptation import predictor as nnunet_prediction
from nnunet_sddm.data.phantoms import VENDORS, generate_phantom_dataset
from nnunet_sddm.evaluation.evaluate import evaluate_folders
from nnunet_sddm.study import nnunet_steps
from nnunet_sddm.study.config_tree import SEGMENTERS, trainer_name
from nnunet_sddm.utilities.files import read_json, staging_dir, write_json

SOURCE_ID = 611
IN_DOMAIN_GOAL, TARGET_GOAL = 0.85, (0.3, 0.75)


def _dataset(workdir: Path, dataset_id: int, vendor: str, subjects: int, test_subjects: int, seed: int,
             matrix: int) -> Path:
    name = f"Cal{vendor}s{seed}"
    folder = workdir / "raw" / f"Dataset{dataset_id:03d}_{name}"
    if not folder.is_dir():
        generate_phantom_dataset(dataset_id, vendor, subjects, test_subjects, seed=seed, matrix=matrix, name=name)
    return folder


def _dice(labels: Path, predictions: Path) -> Dict[str, float]:
    res = evaluate_folders(labels, predictions, progress=False, num_processes=1, empty_policy="diagonal")
    return {s: res.summary["structures"][s]["metrics"]["DSC"]["mean"] for s in ("LV", "MYO", "RV", "all")}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True, help="folder for nnUNet_raw/preprocessed/results")
    p.add_argument("--segmenters", nargs="+", default=["2d"], choices=sorted(SEGMENTERS))
    p.add_argument("--iterations", nargs="+", type=int, default=[400], help="training iterations per epoch")
    p.add_argument("--epochs", type=int, default=1, help="epochs (the learning rate decays once per epoch)")
    p.add_argument("--subjects", type=int, default=8, help="vendor-A training subjects (x ED/ES)")
    p.add_argument("--test-subjects", type=int, default=5, help="held-out subjects per vendor (x ED/ES)")
    p.add_argument("--targets", nargs="+", default=["B"], choices=[v for v in VENDORS if v != "A"])
    p.add_argument("--target-seed", type=int, default=1, help="phantom seed of the target vendors")
    p.add_argument("--matrix", type=int, default=64, help="phantom in-plane matrix")
    p.add_argument("--seed", type=int, default=0, help="phantom seed of the source and training seed")
    p.add_argument("--batch-size", type=int, default=None,
                   help="segmenter batch size set in nnU-Net's plans (the study's nnunet.batch_size; default: "
                        "as nnU-Net plans it)")
    a = p.parse_args(argv)

    a.workdir = a.workdir.resolve()
    data_args = {k: getattr(a, k) for k in ("subjects", "test_subjects", "matrix", "seed", "target_seed")}
    record = a.workdir / "data_args.json"  # the work folder's data; a rerun must not mix other data into it
    if record.is_file() and read_json(record) != data_args:
        sys.exit(f"{a.workdir} holds data made with {read_json(record)}; use another --workdir for {data_args}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    write_json(data_args, record)
    folders = {k: a.workdir / k for k in ("raw", "preprocessed", "results")}
    for k, var in (("raw", "nnUNet_raw"), ("preprocessed", "nnUNet_preprocessed"), ("results", "nnUNet_results")):
        folders[k].mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(folders[k])
    log = a.workdir / "logs" / "nnunet.log"
    source = _dataset(a.workdir, SOURCE_ID, "A", a.subjects, a.test_subjects, a.seed, a.matrix)
    tests = {"A (in-domain)": source}
    for i, v in enumerate(a.targets):
        tests[v] = _dataset(a.workdir, SOURCE_ID + 1 + i, v, 1, a.test_subjects, a.target_seed, a.matrix)
    configurations = list(dict.fromkeys(SEGMENTERS[s][0] for s in a.segmenters))
    plans = nnunet_steps.plans_name(None, a.batch_size)
    pre = folders["preprocessed"] / source.name
    if not all((pre / f"{plans}_{c}").is_dir() for c in configurations):
        nnunet_steps.plan_and_preprocess([SOURCE_ID], configurations, nnunet_steps.nnunet_env(folders, "cpu"), 2, log,
                                         batch_size=a.batch_size)

    rows = []
    for seg in a.segmenters:
        configuration = SEGMENTERS[seg][0]
        for its in a.iterations:
            trainer = trainer_name(seg, {}, a.epochs, its)
            model = nnunet_steps.model_folder(folders["results"], source.name, trainer, configuration, plans)
            seconds = None
            if not nnunet_steps.is_trained(model, "all"):
                env = nnunet_steps.nnunet_env(folders, "cpu", training=True, seed=a.seed, final_validation=False)
                seconds = nnunet_steps.train(SOURCE_ID, configuration, "all", trainer, "cpu", env, log, plans=plans)
            with contextlib.redirect_stdout(io.StringIO()):
                predictor = nnunet_prediction.load_nnunet_predictor(model, ["all"], device="cpu", use_mirroring=False,
                                                                    allow_tqdm=False)
            dice = {}
            for tag, ds in tests.items():
                out = a.workdir / "predictions" / f"{trainer}__{plans}__{configuration}" / tag.split()[0]
                if not out.is_dir():  # built under a temporary name: a folder that exists is complete
                    with contextlib.redirect_stdout(io.StringIO()), staging_dir(out) as tmp:
                        nnunet_prediction.predict_folder(predictor, ds / "imagesTs", tmp)
                dice[tag] = _dice(ds / "labelsTs", out)
            rows.append({"segmenter": seg, "trainer": trainer, "plans": plans, "iterations": a.epochs * its,
                         "train_s": seconds, "dice": dice})
            t = "reused" if seconds is None else f"{seconds:6.1f} s"
            print(f"{SEGMENTERS[seg][2]:11s} {a.epochs}x{its:4d} it  train {t:>8s}  " +
                  "  ".join(f"{tag.split()[0]} {d['all']:.3f}" for tag, d in dice.items()), flush=True)

    print(f"\nsource: vendor A, {a.subjects} subjects x ED/ES, matrix {a.matrix}, seed {a.seed}; test: "
          f"{a.test_subjects} subjects x ED/ES per vendor (targets seed {a.target_seed}); plans {plans}; mean Dice "
          f"over LV/MYO/RV")
    print(f"goals: in-domain >= {IN_DOMAIN_GOAL}, target in [{TARGET_GOAL[0]}, {TARGET_GOAL[1]}]")
    head = f"{'segmenter':11s} {'iters':>5s} {'train s':>8s} " + " ".join(f"{t.split()[0]:>7s}" for t in tests)
    print(head)
    for r in rows:
        marks = []
        for tag, d in r["dice"].items():
            ok = d["all"] >= IN_DOMAIN_GOAL if tag.startswith("A") else TARGET_GOAL[0] <= d["all"] <= TARGET_GOAL[1]
            marks.append(f"{d['all']:6.3f}{' ' if ok else '!'}")
        t = "-" if r["train_s"] is None else f"{r['train_s']:.1f}"
        print(f"{SEGMENTERS[r['segmenter']][2]:11s} {r['iterations']:5d} {t:>8s} " + " ".join(marks))
    print("('!': outside the goal)")
    write_json({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, a.workdir / "calibration.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
