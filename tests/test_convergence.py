"""benchmarks/convergence.py: the doubling test and its table on synthetic runs, by hand."""

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("convergence", BENCH / "convergence.py")
convergence = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convergence)

from test_compare import write_run


def runs(*per_problem_by_seed):
    """seed -> temperature -> eval, the same per-problem means at both temperatures."""
    return {s: {t: {"per_problem": pp, "mean_at_n": sum(pp) / len(pp)} for t in (1.0, 0.2)}
            for s, pp in enumerate(per_problem_by_seed)}


def test_doubling_test_by_hand():
    # S: seeds average [0.25, 0.5, 0.5, 0.25]; 2S: [0.75, 0.5, 1.0, 0.25]
    # differences [0.5, 0, 0.5, 0]: mean 0.25, sample std sqrt(1/12), CI 1.96 * std / 2 = 0.2829
    short = runs([0.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.5, 0.5])
    long = runs([1.0, 0.5, 1.0, 0.0], [0.5, 0.5, 1.0, 0.5])
    d = convergence.doubling_test(short, long)
    assert math.isclose(d["difference"], 0.25)
    assert math.isclose(d["difference_ci95"], 1.96 * math.sqrt(1 / 12) / 2)
    # the CI [-0.033, +0.533] includes 0: converged (a +25-point gain on 4 problems is noise)
    assert d["seeds"] == [0, 1] and d["converged"]


def test_converged_iff_the_ci_reaches_zero():
    short = runs([0.0, 0.5, 0.5, 0.0])
    # differences [0.5, 0.5, 0.5, 0.25]: mean 0.4375, std 0.125, CI 1.96 * 0.125 / 2 = 0.1225
    up = convergence.doubling_test(short, runs([0.5, 1.0, 1.0, 0.25]))
    assert math.isclose(up["difference"], 0.4375) and not up["converged"]
    # worse at 2S: differences [-0.5, -0.5, -0.5, -0.25]: below 0 counts as converged
    down = convergence.doubling_test(runs([0.5, 1.0, 1.0, 0.25]), short)
    assert math.isclose(down["difference"], -0.4375) and down["converged"]
    # equal: difference 0, CI 0 -> converged
    assert convergence.doubling_test(short, short)["converged"]


def test_only_seeds_run_at_both_budgets_pair():
    short = runs([0.0, 0.0], [1.0, 1.0])  # seeds 0 and 1
    long = {0: runs([0.5, 0.5])[0]}  # seed 0 only: 0.5 - 0.0, seed 1 left out
    d = convergence.doubling_test(short, long)
    assert d["seeds"] == [0] and math.isclose(d["difference"], 0.5)
    assert convergence.doubling_test(short, {}) is None


def test_table_by_hand(tmp_path):
    root = tmp_path / "results"
    # cispo: S = 2 steps [0.0, 0.5] (25%), 2S = 4 steps [0.5, 0.5] (50%): +25 points,
    # differences [0.5, 0]: std sqrt(0.125), CI 1.96 * 0.35355 / sqrt(2) = 0.49 -> converged
    write_run(convergence.budget_dir(root, 2), "cispo-seed0", "cispo", 0,
              {1.0: [0.0, 0.5], 0.2: [0.0, 0.5]}, steps=2, tokens=300)
    write_run(convergence.budget_dir(root, 4), "cispo-seed0", "cispo", 0,
              {1.0: [0.5, 0.5], 0.2: [0.0, 0.5]}, steps=4, tokens=700)
    lines = convergence.table(root, 2, ["cispo", "bon"]).splitlines()
    assert len(lines) == 3  # header, rule, cispo (bon has no runs)
    cells = lines[2].split(" | ")
    assert cells[1:5] == ["1 / 1", "25.00%", "50.00%", "+25.00 pt [-24.00, +74.00]"]
    assert cells[7] == "+0.00 pt [+0.00, +0.00]"  # T = 0.2: the same evals
    assert cells[8] == "50.0% / 100.0%"  # pass@16 at S / 2S
    # converged at S: its cost is S's run (2 steps, 300 tokens)
    assert cells[9:12] == ["yes", "2", "0.00 M"]


def planned_runs():
    return [(budget, arm, seed) for steps, which, arms, seeds in convergence.PLAN
            for budget in convergence.budgets_of(steps, which) for arm in arms for seed in seeds]


def test_the_plan_is_every_committed_run_once():
    """`--all` reproduces results/convergence: its PLAN names each committed run, once."""
    committed = {(int(d.parent.name.removeprefix("steps")), d.name.rsplit("-seed", 1)[0],
                  int(d.name.rsplit("-seed", 1)[1]))
                 for d in convergence.RESULTS.glob("steps*/*-seed*")}
    assert len(planned_runs()) == len(set(planned_runs()))
    assert set(planned_runs()) == committed
    assert convergence.budgets_of(700, ("S", "2S")) == [700, 1400]
    assert convergence.budgets_of(1400, ("2S",)) == [2800]


def test_plan_jobs_skip_finished_runs(tmp_path):
    args = SimpleNamespace(runs=str(tmp_path / "runs"), results=tmp_path / "results",
                           eval_every=100, lr=1e-5)
    done = tmp_path / "results" / "steps1400" / "cispo-seed1"
    done.mkdir(parents=True)
    for t in (1, 0.2):
        (done / f"eval_t{t:g}.json").write_text("{}")
    jobs = convergence.plan_jobs(["cispo", "sft"], [0, 1], [700, 1400], args)
    assert [name for name, _ in jobs] == [
        "steps700-cispo-seed0", "steps1400-cispo-seed0", "steps700-sft-seed0",
        "steps1400-sft-seed0", "steps700-cispo-seed1", "steps700-sft-seed1",
        "steps1400-sft-seed1"]
