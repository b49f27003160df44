"""train.py end to end at a real model's shape: the blog's process layout (generators + DDP
trainers) on a random Qwen2.5-shaped model with the real 151,936-token vocabulary, a few steps of
`--method mcts` and `--method cispo` and one eval, with each process's peak memory and the time
per optimizer step. `benchmarks/gpu_check.sh` runs it on a GPU box; a CI-sized variant (2 layers)
is a test (tests/test_real_size.py).

    python benchmarks/real_shape_run.py                          # Qwen2.5-0.5B shape, 24 layers
    python benchmarks/real_shape_run.py --layers 2 --steps 2     # the CI-sized variant
    python benchmarks/real_shape_run.py --size 1.5b --generators 1 --trainers 1   # one GPU

Peak memory is each process's peak resident set (`VmHWM` in /proc/<pid>/status, polled while it
runs; on a GPU the CUDA memory is not in it). The tokenizer is the tiny model's character-level
one, so a prompt is ~43 tokens; sequence lengths are set by --max-new-tokens (the blog's 512
makes a CPU run of a random model take hours: random weights rarely stop before the cap).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_size

GIB = 1024 ** 3


def peak_rss_gib(pid: int) -> float | None:
    """A live process's peak resident set (VmHWM), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def train_cmd(model: Path, method: str, out: Path, args) -> list[str]:
    """A few steps on --generators + --trainers processes; batches split across up to 4 ranks."""
    return [sys.executable, "train.py", "--model", str(model), "--method", method,
            "--out", str(out), "--n-generators", str(args.generators),
            "--n-trainers", str(args.trainers),
            "--steps", str(args.steps), "--sync-every", "1", "--eval-every", "0",
            "--eval-problems", "2", "--eval-n", "2", "--no-final-eval",
            "--search-gain-problems", "0", "--time-limit-min", "0", "--torch-threads", "1",
            "--max-new-tokens", str(args.max_new_tokens),
            "--max-step-tokens", str(max(1, args.max_new_tokens // 4)),
            "--mcts-iterations", "2", "--mcts-workers", "4", "--prompts-per-call", "2",
            "--batch-size", "4", "--cispo-groups", "2", "--group-size", "2",
            "--stall-timeout-s", "1800"]


def run_one(model: Path, method: str, out: Path, args) -> dict:
    """Run train.py, polling its children's peak memory; their roles come from events.jsonl."""
    t0 = time.time()
    proc = subprocess.Popen(train_cmd(model, method, out, args), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        events = out / "events.jsonl"
        pids = ([json.loads(line).get("pid") for line in events.read_text().splitlines()
                 if '"start"' in line] if events.is_file() else [])
        for pid in [p for p in pids if p] + [proc.pid]:
            if (gib := peak_rss_gib(pid)) is not None:
                peaks[pid] = max(gib, peaks.get(pid, 0.0))
        time.sleep(0.5)
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"real_shape_run: {method} failed (exit {proc.returncode}):\n{err[-3000:]}")
    roles = {e["pid"]: e["process"] for e in map(json.loads, (out / "events.jsonl").read_text()
                                                    .splitlines()) if e.get("event") == "start"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_time"] for r in rows if "train_reward" in r]
    return {"method": method, "steps": len(walls), "seconds": time.time() - t0,
            # step 1 includes the generators' first batch; later steps are the steady state
            "seconds_per_step": (walls[-1] - walls[0]) / (len(walls) - 1) if len(walls) > 1
            else float("nan"),
            "eval_mean_at_16": [r["eval_mean_at_16"] for r in rows if "eval_mean_at_16" in r],
            "peak_rss_gib": {roles.get(pid, "main"): round(g, 2) for pid, g in sorted(peaks.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("0.5b", "1.5b"), default="0.5b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (default: the model's)")
    ap.add_argument("--model", type=Path, help="a saved model (real_size.py --save) instead of "
                    "building one: --size and --layers then only label it")
    ap.add_argument("--methods", nargs="+", choices=("mcts", "cispo"), default=["mcts", "cispo"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--generators", type=int, choices=(1, 2), default=2)
    ap.add_argument("--trainers", type=int, choices=(1, 2, 4), default=2,
                    help="DDP ranks (nccl needs a GPU per rank: 1 on a one-GPU box)")
    ap.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = ap.parse_args()
    if args.steps < 1 or args.max_new_tokens < 4 or (args.layers is not None and args.layers < 1):
        raise SystemExit("real_shape_run: --steps >= 1, --max-new-tokens >= 4, --layers >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or real_size.build_model(Path(tmp) / "model", args.size, args.layers)
        policy = real_size.load_policy(str(model))[0]
        cfg, params = policy.lm.config, sum(p.numel() for p in policy.parameters())
        del policy
        summary = {"size": args.size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size,
                   "parameters": params, "max_new_tokens": args.max_new_tokens,
                   "runs": [run_one(model, m, Path(tmp) / f"run-{m}", args) for m in args.methods]}
    print(f"Qwen2.5 shape, {summary['layers']} layers, vocabulary {summary['vocab']:,}, "
          f"{params / 1e6:.0f} M parameters (random weights), {args.generators} generators + "
          f"{args.trainers} DDP trainers")
    for r in summary["runs"]:
        print(f"  {r['method']:6} {r['steps']} steps, {r['seconds_per_step']:.1f} s/step after the "
              f"first ({r['seconds']:.0f} s in all); peak RSS GiB: "
              + ", ".join(f"{k} {v}" for k, v in r["peak_rss_gib"].items()))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
