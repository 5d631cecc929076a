"""Wall and CPU time of every stage of a finished study (e.g. ``nnUNetv2_sddm_study --quick``),
from its ``study_state.json``, against a time budget: the budget is checked by this benchmark,
not by a timed test.

    nnUNetv2_sddm_study --quick -o quick && python benchmarks/study_stages.py quick [--budget-min 20]

Per stage: wall seconds, CPU seconds (the study process and nnU-Net's subprocesses), the share
of the total wall time and the CPU/wall ratio (about the number of busy cores: below 2 on a
2-core machine means waiting, or a machine shared with other work). Per training and
prediction: the model's seconds (the stage results). The last lines are
``total_wall_min: <number>`` and ``within_budget: yes|no`` when ``--budget-min`` is given.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", type=Path, help="the study folder (with study_state.json)")
    p.add_argument("--budget-min", type=float, default=None, help="the time budget in minutes")
    a = p.parse_args(argv)
    state = json.loads((a.study / "study_state.json").read_text())["stages"]
    record = json.loads((a.study / "study.json").read_text())
    done = {k: v for k, v in state.items() if v.get("status") == "done"}
    total = sum(float(v["seconds"]) for v in done.values())
    hw = record.get("hardware", {})
    print(f"study {a.study} ({record['config']['name']}), {hw.get('cpu_count')} CPU core(s) "
          f"{hw.get('processor', '')}".rstrip())
    print(f"{'stage':<14} {'wall s':>9} {'CPU s':>9} {'share':>7} {'CPU/wall':>9}")
    for name, v in state.items():
        if v.get("status") != "done":
            print(f"{name:<14} {'(not done: ' + v.get('status', '?') + ')':>20}")
            continue
        wall, cpu = float(v["seconds"]), float(v.get("cpu_seconds", float("nan")))
        print(f"{name:<14} {wall:9.1f} {cpu:9.1f} {wall / total:7.1%} {cpu / wall if wall else float('nan'):9.2f}")
        for key, res in sorted((v.get("result") or {}).items()):
            if name in ("train", "predict") and isinstance(res, dict) and "seconds" in res:
                print(f"  {key:<44} {float(res['seconds']):9.1f}")
    print(f"total_wall_min: {total / 60:.2f}")
    if a.budget_min is not None:
        print(f"within_budget: {'yes' if total / 60 <= a.budget_min else 'no'} (budget {a.budget_min:g} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
