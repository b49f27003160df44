"""The sampler: one small interface that MCTS, the baselines, eval and training all generate through.

Blog: from each leaf "we produce K completions until the stop tag </step> is encountered", and
pUCT priors come from the completions' summed log-probs. So a sample returns its tokens, the raw
model's log-probs of them and, on request, the value head's V(s) at its end. Each distinct prompt
is encoded once and its KV cache fanned out to its n samples, and prompts that share a prefix (the
leaves of one MCTS tree share the problem prompt and their ancestors' steps) encode it once too:
the author's SGLang radix cache does this, across calls as well. On CPU a tiny model is
overhead-bound, so Qwen2 models run through `fast_decoder.Qwen2Decoder` (our own forward over
the HF weights with a preallocated KV cache, a speed-up only); any other model through the HF
module itself (`HFDecoder`). Both have the same five methods: refresh, prefill, extend, step,
select.
"""

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec

import torch
from torch import Tensor
from transformers import DynamicCache

from countdown import ANSWER_CLOSE, STEP_END
from fast_decoder import Qwen2Decoder, shared_prefix_groups
from value_head import PolicyWithValue

COMPACT_FRACTION = 0.25  # drop finished rows from the batch once they are this share of it


@dataclass
class Completion:
    tokens: list[int]  # generated tokens only (stop string / EOS token included)
    logprobs: list[float]  # log pi(token) under the raw model (temperature 1, no top-p), float32
    text: str  # tokenizer.decode(tokens, skip_special_tokens=True)
    finish_reason: str  # "step", "answer" (ended with ANSWER_CLOSE), "eos" or "length"
    value: float | None = None  # V(s) at the last token of prompt + completion, if want_values


def sample_tokens(logits: Tensor, temperature: float, top_p: float,
                  generator: torch.Generator) -> Tensor:
    """One token per row from float32 logits [B, V]; temperature 0 is greedy (argmax). Sampling
    is by inverse CDF (one uniform per row, searched in the cumulative probabilities): exact, and
    ~15x cheaper on CPU than torch.multinomial, which draws an exponential per vocabulary entry."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    order = None
    if top_p < 1:  # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
        probs, order = probs.sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0)
    cdf = probs.cumsum(-1)
    u = torch.rand(len(cdf), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    # the first index whose cdf exceeds u, so a zero-probability token is never chosen; the
    # clamp only guards u rounding up to the total (then the last kept token is taken)
    choice = torch.searchsorted(cdf, u, right=True)
    if order is None:
        return choice.clamp_(max=cdf.shape[-1] - 1).squeeze(-1)
    choice = torch.minimum(choice, (probs > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, choice).squeeze(-1)


def left_pad(sequences: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """-> ids [B, L] left-padded with 0, positions [B, L] (0 at each row's first real token), valid mask."""
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    width = int(lengths.max())
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    for row, s in enumerate(sequences):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
    pos = torch.arange(width, device=device)[None, :] - (width - lengths)[:, None]
    return ids, pos.clamp(min=0), pos >= 0


class HFDecoder:
    """Fallback for other architectures: the HF module with its own DynamicCache, same interface."""

    def __init__(self, lm):
        self.lm = lm

    def refresh(self) -> None:
        """Nothing derived from the weights."""

    def _run(self, ids: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        out = self.lm(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                      past_key_values=self.cache, use_cache=True, output_hidden_states=True)
        return out.logits[:, -1].float(), out.hidden_states[-1][:, -1]

    def prefill(self, ids: Tensor, pos: Tensor, valid: Tensor, max_len: int
                ) -> tuple[Tensor, Tensor]:
        self.cache, self.mask = DynamicCache(config=self.lm.config), valid.long()
        return self._run(ids, pos)

    def extend(self, ids: Tensor, pos: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        self.mask = torch.cat([self.mask, valid.long()], 1)
        return self._run(ids, pos)

    def step(self, tokens: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        return self._run(tokens[:, None], pos[:, None])

    def select(self, index: Tensor) -> None:
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]


def check_generate_args(prompts: list[list[int]], n: int, max_new_tokens: int,
                        temperature: float, top_p: float) -> None:
    """One clear error for a bad generate() call, the same for every backend."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if n < 1 or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"bad sampling arguments: n={n}, max_new_tokens={max_new_tokens}, "
                         f"temperature={temperature}, top_p={top_p}")


class TorchSampler:
    """Batched KV-cache sampler on the policy in this process (backend "torch")."""

    def __init__(self, policy: PolicyWithValue, tokenizer, seed: int = 0, fast: bool = True):
        """fast=False runs the HF module step by step even for Qwen2 (a reference / benchmark)."""
        self.policy, self.tokenizer = policy, tokenizer
        lm = policy.lm
        self.device = next(lm.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.decoder = Qwen2Decoder(lm) if fast and Qwen2Decoder.supports(lm) else HFDecoder(lm)
        self.tokens_generated = 0  # sampled tokens, for budgets and logging
        self.forward_tokens = 0  # tokens pushed through the model (each prompt once, no padding)
        self.vocab_size = lm.get_output_embeddings().weight.shape[0]
        self.eos_ids = sorted(self._eos_ids())
        self.is_eos = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        self.is_eos[self.eos_ids] = True
        self._stop_tables: dict[tuple[str, ...], Tensor] = {}

    def _eos_ids(self) -> set[int]:
        """The tokenizer's and the model's EOS ids plus Qwen's <|im_end|> / <|endoftext|>."""
        lm, ids = self.policy.lm, set()
        gen_cfg = getattr(lm, "generation_config", None)
        for src in (self.tokenizer.eos_token_id, lm.config.eos_token_id,
                    gen_cfg.eos_token_id if gen_cfg is not None else None):
            ids.update([src] if isinstance(src, int) else (src or []))
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab)
        return {i for i in ids if 0 <= i < self.vocab_size}

    def _stop_candidates(self, stop: tuple[str, ...]) -> Tensor:
        """Tokens that may complete a stop string (their text holds a stop's last char, or is not
        decodable alone); only rows that just sampled one are decoded and checked. Text is
        decoded as in Completion.text (special tokens skipped), as vLLM matches stop strings."""
        if stop not in self._stop_tables:
            table = torch.zeros(self.vocab_size, dtype=torch.bool)
            if any(s[-1].isspace() for s in stop):
                table[:] = True
            else:
                texts = self.tokenizer.batch_decode([[i] for i in range(self.vocab_size)],
                                                    skip_special_tokens=True)
                for i, text in enumerate(texts):
                    table[i] = "\ufffd" in text or any(s[-1] in text for s in stop)
            self._stop_tables[stop] = table.to(self.device)
        return self._stop_tables[stop]

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0,
                 stop: Sequence[str] = (STEP_END, ANSWER_CLOSE),
                 want_values: bool = False) -> list[list[Completion]]:
        """n samples per prompt -> [len(prompts)][n] Completions; each prompt's KV is computed once."""
        check_generate_args(prompts, n, max_new_tokens, temperature, top_p)
        stop = tuple(s for s in stop if s)
        self.decoder.refresh()
        unique = list(dict.fromkeys(tuple(p) for p in prompts))  # shared prefixes: encode once
        logits, last_pos = self._encode(unique, max_new_tokens)
        # fan out: row r of the batch is sample r % n of prompt r // n
        slot = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([slot[tuple(p)] for p in prompts for _ in range(n)], device=self.device)
        self.decoder.select(index)
        logits, next_pos = logits[index], last_pos[index] + 1
        rows = list(range(len(index)))  # batch row -> sample number
        alive = [True] * len(rows)  # per batch row, in Python: no tensor ops on quiet steps
        results: list[Completion | None] = [None] * len(rows)
        tokens = torch.zeros(len(rows), max_new_tokens, dtype=torch.long, device=self.device)
        logps = torch.zeros(len(rows), max_new_tokens, device=self.device)
        can_end = self.is_eos | self._stop_candidates(stop) if stop else self.is_eos
        window = max((len(s) for s in stop), default=0) + 2  # tokens that can hold a stop string
        for t in range(max_new_tokens):
            tok = sample_tokens(logits, temperature, top_p, self.generator)
            tokens[:, t] = tok
            logps[:, t] = torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
            self.tokens_generated += sum(alive)
            finished = []  # (batch row, reason)
            for r in can_end[tok].nonzero()[:, 0].tolist():
                if alive[r]:
                    reason = "eos" if self.is_eos[tok[r]] else self._stop_reason(
                        tokens[r, :t + 1], stop, window)
                    if reason:
                        finished.append((r, reason))
            if t == max_new_tokens - 1:
                done = {r for r, _ in finished}
                finished += [(r, "length") for r in range(len(rows)) if alive[r] and r not in done]
            for r, reason in finished:
                alive[r] = False
                results[rows[r]] = Completion(tokens[r, :t + 1].tolist(),
                                              logps[r, :t + 1].tolist(), "", reason)
            # V(s) at a sample's last token comes from the next step's forward of that token
            need_value = [r for r, _ in finished] if want_values else []
            if not any(alive) and not need_value:
                break
            keep = [r for r in range(len(rows)) if alive[r] or r in need_value]
            # drop finished rows once they are a good share of the batch (compaction)
            if len(rows) - len(keep) >= max(1, COMPACT_FRACTION * len(rows)) or not any(alive):
                kept = torch.tensor(keep, device=self.device)
                self.decoder.select(kept)
                need_value = [keep.index(r) for r in need_value]
                rows, alive = [rows[r] for r in keep], [alive[r] for r in keep]
                tok, next_pos, tokens, logps = tok[kept], next_pos[kept], tokens[kept], logps[kept]
            self.forward_tokens += sum(alive) + len(need_value)
            logits, hidden = self.decoder.step(tok, next_pos)
            next_pos = next_pos + 1
            if need_value:
                values = self.policy.value_head(hidden[need_value]).tolist()
                for r, v in zip(need_value, values):
                    results[rows[r]].value = v
            if not any(alive):
                break
        texts = self.tokenizer.batch_decode([c.tokens for c in results], skip_special_tokens=True)
        for c, text in zip(results, texts):
            c.text = text
        return [results[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _encode(self, unique: list[tuple[int, ...]], max_new_tokens: int) -> tuple[Tensor, Tensor]:
        """Prefill the distinct prompts -> (next-token logits, last position) per prompt. Prompts
        that share a prefix (an MCTS round's leaves of one tree share the problem prompt and their
        ancestors' steps) are grouped (`shared_prefix_groups`): each group's prefix is encoded
        once in a first pass and fanned out, then each prompt's own suffix is appended in a
        second pass: a radix cache of depth two, within the call."""
        group, prefix = shared_prefix_groups(unique)
        if group is None:  # nothing worth sharing: one pass
            ids, pos, valid = left_pad([list(u) for u in unique], self.device)
            self.forward_tokens += int(valid.sum())
            logits, _ = self.decoder.prefill(ids, pos, valid, ids.shape[1] + max_new_tokens + 1)
            return logits, pos[:, -1]
        firsts = [group.index(g) for g in range(max(group) + 1)]  # each group's first prompt
        ids1, pos1, valid1 = left_pad([list(unique[i][:prefix[i]]) for i in firsts], self.device)
        ids2, pos2, valid2 = left_pad([list(u[n:]) for u, n in zip(unique, prefix)], self.device)
        self.forward_tokens += int(valid1.sum()) + int(valid2.sum())
        self.decoder.prefill(ids1, pos1, valid1, ids1.shape[1] + ids2.shape[1] + max_new_tokens + 1)
        self.decoder.select(torch.tensor(group, device=self.device))  # group g: row g of pass 1
        pos2 = pos2 + torch.tensor(prefix, device=self.device)[:, None]
        logits, _ = self.decoder.extend(ids2, pos2, valid2)
        return logits, pos2[:, -1]

    def _stop_reason(self, tokens: Tensor, stop: tuple[str, ...], window: int) -> str | None:
        """Decode the last few tokens; the earliest-ending stop string decides the reason."""
        text = self.tokenizer.decode(tokens[-window:].tolist(), skip_special_tokens=True)
        ends = [(text.find(s) + len(s), s) for s in stop if s in text]
        if not ends:
            return None
        return "answer" if min(ends)[1] == ANSWER_CLOSE else "step"

    @torch.inference_mode()
    def values(self, sequences: list[list[int]]) -> list[float]:
        """V(s) at the last token of each sequence, in one batched forward."""
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("values needs at least one sequence and no empty sequence")
        self.decoder.refresh()
        ids, pos, valid = left_pad(sequences, self.device)
        self.forward_tokens += int(valid.sum())
        _, hidden = self.decoder.prefill(ids, pos, valid, ids.shape[1])
        return self.policy.value_head(hidden).tolist()

    def load_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Weight sync from a trainer: copy a PolicyWithValue state dict in place."""
        with torch.no_grad():
            self.policy.load_state_dict(state_dict)
        self.decoder.refresh()


AUTO_VLLM_PARAMS = 100_000_000  # "auto": vLLM from this model size up (when it is installed)


def choose_backend(backend: str, policy: torch.nn.Module) -> str:
    """Resolve "auto" by model size, as measured on 2 CPU cores (benchmarks/README.md): our torch
    sampler for small models (the 1M-parameter tiny model: 2.6x vLLM's tokens/s, overhead-bound),
    vLLM from AUTO_VLLM_PARAMS up (Qwen2.5-0.5B: 2x ours; the threshold lies between the two
    measured sizes) when installed, else torch with a one-line note. "torch", "vllm": as given."""
    if backend != "auto":
        return backend
    if sum(p.numel() for p in policy.parameters()) < AUTO_VLLM_PARAMS:
        return "torch"
    if find_spec("vllm") is None:
        print("note: --backend auto samples this model with the torch backend: vLLM is ~2x faster "
              "from 0.5B parameters (pip install -r requirements-vllm.txt)", file=sys.stderr)
        return "torch"
    return "vllm"


def make_sampler(backend: str, policy: PolicyWithValue, tokenizer, seed: int = 0, **kw):
    """"torch" -> TorchSampler; "vllm" -> sampler_vllm.VLLMSampler (needs the vllm package)."""
    if backend == "torch":
        return TorchSampler(policy, tokenizer, seed=seed, **kw)
    if backend == "vllm":
        try:
            import vllm  # noqa: F401  (fail here with one clear line, not deep inside sampler_vllm)
        except ImportError:
            raise SystemExit("backend 'vllm' needs the vllm package: "
                             "pip install -r requirements-vllm.txt") from None
        from sampler_vllm import VLLMSampler
        return VLLMSampler(policy, tokenizer, seed=seed, **kw)
    raise ValueError(f"unknown sampler backend {backend!r}; expected 'torch' or 'vllm'")
