"""The blog's headline comparison from a clean checkout: methods x seeds at one equal budget of
optimizer steps, each run's final checkpoint evaluated on all 820 test problems at temperature
1.0 and 0.2 (the author's), paired per problem with the start model; figures and a table.

    python benchmarks/compare.py --arms mcts-whole cispo --seeds 0 1 --steps 1400 --parallel 2
    python benchmarks/compare.py --report-only        # redraw the table and figures

Every run starts from the shipped tiny model (tiny_model/, whose own evals are the pairing
baseline), so runs from any box pool in results/compare/ (figures in figures/compare/); a run
that recorded another start model is refused. results/compare/history/ keeps the runs from
before the model shipped, one folder per start model with its own start/ evals
(`--results results/compare/history/<folder> --report-only` redraws one).
Resumable across sessions: a run whose summary is already in the folder is skipped, an
unfinished run directory is continued with train.py --resume. Run summaries (config, metrics,
events, evals; never checkpoints) are copied to <folder>/<arm>-seed<seed>/ as each run
finishes, ready to commit. Every run uses train.py's defaults (the stabilised settings) plus its
arm's flags; two runs share the 2-core box with one torch thread each, and the budget is in
optimizer steps, so the load does not change what a run measures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import plots
import tiny
import train
from eval import paired_difference

# arm -> train.py flags (an arm is a method with its settings). The mcts arms name c_puct: the
# blog's 0.5, or 2.0 (train.py's CPU default since it selects and distils better at M = 12:
# benchmarks/README.md, README Results).
# mcts-tree-best distils the best-rewarded answer in the tree instead of the greedy pick (the
# reward is known at training time): does a better selected trajectory make a better policy?
ARMS = {
    "mcts": ["--method", "mcts", "--mcts-baseline", "value", "--c-puct", "0.5"],
    "mcts-tree": ["--method", "mcts", "--mcts-baseline", "tree", "--c-puct", "0.5"],
    "mcts-tree-c2": ["--method", "mcts", "--mcts-baseline", "tree", "--c-puct", "2.0"],
    "mcts-tree-best": ["--method", "mcts", "--mcts-baseline", "tree", "--c-puct", "0.5",
                       "--mcts-select", "best_reward"],
    "mcts-whole": ["--method", "mcts", "--mcts-distill", "whole", "--c-puct", "2.0"],
    "mcts-whole-step": ["--method", "mcts", "--mcts-distill", "whole", "--mcts-credit", "step",
                        "--c-puct", "2.0"],
    "mcts-whole-visits": ["--method", "mcts", "--mcts-distill", "whole", "--mcts-credit",
                          "visits", "--c-puct", "2.0"],
    "cispo": ["--method", "cispo"],
    "bon": ["--method", "bon"],
    "sft": ["--method", "sft"],
    "treepo": ["--method", "treepo"],
    "treerl": ["--method", "treerl"],
}
TEMPERATURES = (1.0, 0.2)
RESULTS, FIGURES = ROOT / "results" / "compare", ROOT / "figures" / "compare"
SUMMARY_FILES = ("config.json", "metrics.jsonl", "events.jsonl")


def eval_path(directory: Path, temperature: float) -> Path:
    return directory / f"eval_t{temperature:g}.json"


def eval_cmd(checkpoint: str, temperature: float, out: Path) -> list[str]:
    return [sys.executable, "eval.py", "--checkpoint", checkpoint, "--temperature",
            str(temperature), "--threads", "1", "--out", str(out)]


def run_jobs(jobs: list[tuple[str, list[list[str]]]], parallel: int, log_dir: Path) -> None:
    """Each job is a name and a list of commands run in order; `parallel` jobs at a time."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            name, cmds = pending.pop(0)
            running.append((name, iter(cmds), None))
        still = []
        for name, cmds, proc in running:
            if proc is not None and proc.poll() is None:
                still.append((name, cmds, proc))
                continue
            if proc is not None and proc.returncode != 0:
                print(f"compare: {name} failed (exit {proc.returncode}), see {log_dir / name}.log",
                      file=sys.stderr)
                continue
            cmd = next(cmds, None)
            if cmd is None:
                print(f"compare: {name} done", flush=True)
                continue
            if callable(cmd):
                cmd()
                still.append((name, cmds, None))
                continue
            with open(log_dir / f"{name}.log", "a") as log:
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            still.append((name, cmds, proc))
        running = still
        time.sleep(2)


def job_for(arm: str, seed: int, args, results: Path) -> tuple[str, list] | None:
    """train (or resume) -> eval at each temperature -> copy the summaries; None if done."""
    name = f"{arm}-seed{seed}"
    run_dir, keep = Path(args.runs) / name, results / name
    if all(eval_path(keep, t).is_file() for t in TEMPERATURES):
        return None
    train = [sys.executable, "train.py", *ARMS[arm], "--seed", str(seed), "--steps",
             str(args.steps), "--time-limit-min", "0", "--torch-threads", "1",
             "--eval-every", str(args.eval_every), "--no-final-eval", *args.train_flags]
    if (run_dir / "checkpoints" / "latest").is_file():
        train += ["--resume", str(run_dir)]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # stopped before its first checkpoint
        train += ["--out", str(run_dir)]
    cmds: list = []
    state = run_dir / "checkpoints" / "latest"
    done = state.is_file() and state.read_text().strip() == f"step-{args.steps:06d}"
    if not done:
        cmds.append(train)
    cmds += [eval_cmd(str(run_dir), t, eval_path(run_dir, t)) for t in TEMPERATURES]

    def keep_summaries():
        keep.mkdir(parents=True, exist_ok=True)
        for f in SUMMARY_FILES + tuple(eval_path(Path(), t).name for t in TEMPERATURES):
            if (run_dir / f).is_file():
                shutil.copy2(run_dir / f, keep / f)
    cmds.append(keep_summaries)
    return name, cmds


def start_evals(results: Path) -> dict[float, dict]:
    """The start model's evals, the pairing baseline: the shipped model's own (tiny_model/), or
    a history folder's start/."""
    if (results / "start").is_dir():
        return {t: json.loads(eval_path(results / "start", t).read_text()) for t in TEMPERATURES
                if eval_path(results / "start", t).is_file()}
    return {t: e for t in TEMPERATURES if (e := tiny.start_eval(t)) is not None}


def spread(values, scale=100.0, unit="%", digits=2) -> str:
    """mean [min, max] over seeds ("" for none)."""
    v = np.asarray(values, dtype=float) * scale
    if not len(v):
        return ""
    f = f".{digits}f"
    return (f"{v.mean():{f}}{unit} [{v.min():{f}}, {v.max():{f}}]" if len(v) > 1
            else f"{v.mean():{f}}{unit}")


def report(results: Path, figures: Path) -> str:
    """Table (mean and range over seeds, paired gain vs start and vs the sft control) + figures.
    Refuses a run whose recorded start model is not the one the start evals saw."""
    start = start_evals(results)
    started = {s.get("checkpoint_checksum") for s in start.values()} - {None}
    runs = {}
    for d in sorted(p for p in results.iterdir() if p.is_dir() and p.name not in ("start", "history")):
        if not all(eval_path(d, t).is_file() for t in TEMPERATURES):
            continue
        config = json.loads((d / "config.json").read_text())
        recorded = config.get("start_checksum")
        if recorded and started and {recorded} != started:
            raise SystemExit(f"compare: {d} started from model {recorded[:12]}, but {results} "
                             f"holds the start evals of {', '.join(sorted(c[:12] for c in started))}")
        arm = d.name.rsplit("-seed", 1)[0]
        rows = plots.read_jsonl(d / "metrics.jsonl")
        train_rows = [r for r in rows if "train_reward" in r]
        evals = {t: json.loads(eval_path(d, t).read_text()) for t in TEMPERATURES}
        per_step = train.traj_per_step(replace(train.Args(), **{
            k: v for k, v in config.items() if k in train.Args.__dataclass_fields__}))
        runs.setdefault(arm, []).append({
            "dir": d, "steps": train_rows[-1]["step"], "tokens": train_rows[-1]["generated_tokens"],
            "trained": per_step * sum(r.get("completion_len", np.nan) for r in train_rows),
            "evals": evals, "kl": np.mean([r["kl"] for r in train_rows[-100:]]),
            "curve": [(r.get("generated_tokens", 0), r["eval_mean_at_16"]) for r in rows
                      if "eval_mean_at_16" in r]})
    # the equal-token view: each run's 200-problem eval at the last eval within the token count
    # of the cheapest sampling arm's whole run (sft samples nothing and is left out)
    spent = [r["tokens"] for rs in runs.values() for r in rs if r["tokens"] > 0]
    budget = min(spent) if spent else 0

    def at_budget(run: dict) -> float:
        return max(((t, v) for t, v in run["curve"] if t <= budget), default=(0, np.nan))[1]

    def gain(base: dict, run: dict, t: float) -> float:
        """Paired per-problem difference run - base on the same 820 problems."""
        return paired_difference(base[t]["per_problem"],
                                 run["evals"][t]["per_problem"])["difference"]

    def seed_of(run: dict) -> str:
        return run["dir"].name.rsplit("-seed", 1)[1]

    header = ("| arm | seeds | steps | generated tokens | mean@16 T=1.0 | mean@16 T=0.2 | gain vs "
              "start T=1.0 | gain vs start T=0.2 | gain vs sft T=1.0 | gain vs sft T=0.2 | "
              f"200-problem eval at {budget / 1e6:.2f} M tokens | KL (last 100) | "
              "generated per trained token | pass@16 T=1.0 |")
    lines = [header, "| --- " * 14 + "|"]
    if start:
        lines.append(f"| start | | 0 | 0 | {spread([start[1.0]['mean_at_n']])} | "
                     f"{spread([start[0.2]['mean_at_n']])} | | | | | | | | "
                     f"{spread([start[1.0].get('pass_at_n', np.nan)])} |")
    sft = {seed_of(r): r for r in runs.get("sft", [])}
    order = sorted(runs, key=lambda a: -np.mean([r["evals"][1.0]["mean_at_n"] for r in runs[a]]))
    for arm in order:
        arm_runs = runs[arm]
        cells = [arm, str(len(arm_runs)), spread([r["steps"] for r in arm_runs], 1, "", 0),
                 spread([r["tokens"] for r in arm_runs], 1e-6, " M"),
                 spread([r["evals"][1.0]["mean_at_n"] for r in arm_runs]),
                 spread([r["evals"][0.2]["mean_at_n"] for r in arm_runs])]
        cells += [spread([gain(start, r, t) for r in arm_runs], 100, " pt") if start else ""
                  for t in TEMPERATURES]
        for t in TEMPERATURES:  # paired with the sft run of the same seed
            versus = [gain(sft[seed_of(r)]["evals"], r, t) for r in arm_runs if seed_of(r) in sft]
            cells.append(spread(versus, 100, " pt") if versus and arm != "sft" else "")
        cells.append(spread([at_budget(r) for r in arm_runs]) if arm != "sft" else "")
        cells.append(spread([r["kl"] for r in arm_runs], 1, "", 3))
        ratios = [r["tokens"] / r["trained"] for r in arm_runs if r["trained"] > 0]
        cells.append(spread(ratios, 1, "", 1) if ratios and arm != "sft" else "")
        cells.append(spread([r["evals"][1.0].get("pass_at_n", np.nan) for r in arm_runs]))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    figures.mkdir(parents=True, exist_ok=True)
    (figures / "results.md").write_text(table)
    loaded = plots.label_runs([plots.load_run(r["dir"]) for rs in runs.values() for r in rs])
    for run in loaded:  # arms, not methods: mcts and mcts-tree are separate lines
        run["label"] = run["name"].rsplit("-seed", 1)[0]
    if loaded:
        plots.save(plots.eval_figure(loaded), figures / "eval_mean_at_16.png")
        plots.save(plots.train_figure(loaded, 25), figures / "train_reward.png")
        mcts_runs = [r for r in loaded if plots.has_metric([r], "eval_search_gain")]
        if mcts_runs:
            plots.save(plots.search_figure(mcts_runs, 25), figures / "search_gain.png")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=["mcts", "cispo", "bon", "sft"], choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=1400, help="optimizer steps per run (the budget)")
    ap.add_argument("--eval-every", type=int, default=100, help="200-problem eval every N steps")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    ap.add_argument("--runs", default="runs/compare", help="run directories (checkpoints)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--figures", type=Path, help="figures folder (default: figures/compare/, or "
                    "figures/compare/history/<folder> for a history folder)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("train_flags", nargs="*", help="extra train.py flags for every run (after --)")
    args = ap.parse_args()
    if args.steps < 1 or args.parallel < 1:
        raise SystemExit("compare: --steps and --parallel must be >= 1")
    results = args.results
    figures = args.figures or (FIGURES / "history" / results.name
                               if results.parent.name == "history" else FIGURES)
    if not args.report_only:
        jobs = [j for seed in args.seeds for arm in args.arms  # every arm's seed 0 first
                if (j := job_for(arm, seed, args, results)) is not None]
        print(f"compare: {len(jobs)} jobs, {args.parallel} at a time, results in {results}",
              flush=True)
        run_jobs(jobs, args.parallel, Path(args.runs) / "logs")
    print(report(results, figures), end="")


if __name__ == "__main__":
    main()
