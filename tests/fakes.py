"""Scripted stand-ins shared by the search tests (mcts, treepo): a completion record and a
one-token-per-character tokenizer, so expected numbers can be written out by hand."""

from dataclasses import dataclass


@dataclass
class FakeCompletion:  # private stand-in for sampler.Completion (same fields)
    tokens: list
    logprobs: list
    text: str
    finish_reason: str
    value: float | None = None


class CharTokenizer:
    """One token per character; no chat template, so make_prompt gives plain text + newline."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(ch) for ch in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))

    def batch_decode(self, batch, skip_special_tokens=False):
        return [self.decode(ids) for ids in batch]
