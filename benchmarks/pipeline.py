"""Is the generator/trainer pipeline keeping the generators busy? (blog: "Infrastructure")

Runs the default `python train.py` shortened (fewer steps, a small eval), then prints from its
metrics.jsonl: the share of wall time generators spend producing trajectories vs blocked on a
full queue or loading weights (target >= 85% busy), trainer steps/s, trajectories/s, sampled
tokens/s and policy lag. "Steady" counts from the first to the last optimizer step, so start-up
and the step-0 eval are left out; "whole" counts from each generator's first work item.

    python benchmarks/pipeline.py                       # the default run, 24 steps
    python benchmarks/pipeline.py --steps 40 -- --method cispo --n-generators 2
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps of the shortened run")
    ap.add_argument("--eval-problems", type=int, default=10, help="eval subset (start/end only)")
    ap.add_argument("train_flags", nargs="*", help="extra train.py flags, after --")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "train.py", "--steps", str(args.steps), "--eval-every", "0",
               "--eval-problems", str(args.eval_problems), "--checkpoint-every", str(args.steps),
               "--out", str(out), *args.train_flags]
        print("running:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((out / "config.json").read_text())
    steps = [r for r in rows if "train_reward" in r]
    first, last = steps[0], steps[-1]

    def share(a: dict, b: dict) -> tuple[float, float, float]:
        busy, wait, sync = (b[k] - a.get(k, 0.0) for k in ("gen_busy_s", "gen_wait_s", "gen_sync_s"))
        total = max(busy + wait + sync, 1e-9)
        return busy / total, wait / total, sync / total

    span = last["wall_time"] - first["wall_time"]
    n_traj = (last["step"] - first["step"]) * (config["cispo_groups"] * config["group_size"]
                                               if config["method"] == "cispo" else config["batch_size"])
    print(f"\n{config['method']}: {config['n_generators']} generator(s), {config['n_trainers']} "
          f"trainer(s), {len(steps)} steps")
    for label, (a, b) in {"whole": ({}, last), "steady": (first, last)}.items():
        busy, wait, sync = share(a, b)
        print(f"generators ({label:6s}): busy {busy:6.1%}  waiting on a full queue {wait:6.1%}  "
              f"loading weights {sync:6.1%}   (target busy >= 85%)")
    print(f"trainer steps/s (steady):  {(last['step'] - first['step']) / span:.3f}")
    print(f"trajectories/s (steady):   {n_traj / span:.2f}")
    print(f"sampled tokens/s (steady): {(last['generated_tokens'] - first['generated_tokens']) / span:.0f}")
    print(f"policy lag (mean over steps): {sum(r['policy_lag'] for r in steps) / len(steps):.2f} steps")


if __name__ == "__main__":
    main()
