"""The blog's comparison to convergence: it trained "until the eval score plateaued". Every arm
runs with its author's schedule (AdamW lr decayed linearly to 0 over the run) at a budget of S
optimizer steps and at 2S, from the shipped start model, each run evaluated on all 820 test
problems at temperature 1.0 and 0.2 (benchmarks/compare.py does the runs; one results folder per
budget: results/convergence/steps<B>/).

    python benchmarks/convergence.py --arms mcts-tree-c2 cispo --seeds 0 1 2 --steps 700
    python benchmarks/convergence.py --steps 700 --report-only   # table + figure, no runs
    python benchmarks/convergence.py --all   # every committed run (PLAN; finished ones skipped)

The convergence test, one rule for every arm: an arm has converged at S when doubling the budget
does not raise its mean@16 at T = 1.0 on the 820 problems. Pairing: each problem's mean@16
averaged over the arm's seeds at 2S minus the same at S; converged when the 95% CI of that
paired difference includes 0 or lies below it (the same CI as `eval.py --baseline`). An arm that
fails the test needs another doubling (`--steps 2S`, whose S runs are then the 2S runs here).
Seeds pair only with seeds that ran at both budgets.

The step size: --lr (default 1e-5, twice the author's 5e-6) chosen on training-side signals
only (train reward, KL, format rate, entropy: benchmarks/README.md "Convergence"), the same for
every arm, so that S stays within a session's budget of two runs side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare

import plots
from eval import paired_difference

RESULTS, FIGURES = ROOT / "results" / "convergence", ROOT / "figures" / "convergence"
DEFAULT_LR = 1e-5  # the step size every arm shares (benchmarks/README.md "Convergence")
WALL = "wall_time"
C2, BLOG = "mcts-tree-c2", "mcts"
# Every run in results/convergence/, as (S, budgets, arms, seeds): `--all` runs them (a test
# holds this list and the committed folders equal). Order: how the comparison was built up.
PLAN = [
    (700, ("S", "2S"), (C2, "cispo"), (0, 1)),
    (1400, ("S",), (C2, "cispo"), (2,)),  # S = 700 failed the test: the third seed at 1,400
    (1400, ("2S",), (C2, "cispo", "sft"), (0, 1)),
    (1400, ("2S",), (C2, "cispo"), (2,)),
    (700, ("S", "2S"), (BLOG, "sft", "bon"), (0, 1)),
    (700, ("S", "2S"), ("treerl",), (0,)),
    (1400, ("2S",), ("treerl",), (0,)),
    (2800, ("2S",), (C2,), (0, 1)),
]
# S -> the arms in its table and figure (figures/convergence/convergence_<S>.*)
REPORTS = {700: [C2, "cispo", BLOG, "sft", "bon", "treerl"], 1400: [C2, "cispo", BLOG, "sft", "treerl"],
           2800: [C2]}


def budget_dir(root: Path, steps: int) -> Path:
    return root / f"steps{steps}"


def train_flags(lr: float) -> list[str]:
    """What every convergence run adds to its arm's flags: the author's schedule at --lr."""
    return ["--lr-schedule", "linear", "--lr", f"{lr:g}"]


def evals_of(folder: Path, arm: str) -> dict[int, dict[float, dict]]:
    """seed -> temperature -> eval JSON, for the arm's finished runs in one budget's folder."""
    out = {}
    for d in sorted(folder.glob(f"{arm}-seed*")):
        if d.name.rsplit("-seed", 1)[0] != arm:
            continue
        paths = {t: compare.eval_path(d, t) for t in compare.TEMPERATURES}
        if all(p.is_file() for p in paths.values()):
            out[int(d.name.rsplit("-seed", 1)[1])] = {
                t: json.loads(p.read_text()) for t, p in paths.items()}
    return out


def doubling_test(short: dict[int, dict], long: dict[int, dict], t: float = 1.0) -> dict | None:
    """The convergence test on the seeds run at both budgets: 2S - S, each problem's mean@16
    averaged over those seeds first. None when no seed ran at both."""
    seeds = sorted(set(short) & set(long))
    if not seeds:
        return None
    per_problem = [np.mean([runs[s][t]["per_problem"] for s in seeds], axis=0)
                   for runs in (short, long)]
    d = paired_difference(*per_problem)
    d["seeds"] = seeds
    d["converged"] = d["difference"] - d["difference_ci95"] <= 0.0  # CI includes 0 or below
    return d


def steps_and_tokens(folder: Path, arm: str) -> tuple[list[int], list[int], list[float]]:
    """Per finished run: optimizer steps, generated tokens and wall seconds at its last step."""
    steps, tokens, wall = [], [], []
    for seed in evals_of(folder, arm):
        rows = [r for r in plots.read_jsonl(folder / f"{arm}-seed{seed}" / "metrics.jsonl")
                if "train_reward" in r]
        steps.append(rows[-1]["step"])
        tokens.append(rows[-1].get("generated_tokens", 0))
        wall.append(rows[-1].get(WALL, np.nan))
    return steps, tokens, wall


def table(root: Path, steps: int, arms: list[str]) -> str:
    """Per arm: mean@16 and pass@16 at S and 2S, the doubling test at T = 1.0 and 0.2, and the
    steps / tokens / wall seconds of the budget it converged at (2S's cost when it did not)."""
    short_dir, long_dir = budget_dir(root, steps), budget_dir(root, 2 * steps)
    lines = [(f"| arm | seeds S / 2S | mean@16 T=1.0 at {steps} | at {2 * steps} | 2S - S "
              f"T=1.0 [95% CI] | mean@16 T=0.2 at {steps} | at {2 * steps} | 2S - S T=0.2 | "
              "pass@16 T=1.0 S / 2S | converged at S | steps | generated tokens | wall s |"),
             "| --- " * 13 + "|"]
    for arm in arms:
        short, long = evals_of(short_dir, arm), evals_of(long_dir, arm)
        if not short and not long:
            continue
        tests = {t: doubling_test(short, long, t) for t in compare.TEMPERATURES}

        def mean_at(runs, t):
            return compare.spread([runs[s][t]["mean_at_n"] for s in sorted(runs)])

        def diff(d):
            return (f"{100 * d['difference']:+.2f} pt [{100 * (d['difference'] - d['difference_ci95']):+.2f}, "
                    f"{100 * (d['difference'] + d['difference_ci95']):+.2f}]" if d else "")
        passes = " / ".join(compare.spread([r[1.0].get("pass_at_n", np.nan) for r in runs.values()],
                                           digits=1)
                            for runs in (short, long))
        done = tests[1.0]
        verdict = "" if done is None else ("yes" if done["converged"] else "no")
        cost_dir = short_dir if done and done["converged"] else long_dir
        s, tok, wall = steps_and_tokens(cost_dir, arm)
        lines.append(f"| {arm} | {len(short)} / {len(long)} | {mean_at(short, 1.0)} | "
                     f"{mean_at(long, 1.0)} | {diff(tests[1.0])} | {mean_at(short, 0.2)} | "
                     f"{mean_at(long, 0.2)} | {diff(tests[0.2])} | {passes} | {verdict} | "
                     f"{compare.spread(s, 1, '', 0)} | {compare.spread(tok, 1e-6, ' M')} | "
                     f"{compare.spread(wall, 1, '', 0)} |")
    return "\n".join(lines) + "\n"


def figure(root: Path, steps: int, arms: list[str]):
    """The 200-problem eval curve of every run at both budgets, by step, by generated tokens and
    by wall-clock seconds (runs shared the 2-core box two at a time), mean over seeds."""
    runs = []
    for budget, style in ((steps, "S"), (2 * steps, "2S")):
        for arm in arms:
            for seed in evals_of(budget_dir(root, budget), arm):
                run = plots.load_run(budget_dir(root, budget) / f"{arm}-seed{seed}")
                run["label"] = f"{arm} ({style} = {budget})"
                runs.append(run)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    for ax, x in zip(axes, (plots.STEP, plots.TOKENS, WALL)):
        plots.plot_metric(ax, runs, x, plots.EVAL_KEY)
    axes[0].set_ylabel(f"eval {plots.mean_at(runs)} (200 problems)" if runs else "")
    axes[2].set_xlabel("wall-clock seconds (two runs at a time on 2 cores)")
    for ax in axes[1:]:
        if ax.get_legend():
            ax.get_legend().remove()
    fig.suptitle(f"Convergence: linear lr decay over S = {steps} and 2S = {2 * steps} steps, "
                 "mean over seeds, band = min-max")
    fig.tight_layout()
    return fig


def plan_jobs(arms, seeds, budgets: list[int], args) -> list[tuple[str, list]]:
    """compare.py's job (train, eval, keep the summaries) for each run not finished yet."""
    jobs = []
    for seed in seeds:  # seed-major: every arm's seed 0 at both budgets first
        for arm in arms:
            for budget in budgets:
                ns = SimpleNamespace(runs=f"{args.runs}/steps{budget}", steps=budget,
                                     eval_every=args.eval_every, train_flags=train_flags(args.lr))
                job = compare.job_for(arm, seed, ns, budget_dir(args.results, budget))
                if job is not None:
                    jobs.append((f"steps{budget}-{job[0]}", job[1]))
    return jobs


def budgets_of(steps: int, which) -> list[int]:
    return [steps * (2 if b == "2S" else 1) for b in ("S", "2S") if b in which]


def report(args, steps: int, arms: list[str]) -> None:
    """Per-budget results (compare.report) for S and 2S, then the doubling table and figure."""
    for budget in (steps, 2 * steps):
        folder = budget_dir(args.results, budget)
        if folder.is_dir():
            compare.report(folder, args.figures / f"steps{budget}")
    text = table(args.results, steps, arms)
    args.figures.mkdir(parents=True, exist_ok=True)
    (args.figures / f"convergence_{steps}.md").write_text(text)
    plots.save(figure(args.results, steps, arms), args.figures / f"convergence_{steps}.png")
    print(text, end="")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=["mcts-tree-c2", "cispo", "mcts", "bon", "sft"],
                    choices=compare.ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=700, help="S: the short budget (2S is the other)")
    ap.add_argument("--budgets", nargs="+", choices=("S", "2S"), default=["S", "2S"],
                    help="which budgets to run (both by default)")
    ap.add_argument("--all", action="store_true",
                    help="every committed run (PLAN) and every table, instead of --arms ... --budgets")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak lr of the linear decay")
    ap.add_argument("--eval-every", type=int, default=100, help="200-problem eval every N steps")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    ap.add_argument("--runs", default="runs/convergence", help="run directories (checkpoints)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--figures", type=Path, default=FIGURES)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.steps < 1 or args.parallel < 1 or args.lr <= 0:
        raise SystemExit("convergence: --steps, --parallel and --lr must be positive")
    plan = PLAN if args.all else [(args.steps, args.budgets, args.arms, args.seeds)]
    if not args.report_only:
        jobs = [job for steps, which, arms, seeds in plan
                for job in plan_jobs(arms, seeds, budgets_of(steps, which), args)]
        print(f"convergence: {len(jobs)} jobs, {args.parallel} at a time", flush=True)
        compare.run_jobs(jobs, args.parallel, Path(args.runs) / "logs")
    for steps, arms in (REPORTS.items() if args.all else [(args.steps, args.arms)]):
        report(args, steps, arms)


if __name__ == "__main__":
    main()
