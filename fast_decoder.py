"""The fast decode path of sampler.TorchSampler: a hand-written Qwen2 forward over the HF module's
weights, and the grouping of prompts that share a prefix. A speed-up, not a concept: the tiny
model on a CPU is overhead-bound, and these cut the ops per decode step (benchmarks/sampler.py
measures them against HF `generate`; benchmarks/README.md has the numbers). `HFDecoder` in
sampler.py is the plain reference with the same interface.
"""

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_SHARED_PREFIX = 8  # a common prefix of the batch's prompts this long is encoded only once


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
