"""The sampler: one small interface that MCTS, the baselines, eval and training all generate through.

Blog: from each leaf "we produce K completions until the stop tag </step> is encountered", and
pUCT priors come from the completions' summed log-probs. So a sample returns its tokens, the raw
model's log-probs of them and, on request, the value head's V(s) at its end. Each distinct prompt
is encoded once and its KV cache fanned out to its n samples, and prompts that share a prefix (the
leaves of one MCTS tree share the problem prompt and their ancestors' steps) encode it once too:
the author's SGLang radix cache does this, across calls as well. On CPU a tiny model is
overhead-bound (anchors.md), so Qwen2 models run through `Qwen2Decoder`: our own forward over the
HF weights with a preallocated KV cache.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from countdown import ANSWER_CLOSE, STEP_END
from value_head import PolicyWithValue

COMPACT_FRACTION = 0.25  # drop finished rows from the batch once they are this share of it
MIN_SHARED_PREFIX = 8  # a common prefix of the batch's prompts this long is encoded only once


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


def shared_prefix_groups(prompts: Sequence[Sequence[int]], min_shared: int = MIN_SHARED_PREFIX
                         ) -> tuple[list[int] | None, list[int]]:
    """Group prompts to encode shared prefixes once -> (group id per prompt: 0, 1, ... in order
    of first appearance, prefix length per prompt), or (None, []) when no prefix of at least
    min_shared tokens is shared.

    In sorted order, prompts with long common prefixes are neighbours, and the common prefix of
    a run is the minimum of its neighbours' common prefixes. A dynamic program over runs picks
    the groups that save the most encoded tokens, (members - 1) x common prefix per group
    (a group's prefix leaves each member at least one token of its own). A prompt alone in its
    group puts all but its last token in the first pass (nothing is encoded twice)."""
    n = len(prompts)
    order = sorted(range(n), key=lambda i: prompts[i])
    common = []  # common[j]: shared prefix of sorted neighbours j, j+1 (each keeps one token)
    for a, b in pairwise(order):
        pa, pb, k = prompts[a], prompts[b], 0
        limit = min(len(pa), len(pb)) - 1
        while k < limit and pa[k] == pb[k]:
            k += 1
        common.append(k)
    best = [0] * (n + 1)  # best[j]: most tokens saved by grouping the first j sorted prompts
    cut = [0] * (n + 1)  # start of the last group in that best grouping
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1], j - 1  # prompt j-1 alone
        shared = None  # common prefix of sorted prompts i..j-1, as i moves left
        for i in range(j - 2, -1, -1):
            shared = common[i] if shared is None else min(shared, common[i])
            if shared < min_shared:
                break  # longer runs only share less
            if best[i] + (j - 1 - i) * shared > best[j]:
                best[j], cut[j] = best[i] + (j - 1 - i) * shared, i
    if best[n] < min_shared:
        return None, []
    group, prefix = [0] * n, [0] * n
    j = n
    while j > 0:
        i = cut[j]
        members = order[i:j]
        shared = min(common[i:j - 1]) if j - i > 1 else len(prompts[members[0]]) - 1
        for m in members:
            group[m], prefix[m] = i, shared
        j = i
    dense = {g: k for k, g in enumerate(dict.fromkeys(group))}
    return [dense[g] for g in group], prefix


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
        self.rope = None
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
        (load_weights, or an optimizer stepping the same module in place). Two exact rewrites
        make decoding cheaper: the q rows carry the 1/sqrt(d) attention scale, and the q and k
        rows of each head are reordered so that HF's rotate-half RoPE pairs (i, i + d/2) sit
        side by side and RoPE becomes one complex multiply. q.k is unchanged by a reordering
        applied to both, so only our private K cache sees it."""
        key = self._source_key()
        if key == self._source:
            return
        m, d = self.lm.model, self.head_dim
        pairs = torch.arange(d).view(2, d // 2).t().reshape(-1)  # 0, d/2, 1, d/2+1, ...
        q_rows = (torch.arange(self.n_heads)[:, None] * d + pairs).view(-1)
        k_rows = (torch.arange(self.n_kv)[:, None] * d + pairs).view(-1)
        scale = d ** -0.5
        with torch.no_grad():
            self.embed, self.norm = m.embed_tokens.weight, m.norm.weight
            self.lm_head = self.lm.lm_head.weight
            self.layers = []
            for layer in m.layers:
                a, mlp = layer.self_attn, layer.mlp
                q_w, k_w, v_w = (p.weight for p in (a.q_proj, a.k_proj, a.v_proj))
                q_b, k_b, v_b = (p.bias if p.bias is not None else torch.zeros_like(p.weight[:, 0])
                                 for p in (a.q_proj, a.k_proj, a.v_proj))
                self.layers.append((  # qkv, o and down are transposed for addmm (bias / residual)
                    layer.input_layernorm.weight,
                    torch.cat([q_w[q_rows] * scale, k_w[k_rows], v_w]).t(),
                    torch.cat([q_b[q_rows] * scale, k_b[k_rows], v_b]),
                    a.o_proj.weight.t(), layer.post_attention_layernorm.weight,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t(),
                    mlp.down_proj.weight.t(),
                ))
        self.rope = None  # the RoPE table follows the weights' device
        self._source = key

    def _rope_table(self, length: int) -> None:
        """cos + i sin [position, q+k+v heads, d/2] (complex64) from the HF rotary module itself
        (so every rope_type / scaling it supports is honoured); v heads get 1 + 0i, so one
        multiply covers the whole qkv output and k, v reach the cache in one copy."""
        if self.rope is not None and self.rope.shape[0] >= length:
            return
        length = max(length, 2 * (0 if self.rope is None else self.rope.shape[0]), 256)
        pos = torch.arange(length, device=self.embed.device)[None]
        cos, sin = self.lm.model.rotary_emb(self.embed[:1].float(), pos)  # float32 tables
        half = self.head_dim // 2  # HF's tables repeat the d/2 frequencies twice
        rot = torch.complex(cos[0, :, :half], sin[0, :, :half])[:, None]
        ones = torch.ones(length, self.n_kv, half, dtype=rot.dtype, device=rot.device)
        self.rope = torch.cat([rot.expand(-1, self.n_heads + self.n_kv, -1), ones], 1)

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        """Qwen2RMSNorm: normalise in float32, scale in the model's dtype (one op in float32)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def prefill(self, ids: Tensor, pos: Tensor, valid: Tensor, max_len: int
                ) -> tuple[Tensor, Tensor]:
        """Encode left-padded prompts into a fresh cache of max_len columns -> last (logits, hidden)."""
        self._rope_table(max_len)  # a position never exceeds its cache column
        self.cache = torch.empty(len(self.layers), 2, len(ids), self.n_kv, max_len, self.head_dim,
                                 dtype=self.embed.dtype, device=ids.device)
        # pad columns get -inf in an additive score bias (decode steps add it only if needed)
        self.bias = torch.zeros(len(ids), 1, 1, max_len, dtype=self.embed.dtype, device=ids.device)
        self.has_pad, self.col = False, 0
        return self.extend(ids, pos, valid)

    def extend(self, ids: Tensor, pos: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Append left-padded token blocks [B, T] after the cached columns (a prompt's own suffix
        after a prefix shared by the batch) -> last (logits, hidden)."""
        B, T = ids.shape
        new = slice(self.col, self.col + T)
        self.bias[:, 0, 0, new].masked_fill_(~valid, float("-inf"))
        self.has_pad = self.has_pad or not bool(valid.all())
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=ids.device)  # pad queries see themselves: no NaN
        seen = (self.bias[:, 0, 0, None, : self.col] == 0).expand(B, T, self.col)  # cached columns
        mask = torch.cat([seen, (causal & valid[:, None, :]) | eye], -1)  # [B, Tq, Tk]
        mask = mask[:, None, None].expand(B, 1, self.group, T, -1).reshape(B, 1, self.group * T, -1)
        hidden = self._forward(ids, pos, mask)[:, -1]
        return F.linear(hidden, self.lm_head).float(), hidden

    def step(self, tokens: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Feed one token per row -> (logits [B, V] float32, final hidden [B, H])."""
        hidden = self._forward(tokens[:, None], pos[:, None], None)[:, 0]
        return F.linear(hidden, self.lm_head).float(), hidden

    def select(self, index: Tensor) -> None:
        """Keep / repeat cache rows (fan-out of a prompt to its samples; dropping finished rows)."""
        shape = list(self.cache.shape)
        shape[2] = len(index)
        cache = self.cache.new_empty(shape)
        cache[..., : self.col, :] = self.cache[:, :, index, :, : self.col]
        self.cache, self.bias = cache, self.bias[index]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q [B, kv heads, g*T, d] (already scaled), k, v [B, kv heads, L, d]. A one-token decode
        step is two small batched matmuls and a softmax (CPU flash attention has a high fixed
        cost per call at these sizes); prompts go through SDPA with their causal mask."""
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        scores = torch.matmul(q, k.transpose(-1, -2))
        if self.has_pad:
            scores += self.bias[..., : k.shape[-2]]
        return torch.matmul(torch.softmax(scores, -1), v)

    def _forward(self, x: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        """x, pos [B, T] -> final-norm hidden [B, T, H]; writes the KV cache at columns col..col+T."""
        B, T = x.shape
        nh, nkv, d, g, col = self.n_heads, self.n_kv, self.head_dim, self.group, self.col
        rope = self.rope[pos]  # [B, T, heads, d/2] complex
        h = F.embedding(x.view(-1), self.embed)  # [B*T, H]: matmuls run on 2-D activations
        for i, (w_in, w_qkv_t, b_qkv, w_o_t, w_post, w_gu_t, w_down_t) in enumerate(self.layers):
            qkv = torch.addmm(b_qkv, self._norm(h, w_in), w_qkv_t).view(B, T, nh + 2 * nkv, d // 2, 2)
            # RoPE on q and k (v: times 1) in float32; .float() and .to() are no-ops for float32
            qkv = torch.view_as_real(torch.view_as_complex(qkv.float()) * rope).to(h.dtype)
            qkv = qkv.view(B, T, nh + 2 * nkv, d)
            cache = self.cache[i]
            cache[:, :, :, col: col + T] = qkv[:, :, nh:].view(B, T, 2, nkv, d).permute(2, 0, 3, 1, 4)
            # GQA: the g query heads of a kv head become g*T query rows of that kv head
            q = qkv[:, :, :nh].reshape(B, T, nkv, g, d).permute(0, 2, 3, 1, 4).reshape(B, nkv, g * T, d)
            o = self._attend(q, cache[0, :, :, : col + T], cache[1, :, :, : col + T], mask)
            o = o.view(B, nkv, g, T, d).permute(0, 3, 1, 2, 4).reshape(B * T, nh * d)
            h = torch.addmm(h, o, w_o_t)
            gate, up = torch.mm(self._norm(h, w_post), w_gu_t).chunk(2, -1)
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
