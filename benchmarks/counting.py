"""A sampler wrapper for benchmarks: counts what the algorithms need not (calls, seconds inside
the model, forward tokens with and without encoding each context once for its samples)."""

from __future__ import annotations

import time


class CountingSampler:
    """Wraps any sampler (same `generate`, `tokenizer`); the counters only ever grow."""

    def __init__(self, sampler):
        self.sampler, self.tokenizer = sampler, sampler.tokenizer
        self.calls = 0
        self.seconds = 0.0  # wall time inside generate (the model's forwards)
        self.fanout_tokens = 0  # forward tokens, each context encoded once for its n samples
        self.reencode_tokens = 0  # forward tokens, each context encoded again for every sample

    @property
    def forward_tokens(self) -> int:
        """The sampler's own count (it also encodes a prefix shared by contexts once)."""
        return self.sampler.forward_tokens

    @property
    def tokens_generated(self) -> int:
        return self.sampler.tokens_generated

    def generate(self, prompts, *args, **kwargs):
        start = time.perf_counter()
        try:
            outs = self.sampler.generate(prompts, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
        self.calls += 1
        for context, samples in zip(prompts, outs):
            generated = sum(len(c.tokens) for c in samples)
            self.fanout_tokens += len(context) + generated
            self.reencode_tokens += len(samples) * len(context) + generated
        return outs
