"""The blog's open knobs as curves: "the number of parallel workers per tree, or the number of MCTS
iterations ... initial experiments showed increasing both these values led to significant gains".

Two measures, both from the shipped start model unless --model says otherwise:

  search   the search measured on itself (benchmarks/search_gain.py) over a grid of M (iterations
           per worker) x workers: the selected trajectory's exact success and dense reward against
           one policy sample's and best-of-N's at the same generated tokens, and tokens per tree.
  train    the trained outcome: the default MCTS arm (benchmarks/compare.py's mcts-tree-c2) with
           one knob changed, one seed each, at the convergence comparison's budget and schedule
           (benchmarks/convergence.py: S = 1,400 steps, lr 1e-5 decayed linearly); mean@16 on all
           820 test problems at T = 1.0 and 0.2, and the 200-problem curve by step and tokens.
           The default point (M = 12, 16 workers) is that comparison's own run: its summaries
           are copied from results/convergence/, not trained again.

    python benchmarks/scaling.py search --iterations 4 8 12 24 48 --workers 4 8 16 32
    python benchmarks/scaling.py search --model runs/compare/mcts-tree-c2-seed0 --tag trained
    python benchmarks/scaling.py train --iterations 6 12 24 --workers 8 16 32 --steps 1400
    python benchmarks/scaling.py report

Results in results/scaling/ (search-<tag>.json; train/<arm>-seed<seed>/), figures in
figures/scaling/. A grid point already in the JSON is not measured again (resumable).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare
import convergence
import search_gain

import plots
import train

RESULTS, FIGURES = ROOT / "results" / "scaling", ROOT / "figures" / "scaling"
DEFAULT = train.Args()  # the knobs' defaults: M = 12 per worker, 16 workers
BASE_ARM = "mcts-tree-c2"  # train.py's default MCTS (tree baseline, c_puct 2.0)


def arm_name(iterations: int, workers: int) -> str:
    return f"{BASE_ARM}-m{iterations}-w{workers}"


def register_arm(iterations: int, workers: int) -> str:
    """compare.py's default MCTS arm with M and the worker count set; returns its name."""
    name = arm_name(iterations, workers)
    compare.ARMS[name] = [*compare.ARMS[BASE_ARM], "--mcts-iterations", str(iterations),
                          "--mcts-workers", str(workers)]
    return name


def grid_search(model: str, iterations: list[int], workers: list[int], problems: int,
                threads: int, out: Path) -> list[dict]:
    """search_gain.measure at every (M, workers); rows kept in `out` as they finish."""
    rows = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["search"]["iterations"], r["search"]["workers"]) for r in rows}
    for w in workers:
        for m in iterations:
            if (m, w) in done:
                continue
            row = search_gain.measure(replace(search_gain.Args(), model=model, problems=problems,
                                              iterations=m, workers=w, threads=threads))
            rows.append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1) + "\n")
            print(f"scaling: M={m:>3} workers={w:>3}: selected exact {row['selected_sparse']:.1%} "
                  f"(sample {row['sample_sparse']:.1%}, best-of-{row['bon_n_equal_tokens']} "
                  f"{row['bon_sparse']:.1%}), {row['tokens_per_tree']:.0f} tokens per tree",
                  flush=True)
    return rows


def search_figure(rows: list[dict], title: str):
    """Left: selected exact success against M, a line per worker count (dotted: best-of-N at the
    same tokens; grey: one sample). Right: the same against tokens per tree."""
    fig, (by_m, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    workers = sorted({r["search"]["workers"] for r in rows})
    for i, w in enumerate(workers):
        rs = sorted((r for r in rows if r["search"]["workers"] == w),
                    key=lambda r: r["search"]["iterations"])
        m = [r["search"]["iterations"] for r in rs]
        tokens = [r["tokens_per_tree"] for r in rs]
        for ax, x in ((by_m, m), (by_tokens, tokens)):
            ax.plot(x, [100 * r["selected_sparse"] for r in rs], "o-", color=f"C{i}",
                    label=f"MCTS, {w} workers")
            ax.plot(x, [100 * r["bon_sparse"] for r in rs], ":", color=f"C{i}",
                    label=f"best-of-N at equal tokens ({w} workers' trees)")
    sample = 100 * np.mean([r["sample_sparse"] for r in rows])
    for ax in (by_m, by_tokens):
        ax.axhline(sample, color="grey", lw=1, label="one policy sample")
        ax.grid(alpha=0.3)
    by_m.set_xscale("log", base=2)
    by_m.set_xticks(sorted({r["search"]["iterations"] for r in rows}))
    by_m.xaxis.set_major_formatter(ticker.ScalarFormatter())  # 4, 8, ... not 2^2, 2^3
    by_m.xaxis.set_minor_formatter(ticker.NullFormatter())
    by_m.set_xlabel("MCTS iterations per worker, M")
    by_tokens.set_xlabel("generated tokens per tree")
    by_m.set_ylabel("exact success of the selected answer (%)")
    by_m.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def search_table(rows: list[dict]) -> str:
    lines = [("| M | workers | selected exact | selected dense | sample exact | best-of-N exact "
              "(N) | tokens per tree | search s |"), "| --- " * 8 + "|"]
    for r in sorted(rows, key=lambda r: (r["search"]["workers"], r["search"]["iterations"])):
        lines.append(f"| {r['search']['iterations']} | {r['search']['workers']} | "
                     f"{r['selected_sparse']:.1%} | {r['selected_dense']:+.2f} | "
                     f"{r['sample_sparse']:.1%} | {r['bon_sparse']:.1%} "
                     f"({r['bon_n_equal_tokens']}) | {r['tokens_per_tree']:.0f} | "
                     f"{r['search_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def train_jobs(iterations: list[int], workers: list[int], seed: int, steps: int, lr: float,
               runs: str, results: Path) -> list:
    """One knob at a time around the default: (M, default workers) and (default M, workers)."""
    points = sorted({(m, DEFAULT.mcts_workers) for m in iterations}
                    | {(DEFAULT.mcts_iterations, w) for w in workers})
    ns = SimpleNamespace(runs=runs, steps=steps, eval_every=100,
                         train_flags=convergence.train_flags(lr))
    return [j for m, w in points
            if (j := compare.job_for(register_arm(m, w), seed, ns, results)) is not None]


def reuse_default(seed: int, steps: int, lr: float, results: Path,
                  convergence_results: Path = convergence.RESULTS) -> bool:
    """Copy the convergence comparison's run of the default arm as the default grid point: the
    same flags, seed, steps and schedule. Only at convergence.py's own lr; True if copied."""
    src = convergence_results / f"steps{steps}" / f"{BASE_ARM}-seed{seed}"
    dst = results / f"{arm_name(DEFAULT.mcts_iterations, DEFAULT.mcts_workers)}-seed{seed}"
    if lr != convergence.DEFAULT_LR or not src.is_dir() or dst.is_dir():
        return False
    shutil.copytree(src, dst)
    return True


def report(results: Path, figures: Path) -> None:
    figures.mkdir(parents=True, exist_ok=True)
    for path in sorted(results.glob("search-*.json")):
        rows = json.loads(path.read_text())
        tag = path.stem.removeprefix("search-")
        (figures / f"{path.stem}.md").write_text(search_table(rows))
        plots.save(search_figure(rows, f"The search measured on itself ({tag} model, "
                                       f"{rows[0]['problems']} training problems)"),
                   figures / f"{path.stem}.png")
        print(f"## search, {tag} model\n\n{search_table(rows)}")
    train_dir = results / "train"
    if train_dir.is_dir() and any(train_dir.iterdir()):
        for d in train_dir.iterdir():  # arms by name: register them so compare.report reads them
            if d.is_dir() and d.name.startswith(BASE_ARM + "-m"):
                m, w = d.name.rsplit("-seed", 1)[0].removeprefix(BASE_ARM + "-").split("-")
                register_arm(int(m[1:]), int(w[1:]))
        print("## trained outcome\n\n" + compare.report(train_dir, figures / "train"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("search", "train", "report"))
    ap.add_argument("--iterations", nargs="+", type=int, default=[4, 8, 12, 24, 48])
    ap.add_argument("--workers", nargs="+", type=int, default=[4, 8, 16, 32])
    ap.add_argument("--model", default="tiny", help="search: tiny or a run dir / checkpoint")
    ap.add_argument("--tag", default="start", help="search: the results name, search-<tag>.json")
    ap.add_argument("--problems", type=int, default=48, help="search: training problems")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="train: the seed of every run")
    ap.add_argument("--steps", type=int, default=1400, help="train: optimizer steps per run")
    ap.add_argument("--lr", type=float, default=convergence.DEFAULT_LR,
                    help="train: peak lr of the linear decay (convergence.py's)")
    ap.add_argument("--parallel", type=int, default=2, help="train: runs at a time")
    ap.add_argument("--runs", default="runs/scaling", help="train: run directories")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--figures", type=Path, default=FIGURES)
    args = ap.parse_args()
    if min(args.iterations + args.workers) < 1 or args.problems < 1 or args.steps < 1:
        raise SystemExit("scaling: --iterations, --workers, --problems and --steps must be >= 1")
    if args.what == "search":
        grid_search(args.model, args.iterations, args.workers, args.problems, args.threads,
                    args.results / f"search-{args.tag}.json")
    elif args.what == "train":
        if reuse_default(args.seed, args.steps, args.lr, args.results / "train"):
            print("scaling: the default point copied from the convergence comparison")
        jobs = train_jobs(args.iterations, args.workers, args.seed, args.steps, args.lr,
                          args.runs, args.results / "train")
        print(f"scaling: {len(jobs)} training runs, {args.parallel} at a time", flush=True)
        compare.run_jobs(jobs, args.parallel, Path(args.runs) / "logs")
    report(args.results, args.figures)


if __name__ == "__main__":
    main()
