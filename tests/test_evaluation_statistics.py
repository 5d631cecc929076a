"""Paired tests (= scipy), Holm (= its definition), seeded bootstrap CIs, repeats, missing/spurious
counts, the NaN-policy tables, clipped chart CIs and byte-identical comparison CSVs."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import stats

from nnunet_sddm.evaluation.compare import Entry, compare_results, structure_counts
from nnunet_sddm.evaluation.evaluate import EvaluationResults, load_results, nan_policy_view, write_per_case_csv
from nnunet_sddm.evaluation.figures import bar_chart_ci, bar_stats, label_image_grid
from nnunet_sddm.evaluation.metrics import METRICS
from nnunet_sddm.evaluation.statistics import bootstrap_mean_ci, holm, paired_tests, wilcoxon_method
from nnunet_sddm.utilities.errors import SDDMError


def holm_by_definition(p):
    """Holm from its definition: sorted ascending, p~_(i) = max_{j<=i} min(1, (m-j+1) p_(j))."""
    p = list(p)
    idx = [i for i, v in enumerate(p) if not math.isnan(v)]
    m = len(idx)
    order = sorted(idx, key=lambda i: p[i])
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(order, start=1):
        running = max(running, min(1.0, (m - rank + 1) * p[i]))
        out[i] = running
    return out


def test_paired_tests_equal_scipy():
    rng = np.random.default_rng(7)
    b = rng.normal(0.8, 0.05, 30)
    c = b + rng.normal(0.01, 0.03, 30)
    c_nan, b_nan = np.append(c, [np.nan, 0.5]), np.append(b, [0.7, np.nan])  # unpaired NaNs dropped
    pt = paired_tests(c_nan, b_nan)
    assert pt["n"] == 30 and pt["mean_diff"] == pytest.approx(np.mean(c - b), abs=1e-15)
    assert pt["p_wilcoxon"] == stats.wilcoxon(c - b).pvalue
    ref = stats.ttest_rel(c, b)
    assert pt["t"] == ref.statistic and pt["p_ttest_rel"] == ref.pvalue
    assert pt["ci_low"] < pt["mean_diff"] < pt["ci_high"]
    # all differences zero: p = 1; constant non-zero: t = inf, p = 0; n < 2: NaN
    z = paired_tests(b, b)
    assert (z["p_wilcoxon"], z["p_ttest_rel"], z["t"], z["mean_diff"]) == (1.0, 1.0, 0.0, 0.0)
    k = paired_tests(b + 0.1, b)
    assert k["t"] == math.inf and k["p_ttest_rel"] == 0.0 and k["p_wilcoxon"] < 1e-5
    # ties among |d| (DSC 0 against DSC 0.1, the same penalty twice): the normal approximation, not
    # SciPy's "auto" permutation test (seconds per table row); without ties: the exact distribution
    tied = np.array([0.1, 0.1, -0.05, 0.1, 0.2, 0.0, 0.1, 0.3, 0.3, 0.1])
    assert wilcoxon_method(tied) == "approx" and wilcoxon_method(c - b) == "exact"
    assert paired_tests(tied, np.zeros(10))["p_wilcoxon"] == stats.wilcoxon(tied, method="approx").pvalue
    one = paired_tests([1.0, np.nan], [0.5, 0.2])
    assert one["n"] == 1 and one["mean_diff"] == 0.5
    assert all(math.isnan(one[key]) for key in ("p_wilcoxon", "p_ttest_rel", "t", "ci_low", "ci_high"))
    assert math.isnan(paired_tests([], [])["mean_diff"])
    with pytest.raises(ValueError):
        paired_tests([1.0, 2.0], [1.0])


def test_holm_equals_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.uniform(0, 0.2, rng.integers(1, 12)) ** 2
        p[rng.random(p.size) < 0.2] = np.nan
        np.testing.assert_allclose(holm(p), holm_by_definition(p), rtol=0, atol=1e-15, equal_nan=True)
    np.testing.assert_allclose(holm([0.01, 0.04, np.nan, 0.03, 0.5]), [0.04, 0.09, np.nan, 0.09, 0.5])
    assert holm([0.6, 0.7])[1] == 1.0 and holm([]).size == 0 and np.isnan(holm([np.nan])).all()
    adj = holm(p := rng.uniform(0, 1, 50))  # monotone in the raw p-values
    assert np.all(np.diff(adj[np.argsort(p)]) >= 0) and adj.max() <= 1


def test_bootstrap_seeded_and_covers_the_true_difference():
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 1.0, 25)
    assert bootstrap_mean_ci(x, seed=5) == bootstrap_mean_ci(x, seed=5)
    assert bootstrap_mean_ci(x, seed=5) != bootstrap_mean_ci(x, seed=6)
    # blocks of resamples give the same draws as one block (a vectorised draw per block)
    big = rng.normal(0, 1, 1000)
    assert bootstrap_mean_ci(big, seed=2, n_boot=9000) == bootstrap_mean_ci(big, seed=2, n_boot=9000)
    # coverage of the true mean difference (0.2) by the 95% percentile CI of a shifted paired sample
    hits, trials = 0, 300
    for i in range(trials):
        base = rng.normal(0.8, 0.05, 30)
        cand = base + 0.2 + rng.normal(0, 0.1, 30)
        pt = paired_tests(cand, base, seed=i, n_boot=2000)
        hits += pt["ci_low"] <= 0.2 <= pt["ci_high"]
    assert 0.89 <= hits / trials <= 0.99


def rows_of(values, structure="LV", flags=None):
    """In-memory rows: ``values`` {case: {metric: v}} or {case: v} (every metric); flags {case: (pred_empty, ref_empty)}."""
    out = []
    for c, v in values.items():
        r = {"case": c, "structure": structure, **({m: float(v) for m in METRICS} if not isinstance(v, dict) else v)}
        if flags is not None:
            r["pred_empty"], r["ref_empty"] = flags.get(c, (False, False))
        out.append(r)
    return out


def res_of(values, flags=None):
    return EvaluationResults(rows=rows_of(values, flags=flags if flags is not None else {}), structures=["LV"])


@pytest.mark.timeout(60)
def test_repeats_aggregation_spread_and_agreement(tmp_path):
    rng = np.random.default_rng(3)
    cases = [f"c{i:02d}" for i in range(12)]
    b1 = dict(zip(cases, rng.normal(0.80, 0.03, 12)))
    b2 = dict(zip(cases, rng.normal(0.80, 0.03, 12)))
    c1 = {c: b1[c] + 0.05 + rng.uniform(0, 0.01) for c in cases}          # clearly better than b1
    c2 = {c: b2[c] + rng.normal(0.0, 0.02) for c in cases}                # no change against b2
    base = [res_of(b1), res_of(b2)]
    cand = [res_of(c1), res_of(dict(reversed(list(c2.items()))))]       # row order does not matter
    out = compare_results(("Baseline/2d", base), [("DA/2d", cand)], n_boot=500)
    e = Entry("DA/2d", "DA", "2d", cand)
    ids, x = e.pooled("LV", "DSC")
    assert ids == cases
    np.testing.assert_allclose(x, [(c1[c] + c2[c]) / 2 for c in cases], rtol=0, atol=1e-15)
    r1, r2 = np.mean(list(c1.values())), np.mean(list(c2.values()))
    cell = {r.name: r for r in out["tables"]["LV"]}["DA/2d"].cells["DSC"]
    assert cell.mean == pytest.approx((r1 + r2) / 2, abs=1e-15) and cell.repeats == 2
    assert cell.spread == pytest.approx(np.std([r1, r2], ddof=1), abs=1e-15)
    assert "±" in out["markdown"] and "mean over repeats" in out["markdown"]
    t = [r for r in out["tests"] if r["structure"] == "LV" and r["metric"] == "DSC"][0]
    assert t["repeats"] == 2 and t["repeats_same_sign_significant"] == 1 and t["n"] == 12
    xb = (np.array([b1[c] for c in cases]) + np.array([b2[c] for c in cases])) / 2
    assert t["p_wilcoxon"] == stats.wilcoxon(x - xb).pvalue
    assert t["mean_diff"] > 0 and t["candidate_better"]
    # CLI-style repeats of one folder name and welch.csv keep the paper's columns
    assert set(out["welch"][0]) == {"candidate", "baseline", "structure", "metric", "mean_candidate",
                                    "mean_baseline", "n_candidate", "n_baseline", "t", "p", "significant",
                                    "candidate_better"}


def test_holm_over_one_table_and_test_choice():
    rng = np.random.default_rng(4)
    cases = [f"c{i}" for i in range(15)]
    base = {c: {m: v for m in METRICS} for c, v in zip(cases, rng.normal(0.8, 0.05, 15))}
    cands = {}
    for k, shift in enumerate((0.0, 0.02, 0.1)):
        cands[f"X{k}/2d"] = res_of({c: {m: base[c][m] + shift + rng.normal(0, 0.02) for m in METRICS} for c in cases})
    for test, key in (("wilcoxon", "p_wilcoxon"), ("ttest_rel", "p_ttest_rel"), ("welch", "p_welch")):
        out = compare_results(("B/2d", res_of(base)), cands, test=test, n_boot=0)
        sel = [r for r in out["tests"] if r["structure"] == "LV"]
        assert len(sel) == 3 * len(METRICS)
        np.testing.assert_allclose([r["p_holm"] for r in sel], holm_by_definition([r[key] for r in sel]))
        assert all(r["significant"] == (r["p_holm"] < 0.01) and r["test"] == test for r in sel)
        rows = {r.name: r for r in out["tables"]["LV"]}
        assert rows["X2/2d"].cells["DSC"].sig_vs_baseline  # a shift of 0.1 is found by every test
        assert rows["X2/2d"].cells["DSC"].p_vs_baseline == [r for r in sel if r["candidate"] == "X2/2d"
                                                          and r["metric"] == "DSC"][0]["p_holm"]
        assert "Holm-adjusted" in out["markdown"]
    with pytest.raises(SDDMError, match="test must be"):
        compare_results(("B/2d", res_of(base)), cands, test="mannwhitney")


def test_missing_spurious_counts_on_hand_made_rows():
    def res(flags_lv, flags_rv):
        rows = []
        for c, (f_lv, f_rv) in enumerate(zip(flags_lv, flags_rv)):
            for s, f in (("LV", f_lv), ("RV", f_rv)):
                rows.append({"case": f"c{c}", "structure": s, **{m: 1.0 for m in METRICS},
                             "pred_empty": f[0], "ref_empty": f[1]})
        return EvaluationResults(rows=rows, structures=["LV", "RV"])

    ok, miss, spur, both = (0, 0), (1, 0), (0, 1), (1, 1)
    r1 = res([ok, miss, miss, both], [spur, ok, ok, ok])
    r2 = res([ok, ok, miss, ok], [spur, spur, miss, both])
    rows = {r["structure"]: r for r in structure_counts(Entry("DA/2d", "DA", "2d", [r1, r2]))}
    assert (rows["LV"]["missing"], rows["LV"]["spurious"]) == (1.5, 0.0)
    assert rows["LV"]["missing_per_repeat"] == "2;1" and rows["RV"]["spurious_per_repeat"] == "1;2"
    assert (rows["RV"]["missing"], rows["RV"]["spurious"]) == (0.5, 1.5)
    assert (rows["all"]["missing"], rows["all"]["spurious"]) == (2.0, 1.5) and rows["all"]["n_cases"] == 4
    old = EvaluationResults(rows=[{k: v for k, v in r.items() if k not in ("pred_empty", "ref_empty")}
                                  for r in r1.rows], structures=["LV", "RV"])
    unknown = structure_counts(Entry("B", "B", "", [old]))
    assert all(math.isnan(r["missing"]) and r["missing_per_repeat"] == "" for r in unknown)


def write_study(tmp_path, rng):
    """Baseline and candidate evaluation folders (per_case.csv with flags): 8 cases x LV, RV; the
    candidate misses RV in case c0 (diagonal penalty 300 mm) and predicts a spurious RV in c1."""
    out = {}
    for name, shift in (("base", 0.0), ("da", 0.03)):
        rows = []
        for i in range(8):
            for s in ("LV", "RV"):
                dsc = float(np.clip(0.85 + shift + rng.normal(0, 0.02), 0, 1))
                r = {"case": f"c{i}", "structure": s, "DSC": dsc, "IoU": dsc / (2 - dsc),
                     **{m: float(3.0 - 10 * shift + rng.normal(0, 0.3)) for m in ("ASD", "ASSD", "HD95")},
                     "HD": float(12.0 + rng.normal(0, 1)), "pred_empty": False, "ref_empty": False}
                if name == "da" and s == "RV" and i == 0:
                    r.update(DSC=0.0, IoU=0.0, ASD=300.0, ASSD=300.0, HD=300.0, HD95=300.0, pred_empty=True)
                if name == "da" and s == "RV" and i == 1:
                    r.update(DSC=0.0, IoU=0.0, ASD=300.0, ASSD=300.0, HD=300.0, HD95=300.0, ref_empty=True)
                rows.append(r)
        (tmp_path / name).mkdir()
        write_per_case_csv(rows, tmp_path / name / "per_case.csv")
        out[name] = tmp_path / name
    return out


@pytest.mark.timeout(60)
def test_outputs_byte_identical_finite_table_and_counts(tmp_path):
    d = write_study(tmp_path, np.random.default_rng(5))
    res = load_results(d["da"])
    assert res.has_flags and res.penalised("RV", "HD").tolist() == [True, True] + [False] * 6
    assert not res.penalised("RV", "DSC").any()
    fin = nan_policy_view(res)
    assert math.isnan(fin.values("RV", "HD")[0]) and fin.values("RV", "DSC")[0] == 0.0
    outs = []
    for k in (1, 2):
        compare_results(("Baseline/2d", d["base"]), [("DA/2d", d["da"])], out_dir=tmp_path / f"cmp{k}")
        outs.append(tmp_path / f"cmp{k}")
    for name in ("tests.csv", "structures.csv", "welch.csv", "table.csv", "table_RV.csv", "table_finite.csv",
                 "table_finite_RV.csv", "missing.md"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    with open(outs[0] / "tests.csv") as f:
        trows = list(csv.DictReader(f))
    assert len(trows) == 3 * len(METRICS) and str(tmp_path) not in (outs[0] / "tests.csv").read_text()
    assert {"p_holm", "ci_low", "ci_high", "repeats_same_sign_significant"} <= set(trows[0])
    with open(outs[0] / "structures.csv") as f:
        srows = {(r["entry"], r["structure"]): r for r in csv.DictReader(f)}
    assert (srows["DA/2d", "RV"]["missing"], srows["DA/2d", "RV"]["spurious"]) == ("1.0", "1.0")
    assert srows["Baseline/2d", "all"]["missing"] == "0.0"
    assert "1 / 1" in (outs[0] / "missing.md").read_text()
    # NaN-policy table: the two penalised RV cases are out of the distance means, and n is shown
    with open(outs[0] / "table_finite_RV.csv") as f:
        fr = {r["name"]: r for r in csv.DictReader(f)}
    with open(outs[0] / "table_RV.csv") as f:
        pr = {r["name"]: r for r in csv.DictReader(f)}
    hd = res.values("RV", "HD")
    assert float(fr["DA/2d"]["HD"]) == pytest.approx(hd[2:].mean()) and fr["DA/2d"]["HD_n"] == "6"
    assert float(pr["DA/2d"]["HD"]) == pytest.approx(hd.mean()) and pr["DA/2d"]["HD_n"] == "8"
    assert fr["DA/2d"]["DSC_n"] == "8"
    md = (outs[0] / "table_finite_RV.md").read_text()
    assert "(n=6/8)" in md and "(n=8/8)" in md and "excluded" in md
    for name in ("fig_missing.png", "fig_HD.png", "table_finite.tex"):
        assert (outs[0] / name).is_file()


def test_chart_bars_leave_penalties_out_and_clip_cis(tmp_path):
    st = bar_stats([1.0, 0.99, 0.2], valid_range=(0.0, 1.0))
    assert st["ci_high"] == 1.0 and st["ci_low"] >= 0.0 and st["mean"] == pytest.approx(0.73)
    st = bar_stats([0.5, 0.1, 9.0], valid_range=(0.0, np.inf))
    assert st["ci_low"] == 0.0
    st = bar_stats([2.0, 3.0, 300.0, np.nan], penalised=[False, False, True, False])
    assert st["mean"] == 2.5 and st["n"] == 2 and st["n_penalised"] == 1
    with pytest.raises(ValueError):
        bar_stats([1.0, 2.0], penalised=[True])
    samples = {"Baseline/2d": {"LV": [3.0, 3.5, 2.8, 3.1], "RV": [4.0, 4.2, 3.9, 4.4]},
               "DA/2d": {"LV": [2.5, 2.9, 2.6, 2.4], "RV": [300.0, 3.5, 3.7, 300.0]}}
    pen = {"Baseline/2d": {"LV": [False] * 4, "RV": [False] * 4},
           "DA/2d": {"LV": [False] * 4, "RV": [True, False, False, True]}}
    png = bar_chart_ci(samples, "HD95", tmp_path / "hd95.png", penalised=pen)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_image_grid_draws_maps_in_colour_and_refuses_ragged_grids(tmp_path):
    from matplotlib.image import imread

    lab = np.zeros((16, 16), np.int64)
    lab[4:12, 4:12] = 3  # one structure (label 3) filling the middle of the map
    img = np.full((16, 16), 0.5, np.float32)
    png = label_image_grid([[lab, img]], ["labels", "image"], ["map", "image"], ["case"], tmp_path / "g.png",
                           [1, 2, 3], ["LV", "MYO", "RV"])
    rgb = imread(png)[..., :3]
    colourful = np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).max(axis=-1) > 0.1
    top_left = colourful[: int(0.8 * rgb.shape[0]), : rgb.shape[1] // 2]  # the map's panel, above the legend
    assert top_left.sum() > 0.05 * top_left.size  # shows the structure in colour
    with pytest.raises(ValueError):
        label_image_grid([[lab, img], [lab]], ["labels", "image"], ["a", "b"], ["r1", "r2"], tmp_path / "x.png", [3])
    with pytest.raises(ValueError):
        label_image_grid([[lab]], ["mask"], ["a"], ["r"], tmp_path / "y.png", [3])
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_verdict_direction_follows_the_paired_difference():
    """With NaNs in different cases the unpaired means and the paired difference can disagree in
    sign; a paired test's verdict takes the paired difference's (Welch's: the means')."""
    base = res_of({"a": 0.2, "b": 0.9, "c": 0.3})
    cand = res_of({"a": 0.25, "b": math.nan, "c": 0.35})  # +0.05 where both are finite; lower mean overall
    for test, better in (("wilcoxon", True), ("ttest_rel", True), ("welch", False)):
        out = compare_results(("Baseline", base), [("X", cand)], test=test, n_boot=100)
        row = [r for r in out["tests"] if r["structure"] == "all" and r["metric"] == "DSC"][0]
        assert row["mean_diff"] == pytest.approx(0.05) and row["candidate_better"] is better, test
        hd = [r for r in out["tests"] if r["structure"] == "all" and r["metric"] == "HD"][0]
        assert hd["candidate_better"] is (not better), test  # distances: lower is better
