"""The vLLM backend next to the torch backend, side by side in one run on the tiny model:
tokens/s on one batch (vs transformers `generate`), MCTS search throughput (trees/min, with
vLLM's prefix-cache hit rate), engine start and weight-sync latency.

    python benchmarks/sampler_vllm.py            # random weights, tiny default architecture
    python benchmarks/sampler_vllm.py --trained  # the warm-started tiny model (built once if missing)

Needs the vllm package (requirements-vllm.txt).
"""

import dataclasses
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from counting import CountingSampler

import countdown
import mcts
import train
from sampler import TorchSampler, make_sampler

# the tokens/s helpers of benchmarks/sampler.py (a file name that `import sampler` would shadow)
_spec = importlib.util.spec_from_file_location("bench_sampler", ROOT / "benchmarks" / "sampler.py")
bench_sampler = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_sampler)


def best_seconds(methods: dict, repeats: int) -> tuple[dict, dict]:
    """Warm up each method, then time them interleaved (load on the box hits all alike)."""
    best, result = dict.fromkeys(methods, float("inf")), {}
    for run in methods.values():
        run()
    for _ in range(repeats):
        for name, run in methods.items():
            t = time.perf_counter()
            result[name] = run()
            best[name] = min(best[name], time.perf_counter() - t)
    return best, result


def main() -> None:
    ap = bench_sampler.common_args(__doc__)
    ap.add_argument("--trees", type=int, default=8, help="MCTS trees searched together")
    ap.add_argument("--iterations", type=int, default=0,
                    help="MCTS iterations per worker, M (0: train.py's default search)")
    ap.add_argument("--syncs", type=int, default=5, help="timed weight syncs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    policy, tokenizer = bench_sampler.load_model(args.trained)
    _, test = countdown.make_splits(0)
    prompts = [tokenizer.encode(countdown.make_prompt(p, tokenizer)) for p in test[:args.prompts]]
    ts = TorchSampler(policy, tokenizer, seed=0)
    vs = make_sampler("vllm", policy, tokenizer, seed=0)  # shares `policy` for values and syncs
    samplers = {"torch": ts, "vllm": vs}
    params = sum(p.numel() for p in policy.lm.parameters())
    print(f"model: {'warm-started' if args.trained else 'random'} tiny Qwen2, {params / 1e6:.2f}M "
          f"params; {torch.get_num_threads()} torch threads; vLLM engine start "
          f"{vs.start_seconds:.1f} s (in-process, eager)\n")

    # 1. tokens/s: the same batch through each engine
    new, temp = args.new_tokens, args.temperature
    fixed = bench_sampler.without_eos(TorchSampler(policy, tokenizer, seed=0))
    methods = {  # generate and the torch row make exactly `new` tokens; vLLM still stops at EOS
        "transformers generate": lambda: bench_sampler.hf_generate(
            policy, tokenizer, prompts, 1, new, temp),
        "torch backend": lambda: bench_sampler.ours(fixed, prompts, 1, new, temp),
        "vLLM backend": lambda: bench_sampler.ours(vs, prompts, 1, new, temp),
    }
    best, tokens = best_seconds(methods, args.repeats)
    base = tokens["transformers generate"] / best["transformers generate"]
    print(f"{args.prompts} prompts x {new} new tokens, temperature {temp}")
    print(f"{'engine':<24} {'tokens':>7} {'seconds':>8} {'tokens/s':>10} {'vs generate':>12}")
    for name in methods:
        rate = tokens[name] / best[name]
        print(f"{name:<24} {tokens[name]:>7} {best[name]:>8.3f} {rate:>10,.0f} {rate / base:>11.2f}x")

    # 2. MCTS at train.py's default search (M per worker, 16 workers, K, step and answer caps,
    # virtual loss): all leaves of a round of all trees in one generate call
    cfg = train.mcts_config(train.Args(temperature=temp))
    cfg = dataclasses.replace(cfg, iterations=args.iterations or cfg.iterations)
    problems = test[:args.trees]
    seconds, outside, tokens = (dict.fromkeys(samplers, float("inf")) for _ in range(3))
    hit_rate = 0.0
    for _ in range(args.repeats):
        for name, s in samplers.items():
            queries, hits = vs.prefix_cache_queries, vs.prefix_cache_hits
            counted = CountingSampler(s)
            t = time.perf_counter()
            results = mcts.search(problems, counted, cfg)
            wall = time.perf_counter() - t
            if wall < seconds[name]:  # the best repeat's numbers
                seconds[name], outside[name] = wall, 1 - counted.seconds / wall
                tokens[name] = sum(r.stats["tokens_generated"] for r in results) / len(results)
            if name == "vllm":
                hit_rate = (vs.prefix_cache_hits - hits) / max(vs.prefix_cache_queries - queries, 1)
    print(f"\nMCTS (train.py's search): {args.trees} trees x M={cfg.iterations} per worker, "
          f"{cfg.workers} workers, K={cfg.k}, {counted.calls} sampler calls per search")
    print(f"{'engine':<24} {'seconds':>8} {'trees/min':>10} {'vs torch':>9} {'tokens/tree':>12} "
          f"{'bookkeeping':>12}")
    for name in samplers:
        print(f"{name + ' backend':<24} {seconds[name]:>8.2f} {60 * args.trees / seconds[name]:>10.1f}"
              f" {seconds['torch'] / seconds[name]:>8.2f}x {tokens[name]:>12.0f} "
              f"{outside[name]:>12.1%}")
    print("(bookkeeping: the search's wall time outside sampler calls, target <= 10%)")
    print(f"vLLM prefix-cache hit rate during search: {hit_rate:.1%} of prompt tokens")

    # 3. weight sync: a trainer's state dict into each backend, in place
    original = {k: v.clone() for k, v in policy.state_dict().items()}
    perturbed = {k: v + 1e-3 * torch.randn_like(v) for k, v in original.items()}
    print("\nweight sync (median of", args.syncs, "):")
    for name, s in samplers.items():
        times = []
        for i in range(args.syncs):
            t = time.perf_counter()
            s.load_weights(perturbed if i % 2 == 0 else original)
            times.append(time.perf_counter() - t)
        print(f"{name + ' backend':<24} {1000 * statistics.median(times):>8.1f} ms")
    print(f"(vLLM's own last_sync_seconds: {1000 * vs.last_sync_seconds:.1f} ms, both the engine "
          "and the torch policy that gives the values)")


if __name__ == "__main__":
    main()
