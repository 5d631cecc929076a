"""Speed of the project's metrics against MedPy 0.5.2 on the same cases, values asserted equal.

For every case and structure (LV, MYO, RV) both compute DSC, IoU, ASD, ASSD, HD and HD95 with
the voxel spacing: MedPy as a user calls it (``dc, jc, asd, assd, hd, hd95`` one after the
other), the project with ``nnunet_sddm.evaluation.metrics.case_metrics`` (surface distances once
per structure, on a crop). Both run in this process on the same in-memory arrays (file reading
is excluded; one process each, so the ratio is the algorithmic speed-up; the folder evaluator
additionally runs cases in parallel). Every value must agree to 1e-6 (mm for distances).

    python benchmarks/metrics_speed.py                      # generated cardiac-like data, < 2 min on CPU
    python benchmarks/metrics_speed.py --real /work/shared/data [--max-acdc 20]

With ``--real``: the reference label maps of M&Ms (all) and ACDC (the first ``--max-acdc``
frames) and, as "predictions", each reference shifted by one voxel in-plane with the MYO
dilated and a slice's RV removed (realistic errors, an empty-slice case included).
The last line is ``speedup_vs_medpy: <number>``.

With ``--command`` the comparison is end to end, process start included: the cases are written
as NIfTI label maps (``ref/``, ``pred/``), then two fresh processes are timed on them: a MedPy
script as a user writes it (nibabel reading, ``dc, jc, asd, assd, hd, hd95`` per structure, one
CSV) and ``nnUNetv2_sddm_evaluate -ref ref -pred pred -np N`` (its launcher, start-up check,
reading, metrics, per_case.csv / summary.json / summary.md), each ``--repeats`` times (median).
Both CSVs must agree to 1e-6. The last line is then ``command_speedup_vs_medpy: <number>`` (for
the last ``-np`` given).

    python benchmarks/metrics_speed.py --real /work/shared/data --max-acdc 6 --command -np 1 2
"""
from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

LABELS = {"LV": 1, "MYO": 2, "RV": 3}
TOL = 1e-6


def generated_cases(n: int = 12, seed: int = 0):
    """Cardiac-like label maps (12 x 224 x 208, spacing 8 x 1.4 x 1.4 mm) and perturbed predictions."""
    rng = np.random.default_rng(seed)
    shape, spacing = (12, 224, 208), (8.0, 1.4, 1.4)
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    cases = []
    for i in range(n):
        def heart(dz, dy, dx, scale):
            cy, cx = 112 + dy, 104 + dx
            taper = np.clip(1 - ((z - 5.5 - dz) / (6.5 + 0.5 * scale)) ** 2, 0, None)
            r = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
            lab = np.zeros(shape, np.int16)
            r_lv, r_myo = (16 + 4 * scale) * np.sqrt(taper), (24 + 4 * scale) * np.sqrt(taper)
            rv = (((y - cy + 4) / (18 + 3 * scale)) ** 2 + ((x - cx - 30) / (26 + 3 * scale)) ** 2 < taper) & (r > r_myo)
            lab[rv] = 3
            lab[(r < r_myo) & (r >= r_lv)] = 2
            lab[r < r_lv] = 1
            return lab
        ref = heart(0, 0, 0, rng.uniform(-1, 1))
        pred = heart(rng.integers(-1, 2), rng.integers(-3, 4), rng.integers(-3, 4), rng.uniform(-1, 1))
        blob = ((z - rng.integers(0, 12)) ** 2 / 2 + (y - rng.integers(40, 180)) ** 2 + (x - rng.integers(30, 180)) ** 2) < 30
        pred[blob & (pred == 0)] = rng.integers(1, 4)          # a spurious island far away (drives HD)
        cases.append((f"gen_{i:03d}", ref, pred, spacing))
    return cases


def real_cases(root: Path, max_acdc: int = 20):
    """Reference label maps of M&Ms and ACDC with synthetic prediction errors."""
    import nibabel as nib

    root = Path(root)
    files = sorted((root / "MnMs1-sample").glob("*_gt.nii.gz"))
    files += sorted((root / "ACDC" / "training").glob("patient*/patient*_frame??_gt.nii.gz"))[:max_acdc]
    if not files:
        sys.exit(f"no *_gt.nii.gz label files under {root}")
    cases = []
    for f in files:
        img = nib.load(str(f))
        ref = np.rint(np.asarray(img.dataobj, dtype=np.float64)).astype(np.int16).transpose(2, 1, 0)
        spacing = tuple(float(s) for s in img.header.get_zooms()[:3])[::-1]
        pred = np.roll(ref, (1, -1), axis=(1, 2))
        myo = ndimage.binary_dilation(pred == 2, iterations=1) & (pred == 0)
        pred[myo] = 2
        rv_slices = np.flatnonzero((pred == 3).any(axis=(1, 2)))
        if rv_slices.size:
            k = rv_slices[0]
            pred[k][pred[k] == 3] = 0
        cases.append((f.name.replace("_gt.nii.gz", ""), ref, pred, spacing))
    return cases


def medpy_metrics(pred, ref, spacing):
    from medpy.metric import binary as mb

    out = []
    for name, v in LABELS.items():
        p, r = pred == v, ref == v
        if not p.any() or not r.any():
            out.append(None)  # MedPy raises on empty masks
            continue
        out.append({"DSC": mb.dc(p, r), "IoU": mb.jc(p, r), "ASD": mb.asd(p, r, spacing),
                    "ASSD": mb.assd(p, r, spacing), "HD": mb.hd(p, r, spacing), "HD95": mb.hd95(p, r, spacing)})
    return out


MEDPY_SCRIPT = """
import csv, sys
from pathlib import Path

import nibabel as nib
import numpy as np
from medpy.metric import binary as mb

ref_dir, pred_dir, out = map(Path, sys.argv[1:4])
rows = []
for rf in sorted(ref_dir.glob("*.nii.gz")):
    r_img, p_img = nib.load(str(rf)), nib.load(str(pred_dir / rf.name))
    ref, pred = np.asarray(r_img.dataobj), np.asarray(p_img.dataobj)
    sp = r_img.header.get_zooms()[:3]
    for name, v in {"LV": 1, "MYO": 2, "RV": 3}.items():
        p, r = pred == v, ref == v
        rows.append([rf.name[:-7], name, mb.dc(p, r), mb.jc(p, r), mb.asd(p, r, sp), mb.assd(p, r, sp),
                     mb.hd(p, r, sp), mb.hd95(p, r, sp)])
with open(out, "w", newline="") as f:
    csv.writer(f).writerows(rows)
"""


def write_cases(cases, folder: Path) -> None:
    """``folder/ref/CASE.nii.gz`` and ``folder/pred/CASE.nii.gz`` (int16, the cases' spacing)."""
    import nibabel as nib

    for sub in ("ref", "pred"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, ref, pred, spacing in cases:
        affine = np.diag(list(spacing[::-1]) + [1.0])
        for sub, lab in (("ref", ref), ("pred", pred)):
            nib.save(nib.Nifti1Image(lab.transpose(2, 1, 0).astype(np.int16), affine), str(folder / sub / f"{name}.nii.gz"))


def timed(cmd, repeats: int) -> float:
    """Median wall time of ``repeats`` runs of ``cmd`` (each a fresh process)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def command_comparison(cases, n_procs, repeats: int) -> float:
    from nnunet_sddm.evaluation.metrics import METRICS

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cases(cases, tmp)
        script = tmp / "medpy_eval.py"
        script.write_text(MEDPY_SCRIPT)
        t_medpy = timed([sys.executable, str(script), str(tmp / "ref"), str(tmp / "pred"), str(tmp / "medpy.csv")],
                        repeats)
        medpy = {(r[0], r[1]): [float(v) for v in r[2:]] for r in csv.reader(open(tmp / "medpy.csv"))}
        print(f"MedPy script (process start, nibabel reading, 6 metrics x 3 structures): {t_medpy:.2f} s "
              f"(median of {repeats})")
        speedup = float("nan")
        for n in n_procs:
            out = tmp / f"ours_np{n}"
            cmd = [sys.executable, "-m", "nnunet_sddm.cli.launch", "nnUNetv2_sddm_evaluate", "-ref", str(tmp / "ref"),
                   "-pred", str(tmp / "pred"), "-o", str(out), "--labels", "LV=1", "MYO=2", "RV=3", "--quiet",
                   "--overwrite", "-np", str(n)]
            t_ours = timed(cmd, repeats)
            for row in csv.DictReader(open(out / "per_case.csv")):
                ref_vals = medpy[(row["case"], row["structure"])]
                for m, v in zip(METRICS, ref_vals):
                    if not abs(float(row[m]) - v) <= TOL:
                        raise SystemExit(f"MISMATCH {row['case']} {row['structure']} {m}: medpy {v} vs ours {row[m]}")
            speedup = t_medpy / t_ours
            print(f"nnUNetv2_sddm_evaluate -np {n} (process start included): {t_ours:.2f} s (median of {repeats}), "
                  f"values equal to MedPy's; {speedup:.1f}x")
        return speedup


def main(argv=None) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nnunet_sddm.evaluation.metrics import METRICS, case_metrics

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", default=None, help="folder with ACDC/ and MnMs1-sample/ (e.g. /work/shared/data)")
    ap.add_argument("--max-acdc", type=int, default=20, help="ACDC frames to use with --real (default 20)")
    ap.add_argument("--cases", type=int, default=10, help="generated cases without --real (default 10)")
    ap.add_argument("--command", action="store_true",
                    help="compare whole commands, process start included (see the module docstring)")
    ap.add_argument("-np", type=int, nargs="+", default=[1], help="with --command: worker counts to run (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="with --command: runs of each command (default 3)")
    a = ap.parse_args(argv)
    cases = real_cases(Path(a.real), a.max_acdc) if a.real else generated_cases(a.cases)
    print(f"{len(cases)} cases ({'real: ' + a.real if a.real else 'generated'}), structures {list(LABELS)}")
    if a.command:
        speedup = command_comparison(cases, a.np, a.repeats)
        print(f"command_speedup_vs_medpy: {speedup:.1f}")
        return speedup

    t0 = time.perf_counter()
    ref_vals = [medpy_metrics(pred, ref, sp) for _, ref, pred, sp in cases]
    t_medpy = time.perf_counter() - t0
    t0 = time.perf_counter()
    our_vals = [case_metrics(pred, ref, LABELS, sp) for _, ref, pred, sp in cases]
    t_ours = time.perf_counter() - t0

    max_diff = {m: 0.0 for m in METRICS}
    n_compared = n_empty = 0
    for (case, *_), mp, ours in zip(cases, ref_vals, our_vals):
        for name, m_row, o_row in zip(LABELS, mp, ours):
            if m_row is None:
                n_empty += 1
                continue
            for m in METRICS:
                d = abs(float(m_row[m]) - o_row[m])
                max_diff[m] = max(max_diff[m], d)
                if not d <= TOL:
                    raise SystemExit(f"MISMATCH {case} {name} {m}: medpy {m_row[m]!r} vs ours {o_row[m]!r}")
                n_compared += 1
    print(f"compared {n_compared} values ({n_empty} empty structures skipped: MedPy raises there)")
    print("max |difference| per metric: " + ", ".join(f"{m} {max_diff[m]:.2e}" for m in METRICS))
    print(f"MedPy (dc, jc, asd, assd, hd, hd95): {t_medpy:.3f} s = {1000 * t_medpy / len(cases):.1f} ms/case")
    print(f"nnunet_sddm case_metrics:           {t_ours:.3f} s = {1000 * t_ours / len(cases):.1f} ms/case")
    speedup = t_medpy / t_ours
    print(f"speedup_vs_medpy: {speedup:.1f}")
    return speedup


if __name__ == "__main__":
    main()
