"""Folder evaluation end to end (outputs, labels, per-slice mode) and its bad-input handling."""
from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from medpy.metric import binary as mb

from nnunet_sddm.cli.evaluation import compare_main, domain_shift_main, evaluate_main
from nnunet_sddm.evaluation.evaluate import combine_labels, evaluate_folders, load_results
from nnunet_sddm.utilities.errors import SDDMError

SPACING_XYZ = (1.5, 1.25, 8.0)  # file order (x, y, z)


def save(path, arr_zyx, affine=None, dtype=np.uint8):
    aff = np.diag(list(SPACING_XYZ) + [1.0]) if affine is None else affine
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr_zyx).transpose(2, 1, 0).astype(dtype), aff), str(path))


def heart(shape=(6, 32, 30), shift=(0, 0)):
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    r = np.hypot(y - 16 - shift[0], x - 14 - shift[1])
    lab = np.zeros(shape, np.uint8)
    lab[(r >= 5) & (r < 8)] = 2
    lab[r < 5] = 1
    lab[(np.abs(y - 16 - shift[0]) < 4) & (x - shift[1] >= 23) & (x - shift[1] < 28)] = 3
    lab[0] = 0
    return lab


@pytest.fixture
def folders(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for i in range(3):
        save(ref / f"case_{i}.nii.gz", heart())
        p = heart(shift=(i % 2, 1))
        if i == 2:
            p[p == 3] = 0  # RV missing in the prediction: one-empty case
        save(pred / f"case_{i}.nii.gz", p)
    (pred / "plans.json").write_text("{}")  # non-image files in a prediction folder are ignored
    return ref, pred


@pytest.mark.timeout(60)
def test_evaluate_outputs_and_medpy_values(folders, tmp_path):
    ref, pred = folders
    out = tmp_path / "out"
    res = evaluate_folders(ref, pred, num_processes=2, out_dir=out, progress=False)
    with open(out / "per_case.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["case", "structure", "DSC", "IoU", "ASD", "ASSD", "HD", "HD95", "pred_empty", "ref_empty"]
    assert len(rows) == 1 + 3 * 3
    flags = {(r[0], r[1]): (r[8], r[9]) for r in rows[1:]}
    assert flags["case_2", "RV"] == ("1", "0") and flags["case_0", "RV"] == ("0", "0")
    sp = SPACING_XYZ[::-1]
    for r in res.rows:
        if r["case"] == "case_2" and r["structure"] == "RV":
            assert r["DSC"] == 0.0 and math.isnan(r["HD"])
            continue
        v = {"LV": 1, "MYO": 2, "RV": 3}[r["structure"]]
        i = int(r["case"][-1])
        p = heart(shift=(i % 2, 1)) == v
        q = heart() == v
        assert r["HD95"] == pytest.approx(mb.hd95(p, q, sp), abs=1e-9)
        assert r["ASSD"] == pytest.approx(mb.assd(p, q, sp), abs=1e-9)
        assert r["DSC"] == pytest.approx(mb.dc(p, q), abs=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["structures"]["RV"]["empty"] == {"pred_empty": 1, "ref_empty": 0, "both_empty": 0}
    assert summary["structures"]["RV"]["metrics"]["HD"]["n"] == 2
    assert summary["structures"]["RV"]["metrics"]["HD"]["n_nan"] == 1
    assert summary["config"]["labels"] == {"LV": 1, "MYO": 2, "RV": 3}
    assert "package_version" in summary["config"]
    assert (out / "summary.md").read_text().startswith("# Evaluation")
    loaded = load_results(out)
    np.testing.assert_allclose(loaded.values("MYO", "HD95"), res.values("MYO", "HD95"))
    assert loaded.has_flags and loaded.one_empty("RV").tolist() == [False, False, True]
    assert summary["skipped_structures"] == {}
    # the diagonal penalty replaces the NaN and is counted the same way
    res2 = evaluate_folders(ref, pred, num_processes=1, empty_policy="diagonal", progress=False)
    rv = [r for r in res2.rows if r["case"] == "case_2" and r["structure"] == "RV"][0]
    assert rv["HD"] == pytest.approx(math.sqrt((30 * 1.5) ** 2 + (32 * 1.25) ** 2 + (6 * 8.0) ** 2))


@pytest.mark.timeout(60)
def test_labels_from_dataset_json_and_argument_and_per_slice(folders, tmp_path):
    ref, pred = folders
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "RV": 3, "LV": 1, "MYO": 2}, "file_ending": ".nii.gz"}))
    res = evaluate_folders(ref, pred, dataset_json=dj, num_processes=1, progress=False)
    assert res.structures == ["RV", "LV", "MYO"]
    res = evaluate_folders(ref, pred, labels=["LV=1", "MYO=2", "RV=3"], num_processes=1, per_slice=True,
                           out_dir=tmp_path / "ps", progress=False)
    assert res.structures == ["LV", "MYO", "RV"]
    assert (tmp_path / "ps" / "per_slice.csv").is_file()
    lv0 = [r for r in res.slice_rows if r["case"] == "case_0" and r["structure"] == "LV"]
    assert len(lv0) == 6 and math.isnan(lv0[0]["DSC"])  # slice 0 empty in both
    case_lv = [r for r in res.rows if r["case"] == "case_0" and r["structure"] == "LV"][0]
    assert case_lv["DSC"] == pytest.approx(np.mean([r["DSC"] for r in lv0[1:]]))


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_main(args)
    return e.value.code, capsys.readouterr().err


@pytest.mark.timeout(60)
def test_bad_inputs(folders, tmp_path, capsys):
    ref, pred = folders
    base = ["-ref", str(ref), "-pred", str(pred), "-np", "1", "--quiet"]
    # missing case on the prediction side: listed, refused unless --allow-missing
    (pred / "case_1.nii.gz").rename(tmp_path / "moved.nii.gz")
    code, err = run_cli(base + ["-o", str(tmp_path / "o1")], capsys)
    assert code == 2 and "case_1" in err and "--allow-missing" in err
    assert not (tmp_path / "o1").exists()
    evaluate_main(base + ["-o", str(tmp_path / "o2"), "--allow-missing"])
    s = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert s["missing"]["in_prediction"] == ["case_1"] and s["n_cases"] == 2
    (tmp_path / "moved.nii.gz").rename(pred / "case_1.nii.gz")
    # existing output folder is not overwritten
    code, err = run_cli(base + ["-o", str(tmp_path / "o2")], capsys)
    assert code == 2 and "exists" in err
    # label value outside the map
    bad = heart()
    bad[3, 2, 2] = 7
    save(pred / "case_0.nii.gz", bad)
    code, err = run_cli(base + ["-o", str(tmp_path / "o3")], capsys)
    assert code == 2 and "case_0" in err and "[7]" in err
    # shape mismatch
    save(pred / "case_0.nii.gz", heart(shape=(6, 30, 30)))
    code, err = run_cli(base + ["-o", str(tmp_path / "o4")], capsys)
    assert code == 2 and "shape" in err and "case_0" in err
    # geometry (affine) mismatch
    aff = np.diag(list(SPACING_XYZ) + [1.0])
    aff[0, 3] = 12.0
    save(pred / "case_0.nii.gz", heart(), affine=aff)
    code, err = run_cli(base + ["-o", str(tmp_path / "o5")], capsys)
    assert code == 2 and "affine" in err
    # unreadable file
    (pred / "case_0.nii.gz").write_bytes(b"not a nifti")
    code, err = run_cli(base + ["-o", str(tmp_path / "o6")], capsys)
    assert code == 2 and "case_0.nii.gz" in err and "cannot read" in err
    # malformed --labels
    code, err = run_cli(base + ["-o", str(tmp_path / "o7"), "--labels", "LV:1"], capsys)
    assert code == 2 and "NAME=VALUE" in err
    for o in ("o1", "o3", "o4", "o5", "o6", "o7"):
        assert not (tmp_path / o).exists()


@pytest.mark.parametrize("main", [compare_main, evaluate_main, domain_shift_main])
def test_help_texts_are_printed_as_written(main, capsys):
    # issue 11: nnUNetv2_sddm_compare --help printed "95%% CIs" (a description is not %-formatted)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "%%" not in out and "SDDM_METHOD" not in out and "NNUNET_INTEGRATION" not in out
    if main is compare_main:
        assert "95% CI" in " ".join(out.split())


@pytest.mark.timeout(60)
def test_target_with_fewer_labels_than_the_model(tmp_path, capsys):
    """A source-trained model predicts LV, MYO, RV; the target annotates LV and MYO only."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for i in range(2):
        r = heart()
        r[r == 3] = 0
        save(ref / f"case_{i}.nii.gz", r)
        save(pred / f"case_{i}.nii.gz", heart(shift=(i, 1)))  # contains RV=3
    target = {"LV": 1, "MYO": 2}
    with pytest.raises(SDDMError, match=r"\[3\]"):  # without the model's labels, value 3 is refused
        evaluate_folders(ref, pred, labels=target, num_processes=1, progress=False)
    res = evaluate_folders(ref, pred, labels=target, prediction_labels={"LV": 1, "MYO": 2, "RV": 3},
                           num_processes=1, out_dir=tmp_path / "out", progress=False)
    assert res.structures == ["LV", "MYO"] and {r["structure"] for r in res.rows} == {"LV", "MYO"}
    assert res.skipped_structures == {"RV": {"value": 3, "only_in": "prediction labels"}}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_structures"] == res.skipped_structures
    assert summary["config"]["prediction_labels"] == {"LV": 1, "MYO": 2, "RV": 3}
    lv = [r for r in res.rows if r["case"] == "case_1" and r["structure"] == "LV"][0]
    assert lv["DSC"] == pytest.approx(mb.dc(heart(shift=(1, 1)) == 1, heart() == 1), abs=1e-12)
    # the same from the command line, with the model's dataset.json
    dj = tmp_path / "source_dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "LV": 1, "MYO": 2, "RV": 3}}))
    evaluate_main(["-ref", str(ref), "-pred", str(pred), "--labels", "LV=1", "MYO=2", "-pred-djfile", str(dj),
                   "-o", str(tmp_path / "o2"), "-np", "1", "--quiet"])
    assert "RV=3 (prediction labels)" in capsys.readouterr().out
    evaluate_main(["-ref", str(ref), "-pred", str(pred), "--labels", "LV=1", "MYO=2", "--prediction-labels",
                   "LV=1", "MYO=2", "RV=3", "-o", str(tmp_path / "o3"), "-np", "1", "--quiet"])
    assert load_results(tmp_path / "o3").structures == ["LV", "MYO"]
    # nnU-Net copies the MODEL's dataset.json into its prediction folder: with the model's labels given,
    # the reference's are not taken from there (they come from the reference side)
    (pred / "dataset.json").write_text(dj.read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "LV": 1, "MYO": 2}}))
    res = evaluate_folders(ref, pred, prediction_dataset_json=dj, num_processes=1, progress=False)
    assert res.structures == ["LV", "MYO"] and list(res.skipped_structures) == ["RV"]
    # conflicting maps are refused: one name with two values, one value with two names
    with pytest.raises(SDDMError, match="conflicting label maps.*LV=1.*LV=2"):
        evaluate_folders(ref, pred, labels=target, prediction_labels={"LV": 2, "MYO": 1}, progress=False)
    with pytest.raises(SDDMError, match="value 2 is 'MYO'.*'Myocardium'"):
        combine_labels(target, {"LV": 1, "Myocardium": 2})
    with pytest.raises(SDDMError, match="no structure in common"):
        combine_labels({"LV": 1}, {"RV": 3})
    ev, sk = combine_labels({"LV": 1, "MYO": 2, "RV": 3}, {"LV": 1, "MYO": 2})  # and the reverse subset
    assert ev == {"LV": 1, "MYO": 2} and sk == {"RV": {"value": 3, "only_in": "reference labels"}}


def test_a_unit_scale_sform_is_read_as_itk_reads_it(folders, tmp_path):
    """Some ACDC files carry sform code 2 with unit scales and qform code 0 (the spacing only in
    pixdim): ITK, and so nnU-Net, keeps the sform's directions and origin with pixdim's spacing,
    and a prediction nnU-Net writes with that geometry evaluates against it; a really different
    placement is still refused."""
    import SimpleITK as sitk

    from nnunet_sddm.evaluation.io import nifti_affine

    ref, _ = folders
    img = nib.Nifti1Image(heart().transpose(2, 1, 0), np.diag(list(SPACING_XYZ) + [1.0]))
    img.set_qform(np.diag(list(SPACING_XYZ) + [1.0]), code=0)
    unit = np.diag([-1.0, -1.0, 1.0, 1.0])
    unit[:3, 3] = (4.0, -7.5, 20.0)  # an origin, which ITK keeps
    img.set_sform(unit, code=2)
    nib.save(img, str(ref / "case_0.nii.gz"))
    itk = sitk.ReadImage(str(ref / "case_0.nii.gz"))
    want = np.eye(4)
    want[:3, :3] = np.asarray(itk.GetDirection()).reshape(3, 3) * np.asarray(itk.GetSpacing())
    want[:3, 3] = itk.GetOrigin()
    want[:2] *= -1  # ITK's LPS -> NIfTI's RAS
    np.testing.assert_allclose(nifti_affine(nib.load(str(ref / "case_0.nii.gz"))), want, atol=1e-6)
    pred = tmp_path / "pred_itk"
    pred.mkdir()
    for case in ("case_0", "case_1", "case_2"):
        out = sitk.GetImageFromArray(heart())
        out.CopyInformation(sitk.ReadImage(str(ref / f"{case}.nii.gz")))
        sitk.WriteImage(out, str(pred / f"{case}.nii.gz"))
    assert evaluate_folders(ref, pred, progress=False).summary["n_cases"] == 3
    moved = sitk.ReadImage(str(pred / "case_0.nii.gz"))
    moved.SetOrigin((12.0, 0.0, 0.0))
    sitk.WriteImage(moved, str(pred / "case_0.nii.gz"))
    with pytest.raises(SDDMError, match="affine"):
        evaluate_folders(ref, pred, progress=False)
