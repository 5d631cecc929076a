"""Statistics (Welch = scipy, CIs), entry-name parsing, Table-1 marks, LaTeX/CSV/PNG outputs."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

from nnunet_sddm.cli.evaluation import compare_main
from nnunet_sddm.evaluation.compare import compare_results, parse_entry_name
from nnunet_sddm.evaluation.evaluate import PER_CASE_COLUMNS
from nnunet_sddm.evaluation.statistics import confidence_interval, describe, welch
from nnunet_sddm.utilities.errors import SDDMError


def test_welch_equals_scipy_and_describe():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.8, 0.05, 40), rng.normal(0.78, 0.12, 25)
    w = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w["p"] == ref.pvalue and w["t"] == ref.statistic
    a_nan = np.concatenate([a, [np.nan, np.nan]])
    assert welch(a_nan, b)["p"] == ref.pvalue and welch(a_nan, b)["n_a"] == 40
    assert welch([1.0, 1.0], [1.0, 1.0])["p"] == 1.0
    assert math.isnan(welch([1.0], b)["p"])
    d = describe(a_nan)
    assert d["n"] == 40 and d["n_nan"] == 2 and d["mean"] == pytest.approx(a.mean())
    lo, hi = stats.t.interval(0.95, 39, loc=a.mean(), scale=stats.sem(a))
    assert (d["ci95_low"], d["ci95_high"]) == pytest.approx((lo, hi))
    assert all(math.isnan(v) for v in confidence_interval([2.0, np.nan]))


def test_parse_entry_name():
    assert parse_entry_name("DA/2d_nnunet") == ("DA", "2d_nnunet")
    assert parse_entry_name("approach=DG, model=3d") == ("DG", "3d")
    assert parse_entry_name("Mixed") == ("Mixed", "")
    with pytest.raises(SDDMError):
        parse_entry_name("approach=DA,foo=1")


def write_per_case(path, rng, means):
    """A per_case.csv with 12 cases x 3 structures; means: {metric: mean}."""
    path.mkdir(parents=True)
    with open(path / "per_case.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PER_CASE_COLUMNS)
        for c in range(12):
            for s in ("LV", "MYO", "RV"):
                vals = [means[m] + rng.normal(0, 0.02 if m in ("DSC", "IoU") else 0.3)
                        for m in ("DSC", "IoU", "ASD", "ASSD", "HD", "HD95")]
                w.writerow([f"c{c}", s] + [repr(float(v)) for v in vals])


@pytest.mark.timeout(60)
def test_compare_tables_marks_and_figures(tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = dict(DSC=0.85, IoU=0.75, ASD=1.5, ASSD=1.5, HD=20.0, HD95=6.0)
    same = dict(DSC=0.849, IoU=0.749, ASD=1.52, ASSD=1.5, HD=20.1, HD95=6.05)
    bad = dict(DSC=0.70, IoU=0.55, ASD=3.0, ASSD=3.5, HD=30.0, HD95=12.0)
    write_per_case(tmp_path / "base", rng, good)
    write_per_case(tmp_path / "da", rng, same)
    write_per_case(tmp_path / "dg", rng, bad)
    out = tmp_path / "cmp"
    compare_main(["--baseline", f"Baseline/2d={tmp_path / 'base'}",
                  "--candidates", f"DA/2d={tmp_path / 'da'}", f"DG/2d={tmp_path / 'dg'}", "-o", str(out)])
    assert "written to" in capsys.readouterr().out
    for name in ("table.md", "table.csv", "table.tex", "table_LV.md", "welch.csv", "compare.json"):
        assert (out / name).is_file(), name
    for m in ("DSC", "IoU", "ASD", "ASSD", "HD", "HD95"):
        png = (out / f"fig_{m}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    with open(out / "table.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    # DG is clearly worse: never best nor "not significantly worse"; significant vs baseline
    assert all(rows["DG/2d"][f"{m}_mark"] == "" for m in ("DSC", "HD95"))
    assert float(rows["DG/2d"]["DSC_p_vs_baseline"]) < 0.01
    # baseline and DA are indistinguishable: one is best, the other marked not significantly worse
    marks = {rows["Baseline/2d"]["DSC_mark"], rows["DA/2d"]["DSC_mark"]}
    assert marks == {"best", "ns"}
    best_dsc = max(float(rows[n]["DSC"]) for n in rows)
    assert float(rows[[n for n in rows if rows[n]["DSC_mark"] == "best"][0]]["DSC"]) == best_dsc
    best_hd = min(float(rows[n]["HD95"]) for n in rows)
    assert float(rows[[n for n in rows if rows[n]["HD95_mark"] == "best"][0]]["HD95"]) == best_hd
    md = (out / "table.md").read_text()
    assert "Higher is better for DSC, IoU" in md and "lower is better for ASD" in md and "**" in md
    tex = (out / "table.tex").read_text()
    assert r"\textbf{" in tex and r"\begin{tabular}" in tex
    with open(out / "welch.csv") as f:
        wrows = list(csv.DictReader(f))
    assert len(wrows) == 2 * 4 * 6  # candidates x (3 structures + all) x metrics
    # Welch p equals scipy on the same per-case values
    import nnunet_sddm.evaluation.evaluate as ev

    a = ev.load_results(tmp_path / "dg").values("LV", "HD")
    b = ev.load_results(tmp_path / "base").values("LV", "HD")
    w = [r for r in wrows if r["candidate"] == "DG/2d" and r["structure"] == "LV" and r["metric"] == "HD"][0]
    assert float(w["p"]) == stats.ttest_ind(a, b, equal_var=False).pvalue
    # per_case.csv without empty flags (older versions): no NaN-policy tables, counts n/a
    assert not (out / "table_finite.md").exists() and "n/a / n/a" in (out / "missing.md").read_text()
    with open(out / "structures.csv") as f:
        assert all(r["missing"] == "nan" for r in csv.DictReader(f))
    assert "Wilcoxon signed-rank" in md and "Holm-adjusted" in md


@pytest.mark.timeout(60)
def test_compare_cli_repeats_and_test_choice(tmp_path, capsys):
    rng = np.random.default_rng(1)
    good = dict(DSC=0.85, IoU=0.75, ASD=1.5, ASSD=1.5, HD=20.0, HD95=6.0)
    for name in ("base", "da1", "da2"):
        write_per_case(tmp_path / name, rng, good)
    out = tmp_path / "cmp"
    compare_main(["--baseline", f"Baseline/2d={tmp_path / 'base'}", "--candidates", f"DA/2d={tmp_path / 'da1'}",
                  f"DA/2d={tmp_path / 'da2'}", "-o", str(out), "--test", "welch", "--n-boot", "200"])
    with open(out / "tests.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["repeats"] for r in rows} == {"2"} and {r["test"] for r in rows} == {"welch"}
    with open(out / "table.csv") as f:
        da = [r for r in csv.DictReader(f) if r["name"] == "DA/2d"][0]
    assert da["DSC_repeats"] == "2" and float(da["DSC_spread"]) >= 0
    assert "Welch's t-test" in (out / "table.md").read_text() and " ± " in (out / "table.md").read_text()
    assert json.loads((out / "compare.json").read_text())["rows"]["DA/2d"]["repeats"] == 2


def test_compare_bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    write_per_case(tmp_path / "base", rng, dict(DSC=0.8, IoU=0.7, ASD=1, ASSD=1, HD=9, HD95=3))
    with pytest.raises(SDDMError, match="per_case.csv"):
        compare_results(("B", tmp_path / "base"), {"X": tmp_path / "nope"})
    with pytest.raises(SDDMError, match="two baselines"):
        compare_results([("B/2d", tmp_path / "base"), ("C/2d", tmp_path / "base")], {"X/2d": tmp_path / "base"})
    with pytest.raises(SDDMError, match="no baseline with model"):
        compare_results([("B/2d", tmp_path / "base"), ("B/3d", tmp_path / "base")], {"X/unet": tmp_path / "base"})
    (tmp_path / "exists").mkdir()
    with pytest.raises(SDDMError, match="exists"):
        compare_results(("B", tmp_path / "base"), {"X": tmp_path / "base"}, out_dir=tmp_path / "exists")
    with pytest.raises(SystemExit) as e:
        compare_main(["--baseline", "noequals", "--candidates", f"X={tmp_path / 'base'}", "-o", str(tmp_path / "o")])
    assert e.value.code == 2


def test_bar_styles_distinguish_every_entry():
    from nnunet_sddm.evaluation.figures import _bar_styles

    table = [f"{a}/{m}" for a in ("Baseline", "DA", "DG", "Mixed", "DA+ens", "Mixed+ens")
             for m in ("2D nnU-Net", "3D nnU-Net", "2D U-Net")]
    styles = _bar_styles(table)
    assert len(set(styles.values())) == len(table) == 18  # tab10 alone would repeat colours
    assert len({c for c, _ in styles.values()}) == 6 and len({h for _, h in styles.values()}) == 3
    few = _bar_styles(["Baseline", "DA", "DG"])
    assert len({c for c, _ in few.values()}) == 3 and not any(h for _, h in few.values())


def test_all_counts_each_case_once():
    """'all' = one value per case (mean over its structures), so n = cases, not cases x structures."""
    from nnunet_sddm.evaluation.evaluate import EvaluationResults

    rows = [{"case": c, "structure": s, "HD": v} for c, vals in (("a", (1.0, 2.0, 3.0)), ("b", (4.0, math.nan, 8.0)),
                                                                  ("c", (math.nan,) * 3))
            for s, v in zip(("LV", "MYO", "RV"), vals)]
    res = EvaluationResults(rows=rows, structures=["LV", "MYO", "RV"])
    np.testing.assert_array_equal(res.values("all", "HD"), [2.0, 6.0, np.nan])
    np.testing.assert_array_equal(res.values("MYO", "HD"), [2.0, np.nan, np.nan])


def test_tables_show_how_many_cases_a_mean_rests_on():
    from nnunet_sddm.evaluation.evaluate import EvaluationResults

    def res(values):
        return EvaluationResults(rows=[{"case": f"c{i}", "structure": "LV", **{m: v for m in
                                        ("DSC", "IoU", "ASD", "ASSD", "HD", "HD95")}}
                                       for i, v in enumerate(values)], structures=["LV"])

    out = compare_results(("Baseline/2d", res([30.0, 31, 29, 30])), {"DA/2d": res([10.0, math.nan, math.nan, 11])})
    md = out["markdown"]
    assert md.count("(n=2/4)") == 6 and md.count("(n=4/4)") == 0  # every DA cell; none for the baseline
    assert "only k of the N cases had a finite value" in md
