"""Figures: the blog's eval and training curves, the equal-budget search comparison, one search tree.

    python plots.py runs/mcts-s0 runs/mcts-s1 runs/cispo-s0 ... [--out figures]  (+ results.md)
    python plots.py tree trees/tree_000.json [--out tree.png]
    python plots.py budget summary.json [--out budget.png]

Runs are grouped by `config.json`'s "method": one line per method (mean over seeds), shaded
from the min to the max seed. Runs of one method whose settings differ (an ablation, e.g.
`--tree-reward sparse` vs `dense`) get one line per setting, labelled with it. Every function
returns its Figure so tests can inspect it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from countdown import STEP_END

EVAL_KEY, TRAIN_KEY = "eval_mean_at_n", "train_reward"  # load_run names train.py's eval_mean_at_{n}
STEP, TOKENS = "step", "generated_tokens"
MAX_FIG_WIDTH = 30.0  # inches: a 100-iteration tree has hundreds of leaves


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a malformed or truncated line (a run killed mid-write) is
    skipped with a warning instead of losing the whole run."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            warnings.warn(f"{path}:{i}: skipping malformed JSONL line: {line[:60]!r}", stacklevel=2)
            continue
        rows.append(row)
    return rows


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a one-line error (a file cut short or not ours)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"plots.py: error: cannot read {path} ({e})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"plots.py: error: {path} holds no JSON object")
    return data


def load_run(run_dir: str | Path) -> dict:
    """One training run: its method and seed (config.json) and its metric rows."""
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    config = read_json(config_path) if config_path.is_file() else {}
    rows = read_jsonl(metrics_path)
    if not rows:
        raise SystemExit(f"plots.py: error: {metrics_path} holds no rows (nothing to plot)")
    method = str(config.get("method", run_dir.name))
    n = config.get("eval_n", 16)  # train.py logs mean@n as eval_mean_at_{n}
    for r in rows:
        if f"eval_mean_at_{n}" in r:
            r[EVAL_KEY] = r[f"eval_mean_at_{n}"]
    return {"method": method, "label": method, "seed": config.get("seed"), "config": config,
            "name": run_dir.name, "eval_n": n, "rows": rows}


def mean_at(runs: list[dict]) -> str:
    """'mean@16' when every run evaluated with the same n, else 'mean@n'."""
    ns = {run.get("eval_n", 16) for run in runs}
    return f"mean@{ns.pop()}" if len(ns) == 1 else "mean@n"


# config keys that do not change what a run trains: seeds of one setting are averaged over them
BOOKKEEPING = {"seed", "out", "resume", "dry_run", "checkpoint_every", "eval_every",
               "eval_problems", "eval_n", "time_limit_min", "steps"}


def label_runs(runs: list[dict]) -> list[dict]:
    """Label each run with its method plus the settings that differ among that method's runs
    (bookkeeping keys aside), so an ablation is drawn as separate lines, not as seeds. Only keys
    every run's config holds count: one that some lack is a flag added or removed in between."""
    by_method = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    for method, group in by_method.items():
        keys = sorted(set.intersection(*(set(run.get("config", {})) for run in group))
                      - BOOKKEEPING - {"method"})
        differ = [k for k in keys if len({json.dumps(r.get("config", {}).get(k)) for r in group}) > 1]
        for run in group:
            settings = ", ".join(f"{k}={run.get('config', {}).get(k)}" for k in differ)
            run["label"] = f"{method} ({settings})" if settings else method
    return runs


def series(rows: list[dict], x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) over the rows that carry both keys (eval rows only every few steps), sorted by x.
    A row without generated tokens (the step-0 eval of runs from before train.py logged it)
    takes the last count before it, 0 at the start: the eval curve by tokens keeps its first point."""
    if x_key == TOKENS:
        tokens, filled = 0, []
        for r in sorted(rows, key=lambda r: r.get(STEP) if r.get(STEP) is not None else -1):
            tokens = r.get(TOKENS) if r.get(TOKENS) is not None else tokens
            filled.append({**r, TOKENS: tokens})
        rows = filled
    pts = sorted((r[x_key], r[y_key]) for r in rows
                 if r.get(x_key) is not None and r.get(y_key) is not None)
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def seed_band(curves: list[tuple[np.ndarray, np.ndarray]]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max across seeds on a common x grid: the union of the seeds' x values inside
    the range all seeds cover (generated tokens differ per seed, so curves are interpolated)."""
    curves = [(x, y) for x, y in curves if len(x)]
    lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    grid = np.unique(np.concatenate([x[(x >= lo) & (x <= hi)] for x, _ in curves]))
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def trailing_mean(y: np.ndarray, window: int) -> np.ndarray:
    """y[i] -> mean of y[max(0, i - window + 1) .. i]: smooths per-step noise, never looks ahead."""
    if window <= 1 or not len(y):
        return y
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def plot_metric(ax, runs: list[dict], x_key: str, y_key: str, smooth: int = 1) -> None:
    """One line per method (mean over its seeds) with a shaded min-max band across seeds;
    `smooth` > 1 averages each run over its last `smooth` points first."""
    by_label = defaultdict(list)  # the method and any setting its runs differ in (label_runs)
    for run in runs:
        x, y = series(run["rows"], x_key, y_key)
        by_label[run.get("label", run["method"])].append((x, trailing_mean(y, smooth)))
    colour = {m: f"C{i}" for i, m in enumerate(sorted(by_label))}  # same line, same colour
    for label, curves in sorted(by_label.items()):
        if not any(len(x) for x, _ in curves):
            continue
        if x_key == TOKENS and all(not x.any() for x, _ in curves):
            continue  # samples nothing (train.py --method sft, the control): no tokens axis
        grid, mean, lo, hi = seed_band(curves)
        (line,) = ax.plot(grid, mean, label=label, color=colour[label])
        if len(curves) > 1:
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(x_key.replace("_", " "))
    ax.set_ylabel(y_key.replace("_", " "))
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()


def eval_figure(runs: list[dict]) -> Figure:
    """The blog's 'mean@16 evaluation curve', by step and by generated tokens (fair compute)."""
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    plot_metric(by_step, runs, STEP, EVAL_KEY)
    plot_metric(by_tokens, runs, TOKENS, EVAL_KEY)
    by_step.set_ylabel(f"eval {mean_at(runs)}")
    by_tokens.set_ylabel(f"eval {mean_at(runs)}")
    fig.suptitle(f"Countdown {mean_at(runs)} (test split), mean over seeds, band = min-max")
    fig.tight_layout()
    return fig


def train_figure(runs: list[dict], smooth: int = 1) -> Figure:
    """The blog's 'reward-training curve': mean train reward of each step's trajectories
    (a batch of 8-32: noisy), averaged over the last `smooth` steps."""
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_metric(ax, runs, STEP, TRAIN_KEY, smooth)
    about = f", mean of the last {smooth} steps" if smooth > 1 else ""
    ax.set_title(f"Training reward{about}\nmean over seeds, band = min-max")
    fig.tight_layout()
    return fig


def search_figure(runs: list[dict], smooth: int = 1) -> Figure:
    """Is the search selecting better trajectories than the policy samples? At each eval of an
    mcts run: selected reward minus the mean of i.i.d. samples (train.search_gain); per batch:
    the greedy path's depth and the share of answers that came from a rollout."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    plot_metric(axes[0], runs, STEP, "eval_search_gain")
    axes[0].axhline(0.0, color="grey", lw=0.8)
    plot_metric(axes[1], runs, STEP, "search_depth", smooth)
    plot_metric(axes[2], runs, STEP, "search_from_rollout", smooth)
    fig.suptitle("The search measured on itself (dense reward), mean over seeds, band = min-max")
    fig.tight_layout()
    return fig


STABILITY = ("eval_format_rate", "kl", "entropy", "train_format_rate", "advantage_std",
             "completion_len")


def stability_figure(runs: list[dict], smooth: int = 1) -> Figure:
    """Does a run keep what it learned? mean@16 next to the guards of divergence: eval format
    rate, KL to the start model, policy entropy, the training batches' format rate, advantage
    spread and completion length (per-step series averaged over the last `smooth` steps)."""
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    plot_metric(axes[0, 0], runs, STEP, EVAL_KEY)
    for ax, key in zip(axes.flat[1:], STABILITY):
        plot_metric(ax, runs, STEP, key, 1 if key.startswith("eval_") else smooth)
    plot_metric(axes[1, 3], runs, STEP, "value_start", smooth)
    fig.suptitle("Stability: eval and the per-step guards, mean over seeds, band = min-max")
    fig.tight_layout()
    return fig


def has_metric(runs: list[dict], key: str) -> bool:
    return any(key in row for run in runs for row in run["rows"])


def budget_figure(summary: dict) -> Figure:
    """Accuracy vs generated-token budget per problem, one line per search method: the
    equal-compute comparison of plain sampling, best-of-N and MCTS at test time."""
    fig, ax = plt.subplots(figsize=(6, 4))
    by_method = defaultdict(list)
    for row in summary["search"]:
        by_method[row["method"]].append(row)
    for method, rows in sorted(by_method.items()):
        rows.sort(key=lambda r: r["budget_tokens"])
        ax.errorbar([r["budget_tokens"] for r in rows], [r["accuracy"] for r in rows],
                    yerr=[r["ci95"] for r in rows], marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    budgets = sorted({r["budget_tokens"] for r in summary["search"]})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("generated-token budget per problem")
    ax.set_ylabel("accuracy (sparse reward of the chosen answer)")
    ax.set_title(f"Test-time search at equal budget ({summary.get('checkpoint', '')})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def results_table(runs: list[dict]) -> str:
    """The numbers beside the figures, as a markdown table: per run its steps, generated tokens,
    eval mean@n at the first and last eval (CI of the last), mean train reward over the first
    and the last quarter of its steps, and the last logged KL."""
    lines = [(f"| run | method | steps | generated tokens | {mean_at(runs)} first -> last | "
              "train reward, first -> last quarter | KL |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        rows = run["rows"]
        train = [r for r in rows if r.get(TRAIN_KEY) is not None]
        evals = [r for r in rows if r.get(EVAL_KEY) is not None]
        q = max(1, len(train) // 4)
        reward = (f"{np.mean([r[TRAIN_KEY] for r in train[:q]]):.3f} -> "
                  f"{np.mean([r[TRAIN_KEY] for r in train[-q:]]):.3f}") if train else ""
        score = (f"{evals[0][EVAL_KEY]:.2%} -> {evals[-1][EVAL_KEY]:.2%} "
                 f"(± {evals[-1].get('eval_ci95', float('nan')):.2%})") if evals else ""
        last = train[-1] if train else {}
        tokens = max((r.get(TOKENS) or 0 for r in rows), default=0)
        kl = f"{last['kl']:.3f}" if last.get("kl") is not None else ""
        lines.append(f"| {run.get('name', '')} | {run.get('label', run['method'])} | {last.get(STEP, 0)} | "
                     f"{tokens / 1e6:.2f} M | {score} | {reward} | {kl} |")
    return "\n".join(lines) + "\n"


def tree_layout(tree: dict) -> list[tuple[dict, float, int, int | None]]:
    """Layered layout: (node, x, depth, parent index); leaves get consecutive x, a parent sits
    over the mean of its children, so siblings never cross."""
    placed: list = []
    next_leaf = [0.0]

    def place(node: dict, depth: int, parent: int | None) -> float:
        index = len(placed)
        placed.append(None)
        xs = [place(child, depth + 1, index) for child in node.get("children", [])]
        if xs:
            x = float(np.mean(xs))
        else:
            x, next_leaf[0] = next_leaf[0], next_leaf[0] + 1
        placed[index] = (node, x, depth, parent)
        return x

    place(tree, 0, None)
    return placed


def short_label(text: str, width: int = 14) -> str:
    """A step's text cut to fit a node label (every step ends with </step>: dropped)."""
    text = " ".join(text.replace(STEP_END, "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


def tree_figure(tree: dict) -> Figure:
    """One MCTS search tree: node label = its step text (shortened) and visits, colour = Q,
    edge width = the child's visit count, so the search's focus is visible."""
    nodes = tree_layout(tree)
    visits = np.array([n.get("N", 0) for n, *_ in nodes], dtype=float)
    width_scale = 6.0 / max(visits.max(), 1.0)
    depth = max(d for *_, d, _ in nodes)
    n_leaves = max(x for _, x, *_ in nodes) + 1
    width = min(MAX_FIG_WIDTH, max(6.0, 1.3 * n_leaves))
    fontsize = max(2.0, min(7.0, 7.0 * width / (1.3 * n_leaves)))  # shrink labels on big trees
    fig, ax = plt.subplots(figsize=(width, max(3.0, 1.2 * (depth + 1))))
    for node, x, d, parent in nodes:
        if parent is not None:
            _, px, pd, _ = nodes[parent]
            ax.plot([px, x], [-pd, -d], color="grey", zorder=1,
                    linewidth=0.5 + width_scale * node.get("N", 0))
    q = [n.get("Q") if n.get("Q") is not None else np.nan for n, *_ in nodes]
    points = ax.scatter([x for _, x, *_ in nodes], [-d for *_, d, _ in nodes], c=q,
                        cmap="RdYlGn", vmin=-1, vmax=1, s=250, edgecolors="black", zorder=2)
    for node, x, d, _ in nodes:
        label = "root" if d == 0 else short_label(node.get("text", ""))
        ax.text(x, -d - 0.22, f"{label}\nN={node.get('N', 0)}", ha="center", va="top",
                fontsize=fontsize, zorder=3)
    fig.colorbar(points, ax=ax, label="Q (mean backed-up value)")
    ax.set_ylim(-depth - 0.8, 0.4)
    ax.set_axis_off()
    problem = tree.get("problem")
    about = f": {problem['nums']} -> {problem['target']}" if problem else ""
    ax.set_title(f"MCTS search tree{about} (edge width = visits)")
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write a PNG and free the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("tree", "budget"):
        p = argparse.ArgumentParser(prog=f"plots.py {argv[0]}")
        p.add_argument("json_file", type=Path)
        p.add_argument("--out", type=Path, default=None, help="PNG path (default: beside input)")
        args = p.parse_args(argv[1:])
        if not args.json_file.is_file():
            raise SystemExit(f"no such file: {args.json_file}")
        data = read_json(args.json_file)
        try:
            fig = tree_figure(data) if argv[0] == "tree" else budget_figure(data)
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"plots.py: error: {args.json_file} is not a {argv[0]} file "
                             f"(eval.py writes them; {type(e).__name__}: {e})") from None
        print(save(fig, args.out or args.json_file.with_suffix(".png")))
        return
    p = argparse.ArgumentParser(prog="plots.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (metrics.jsonl, config.json)")
    p.add_argument("--out", type=Path, default=Path("figures"), help="output directory")
    p.add_argument("--smooth", type=int, default=25, help="train reward: mean of the last N steps")
    args = p.parse_args(argv)
    runs = label_runs([load_run(r) for r in args.runs])
    print(save(eval_figure(runs), args.out / f"eval_{mean_at(runs).replace('@', '_at_')}.png"))
    print(save(train_figure(runs, args.smooth), args.out / "train_reward.png"))
    if has_metric(runs, "entropy"):
        print(save(stability_figure(runs, args.smooth), args.out / "stability.png"))
    if has_metric(runs, "eval_search_gain"):
        print(save(search_figure(runs, args.smooth), args.out / "search_gain.png"))
    table = results_table(runs)
    (args.out / "results.md").write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
