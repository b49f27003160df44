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


def ddp_nan_loss_rank(rank: int, model_dir: str, port: int, out) -> None:
    """One of two gloo DDP trainers on the same batch, except that rank 1's first reward is NaN:
    puts (rank, skipped_step, weights unchanged) on `out`, or (rank, the error, None). A spawn
    target, hence here. A hang cannot outlive the test: collectives time out after 60 s, and
    after 90 s the process prints every thread's stack (the hang's place) and exits."""
    import faulthandler
    import math
    from datetime import timedelta

    import torch

    import infrastructure as infra
    import train
    from value_head import load_policy

    faulthandler.dump_traceback_later(90, exit=True)
    try:
        torch.set_num_threads(1)
        infra.init_process_group(torch.device("cpu"), rank, 2, port, timeout=timedelta(seconds=60))
        policy, tok = load_policy(model_dir)
        model = torch.nn.parallel.DistributedDataParallel(policy)
        reward = math.nan if rank == 1 else 1.0
        batch = train.collate([train.trajectory([5, 6, 7], [8, 9], [-0.5, -1.5], reward, None, 0),
                               train.trajectory([5], [4, 3], [-1.0, -2.0], -1.0, None, 0)],
                              tok.pad_token_id)
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        stats = train.train_step(model, None, opt, batch,
                                 train.Args(c_kl=0.0, mcts_baseline="value"))
        unchanged = all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
        out.put((rank, stats["skipped_step"], unchanged))
        torch.distributed.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - the test shows it
        out.put((rank, repr(e), None))
