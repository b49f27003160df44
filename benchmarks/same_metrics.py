"""Refactor check: a short run of each method, same seed, same metrics before and after a change.

    python benchmarks/same_metrics.py --save /tmp/before.json     # on the old code
    python benchmarks/same_metrics.py --check /tmp/before.json    # on the new code

Each method trains a few steps on the tiny model with weight publishing off (--sync-every past
the last step), so the generator never changes weights mid-run and the run is deterministic:
every metric except the clocks must match exactly.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("mcts", "cispo", "bon", "treepo", "treerl", "sft")
# timings, and how far the generator ran ahead of the trainer when a row was written (timing too)
CLOCKS = ("wall_time", "gen_busy_frac", "gen_busy_s", "gen_wait_s", "gen_sync_s",
          "generated_tokens")
FLAGS = ["--steps", "3", "--sync-every", "100", "--eval-every", "0", "--eval-problems", "4",
         "--eval-n", "2", "--search-gain-problems", "2", "--mcts-iterations", "4",
         "--bon-n", "8", "--group-size", "4", "--cispo-groups", "1", "--batch-size", "2",
         "--prompts-per-call", "2", "--time-limit-min", "0", "--torch-threads", "1",
         "--no-final-eval"]  # the 820-problem eval writes eval_t1.json, not metrics: minutes saved


def metrics(method: str, out: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "train.py", "--method", method, "--out", str(out),
                           *FLAGS], check=False, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"same_metrics: {method} failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return without_clocks(rows)


def without_clocks(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCKS} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--save", type=Path, help="write the metrics here")
    what.add_argument("--check", type=Path, help="compare with metrics written by --save")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        got = {m: metrics(m, Path(tmp) / m) for m in args.methods}
    if args.save:
        args.save.write_text(json.dumps(got, indent=1) + "\n")
        print(f"same_metrics: {sum(map(len, got.values()))} rows of {len(got)} methods -> {args.save}")
        return
    want = {m: without_clocks(rows) for m, rows in json.loads(args.check.read_text()).items()}
    bad = [m for m in got if got[m] != want.get(m)]
    for m, rows in got.items():
        print(f"{m:7s} {'same' if m not in bad else 'DIFFERENT'} ({len(rows)} rows)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
