"""Sampler throughput, measured side by side in one run: our torch sampler vs `transformers`
`generate` (and vLLM when installed) on the tiny model, 64 prompts x 64 new tokens, plus two
limits of this box: the matmul bound (model FLOPs per token / measured 1024^3 matmul FLOP/s) and
the floor row (the same workload's matrix products alone, at their real shapes, timed in the run).

    python benchmarks/sampler.py            # random weights, tiny default architecture (seconds)
    python benchmarks/sampler.py --trained  # the warm-started tiny model (built once if missing)
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import countdown
import tiny
from sampler import TorchSampler, make_sampler
from value_head import PolicyWithValue, load_policy


def load_model(trained: bool, seed: int = 0):
    """The tiny policy: the shipped start model, or the same architecture with random weights."""
    if trained:
        return load_policy(tiny.resolve_model("tiny"))
    tokenizer = tiny.build_tokenizer()
    torch.manual_seed(seed)
    lm = tiny.AutoModelForCausalLM.from_config(tiny.tiny_config(tokenizer, "default"))
    return PolicyWithValue(lm).eval(), tokenizer


def matmul_flops_per_s(n: int = 1024, repeats: int = 10) -> float:
    """Best-of FLOP/s of an n x n float32 matmul: what the cores can do when overhead is nil."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(lm, context: int) -> float:
    """2 FLOPs per weight of every matmul (embedding lookup excluded, lm_head included) plus
    attention scores and mixing over `context` cached positions."""
    cfg = lm.config
    linear = sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context
    return 2 * linear + attention


def products_floor(lm, batch: int, prompt_len: int, new_tokens: int, n: int = 1):
    """-> a function running only this workload's matrix products, back to back on random operands
    of the real sizes (each layer its own weights and its own K and V cache), and returning the
    number of tokens they stand for: every linear layer for the prompts (batch x prompt_len rows)
    and for each decode step (batch x n rows), causal attention over the prompts, and each decode
    step's two attention products over its context. An eager sampler on this box pays at least
    this much."""
    cfg = lm.config
    H, I, V = cfg.hidden_size, cfg.intermediate_size, lm.get_output_embeddings().weight.shape[0]
    nh, nkv, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    d = getattr(cfg, "head_dim", None) or H // nh
    shapes = [(H, (nh + 2 * nkv) * d), (nh * d, H), (H, 2 * I), (I, H)]
    weights = [[torch.randn(*s) for s in shapes] for _ in range(layers)]
    head = torch.randn(H, V)
    rows, context = batch * n, prompt_len + new_tokens

    def operands(m):  # the input of each weight for m rows
        return [torch.randn(m, s[0]) for s in shapes]

    prompt_in, step_in = operands(batch * prompt_len), operands(rows)
    q = torch.randn(batch, nh, prompt_len, d)
    kv = [torch.randn(batch, nh, prompt_len, d) for _ in range(layers)]
    q_step = torch.randn(rows * nkv, nh // nkv, d)
    cache = [torch.randn(2, rows * nkv, context, d) for _ in range(layers)]

    def run():
        for layer in range(layers):
            for x, w in zip(prompt_in, weights[layer]):
                x @ w
            torch.nn.functional.scaled_dot_product_attention(q, kv[layer], kv[layer], is_causal=True)
        step_in[0][:batch] @ head
        for t in range(new_tokens - 1):  # the last sampled token needs no forward
            for layer in range(layers):
                for x, w in zip(step_in, weights[layer]):
                    x @ w
                k, v = cache[layer][:, :, : prompt_len + t + 1]
                torch.bmm(torch.bmm(q_step, k.transpose(1, 2)), v)
            step_in[0] @ head
        return rows * new_tokens

    return run


def hf_generate(policy, tokenizer, prompts, n, new_tokens, temperature):
    """transformers' generate on left-padded prompts, EOS masked (min_new_tokens): exactly
    new_tokens per sample, like ours below; returns the number of new tokens."""
    batch = tokenizer.pad({"input_ids": [p for p in prompts for _ in range(n)]},
                          padding_side="left", return_tensors="pt").to(policy.lm.device)
    out = policy.lm.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].numel()


def without_eos(sampler: TorchSampler) -> TorchSampler:
    """A benchmark with random weights must not end samples at random EOS draws: every method
    generates exactly prompts x new tokens (stop strings are off too)."""
    sampler.is_eos[:] = False
    return sampler


def ours(sampler, prompts, n, new_tokens, temperature):
    out = sampler.generate(prompts, n=n, max_new_tokens=new_tokens, temperature=temperature,
                           stop=())
    return sum(len(c.tokens) for samples in out for c in samples)


def common_args(doc: str) -> argparse.ArgumentParser:
    """The flags every sampler benchmark takes (this one and benchmarks/sampler_vllm.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trained", action="store_true", help="use the shipped tiny model")
    ap.add_argument("--prompts", type=int, default=64, help="number of prompts (batch)")
    ap.add_argument("--new-tokens", type=int, default=64, help="max new tokens per sample")
    ap.add_argument("--temperature", type=float, default=0.8, help="the author's expansion temperature")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method (best is kept)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the CI box has 2 cores)")
    return ap


def main() -> None:
    ap = common_args(__doc__)
    ap.add_argument("--compile", action="store_true",
                    help="add a row: our decoder's step under torch.compile (inductor)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    policy, tokenizer = load_model(args.trained)
    _, test = countdown.make_splits(0)
    prompts = [tokenizer.encode(countdown.make_prompt(p, tokenizer)) for p in test[:args.prompts]]
    fast = without_eos(TorchSampler(policy, tokenizer, seed=0))
    hf_module = without_eos(TorchSampler(policy, tokenizer, seed=0, fast=False))
    k = 8  # shared prefix: prompts/k prompts x k samples each (MCTS expands K samples per leaf)
    methods = {  # name -> () -> generated tokens
        "transformers generate": lambda: hf_generate(policy, tokenizer, prompts, 1,
                                                     args.new_tokens, args.temperature),
        "ours, HF module per step": lambda: ours(hf_module, prompts, 1, args.new_tokens,
                                                 args.temperature),
        "ours (Qwen2Decoder)": lambda: ours(fast, prompts, 1, args.new_tokens, args.temperature),
    }
    if args.prompts % k == 0 and args.prompts > k:
        methods[f"ours, {args.prompts // k} prompts x n={k}"] = lambda: ours(
            fast, prompts[: args.prompts // k], k, args.new_tokens, args.temperature)
    if args.compile:  # inductor over the decode step (dynamic shapes: the cache grows a column
        # a step and rows drop out); the warm-up call below pays the compile
        compiled = without_eos(TorchSampler(policy, tokenizer, seed=0))
        compiled.decoder.step = torch.compile(compiled.decoder.step, dynamic=True)
        methods["ours + torch.compile(step)"] = lambda: ours(compiled, prompts, 1, args.new_tokens,
                                                             args.temperature)
    mean_prompt = sum(map(len, prompts)) / len(prompts)
    floor = products_floor(policy.lm, args.prompts, round(mean_prompt), args.new_tokens)
    methods["floor: matrix products only"] = floor
    try:  # vLLM column (sampler_vllm.py), when the vllm package is installed
        model_dir = tempfile.mkdtemp(prefix="bench-sampler-")
        policy.save_pretrained(model_dir, tokenizer)  # the engine loads the weights from disk
        vllm_sampler = make_sampler("vllm", policy, tokenizer, seed=0, model_dir=model_dir)
        methods["vLLM"] = lambda: ours(vllm_sampler, prompts, 1, args.new_tokens, args.temperature)
    except (SystemExit, ValueError) as e:
        print(f"(no vLLM column: {e})")

    best = {name: float("inf") for name in methods}
    tokens = {}
    for name, run in methods.items():  # warm-up (first-call allocations, thread pools)
        run()
    for _ in range(args.repeats):  # interleaved, so load on the box hits every method alike
        for name, run in methods.items():
            t = time.perf_counter()
            tokens[name] = run()
            best[name] = min(best[name], time.perf_counter() - t)

    fpt = flops_per_token(policy.lm, int(mean_prompt + args.new_tokens / 2))
    bound = matmul_flops_per_s() / fpt
    params = sum(p.numel() for p in policy.lm.parameters())
    print(f"model: {'warm-started' if args.trained else 'random'} tiny Qwen2, {params / 1e6:.2f}M "
          f"params, {fpt / 1e6:.2f} MFLOP/token; {args.prompts} prompts (mean {mean_prompt:.0f} "
          f"tokens) x {args.new_tokens} new tokens, temperature {args.temperature}, "
          f"{torch.get_num_threads()} threads")
    print(f"matmul bound: {bound:,.0f} tokens/s; load average during the run: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (others' load slows every row)\n")
    base = tokens["transformers generate"] / best["transformers generate"]
    print(f"{'method':<28} {'tokens':>7} {'seconds':>8} {'tokens/s':>10} {'vs generate':>12} "
          f"{'of bound':>9}")
    for name in methods:
        rate = tokens[name] / best[name]
        print(f"{name:<28} {tokens[name]:>7} {best[name]:>8.3f} {rate:>10,.0f} {rate / base:>11.2f}x "
              f"{rate / bound:>8.1%}")
    ours_s = best["ours (Qwen2Decoder)"]
    print(f"\nthe floor row is the same workload's matrix products alone (no sampling, norms, RoPE, "
          f"cache writes);\nours takes {ours_s / best['floor: matrix products only']:.2f}x the "
          f"floor; {args.prompts} prompts x {args.new_tokens} tokens at 3x generate would need "
          f"{best['transformers generate'] / 3 * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
