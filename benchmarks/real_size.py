"""The sampler and the trainer at real model sizes, no download: a Qwen2.5-0.5B- or 1.5B-shaped
model (the published config.json's architecture, random weights from `from_config`, saved with
`save_pretrained` and loaded back through value_head.load_policy like any checkpoint), measured
side by side in one run on the two batch shapes training generates:

  mcts   P prompts x K samples each (one MCTS round's leaves: K = 4 completions of a short step)
  cispo  P prompts x 16 samples each (CISPO groups)

Rows: transformers `generate`, our torch sampler (sampler.make_sampler("torch")), the vLLM backend
(sampler_vllm.py, when installed) and the floor of benchmarks/sampler.py (the workload's matrix
products alone, at their real shapes). Then train.train_step (the blog's L_total and one AdamW
step, KL reference included) on a batch of trajectories: seconds per step and peak memory.

The tokenizer is the tiny model's character-level one (Qwen's BPE files would need a download),
so a prompt is ~43 tokens; the vocabulary of the model (embedding, lm_head) is Qwen's 151,936.

    python benchmarks/real_size.py --new-tokens 16 --repeats 1       # Qwen2.5-0.5B on CPU: minutes
    python benchmarks/real_size.py --quick                           # a shrunken shape: seconds
    python benchmarks/real_size.py --size 1.5b --save /tmp/q15       # only build and save the model
    python benchmarks/real_size.py --model /tmp/q15 --device cuda    # measure a saved one on a GPU
"""

import argparse
import copy
import gc
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # their helpers (counting.py), also when imported

import countdown
import tiny
import train
from sampler import make_sampler
from value_head import PolicyWithValue, load_policy


def _benchmark_module(name: str):
    """benchmarks/<name>.py (its file name would shadow the top-level module of the same name)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_sampler = _benchmark_module("sampler")  # hf_generate, ours, without_eos, products_floor
bench_vllm = _benchmark_module("sampler_vllm")  # best_seconds

# config.json of Qwen/Qwen2.5-0.5B-Instruct and Qwen/Qwen2.5-1.5B-Instruct: the fields that set
# the architecture; "quick" keeps them but shrinks the shape (head_dim 64: vLLM's CPU attention
# takes it) so CI runs it in seconds
SHAPES = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "max_window_layers": 21},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2, "max_window_layers": 21},
    "quick": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_window_layers": 2,
              "vocab_size": 1024},
}
QWEN25 = {"vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1e6,
          "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "hidden_act": "silu",
          "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0,
          "initializer_range": 0.02}


def qwen25_config(size: str, tokenizer, layers: int | None = None, **overrides) -> Qwen2Config:
    """The published architecture; token ids are the tokenizer's (the published ones index
    Qwen's BPE vocabulary)."""
    cfg = QWEN25 | SHAPES[size] | overrides
    if layers:
        cfg |= {"num_hidden_layers": layers,
                "max_window_layers": min(layers, cfg["max_window_layers"])}
    return Qwen2Config(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=None, **cfg)


def build_model(out_dir: str | os.PathLike, size: str, layers: int | None = None,
                device: str = "cpu", seed: int = 0, **overrides) -> Path:
    """Random weights (`from_config`, initialised on `device`: fast on a GPU) + the tiny model's
    tokenizer + a seeded value head, saved as a checkpoint that load_policy and train.py read."""
    tokenizer = tiny.build_tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(qwen25_config(size, tokenizer, layers, **overrides))
    PolicyWithValue(lm).save_pretrained(out_dir, tokenizer)
    return Path(out_dir)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak RSS


def peak_memory_gib(device: torch.device) -> float:
    """Since the last reset: CUDA memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 2**20


def measure_train_step(policy: PolicyWithValue, tokenizer, prompts: list[list[int]], batch: int,
                       tokens: int, steps: int, device: torch.device) -> dict:
    """train.train_step with train.py's default loss settings on `batch` trajectories of `tokens`
    random completion tokens (MCTS-style: advantage r - V, so the value loss is live too). The
    first step also allocates AdamW's state. Frees the optimizer and the reference afterwards."""
    args = train.Args()
    gen = torch.Generator().manual_seed(0)
    trajs = [train.trajectory(prompts[i % len(prompts)],
                              torch.randint(len(tokenizer), (tokens,), generator=gen).tolist(),
                              [-1.0] * tokens, float(i % 2), None, 0) for i in range(batch)]
    data = {k: v.to(device) for k, v in train.collate(trajs, tokenizer.pad_token_id).items()}
    reset_peak_memory(device)
    ref = copy.deepcopy(policy).requires_grad_(False) if args.c_kl else None
    opt = train.make_optimizer(policy, args)
    seconds, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        stats = train.train_step(policy, ref, opt, data, args)
        sync(device)
        seconds.append(time.perf_counter() - t)
        losses.append(stats["total_loss"])
    peak = peak_memory_gib(device)
    del ref, opt
    policy.zero_grad(set_to_none=True)
    gc.collect()
    return {"seconds": seconds, "peak_gib": peak, "losses": losses,
            "tokens": int(data["attention_mask"].sum())}


def measure_sampling(policy, tokenizer, prompts: list[list[int]], n: int, new_tokens: int,
                     temperature: float, generate: bool, samplers: dict, repeats: int,
                     device: torch.device) -> dict:
    """-> {row: (tokens, best seconds)} for one batch shape: len(prompts) prompts x n samples;
    rows: transformers generate (if `generate`), each of `samplers`, the floor."""
    def synced(fn):
        return lambda: (fn(), sync(device))[0]

    methods = {}
    if generate:
        methods["transformers generate"] = lambda: bench_sampler.hf_generate(
            policy, tokenizer, prompts, n, new_tokens, temperature)
    for name, label in (("torch", "torch sampler"), ("vllm", "vLLM backend")):
        if name in samplers:
            methods[label] = lambda s=samplers[name]: bench_sampler.ours(
                s, prompts, n, new_tokens, temperature)
    mean_prompt = round(sum(map(len, prompts)) / len(prompts))
    with torch.device(device):  # random operands of the real shapes, on the model's device
        methods["floor: matrix products only"] = bench_sampler.products_floor(
            policy.lm, len(prompts), mean_prompt, new_tokens, n)
    best, tokens = bench_vllm.best_seconds({k: synced(v) for k, v in methods.items()}, repeats)
    return {name: (tokens[name], best[name]) for name in methods}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=["0.5b", "1.5b"], default="0.5b", help="Qwen2.5 shape")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--quick", action="store_true",
                    help="a shrunken shape and small counts: seconds, for CI")
    ap.add_argument("--model", default=None, help="a saved model dir, not a fresh build")
    ap.add_argument("--save", default=None, help="only build the model into this dir")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--backends", default="generate,torch,vllm",
                    help="sampling rows (vllm is skipped when the package is missing)")
    ap.add_argument("--mcts-prompts", type=int, default=4, help="prompts of the MCTS-shaped batch")
    ap.add_argument("--k", type=int, default=4, help="samples per MCTS prompt (blog: K = 4)")
    ap.add_argument("--cispo-prompts", type=int, default=2, help="prompts of the CISPO batch")
    ap.add_argument("--group-size", type=int, default=16, help="samples per CISPO prompt (blog 16)")
    ap.add_argument("--new-tokens", type=int, default=16, help="new tokens per sample")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    ap.add_argument("--train-batch", type=int, default=8, help="trajectories per trainer step")
    ap.add_argument("--train-tokens", type=int, default=32, help="completion tokens per trajectory")
    ap.add_argument("--train-steps", type=int, default=2, help="timed trainer steps (the first "
                    "allocates AdamW's state)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed runs per row after a warm-up (the best is kept)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the CI box has 2 cores)")
    args = ap.parse_args(argv)
    if args.quick:
        args.mcts_prompts, args.cispo_prompts, args.new_tokens = 2, 1, 8
        args.train_batch, args.train_tokens, args.train_steps = 2, 8, 1
    unknown = set(args.backends.split(",")) - {"generate", "torch", "vllm"}
    if unknown:
        ap.error(f"unknown backends {sorted(unknown)}; expected some of generate,torch,vllm")
    return args


def run(args: argparse.Namespace) -> dict:
    """Build (into --save, or a temp dir removed afterwards) or take --model, measure, print;
    returns the measurements."""
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else args.size
    if args.save:
        build_model(args.save, size, args.layers, args.device)
        print(f"saved a random Qwen2.5-{size}-shaped model to {args.save}")
        return {}
    if args.model:
        return measure(args, Path(args.model))
    with tempfile.TemporaryDirectory(prefix="real-size-") as tmp:
        return measure(args, build_model(tmp, size, args.layers, args.device))


def measure(args: argparse.Namespace, model_dir: Path) -> dict:
    device = torch.device(args.device)
    policy, tokenizer = load_policy(str(model_dir))
    policy.to(device)
    cfg = policy.lm.config
    params = sum(p.numel() for p in policy.lm.parameters())
    _, test = countdown.make_splits(0)
    problems = test[:max(args.mcts_prompts, args.cispo_prompts)]
    prompts = [tokenizer.encode(countdown.make_prompt(p, tokenizer)) for p in problems]
    print(f"model: {model_dir}, {params / 1e9:.3f}B params (hidden "
          f"{cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}), {policy.lm.dtype}, on "
          f"{device}; {torch.get_num_threads()} torch threads; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start")

    result = {"params": params}
    t = measure_train_step(policy, tokenizer, prompts, args.train_batch, args.train_tokens,
                           args.train_steps, device)
    result["train"] = t
    print(f"\ntrainer step (train.train_step: forward + KL reference + backward + AdamW), "
          f"{args.train_batch} trajectories, {t['tokens']} tokens: "
          + ", ".join(f"{s:.2f} s" for s in t["seconds"])
          + f"; peak {'CUDA memory' if device.type == 'cuda' else 'RSS'} {t['peak_gib']:.2f} GiB")

    backends = args.backends.split(",")
    samplers = {}
    if "torch" in backends:
        torch_sampler = make_sampler("torch", policy, tokenizer, seed=0)
        samplers["torch"] = bench_sampler.without_eos(torch_sampler)
    if "vllm" in backends:
        try:
            samplers["vllm"] = make_sampler("vllm", policy, tokenizer, seed=0, model_dir=model_dir)
        except (SystemExit, ValueError) as e:
            print(f"(no vLLM row: {e})")
    shapes = {"mcts": (args.mcts_prompts, args.k), "cispo": (args.cispo_prompts, args.group_size)}
    for shape, (n_prompts, n) in shapes.items():
        rows = measure_sampling(policy, tokenizer, prompts[:n_prompts], n, args.new_tokens,
                                args.temperature, "generate" in backends, samplers,
                                args.repeats, device)
        result[shape] = rows
        mean_prompt = sum(map(len, prompts[:n_prompts])) / n_prompts
        print(f"\n{shape}: {n_prompts} prompts (mean {mean_prompt:.0f} tokens) x {n} samples x "
              f"{args.new_tokens} new tokens, temperature {args.temperature}; load average "
              f"{os.getloadavg()[0]:.1f}")
        print(f"{'method':<28} {'tokens':>7} {'seconds':>8} {'tokens/s':>10} {'vs generate':>12} "
              f"{'x floor':>8}")
        floor_s = rows["floor: matrix products only"][1]
        base = rows.get("transformers generate")
        for name, (tokens, seconds) in rows.items():
            vs = f"{tokens / seconds / (base[0] / base[1]):>11.2f}x" if base else f"{'-':>12}"
            print(f"{name:<28} {tokens:>7} {seconds:>8.3f} {tokens / seconds:>10,.1f} {vs} "
                  f"{seconds / floor_s:>7.2f}x")
    return result


if __name__ == "__main__":
    run(parse_args())
