"""The sampler: one small interface that MCTS, the baselines, eval and training all generate through.

Blog: from each leaf "we produce K completions until the stop tag </step> is encountered", and
pUCT priors come from the completions' summed log-probs. So a sample returns its tokens, the raw
model's log-probs of them and, on request, the value head's V(s) at its end. Each distinct prompt
is encoded once and its KV cache fanned out to its n samples (the author's SGLang radix cache does
this across calls too). On CPU a tiny model is overhead-bound (anchors.md), so Qwen2 models run
through `Qwen2Decoder`: our own forward over the HF weights with a preallocated KV cache.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from countdown import ANSWER_CLOSE, STEP_END
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
    """One token per row from float32 logits [B, V]; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # top-p (nucleus): keep the smallest set of most likely tokens whose mass reaches top_p
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    choice = torch.multinomial(sorted_probs.masked_fill(outside, 0), 1, generator=generator)
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


class Qwen2Decoder:
    """Qwen2 forward over the HF module's weights: RMSNorm, RoPE, GQA attention with q/k/v biases,
    SwiGLU MLP, tied or untied lm_head; a preallocated KV cache [layers, 2, B, kv_heads, T, d].
    Few ops per step: q/k/v and gate/up are fused matmuls, RoPE is applied to q and k at once."""

    def __init__(self, lm):
        cfg = lm.config
        self.lm, self.eps = lm, cfg.rms_norm_eps
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.cos = self.sin = None
        self._source = None
        self.refresh()

    @staticmethod
    def supports(lm) -> bool:
        """Plain Qwen2 only; anything else (sliding window, other archs) uses HFDecoder."""
        cfg = lm.config
        return (cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False)
                and cfg.hidden_act == "silu")

    def _source_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.lm.parameters())

    def refresh(self) -> None:
        """(Re)build the fused weights; generate() calls it whenever the HF weights changed
        (load_weights, or an optimizer stepping the same module in place)."""
        key = self._source_key()
        if key == self._source:
            return
        m = self.lm.model
        with torch.no_grad():
            self.embed, self.norm = m.embed_tokens.weight, m.norm.weight
            self.lm_head = self.lm.lm_head.weight
            self.layers = []
            for layer in m.layers:
                a, mlp = layer.self_attn, layer.mlp
                biases = [p.bias if p.bias is not None else torch.zeros_like(p.weight[:, 0])
                          for p in (a.q_proj, a.k_proj, a.v_proj)]
                self.layers.append((  # o and down are transposed views for addmm (residual add)
                    layer.input_layernorm.weight,
                    torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                    torch.cat(biases), a.o_proj.weight.t(), layer.post_attention_layernorm.weight,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight.t(),
                ))
        self.cos = None  # the RoPE table follows the weights' dtype/device
        self._source = key

    def _rope_table(self, length: int) -> None:
        """cos and sign-folded sin [position, q+k+v heads, d] from the HF rotary module itself (so
        every rope_type / scaling it supports is honoured); v heads get cos 1, sin 0, so one
        rotation covers the whole qkv output and k, v reach the cache in one copy."""
        if self.cos is not None and self.cos.shape[0] >= length:
            return
        length = max(length, 2 * (0 if self.cos is None else self.cos.shape[0]), 256)
        pos = torch.arange(length, device=self.embed.device)[None]
        cos, sin = self.lm.model.rotary_emb(self.embed[:1], pos)
        cos, sin, half = cos[0, :, None], sin[0, :, None], self.head_dim // 2
        # rotate_half(x) * sin == x.roll(half) * [-sin[:half], sin[half:]]
        sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)
        qk, v = self.n_heads + self.n_kv, (length, self.n_kv, self.head_dim)
        self.cos = torch.cat([cos.expand(-1, qk, -1), cos.new_ones(v)], 1)
        self.sin = torch.cat([sin.expand(-1, qk, -1), sin.new_zeros(v)], 1)

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        """Qwen2RMSNorm: normalise in float32, scale in the model's dtype (one op in float32)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def prefill(self, ids: Tensor, pos: Tensor, valid: Tensor, max_len: int
                ) -> tuple[Tensor, Tensor]:
        """Encode left-padded prompts into a fresh cache of max_len columns -> last (logits, hidden)."""
        B, T = ids.shape
        self._rope_table(int(pos.max()) + max_len)
        self.cache = torch.empty(len(self.layers), 2, B, self.n_kv, max_len, self.head_dim,
                                 dtype=self.embed.dtype, device=ids.device)
        self.valid = torch.ones(B, max_len, dtype=torch.bool, device=ids.device)
        self.valid[:, :T] = valid
        self.has_pad = not bool(valid.all())
        self.col = 0
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=ids.device)  # pad queries see themselves: no NaN
        mask = (causal & valid[:, None, :]) | eye  # [B, Tq, Tk]
        mask = mask[:, None, None].expand(B, 1, self.group, T, T).reshape(B, 1, self.group * T, T)
        hidden = self._forward(ids, pos, mask)[:, -1]
        return F.linear(hidden, self.lm_head).float(), hidden

    def step(self, tokens: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Feed one token per row -> (logits [B, V] float32, final hidden [B, H])."""
        mask = self.valid[:, None, None, : self.col + 1] if self.has_pad else None
        hidden = self._forward(tokens[:, None], pos[:, None], mask)[:, 0]
        return F.linear(hidden, self.lm_head).float(), hidden

    def select(self, index: Tensor) -> None:
        """Keep / repeat cache rows (fan-out of a prompt to its samples; dropping finished rows)."""
        shape = list(self.cache.shape)
        shape[2] = len(index)
        cache = self.cache.new_empty(shape)
        cache[..., : self.col, :] = self.cache[:, :, index, :, : self.col]
        self.cache, self.valid = cache, self.valid[index]

    def _forward(self, x: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        """x, pos [B, T] -> final-norm hidden [B, T, H]; writes the KV cache at columns col..col+T."""
        B, T = x.shape
        nh, nkv, d, g, col = self.n_heads, self.n_kv, self.head_dim, self.group, self.col
        cos, sin = self.cos[pos], self.sin[pos]  # [B, T, heads, d]
        h = F.embedding(x.view(-1), self.embed)  # [B*T, H]: matmuls run on 2-D activations
        for i, (w_in, w_qkv, b_qkv, w_o_t, w_post, w_gu, w_down_t) in enumerate(self.layers):
            qkv = F.linear(self._norm(h, w_in), w_qkv, b_qkv).view(B, T, nh + 2 * nkv, d)
            qkv = qkv * cos + qkv.roll(d // 2, -1) * sin  # RoPE on q and k (v: cos 1, sin 0)
            cache = self.cache[i]
            cache[:, :, :, col: col + T] = qkv[:, :, nh:].view(B, T, 2, nkv, d).permute(2, 0, 3, 1, 4)
            # GQA: the g query heads of a kv head become g*T query rows of that kv head
            q = qkv[:, :, :nh].reshape(B, T, nkv, g, d).permute(0, 2, 3, 1, 4).reshape(B, nkv, g * T, d)
            o = F.scaled_dot_product_attention(q, cache[0, :, :, : col + T], cache[1, :, :, : col + T],
                                               attn_mask=mask)
            o = o.view(B, nkv, g, T, d).permute(0, 3, 1, 2, 4).reshape(B * T, nh * d)
            h = torch.addmm(h, o, w_o_t)
            gate, up = F.linear(self._norm(h, w_post), w_gu).chunk(2, -1)
            h = torch.addmm(h, F.silu(gate) * up, w_down_t)
        self.col = col + T
        return self._norm(h, self.norm).view(B, T, -1)


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
        ids, pos, valid = left_pad([list(p) for p in unique], self.device)
        self.forward_tokens += int(valid.sum())
        width = ids.shape[1]
        logits, _ = self.decoder.prefill(ids, pos, valid, width + max_new_tokens + 1)
        # fan out: row r of the batch is sample r % n of prompt r // n
        slot = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([slot[tuple(p)] for p in prompts for _ in range(n)], device=self.device)
        self.decoder.select(index)
        logits, next_pos = logits[index], pos[index, -1] + 1
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
