"""The embedded tiny default model: a character-level Qwen2 warm-started on solver traces.

It plays the blog's "pre-RL instruct model" (Qwen-2.5-1.5B-Instruct, mean@16 = 3.1%): well
formatted but weak, so RL has room to show learning. No hub, no download: it ships in the
repository (`tiny_model/`, with its own mean@16 evals), and `--model tiny` loads it. This file is
the recipe that built it; `python tiny.py` rebuilds it into the cache (~5-8 min) and says whether
this CPU's float rounding reproduces the shipped weights.

- ~1M parameters, Qwen2 architecture, so the loading and sampling code is the real model's.
- Tokenizer: Qwen2's byte-level BPE without merges (one token per character); `</step>`,
  `<answer>`, `</answer>` are single tokens.
- Prompt: the chat template around a short message, `Use 4 3 13 3 to make 24.`
  (countdown.make_prompt style "short", declared as `countdown_prompt` in the tokenizer's
  config): the character-level model learns the format from the warm start, and the instruct
  message was ~70% of every sequence it trained and sampled on. Real models get "instruct".
- Warm start: 2000 supervised steps of 32 solver traces (deterministic per seed and CPU kind);
  the shipped model's mean@16 and format rate are in `tiny_model/start_eval_t*.json`.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, pre_tokenizers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2Tokenizer

import countdown
from value_head import PolicyWithValue, machine, model_checksum, seeded_value_head

CACHE_VERSION = "tiny-v3"  # bump when the recipe changes: ensure_tiny then builds a fresh copy
# The start model of every run and committed result: built once by this recipe and shipped in the
# repository, because the build's float rounding follows the CPU (boxes with other vector ISAs
# built other weights from the same seed). `python tiny.py` says whether this CPU reproduces it.
SHIPPED = Path(__file__).resolve().parent / "tiny_model"
SHIPPED_CHECKSUM = "58056a5f5d1f02a217d735d9d1816625"  # value_head.model_checksum(SHIPPED)

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
STEP_TOKENS = ("</step>", "<answer>", "</answer>")  # = countdown.STEP_END, ANSWER_OPEN, ANSWER_CLOSE
# Qwen-Instruct's template without its default system prompt: the prompt path is the same.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level: Qwen2's byte-level BPE with the 256 byte symbols and *no merges*, so every
    byte is one token and any text round-trips. Being a real Qwen2Tokenizer matters: for a qwen2
    checkpoint AutoTokenizer always rebuilds Qwen2's pipeline, so anything else loads differently.
    The step tags are single *non-special* tokens: decoding with skip_special_tokens keeps them
    and stop strings (vLLM, ours) still match."""
    specials = [PAD, IM_START, IM_END]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*specials, *STEP_TOKENS, *alphabet])}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], pad_token=PAD, eos_token=IM_END,
                         extra_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE,
                         padding_side="left", model_max_length=512,
                         countdown_prompt="short")  # countdown.make_prompt: numbers + target only
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in STEP_TOKENS])
    return tok


SIZES = {  # ~1M params: the size that learned most per CPU-minute in our measurements
    "default": {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 512,
                "num_attention_heads": 4, "num_key_value_heads": 2},
    "test": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
             "num_attention_heads": 2, "num_key_value_heads": 1},
}


def tiny_config(tokenizer: PreTrainedTokenizerFast, size: str = "default") -> Qwen2Config:
    """A small Qwen2: the same architecture (and loading code) as Qwen-2.5-Instruct."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny size {size!r}; expected one of {sorted(SIZES)}")
    return Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SIZES[size],
    )


# Warm start: a fixed number of steps (not a time budget) and a fixed torch thread count, so
# that a seed fixes the weights on one kind of CPU. The default lands at the blog's pre-RL level
# (the shipped model's evals). Two threads: the build runs alone (`python tiny.py`) and is ~1.8x
# faster than one thread on an idle 2-core box (OpenMP threads slow down ~10x when other
# processes share the cores: don't build beside them).
SFT = {
    "default": {"n_train": 20000, "steps": 2000, "batch_size": 32, "lr": 3e-3, "threads": 2},
    # seconds, for the test suite
    "test": {"n_train": 512, "steps": 40, "batch_size": 16, "lr": 1e-2, "threads": 1},
}


def sft_examples(problems: list[countdown.Problem], tokenizer: PreTrainedTokenizerFast
                 ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) pairs: the solver's trace in the step format, closed by eos."""
    prompts = tokenizer([countdown.make_prompt(p, tokenizer) for p in problems],
                        add_special_tokens=False).input_ids
    traces = tokenizer([countdown.solution_trace(p) for p in problems],
                       add_special_tokens=False).input_ids
    return [(p, t + [tokenizer.eos_token_id]) for p, t in zip(prompts, traces, strict=True)]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels with -100 on prompt and pad tokens (loss on the
    completion only). Right padding needs no attention mask: causal attention never looks ahead."""
    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
    return ids, labels


def completion_loss(lm: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens."""
    logits = lm(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def warm_start(lm: torch.nn.Module, examples: list[tuple[list[int], list[int]]], pad_id: int,
               steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Supervised training on solver traces (AdamW, linear warmup then cosine decay to lr/10);
    returns the per-step losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        (s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    order: list[int] = []
    losses = []
    lm.train()
    bar = tqdm(range(steps), desc="tiny warm start", unit="step", mininterval=2)
    for _ in bar:
        if len(order) < batch_size:  # next epoch, freshly shuffled
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        loss = completion_loss(lm, *collate([examples[i] for i in batch], pad_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    lm.eval()
    return losses


def build_tiny(out_dir: str | os.PathLike, seed: int = 0, size: str = "default") -> Path:
    """Train the tiny policy on the train split's solver traces and save it (LM + fresh seeded
    value head + tokenizer) atomically: out_dir either is absent or holds a complete model."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, size)
    sft = dict(SFT[size])
    train, _ = countdown.make_splits(seed, n_train=sft.pop("n_train"))  # = the first n_train
    examples = sft_examples(train, tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(sft.pop("threads"))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = AutoModelForCausalLM.from_config(config)
            warm_start(lm, examples, tokenizer.pad_token_id, seed=seed, **sft)
    finally:
        torch.set_num_threads(threads)
    policy = PolicyWithValue(lm, seeded_value_head(config.hidden_size, seed))  # RL trains it
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    policy.save_pretrained(tmp, tokenizer=tokenizer)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def cache_root() -> Path:
    return Path(os.environ.get("TREESEARCH_CACHE", Path.home() / ".cache" / "treesearch-distill"))


def ensure_tiny(seed: int = 0, cache_dir: str | os.PathLike | None = None,
                rebuild: bool = False) -> Path:
    """The cached tiny model, built on first use (minutes); a file lock makes concurrent
    callers wait for one build instead of racing."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    path = root / f"{CACHE_VERSION}-seed{seed}"
    if path.is_dir() and not rebuild:
        return path
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rebuild or not path.is_dir():  # another process may have built it while we waited
            for stale in root.glob(f".{path.name}.*"):  # temp dir of a build that was killed
                shutil.rmtree(stale)
            print(f"building the tiny model (seed {seed}) into {path} (~6 min on 2 idle cores, once)",
                  file=sys.stderr)
            build_tiny(path, seed)
    return path


def resolve_model(model: str) -> str:
    """`--model tiny` -> the shipped start model's directory (never a build); anything else
    unchanged. The entry scripts call this once and pass the path down."""
    if model != "tiny":
        return model
    if not all((SHIPPED / f).is_file() for f in ("config.json", "model.safetensors")):
        raise SystemExit(f"the shipped tiny model is missing from {SHIPPED}: restore it with "
                         "`git checkout -- tiny_model` (`python tiny.py` builds the recipe instead)")
    return str(SHIPPED)


def start_eval(temperature: float = 1.0) -> dict | None:
    """The shipped start model's mean@16 on all 820 test problems at this temperature, per
    problem (eval.py's JSON): what a run's final eval is paired with. None if not shipped."""
    path = SHIPPED / f"start_eval_t{temperature:g}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description="Build the tiny model from its recipe into the cache, "
                                 "print its directory and whether this CPU reproduces the shipped "
                                 "start model (runs always use the shipped one).")
    ap.add_argument("--seed", type=int, default=0, help="model seed (init, data order, splits)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    args = ap.parse_args()
    path = ensure_tiny(args.seed, rebuild=args.rebuild)
    built = model_checksum(str(path))
    print(path)
    if args.seed != 0:
        print(f"checksum {built} (the shipped model is seed 0)")
    elif built == SHIPPED_CHECKSUM:
        print(f"checksum {built}: reproduces the shipped start model ({SHIPPED})")
    else:
        print(f"checksum {built}: differs from the shipped start model's {SHIPPED_CHECKSUM} (the "
              f"build's float rounding follows the CPU: {machine()}); runs use the shipped one")


if __name__ == "__main__":
    main()
