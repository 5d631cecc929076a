"""The quality report (``nnUNetv2_sddm_quality``): image sets and pairs, and the command on
phantoms with known answers: a copy of the training set is flagged as copies (SSIM 1, PSNR inf,
Frechet distance 0), an independent draw of the same vendor is not; membership inference runs."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _micro_model import micro_model_folder, one_torch_thread


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Vendor-A phantoms (3 training + 2 test subjects, 32 px), an exact copy of them with
    ``cases.json`` provenance, and an independent draw (seed 7) of vendor A."""
    import os

    from nnunet_sddm.data.phantoms import generate_phantom_dataset

    root = tmp_path_factory.mktemp("quality")
    old = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k in old:
        (root / k).mkdir()
        os.environ[k] = str(root / k)
    try:
        real = generate_phantom_dataset(61, "A", 3, n_test_cases=2, matrix=32)
        other = generate_phantom_dataset(62, "A", 3, matrix=32, seed=7, name="PhantomAOther")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    copy = root / "Dataset063_Copy"
    (copy / "imagesTr").mkdir(parents=True)
    (copy / "labelsTr").mkdir()
    shutil.copy(real / "dataset.json", copy / "dataset.json")
    records = []
    for r in json.loads((real / "cases.json").read_text()):
        if r["split"] != "Tr":
            continue
        case = f"{r['case']}_syn0"
        shutil.copy(real / "imagesTr" / f"{r['case']}_0000.nii.gz", copy / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(real / "labelsTr" / f"{r['case']}.nii.gz", copy / "labelsTr" / f"{case}.nii.gz")
        records.append({**r, "case": case, "source_case": r["case"], "synthetic": True})
    (copy / "cases.json").write_text(json.dumps(records))
    with one_torch_thread():
        model = micro_model_folder(root / "model")
    return {"real": real, "other": other, "copy": copy, "model": model, "root": root}


def test_image_sets_and_pairs(sets):
    from nnunet_sddm.evaluation.quality_slices import REPORT_SIZE, image_set, load_report_slices, pair_slices
    from nnunet_sddm.utilities.errors import SDDMError

    real = image_set(sets["real"], "-r")
    assert [c.case for c in real.cases] == sorted(c.case for c in real.cases) and len(real.cases) == 6
    assert real.labelled and all(c.subject == c.case.rsplit("_", 1)[0] for c in real.cases)
    test = image_set(sets["real"] / "imagesTs", "--heldout")  # an images folder: labels from labelsTs
    assert len(test.cases) == 4 and test.labelled
    copy = image_set(sets["copy"], "-s")
    assert all(c.source_case == c.case[:-len("_syn0")] for c in copy.cases)

    R = load_report_slices(real, progress=False)
    Y = load_report_slices(copy, progress=False)
    assert R.images.shape[1:] == (REPORT_SIZE, REPORT_SIZE) and R.images.dtype == np.float32
    assert 0.0 <= R.images.min() and R.images.max() <= 1.0 and R.images.max() > 0.9
    assert R.heart is not None and 0.0 < R.heart.mean() < 0.5
    pairs = pair_slices(Y, R)
    assert len(pairs) == len(Y) == pairs.by_provenance and pairs.by_name == 0
    assert np.array_equal(Y.images[pairs.synthetic], R.images[pairs.real])
    assert list(R.z[pairs.real]) == list(Y.z[pairs.synthetic])
    # no provenance: pairs by case name (both draws name their subjects PhA0000 ...)
    O = load_report_slices(image_set(sets["other"] / "imagesTr", "-s"), progress=False)
    named = pair_slices(O, R)  # by name where the slice counts agree
    assert 0 < len(named) == named.by_name < len(O)
    assert all(R.case[b] == O.case[a] for a, b in zip(named.synthetic, named.real))
    with pytest.raises(SDDMError, match="the case it was made from"):
        pair_slices(Y, type(R)(**{**R.__dict__, "case": np.where(R.case == "PhA0000_ED", "PhA0000_ES", R.case)}))
    with pytest.raises(SDDMError, match="not a folder"):
        image_set(sets["root"] / "missing", "-s")


def _run(args):
    from nnunet_sddm.cli.evaluation import quality_main

    with one_torch_thread():
        return quality_main(args)


def test_copy_of_the_training_set_is_flagged(sets, tmp_path):
    out = tmp_path / "copy_report"
    rc = _run(["-s", str(sets["copy"]), "-r", str(sets["real"]), "--train", str(sets["real"] / "imagesTr"),
               "--heldout", str(sets["real"] / "imagesTs"), "-m", str(sets["model"]), "-o", str(out),
               "-np", "1", "--quiet"])
    assert rc == 0
    q = json.loads((out / "quality.json").read_text())
    assert q["paired"]["pairs"] == q["slices"]["synthetic"] > 0
    assert q["paired"]["ssim"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert q["paired"]["psnr"]["inf"] == q["paired"]["pairs"]
    fd = {r["comparison"]: r["frechet"] for r in q["distances"]}
    assert fd["synthetic vs train"] == pytest.approx(0.0, abs=1e-6)
    assert fd["held-out vs train"] > 1e-3
    # -r is the training set: comparing it with itself would say nothing, so those rows are left out
    assert q["real_is_train"] and "real vs train" not in fd and "synthetic vs real" not in fd
    assert q["paired"]["by_provenance"] == q["paired"]["pairs"] and q["paired"]["by_name"] == 0
    syn = q["privacy"]["synthetic"]
    assert syn["likely_copy"] == 1.0 and syn["d1_rms_median"] == 0.0 and syn["nearest_is_source"] == 1.0
    held = q["privacy"]["heldout"]
    assert held["likely_copy"] == 0.0
    m = q["membership"]
    assert 0.0 <= m["ci_low"] <= m["auc"] <= m["ci_high"] <= 1.0
    assert m["members"] == q["slices"]["train"] and m["non_members"] == q["slices"]["heldout"]
    rows = list(csv.DictReader(open(out / "privacy.csv")))
    assert len(rows) == q["slices"]["synthetic"] and all(r["likely_copy"] == "True" for r in rows)
    for name in ("quality.md", "paired.csv", "distances.csv", "membership.csv", "nearest_neighbours.png", "roc.png"):
        assert (out / name).is_file(), name
    md = (out / "quality.md").read_text()
    assert "100.0%" in md and "ROC-AUC" in md and "weak proxy" in md
    # an existing report is refused (exit 2, untouched), --overwrite replaces it
    before = (out / "quality.json").read_bytes()
    with pytest.raises(SystemExit):
        _run(["-s", str(sets["copy"]), "-r", str(sets["real"]), "-o", str(out), "--quiet"])
    assert (out / "quality.json").read_bytes() == before


def test_independent_draw_is_not_flagged(sets, tmp_path):
    out = tmp_path / "other_report"
    assert _run(["-s", str(sets["other"] / "imagesTr"), "-r", str(sets["real"]), "--train",
                 str(sets["real"] / "imagesTr"), "-o", str(out), "-np", "1", "--quiet"]) == 0
    q = json.loads((out / "quality.json").read_text())
    assert q["privacy"]["synthetic"]["likely_copy"] <= 0.05
    assert q["privacy"]["synthetic"]["d1_rms_median"] > q["privacy"]["copy_threshold_rms"]
    assert "membership" not in q and (out / "nearest_neighbours.png").is_file() and not (out / "roc.png").exists()
    assert "Not measured: give the model" in (out / "quality.md").read_text()
    assert q["paired"]["pairs"] == q["paired"]["by_name"] > 0 and q["paired"]["ssim"]["mean"] < 0.99  # other anatomy
    assert "Pairs by name assume" in (out / "quality.md").read_text()
    # same command, same result (also with worker processes); --overwrite replaces the report
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".csv", ".json", ".md")}
    assert _run(["-s", str(sets["other"] / "imagesTr"), "-r", str(sets["real"]), "--train",
                 str(sets["real"] / "imagesTr"), "-o", str(out), "-np", "2", "--quiet", "--overwrite"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".csv", ".json", ".md")} == files


def test_bad_input_is_refused(sets, tmp_path, capsys):
    for args, message in (
            (["-m", str(sets["model"])], "needs both --train"),
            (["--inception-weights", str(tmp_path / "no.pth")], "--inception-weights"),
            (["--train", str(tmp_path / "missing")], "--train"),
    ):
        out = tmp_path / "report"
        with pytest.raises(SystemExit) as e:
            _run(["-s", str(sets["copy"]), "-r", str(sets["real"]), "-o", str(out), "--quiet"] + args)
        assert e.value.code == 2 and message in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".report*"))
