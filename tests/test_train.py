"""train.py: pure helpers checked by hand, then short end-to-end runs of the process pipeline
(generators -> queue -> DDP trainer -> weight sync) on the test-size tiny model."""

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import countdown
import diagnostics
import infrastructure as infra
import mcts
import rundir
import train
from value_head import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


def small_flags(model: str, out: Path, steps: int) -> list[str]:
    """Everything tiny so a run takes seconds after start-up; every step publishes weights."""
    return ["--model", model, "--out", str(out), "--steps", str(steps), "--batch-size", "2",
            "--mcts-iterations", "4", "--mcts-workers", "2", "--mcts-k", "2",
            "--max-step-tokens", "12", "--max-new-tokens", "32", "--prompts-per-call", "1",
            "--cispo-groups", "1", "--group-size", "2", "--bon-n", "3", "--eval-problems", "2",
            "--eval-n", "2", "--eval-every", "0", "--sync-every", "1", "--checkpoint-every", "2",
            "--no-final-eval"]


def run_train(*flags: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """train.py with the weights hashed at every publish and sync (infrastructure.py's test hook)."""
    return subprocess.run([sys.executable, "train.py", *flags], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TREESEARCH_CHECKSUMS": "1", **env})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trainer_state(run_dir: Path) -> dict:
    return rundir.load_trainer_state(latest_checkpoint(run_dir))


TRAIN_FIELDS = {"step", "wall_time", "generated_tokens", "train_reward", "policy_loss",
                "value_loss", "kl", "policy_lag", "lr", "gen_busy_frac", "version"}


def check_run(run_dir: Path, model: str, steps: int, method: str,
              eval_steps: tuple[int, ...] = ()) -> list[dict]:
    """Shared end-to-end checks: fields, eval rows, weights moved, generators got the weights."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "train_reward" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    for r in train_rows:
        assert TRAIN_FIELDS <= r.keys()
        assert -1.0 <= r["train_reward"] <= 1.0 and r["policy_lag"] >= 0 and r["kl"] >= 0
    tokens = [r["generated_tokens"] for r in train_rows]
    assert tokens[0] > 0 and tokens == sorted(tokens)
    evals = [r for r in rows if "eval_mean_at_2" in r]
    assert [r["step"] for r in evals] == [0, *eval_steps, steps]  # before and after
    assert all(0 <= r["eval_mean_at_2"] <= 1 and 0 <= r["eval_format_rate"] <= 1 for r in evals)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == method and config["seed"] == 0

    # weights changed: the final checkpoint differs from the starting model, LM and value head
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == f"step-{steps:06d}"
    for name in ("model.safetensors", "value_head.safetensors"):
        before, after = load_file(Path(model) / name), load_file(ckpt / name)
        assert before.keys() == after.keys()
        assert any(not torch.equal(before[k], after[k]) for k in before), name
    state = rundir.load_trainer_state(ckpt)
    assert state["step"] == steps
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {float(steps)}

    # weight sync: generators load newer versions, bit-identical to what rank 0 published
    events = read_jsonl(run_dir / "events.jsonl")
    published = {e["version"]: e["checksum"] for e in events if e["event"] == "publish"}
    assert sorted(published) == list(range(1, steps + 1))  # --sync-every 1
    for g in range(config["n_generators"]):  # each generator goes forward from the start model
        versions = [e["version"] for e in events if e["event"] == "sync" and e["generator"] == g]
        assert versions == sorted(versions) and versions[0] == 0 and versions[-1] >= 1, g
    for e in events:
        if e["event"] == "sync" and e["version"] > 0:
            assert e["checksum"] == published[e["version"]]
    assert len(set(published.values())) == steps  # every step moved the weights
    # DDP: after every step every rank holds the weights rank 0 published, bit for bit
    ranks = {(e["rank"], e["step"]): e["checksum"] for e in events if e["event"] == "weights"}
    assert ranks == {(r, s): published[s] for r in range(config["n_trainers"])
                     for s in range(1, steps + 1)}
    return rows


# ------------------------------------------------------------------------------- pure helpers


def test_collate_aligns_completion_tokens_by_hand():
    a = train.trajectory([5, 6, 7], [8, 9], [-0.5, -1.5], 1.0, [-7.0, -8.0], 3)
    b = train.trajectory([5], [4, 3, 2], [-1.0, -2.0, -3.0], -1.0, [0.25, 0.5, 0.75], 4)
    out = train.collate([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # position t predicts input t+1: a's completion (8, 9) is predicted at positions 2, 3
    assert out["mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert out["old_logprobs"].tolist() == [[0, 0, -0.5, -1.5], [-1, -2, -3, 0]]
    assert out["versions"].tolist() == [3, 4] and out["rewards"].tolist() == [1.0, -1.0]
    # advantages sit on the same positions as the mask, 0 on prompt and padding
    assert out["advantages"].tolist() == [[0, 0, -7, -8], [0.25, 0.5, 0.75, 0]]
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.int64  # embedding ids


def test_advantages_by_method_by_hand():
    batch = {"rewards": torch.tensor([1.0, -1.0]), "mask": torch.tensor([[0, 1, 1], [1, 1, 0.0]]),
             "advantages": torch.tensor([[0, 2.0, 3.0], [4.0, 5.0, 0]])}
    values = torch.tensor([[9.0, 0.5, -0.25], [0.0, -0.5, 9.0]], requires_grad=True)
    # MCTS (the blog's value baseline) / BoN: r - sg(V(s_t)) on the completion tokens, whatever
    # the generator sent
    for args in (train.Args(method="mcts", mcts_baseline="value"), train.Args(method="bon")):
        adv = train.advantages(args, batch, values)
        assert adv.tolist() == [[0, 0.5, 1.25], [-1, -0.5, 0]] and not adv.requires_grad
    # the others: the generator's advantages, masked
    for args in [train.Args(method="mcts"), train.Args(method="mcts", mcts_distill="whole"),
                 *(train.Args(method=m) for m in ("cispo", "treepo", "treerl", "sft"))]:
        assert train.advantages(args, batch, values).tolist() == [[0, 2, 3], [4, 5, 0]]


def test_batch_info_is_the_mean_of_the_items_numbers():
    a = train.trajectory([5, 6], [8, 9], [-0.5, -1.5], 1.0, 0.5, 3, info={"search_depth": 2})
    b = train.trajectory([5], [4], [-1.0], -1.0, 0.0, 4, info={"search_depth": 4})
    assert diagnostics.batch_info([a, b]) == {"search_depth": 3.0}


WRONG = "<answer>1+2+3*4</answer>"  # for 1 2 3 4 -> 10: 15, dense reward 1 - 2 * 5/10 = 0


def two_answers(done, stop):
    """test_mcts's hand_script, except that after its step A come two answers: test_mcts's
    ANSWER (reward 1) and WRONG (reward 0)."""
    from test_mcts import ANSWER, A, hand_script

    if done == A and stop != ("</answer>",):
        return [(ANSWER, -0.2, "answer", 0.8), (WRONG, -1.2, "answer", 0.1)]
    return hand_script(done, stop)


def test_mcts_producer_tree_baseline_and_search_metrics():
    from test_mcts import ANSWER, PROBLEM, A, B, ScriptedSampler

    wrong, script = WRONG, two_answers
    # workers 1, M 4 (by hand as in test_mcts): root, A expanded, then ANSWER (prior 0.73,
    # reward 1.0) selected twice; greedy: A -> ANSWER. The tree's answers: ANSWER and wrong.
    args = train.Args(mcts_workers=1, mcts_iterations=4, mcts_k=2, max_new_tokens=256,
                      max_step_tokens=64, mcts_baseline="tree")
    sampler = ScriptedSampler(script)
    [t] = train.mcts_trajectories([PROBLEM], sampler, args, version=7)
    assert bytes(t["tokens"].tolist()).decode() == A + ANSWER and t["reward"].item() == 1.0
    assert t["advantages"].tolist() == [0.5] * len(A + ANSWER)  # 1.0 - mean(1.0, 0.0)
    assert t["info"] == {"search_depth": 2, "search_from_rollout": 0,
                         "search_terminal_backups": 2,
                         "search_tree_tokens": len(A) + len(B) + len(ANSWER) + len(wrong)}
    # the blog's advantage: left to the trainer (r - V)
    [t] = train.mcts_trajectories([PROBLEM], ScriptedSampler(script),
                                  train.Args(mcts_workers=1, mcts_iterations=4, mcts_k=2,
                                             mcts_baseline="value"), 7)
    assert t["advantages"].tolist() == [0.0] * len(t["tokens"])
    # whole tree: both answers, leave-one-out (1 - 0, 0 - 1), or step credit: the shared step A
    # gets (V(A) - V(root)) + (V(A) - V(root)) = 0, the answers +-((0.5) + (0.5))
    for credit, adv_a in (("leaf", (1.0, -1.0)), ("step", (0.0, 0.0))):
        whole = replace(args, mcts_distill="whole", mcts_credit=credit)
        bad, right = sorted(train.mcts_trajectories([PROBLEM], ScriptedSampler(script), whole, 7),
                            key=lambda t: t["reward"].item())
        assert bytes(right["tokens"].tolist()).decode() == A + ANSWER
        assert bytes(bad["tokens"].tolist()).decode() == A + wrong
        assert (right["reward"].item(), bad["reward"].item()) == (1.0, 0.0)
        step_adv = (1.0, -1.0) if credit == "step" else adv_a
        for t, a, s in ((right, adv_a[0], step_adv[0]), (bad, adv_a[1], step_adv[1])):
            assert t["advantages"].tolist() == [a] * len(A) + [s] * len(ANSWER if t is right
                                                                        else wrong)
            assert t["info"]["search_answers"] == 2


def test_whole_tree_visits_credit_keeps_the_visited_answers_weighted_by_visits():
    from test_mcts import ANSWER, PROBLEM, A, ScriptedSampler

    # as in the test above: ANSWER selected in rounds 3 and 4 (N = 2), wrong never (N = 0).
    # Visited: ANSWER alone, weight 2 / 2 = 1, advantage 1.0 - mean(1.0, 0.0); wrong left out
    args = train.Args(mcts_workers=1, mcts_iterations=4, mcts_k=2, max_new_tokens=256,
                      max_step_tokens=64, mcts_distill="whole", mcts_credit="visits")
    [t] = train.mcts_trajectories([PROBLEM], ScriptedSampler(two_answers), args, 0)
    assert bytes(t["tokens"].tolist()).decode() == A + ANSWER
    assert t["advantages"].tolist() == [0.5] * len(A + ANSWER)


def test_whole_tree_counts_the_rollout_answer_as_a_step_of_its_own():
    from test_mcts import PROBLEM, A, ScriptedSampler, hand_script

    wrong = WRONG  # dense reward 0
    step = "3+3=6</step>"
    rollout = "<answer>(1+2)*3+4</answer>"  # hand_script's rollout: 13 for 10, reward 0.4

    def script(done, stop):
        if done == A and stop != ("</answer>",):
            return [(wrong, -0.2, "answer", 0.8), (step, -1.2, "step", 0.9)]
        return hand_script(done, stop)
    # workers 1, M 2: root -> A, B; A -> wrong, step. Greedy stops at A (children unvisited) and
    # takes its best-evaluated child: step (V 0.9 > wrong's reward 0), finished by the rollout.
    args = train.Args(mcts_workers=1, mcts_iterations=2, mcts_k=2, max_new_tokens=256,
                      max_step_tokens=64, mcts_distill="whole", mcts_credit="step")
    bad, good = sorted(train.mcts_trajectories([PROBLEM], ScriptedSampler(script), args, 0),
                       key=lambda t: t["reward"].item())
    assert bytes(good["tokens"].tolist()).decode() == A + step + rollout
    assert good["reward"].item() == pytest.approx(0.4) and bad["reward"].item() == 0.0
    # V(root) = V(A) = 0.2; step and rollout: V 0.4 with one answer below
    assert bad["advantages"].tolist() == pytest.approx([0.0] * len(A) + [-0.4] * len(wrong))
    assert good["advantages"].tolist() == pytest.approx(
        [0.0] * len(A) + [0.4] * len(step) + [0.2] * len(rollout))
    leaf_bad, leaf_good = sorted(train.mcts_trajectories([PROBLEM], ScriptedSampler(script),
                                                         replace(args, mcts_credit="leaf"), 0),
                                 key=lambda t: t["reward"].item())
    assert leaf_bad["advantages"].tolist() == pytest.approx([-0.4] * len(A + wrong))
    assert leaf_good["advantages"].tolist() == pytest.approx([0.4] * len(A + step + rollout))
    # visits: neither answer was backed up (wrong unvisited, the rollout finished the unvisited
    # step): nothing to train on from this tree
    assert train.mcts_trajectories([PROBLEM], ScriptedSampler(script),
                                   replace(args, mcts_credit="visits"), 0) == []
    assert leaf_good["old_logprobs"].tolist() == pytest.approx(
        [-1.0 / len(A)] * len(A) + [-1.2 / len(step)] * len(step)
        + [-0.7 / len(rollout)] * len(rollout))


ANSWERS = ["<answer>(1+2)*3+4</answer>", "<answer>1+2+3+4</answer>", "<answer>1+2+3*4</answer>",
           "<answer>1+2</answer>"]  # for 1 2 3 4 -> 10: 13, 10, 15, not all numbers


def answers_script(done, stop):
    """Every sample of a prompt cycles through ANSWERS (summed logprob -1 - i for answer i)."""
    return [(a, -1.0 - i, "answer", None) for i, a in enumerate(ANSWERS)]


def test_cispo_producer_sends_group_relative_advantages_by_hand():
    from test_mcts import ScriptedSampler

    ten, thirteen = countdown.Problem((1, 2, 3, 4), 10), countdown.Problem((1, 2, 3, 4), 13)
    # dense rewards, by hand: for 10: 13 -> 1 - 2 * 3/10 = 0.4, 10 -> 1, 15 -> 1 - 2 * 5/10 = 0,
    # missing numbers -> -1 (mean 0.1); for 13: 1 - 6/13, 1 - 4/13 ... -> 1, 7/13, 9/13, -1
    r10, r13 = [0.4, 1.0, 0.0, -1.0], [1.0, 7 / 13, 9 / 13, -1.0]
    args = train.Args(method="cispo", group_size=4, max_new_tokens=50, temperature=0.7)
    sampler = ScriptedSampler(answers_script)
    trajs = train.cispo_trajectories([ten, thirteen], sampler, args, 3)
    assert sampler.calls == [{"prompts": 2, "n": 4, "max_new_tokens": 50, "temperature": 0.7,
                              "stop": ("</answer>",), "want_values": False}]
    assert len(trajs) == 8
    for t, r, adv in zip(trajs, r10 + r13, [x - 0.1 for x in r10] + [x - sum(r13) / 4 for x in r13]):
        assert t["reward"].item() == pytest.approx(r)
        assert t["advantages"].tolist() == pytest.approx([adv] * len(t["tokens"]), abs=1e-6)
        assert t["version"].item() == 3
    i = ANSWERS.index("<answer>1+2+3*4</answer>")
    assert trajs[i]["old_logprobs"].sum().item() == pytest.approx(-1.0 - i)
    with pytest.raises(ValueError):  # a sampler that loses a prompt's group is not paired off
        train.cispo_trajectories([ten, thirteen], LosingSampler(answers_script), args, 3)


class LosingSampler:
    """Returns one group fewer than it was given prompts (a broken backend)."""

    def __init__(self, script):
        from test_mcts import ScriptedSampler

        self.inner = ScriptedSampler(script)
        self.tokenizer = self.inner.tokenizer

    def generate(self, prompts, **kw):
        return self.inner.generate(prompts, **kw)[1:]


def test_bon_producer_sends_the_best_of_n_by_dense_reward():
    from test_mcts import ScriptedSampler

    problem = countdown.Problem((1, 2, 3, 4), 10)
    args = train.Args(method="bon", bon_n=4, max_new_tokens=50, temperature=0.7)
    sampler = ScriptedSampler(answers_script)
    [t] = train.bon_trajectories([problem], sampler, args, 5)
    assert sampler.calls == [{"prompts": 1, "n": 4, "max_new_tokens": 50, "temperature": 0.7,
                              "stop": ("</answer>",), "want_values": False}]
    best = "<answer>1+2+3+4</answer>"  # reward 1.0, the second of the four samples
    assert bytes(t["tokens"].tolist()).decode() == best and t["reward"].item() == 1.0
    assert t["old_logprobs"].tolist() == pytest.approx([-2.0 / len(best)] * len(best))
    assert not t["advantages"].any()  # r - sg(V(s_t)) is the trainer's (train.advantages)
    # N = 1: the only sample is the first, 13 for 10
    [t] = train.bon_trajectories([problem], ScriptedSampler(answers_script),
                                 replace(args, bon_n=1), 5)
    assert t["reward"].item() == pytest.approx(0.4)
    with pytest.raises(ValueError):
        train.bon_trajectories([problem, problem], LosingSampler(answers_script), args, 5)


def test_mcts_config_carries_every_search_flag():
    args = train.Args(mcts_workers=3, mcts_iterations=5, mcts_k=7, c_puct=1.25, temperature=0.7,
                      max_step_tokens=11, max_new_tokens=99, mcts_virtual_value=-0.5,
                      mcts_select="q", mcts_max_tree_tokens=321)
    assert train.mcts_config(args) == mcts.MCTSConfig(
        workers=3, iterations=5, k=7, c_puct=1.25, temperature=0.7, max_step_tokens=11,
        max_total_tokens=99, virtual_value=-0.5, select="q", max_tree_tokens=321)


ROLLOUT = {"prompt_ids": [1, 2], "tokens": [3, 4, 5], "old_logprobs": [-0.5, -0.25, -1.0],
           "reward": 0.5, "advantages": [0.125, 0.25, -0.375]}  # exact in float32


@pytest.mark.parametrize("method", ["treepo", "treerl"])
def test_tree_producers_carry_the_flags_and_send_the_rollouts(monkeypatch, method):
    """The TreePO / TreeRL producers: the flags become the paper's knobs, and each rollout
    (advantages worked out in treepo.py / treerl.py, tested there) becomes one item as is."""
    seen = {}

    def rollouts(problems, sampler, cfg):
        seen.update(problems=problems, sampler=sampler, cfg=cfg)
        return [ROLLOUT]

    monkeypatch.setattr(train.treepo, "treepo_rollouts", rollouts)
    monkeypatch.setattr(train.treerl, "treerl_rollouts", rollouts)
    args = train.Args(method=method, seed=4, temperature=0.7, max_new_tokens=50, group_size=5,
                      treepo_segment_len=12, treepo_branch=3, treerl_m=7, treerl_n=3,
                      treerl_l=2, treerl_t=4, tree_reward="sparse")
    [t] = train.PRODUCERS[method](["p"], "s", args, 9)
    assert seen["problems"] == ["p"] and seen["sampler"] == "s"
    assert {k: t[k].tolist() for k in ROLLOUT} == ROLLOUT
    assert t["version"].item() == 9
    if method == "treepo":  # depth: max_new_tokens // segment_len = 50 // 12 = 4 segments
        assert seen["cfg"] == train.treepo.TreePOConfig(
            segment_len=12, max_depth=4, branch=3, width=5, temperature=0.7, seed=4,
            reward="sparse")
        # a segment longer than the budget still gets one segment
        train.treepo_trajectories([], None, replace(args, max_new_tokens=8), 0)
        assert seen["cfg"].max_depth == 1
    else:
        assert seen["cfg"] == train.treerl.TreeRLConfig(
            M=7, N=3, L=2, T=4, temperature=0.7, max_new_tokens=50, reward="sparse")


def test_work_items_are_disjoint_and_deterministic():
    args = train.Args(n_generators=2, prompts_per_call=2)
    data = list(range(100))
    order = list(range(100))[::-1]  # item i of the order is data[99 - i]
    assert train.work_item(data, order, args, g=0, pos=0) == [99, 98]   # chunk 0
    assert train.work_item(data, order, args, g=1, pos=0) == [97, 96]   # chunk 1
    assert train.work_item(data, order, args, g=0, pos=1) == [95, 94]   # chunk 2
    assert train.work_item(data, order, args, g=1, pos=24) == [1, 0]    # chunk 49, the last
    assert train.work_item(data, order, args, g=0, pos=25) == [99, 98]  # wraps around


def test_checksum_is_exact_and_order_independent():
    sd = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    same = {"b": torch.ones(2, 2), "a": torch.zeros(3)}
    assert infra.weights_checksum(sd) == infra.weights_checksum(same)
    nudged = {"a": torch.tensor([0.0, 0.0, 1e-30]), "b": torch.ones(2, 2)}
    assert infra.weights_checksum(sd) != infra.weights_checksum(nudged)


class _FakePolicy(torch.nn.Module):
    def __init__(self, weight: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((2,), weight))

    def save_pretrained(self, path, tokenizer=None):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_text("weights")


def test_checkpoint_pointer_survives_a_killed_writer(tmp_path):
    rundir.save_checkpoint(tmp_path, _FakePolicy(), None, {"step": 4})
    ckpts = tmp_path / "checkpoints"
    # what a writer killed mid-save leaves behind: a half-written dir and pointer
    (ckpts / "step-000006.tmp-999").mkdir()
    (ckpts / "latest.tmp-999").write_text("step-000006\n")
    assert latest_checkpoint(tmp_path) == ckpts / "step-000004"
    assert rundir.load_trainer_state(ckpts / "step-000004")["step"] == 4
    rundir.save_checkpoint(tmp_path, _FakePolicy(), None, {"step": 8})
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000004", "step-000008"]
    assert latest_checkpoint(tmp_path) == ckpts / "step-000008"
    rundir.save_checkpoint(tmp_path, _FakePolicy(), None, {"step": 12})  # the last two are kept
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000008", "step-000012"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_never_checkpointed(tmp_path, bad):
    rundir.save_checkpoint(tmp_path, _FakePolicy(), None, {"step": 2})
    rundir.save_checkpoint(tmp_path, _FakePolicy(), None, {"step": 4})
    with pytest.raises(FloatingPointError, match="non-finite weights at step 6: not checkpointed"):
        rundir.save_checkpoint(tmp_path, _FakePolicy(bad), None, {"step": 6})
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002", "step-000004"]
    assert latest_checkpoint(tmp_path) == ckpts / "step-000004"


def fake_shared(policy: torch.nn.Module, version: int = 0):
    """The parts of infra.Shared that publishing and warnings touch."""
    import queue
    import threading
    from types import SimpleNamespace

    return SimpleNamespace(lock=threading.Lock(), log_q=queue.Queue(),
                           version=SimpleNamespace(value=version),
                           weights={k: v.detach().clone() for k, v in policy.state_dict().items()})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_never_published(bad):
    sh = fake_shared(_FakePolicy(0.0), version=8)
    infra.publish_weights(sh, _FakePolicy(1.0), 16)  # healthy: copied, version bumped
    assert sh.version.value == 16 and sh.weights["w"].tolist() == [1.0, 1.0]
    with pytest.raises(FloatingPointError, match="non-finite weights at step 24: not published"):
        infra.publish_weights(sh, _FakePolicy(bad), 24)
    assert sh.version.value == 16 and sh.weights["w"].tolist() == [1.0, 1.0]  # untouched


def test_skipped_updates_are_counted_and_each_is_warned_about(capsys):
    sh, alarms = fake_shared(_FakePolicy()), diagnostics.Alarms(kl_warn=0.1)
    alarms.check(sh, 1, skipped_step=0.0, kl=0.0)
    alarms.check(sh, 2, skipped_step=1.0, kl=0.05)
    alarms.check(sh, 3, skipped_step=1.0, kl=0.2)  # and the KL passes --kl-warn: once
    alarms.check(sh, 4, skipped_step=0.0, kl=0.3)
    assert alarms.skipped == 2
    events = [sh.log_q.get_nowait() for _ in range(sh.log_q.qsize())]
    assert [(e["event"], e["step"]) for e in events] == [("warning", 2), ("warning", 3),
                                                         ("warning", 3)]
    assert "2 skipped so far" in events[1]["message"] and "KL" in events[2]["message"]
    assert capsys.readouterr().err.count("train.py: warning: non-finite loss or gradient norm") == 2


def test_non_finite_gradient_norm_skips_the_update(tiny_test_model):
    """A NaN gradient (what --lr 1e6 produces a step or two in) must leave every weight and the
    optimizer untouched, and say so in the step's stats."""
    from value_head import load_policy

    policy, tok = load_policy(str(tiny_test_model))
    a = train.trajectory([5, 6, 7], [8, 9], [-0.5, -1.5], 1.0, float("nan"), 0)
    b = train.trajectory([5], [4, 3, 2], [-1.0, -2.0, -3.0], -1.0, 0.5, 0)
    batch = train.collate([a, b], tok.pad_token_id)
    args = train.Args(c_kl=0.0, mcts_baseline="value")  # the trainer's r - V: a's NaN unused
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    stats = train.train_step(policy, None, opt, batch, args)  # a healthy step moves the weights
    assert stats["skipped_step"] == 0.0 and math.isfinite(stats["grad_norm"])
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    hook = policy.lm.get_input_embeddings().weight.register_hook(lambda g: g * float("nan"))
    stats = train.train_step(policy, None, opt, batch, args)
    assert stats["skipped_step"] == 1.0 and math.isnan(stats["grad_norm"])
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    assert {float(s["step"]) for s in opt.state.values()} == {1.0}  # AdamW did not count it
    hook.remove()
    assert train.train_step(policy, None, opt, batch, args)["skipped_step"] == 0.0
    assert infra.all_finite(policy)


def test_non_finite_loss_skips_the_update_like_a_non_finite_gradient(tiny_test_model):
    """The one rule: a NaN loss (here a NaN reward: the value loss and r - V are NaN) gets no
    backward and no AdamW step, and counts as a skipped update like a NaN gradient norm."""
    from value_head import load_policy

    policy, tok = load_policy(str(tiny_test_model))
    a = train.trajectory([5, 6, 7], [8, 9], [-0.5, -1.5], float("nan"), None, 0)
    b = train.trajectory([5], [4, 3, 2], [-1.0, -2.0, -3.0], -1.0, None, 0)
    batch = train.collate([a, b], tok.pad_token_id)
    args = train.Args(c_kl=0.0, mcts_baseline="value")
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    stats = train.train_step(policy, None, opt, batch, args)
    assert math.isnan(stats["total_loss"]) and math.isnan(stats["grad_norm"])
    assert stats["skipped_step"] == 1.0 and stats["skipped_loss"] == 1.0
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    assert opt.state == {} and all(p.grad is None for p in policy.parameters())


@pytest.mark.timeout(150)
def test_a_nan_loss_on_one_ddp_rank_skips_the_update_on_every_rank(tiny_test_model):
    """Without the all-reduce of the decision, rank 0 would wait in backward's all-reduce for a
    rank that skipped it: a hang. Both ranks skip; neither moves its weights."""
    import fakes

    ctx = torch.multiprocessing.get_context("spawn")
    out, port = ctx.Queue(), infra.free_port()
    procs = [ctx.Process(target=fakes.ddp_nan_loss_rank, args=(r, str(tiny_test_model), port, out),
                         daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = sorted(out.get(timeout=110) for _ in procs)
    finally:  # a failed test leaves no rank behind (pytest's exit would wait for it)
        for p in procs:
            p.join(timeout=10)
            p.kill()
    assert results == [(0, 1.0, True), (1, 1.0, True)]


def test_skips_in_a_row_end_the_run_and_a_good_step_resets_the_count():
    skipped = {"skipped_step": 1.0, "policy_loss": float("nan"), "value_loss": 0.1, "kl": 0.0}
    ok = {**skipped, "skipped_step": 0.0}
    n = 0
    for step in range(1, train.MAX_SKIPS):  # MAX_SKIPS - 1 in a row: still running
        n = train.check_skips(skipped, n, step)
    assert n == train.MAX_SKIPS - 1
    assert train.check_skips(ok, n, 99) == 0  # a good update resets the count
    n = 0
    for step in range(1, train.MAX_SKIPS):
        n = train.check_skips({**skipped, "skipped_loss": 1.0}, n, step)
    with pytest.raises(FloatingPointError, match=f"{train.MAX_SKIPS} updates in a row skipped by "
                                                 f"step 42 \\(the last: non-finite loss"):
        train.check_skips({**skipped, "skipped_loss": 1.0}, n, 42)
    with pytest.raises(FloatingPointError, match="the last: non-finite gradient norm"):
        train.check_skips(skipped, train.MAX_SKIPS - 1, 7)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),  # torch.save
])
def test_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch, error):
    rundir.save_checkpoint(tmp_path, _FakePolicy(), None, {"step": 4})

    def full_disk(state, path):  # writes part of the file, then the disk is full
        Path(path).write_bytes(b"partial")
        raise error
    monkeypatch.setattr(rundir.torch, "save", full_disk)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(SystemExit) as err:
        rundir.save_checkpoint(tmp_path, _FakePolicy(), None, {"step": 6})
    assert str(err.value).startswith("no space left on device: checkpoint step-000006 not written")
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000004"]  # no .tmp left
    assert latest_checkpoint(tmp_path) == ckpts / "step-000004"


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    rundir.save_checkpoint(tmp_path, _FakePolicy(), None, {"step": 4})
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-000006.tmp-999").mkdir()
    (ckpts / "latest.tmp-999").write_text("step-000006\n")
    rundir.remove_leftovers(ckpts)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000004"]


def test_resume_drops_a_metrics_line_cut_short_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval": 1}\n{"step": 4}\n{"step": 5}\n{"step": 7')
    rundir.keep_rows_until(path, 4)
    assert read_jsonl(path) == [{"step": 0, "eval": 1}, {"step": 4}]
    assert path.read_text().endswith("}\n")  # rows appended next start on a line of their own
    err = capsys.readouterr().err
    assert err == f"train.py: warning: {path}:4: dropping a line cut short: '{{\"step\": 7'\n"


def test_a_non_empty_out_needs_resume_or_overwrite(tiny_test_model, tmp_path):
    out = tmp_path / "run"  # a run stopped before its first checkpoint: rows, no `latest`
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    (out / "notes.txt").write_text("mine")
    flags = ["--model", str(tiny_test_model), "--out", str(out), "--steps", "1"]
    with pytest.raises(SystemExit, match=f"^train.py: error: {out} is not empty; pass --resume"):
        train.run(train.parse_args(flags))
    with pytest.raises(SystemExit, match="--resume continues a run, --overwrite deletes it"):
        train.check_args(train.parse_args([*flags, "--overwrite", "--resume", str(out)]))
    assert (out / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_overwrite_deletes_the_old_runs_files_and_keeps_the_users(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000004").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-000004\n")
    for name in ("metrics.jsonl", "events.jsonl", "config.json", "eval_t1.json"):
        (out / name).write_text('{"step": 4}\n')
    (out / "notes.txt").write_text("mine")
    assert rundir.check_run_dir(out, {}, resume=False, overwrite=True, same=()) == (None, None)
    rundir.claim_run_dir(out, {"method": "cispo"}, None, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert json.loads((out / "config.json").read_text()) == {"method": "cispo"}
    assert (out / "notes.txt").read_text() == "mine"


def test_no_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint in"):
        latest_checkpoint(tmp_path)


def test_preset_gives_defaults_and_flags_override():
    args = train.parse_args(["--preset", "blog", "--n-generators", "3"])
    assert (args.n_generators, args.n_trainers, args.batch_size) == (3, 2, 32)
    assert (args.cispo_groups, args.group_size, args.bon_n, args.eps_high) == (128, 16, 64, 5.0)
    assert (args.mcts_workers, args.mcts_iterations, args.mcts_k) == (16, 100, 4)
    assert (args.c_puct, args.c_kl, args.sync_every) == (0.5, 0.05, 8)
    assert train.parse_args([]).c_puct == 2.0  # the CPU default (M = 12): see mcts.py
    assert args.model == "Qwen/Qwen2.5-1.5B-Instruct" and args.backend == "vllm"
    assert train.traj_per_step(train.replace(args, method="cispo")) == 128 * 16
    assert train.parse_args([]) == train.Args()


def test_blog_preset_is_the_blogs_table_and_the_authors_code():
    """Every preset field, written out from the blog's "Table of Values" and method (A = r -
    sg(V), virtual loss = 1 added to the visit counts: value 0) and, where the table is silent,
    the author's code (at2005/llm-mcts): a field that drifts from its source fails here."""
    table = {"model": "Qwen/Qwen2.5-1.5B-Instruct", "mcts_workers": 16, "mcts_k": 4,
             "mcts_iterations": 100, "batch_size": 32, "cispo_groups": 128, "group_size": 16,
             "eps_high": 5.0, "bon_n": 64, "sync_every": 8, "c_puct": 0.5, "c_kl": 0.05,
             "c_ppo": 1.0, "c_value": 1.0, "n_trainers": 2, "n_generators": 6,
             "eval_problems": 820, "eval_n": 16}
    method = {"mcts_baseline": "value", "mcts_virtual_value": 0.0, "mcts_distill": "path",
              "mcts_select": "visits", "loss": "cispo", "method": "mcts"}
    authors_code = {"lr": 5e-6, "lr_schedule": "linear", "steps": 2048, "max_grad_norm": 0.1,
                    "temperature": 0.8, "max_step_tokens": 64, "max_new_tokens": 512,
                    "eval_temperature": 0.2, "eval_every": 6 * 8, "loss_agg": "sequence"}
    args = train.parse_args(["--preset", "blog"])
    for field, value in (table | method | authors_code).items():
        assert getattr(args, field) == value, field
    assert mcts.MCTSConfig().virtual_loss == 1
    assert train.mcts_config(args).virtual_value == 0.0


# ------------------------------------------------------------------------------- the CLI


def test_blog_preset_dry_run_prints_config_without_starting(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.run(train.parse_args(["--preset", "blog", "--dry-run", "--out", str(out)])) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["n_generators"] == 6 and config["n_trainers"] == 2
    assert config["mcts_iterations"] == 100 and config["preset"] == "blog"
    assert (config["eval_temperature"], config["lr_schedule"], config["loss_agg"]) == (
        0.2, "linear", "sequence")
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "7", "--n-trainers", "2"], "not divisible by --n-trainers 2"),
    (["--method", "cispo", "--group-size", "1"], "--group-size >= 2"),
    (["--preset", "blog", "--dry-run", "--method", "cispo", "--n-trainers", "3"],
     "cispo_groups x group_size = 2048 is not divisible"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "-1"], "--lr must be a finite number >= 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be a finite number > 0"),
    # default mcts_k 4 x max_step_tokens 32 + max_new_tokens 96 = 224
    (["--mcts-max-tree-tokens", "200"], "needs >= mcts_k x max_step_tokens + max_new_tokens = 224"),
])
def test_invalid_combination_is_one_line_error(flags, message):
    with pytest.raises(SystemExit) as e:
        train.check_args(train.parse_args(flags))
    assert str(e.value).startswith("train.py: error: ") and "\n" not in str(e.value)
    assert message in str(e.value)


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "checkpoints" / "latest").write_text("step-000009\n"),
     "names 'step-000009', which is not a checkpoint"),
    (lambda r: (r / "checkpoints" / "latest").write_text(""), "names '', which is not a checkpoint"),
    (lambda r: _cut(r / "checkpoints" / "step-000004" / "model.safetensors"), "incomplete or corrupt"),
    (lambda r: _cut(r / "checkpoints" / "step-000004" / "config.json"), "incomplete or corrupt"),
    (lambda r: _cut(r / "checkpoints" / "step-000004" / "trainer_state.pt"),
     str(Path("step-000004") / "trainer_state.pt (")),
    (lambda r: _cut(r / "config.json"), "cannot read"),
], ids=["latest-missing-step", "latest-empty", "cut-weights", "cut-model-config",
        "cut-trainer-state", "cut-run-config"])
def test_resume_from_a_broken_checkpoint_is_one_line_error(tiny_test_model, tmp_path, damage,
                                                           message):
    from value_head import load_policy

    run_dir = tmp_path / "run"
    policy, tok = load_policy(str(tiny_test_model))
    rundir.save_checkpoint(run_dir, policy, tok, {"step": 4})
    args = train.parse_args(["--model", str(tiny_test_model), "--resume", str(run_dir)])
    (run_dir / "config.json").write_text(json.dumps(train.asdict(args)))
    damage(run_dir)
    with pytest.raises(SystemExit) as err:
        train.run(args)
    assert str(err.value).startswith("train.py: error: ") and "\n" not in str(err.value)
    assert message in str(err.value)


def test_out_under_a_file_is_one_line_error(tiny_test_model, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="^train.py: error: cannot create --out .*Not a directory"):
        train.run(train.parse_args(["--model", str(tiny_test_model), "--out",
                                    str(tmp_path / "file" / "run")]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the blog preset may run on a GPU box")
def test_blog_preset_needs_dry_run_on_cpu():
    with pytest.raises(SystemExit, match="--dry-run"):
        train.check_args(train.parse_args(["--preset", "blog"]))


# ------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("flags, reward", [([], "dense"), (["--tree-reward", "sparse"], "sparse")])
def test_tree_methods_get_the_tree_reward_flag(monkeypatch, flags, reward):
    """TreePO and TreeRL train on the dense reward (as CISPO and BoN) unless asked for the
    papers' sparse one."""
    seen = {}
    monkeypatch.setattr(train.treepo, "treepo_rollouts", lambda p, s, cfg: seen.update(treepo=cfg) or [])
    monkeypatch.setattr(train.treerl, "treerl_rollouts", lambda p, s, cfg: seen.update(treerl=cfg) or [])
    args = train.parse_args(["--method", "treerl", *flags])
    assert train.treepo_trajectories([], None, args, 0) == []
    assert train.treerl_trajectories([], None, args, 0) == []
    assert seen["treepo"].reward == seen["treerl"].reward == reward


def test_sft_control_trains_on_solver_traces_with_teacher_forced_logprobs(tiny_sampler):
    from transformers import AutoModelForCausalLM

    import countdown

    problems = countdown.make_splits(0, n_train=3)[0]
    args = train.parse_args(["--method", "sft"])
    trajs = train.sft_trajectories(problems, tiny_sampler, args, version=5)
    tok = tiny_sampler.tokenizer
    # an independent teacher-forced pass: plain HF forward, log_softmax, gather
    lm = AutoModelForCausalLM.from_pretrained(tiny_sampler.policy.lm.name_or_path)
    for p, t in zip(problems, trajs, strict=True):
        prompt = tok.encode(countdown.make_prompt(p, tok), add_special_tokens=False)
        trace = tok.encode(countdown.solution_trace(p), add_special_tokens=False)
        assert t["prompt_ids"].tolist() == prompt and t["tokens"].tolist() == trace
        assert t["reward"].item() == 1.0 and t["version"].item() == 5
        assert torch.equal(t["advantages"], torch.ones(len(trace)))  # SFT: A = 1 everywhere
        ids = torch.tensor([prompt + trace])
        with torch.no_grad():
            logp = torch.log_softmax(lm(ids).logits[0, :-1].float(), -1)
        expected = logp[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None])[:, 0]
        torch.testing.assert_close(t["old_logprobs"], expected, atol=1e-4, rtol=0)
    assert tiny_sampler.tokens_generated == 0  # nothing sampled


@pytest.mark.timeout(300)
def test_mcts_end_to_end(tiny_test_model, tmp_path):
    out = tmp_path / "mcts"
    r = run_train(*small_flags(str(tiny_test_model), out, steps=3))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mean@2 on 2 test problems" in r.stdout
    rows = check_run(out, str(tiny_test_model), 3, "mcts")
    config = json.loads((out / "config.json").read_text())
    assert config["backend"] == "torch"  # auto: a small model
    # the start model's fingerprint: blake2b over its weight files, recomputed here by hand
    h = hashlib.blake2b(digest_size=16)
    for name in ("model.safetensors", "value_head.safetensors"):
        h.update(name.encode())
        h.update((tiny_test_model / name).read_bytes())
    assert config["start_checksum"] == h.hexdigest() and "torch" in config["machine"]
    for row in rows:  # the search measures itself: per batch, and against samples at each eval
        if "train_reward" in row:
            assert 1 <= row["search_depth"] and 0 <= row["search_from_rollout"] <= 1
            assert row["search_terminal_backups"] >= 0 and row["search_tree_tokens"] > 0
            assert row["entropy"] > 0 and row["completion_len"] >= 1
            assert 0 <= row["train_format_rate"] <= 1
        if "eval_mean_at_2" in row:
            assert row["eval_search_gain"] == pytest.approx(
                row["eval_search_reward"] - row["eval_sample_reward"])
            assert 0 <= row["eval_search_success"] <= 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_final_eval_pairs_the_run_with_the_shipped_start_eval(tmp_path, capsys):
    """The end of a tiny run: eval.py on all 820 test problems, paired per problem with the
    start model's shipped eval (reused, not sampled again). Evaluated on the start model itself,
    with the shipped eval's seed, the pairing is with its own samples: a difference of ~0."""
    import eval as evaluation
    import tiny

    out = tmp_path / "run"
    shutil.copytree(tiny.SHIPPED, out)  # a "run" whose last checkpoint is the start model
    summary = evaluation.final_eval(out, "tiny", backend="torch")
    start = tiny.start_eval(1.0)
    assert summary["baseline"]["mean_at_n"] == start["mean_at_n"]  # the shipped numbers
    assert summary["n_problems"] == 820 and len(summary["per_problem"]) == 820
    assert abs(summary["difference"]) < 0.01  # identical here (one CPU kind); ~0 on others
    saved = json.loads((out / "eval_t1.json").read_text())
    assert saved["difference"] == summary["difference"]
    assert "paired gain" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_two_trainers_two_generators_end_to_end(tiny_test_model, tmp_path):
    """The blog's process shape (Nt DDP trainers, Ng generators), checked with the checksums:
    identical weights on both ranks after every step, every generator synced to published ones."""
    out = tmp_path / "ddp"
    r = run_train(*small_flags(str(tiny_test_model), out, steps=6), "--n-trainers", "2",
                  "--n-generators", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    check_run(out, str(tiny_test_model), 6, "mcts")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cispo_end_to_end(tiny_test_model, tmp_path):
    out = tmp_path / "cispo"
    r = run_train(*small_flags(str(tiny_test_model), out, steps=2), "--method", "cispo")
    assert r.returncode == 0, r.stderr[-3000:]
    check_run(out, str(tiny_test_model), 2, "cispo")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method, flags", [
    ("treepo", ["--treepo-segment-len", "8"]),  # w = group size 2, depth 32 // 8 = 4
    ("treerl", ["--treerl-m", "2", "--treerl-n", "1", "--treerl-t", "1"]),  # <= 2 * (1 + 1) leaves
])
def test_tree_rollout_methods_end_to_end(tiny_test_model, tmp_path, method, flags):
    out = tmp_path / method
    r = run_train(*small_flags(str(tiny_test_model), out, steps=2), "--method", method, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    check_run(out, str(tiny_test_model), 2, method)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bon_resume_restores_step_optimizer_and_data_position(tiny_test_model, tmp_path):
    out = tmp_path / "bon"
    flags = [*small_flags(str(tiny_test_model), out, steps=2), "--method", "bon"]
    r = run_train(*flags)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = trainer_state(out)
    assert saved["step"] == 2 and saved["data_position"][0] >= 1
    n_events = len(read_jsonl(out / "events.jsonl"))

    r = run_train(*small_flags(str(tiny_test_model), out, steps=4), "--method", "bon",
                  "--resume", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    check_run(out, str(tiny_test_model), 4, "bon", eval_steps=(2,))  # 2: end of the first run
    final = trainer_state(out)
    # AdamW's per-parameter step counters went on from 2 (a fresh optimizer would show 2)
    assert {float(s["step"]) for s in final["optimizer"]["state"].values()} == {4.0}
    # the resumed generator starts at the saved data position, not at 0
    resumed = read_jsonl(out / "events.jsonl")[n_events:]
    first_sync = next(e for e in resumed if e["event"] == "sync")
    assert first_sync["data_position"] == saved["data_position"][0]
    assert final["data_position"][0] > saved["data_position"][0]
    assert final["generated_tokens"][0] > saved["generated_tokens"][0]


@pytest.mark.timeout(240)
def test_raising_generator_stops_the_run_with_its_traceback(tiny_test_model, tmp_path):
    r = run_train(*small_flags(str(tiny_test_model), tmp_path / "fail", steps=50),
                  TREESEARCH_FAIL_AT="1")
    assert r.returncode == 1
    assert "generator-0 failed" in r.stderr and "RuntimeError: TREESEARCH_FAIL_AT" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_generator_exits_nonzero_within_30s(tiny_test_model, tmp_path):
    out = tmp_path / "kill"
    proc = subprocess.Popen([sys.executable, "train.py", *small_flags(str(tiny_test_model), out, 500)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = None
        deadline = time.time() + 200
        while time.time() < deadline and proc.poll() is None:  # wait until training runs
            rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
            if any("train_reward" in r for r in rows):
                pid = next(e["pid"] for e in read_jsonl(out / "events.jsonl")
                           if e.get("process") == "generator-0")
                break
            time.sleep(0.5)
        assert pid is not None, "training never started"
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "generator-0 died (killed by SIGKILL)" in stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # zombie = gone


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 130), (signal.SIGKILL, -9)])
def test_stopping_main_leaves_no_children(tiny_test_model, tmp_path, sig, code):
    """SIGTERM stops like Ctrl-C (children stopped, exit 130); after kill -9 of main the children
    notice their parent is gone and exit instead of running on as orphans."""
    out = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "train.py", *small_flags(str(tiny_test_model), out, 500),
                             "--checkpoint-every", "1000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = []
        deadline = time.time() + 200
        while time.time() < deadline and proc.poll() is None:  # wait until training runs
            rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
            if any("train_reward" in r for r in rows):
                pids = [e["pid"] for e in read_jsonl(out / "events.jsonl") if e.get("event") == "start"]
                break
            time.sleep(0.5)
        assert len(pids) == 2, "training never started"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code
    deadline = time.time() + 15
    while time.time() < deadline and any(map(_alive, pids)):
        time.sleep(0.5)
    assert not any(map(_alive, pids))
    assert "leaked semaphore" not in stderr
    if sig == signal.SIGTERM:  # a clean stop: the last logged step is checkpointed
        last = max(r["step"] for r in read_jsonl(out / "metrics.jsonl"))
        assert trainer_state(out)["step"] == last and "stopped at step" in stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_signal_stops_at_once(tiny_test_model, tmp_path):
    """The first SIGINT waits for the trainer's checkpoint; with the trainer frozen that never
    comes (the stall timeout is 10 minutes), so only the second SIGINT can end the run: exit 130
    with every child stopped, the frozen one included."""
    out = tmp_path / "twice"
    proc, pids = start_run(out, *small_flags(str(tiny_test_model), out, 500),
                           "--stall-timeout-s", "600", "--time-limit-min", "0")
    os.kill(pids["trainer-0"], signal.SIGSTOP)
    try:
        proc.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)  # the first: still waiting for the checkpoint
        proc.send_signal(signal.SIGINT)
        stderr = _ended(proc, timeout=60)  # the second: at once, not after the stall timeout
    finally:
        if _alive(pids["trainer-0"]):
            os.kill(pids["trainer-0"], signal.SIGCONT)
    assert proc.returncode == 130 and "interrupted, stopping children" in stderr
    deadline = time.time() + 15
    while time.time() < deadline and any(map(_alive, pids.values())):
        time.sleep(0.5)
    assert not any(map(_alive, pids.values()))


def _rows(path: Path) -> list[dict]:
    """The complete lines of a JSONL file a running process is writing."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def start_run(out: Path, *flags: str, until: str = "train_reward", **popen) -> tuple:
    """Start train.py and wait until `until` is in a metrics row, or is a process that has
    started -> (the process, {process name: pid})."""
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        pids = {e["process"]: e["pid"] for e in _rows(out / "events.jsonl") if e["event"] == "start"}
        if until in pids or any(until in r for r in _rows(out / "metrics.jsonl")):
            return proc, pids
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"training never started: {proc.communicate()[1][-3000:]}")


def _ended(proc, timeout: float) -> str:
    try:
        return proc.communicate(timeout=timeout)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.timeout(300)
def test_a_stopped_generator_ends_the_run(tiny_test_model, tmp_path):
    out = tmp_path / "stall"
    proc, pids = start_run(out, *small_flags(str(tiny_test_model), out, 500),
                           "--stall-timeout-s", "10")
    os.kill(pids["generator-0"], signal.SIGSTOP)
    stderr = _ended(proc, 120)
    assert proc.returncode == 1, stderr[-3000:]
    assert "train.py: error: generator-0 stopped responding: no heartbeat for" in stderr


@pytest.mark.timeout(300)
def test_the_time_limit_holds_when_no_step_completes(tiny_test_model, tmp_path):
    """A generator whose first tree search outlasts the time limit (10^9 rounds: once the small
    tree is all answers each round is pure Python, still hours): no step ever completes, yet the run ends at --time-limit-min with a checkpoint (of step 0). (No
    SIGSTOP race: a generator stopped a moment too late had already filled a small batch.)"""
    out = tmp_path / "limit"
    proc, _ = start_run(out, *small_flags(str(tiny_test_model), out, 500), "--mcts-iterations",
                        "1000000000", "--search-gain-problems", "0", "--time-limit-min", "0.5",
                        "--stall-timeout-s", "600", until="trainer-0")
    stderr = _ended(proc, 200)
    assert proc.returncode == 0, stderr[-3000:]
    assert not any("train_reward" in r for r in read_jsonl(out / "metrics.jsonl"))
    assert trainer_state(out)["step"] == 0
    assert any("time limit reached while waiting" in e.get("message", "")
               for e in read_jsonl(out / "events.jsonl"))


@pytest.mark.timeout(300)
def test_a_checkpoint_is_never_ahead_of_the_log(tiny_test_model, tmp_path):
    """Main stopped (as good as dead for the log) while the trainer goes on: no checkpoint may
    hold steps metrics.jsonl lacks, or a resume after kill -9 of main loses their rows."""
    out = tmp_path / "ahead"
    flags = [*small_flags(str(tiny_test_model), out, 500), "--checkpoint-every", "1"]
    proc, _ = start_run(out, *flags)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        logged = max(r["step"] for r in read_jsonl(out / "metrics.jsonl"))
        time.sleep(15)  # without the guard the trainer checkpoints several steps meanwhile
        ckpts = [int(p.name[5:]) for p in (out / "checkpoints").glob("step-*") if ".tmp" not in p.name]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert max(ckpts) <= logged


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="POSIX semaphores live in /dev/shm")
def test_killing_the_process_group_leaks_no_semaphores(tiny_test_model, tmp_path):
    out = tmp_path / "group"
    proc, pids = start_run(out, *small_flags(str(tiny_test_model), out, 500), start_new_session=True)
    held = set()  # the named semaphores our processes have open
    for pid in [proc.pid, *pids.values()]:
        held |= {line.split("/dev/shm/")[1].split()[0] for line in
                 Path(f"/proc/{pid}/maps").read_text().splitlines() if "/dev/shm/sem." in line}
    assert held  # the queues', events' and counters' locks
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert {name for name in held if (Path("/dev/shm") / name).exists()} == set()



@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nan_loss_stops_the_run(tiny_test_model, tmp_path):
    # lr 1e30: the first AdamW step blows the weights up, every later loss is not finite: each
    # update is skipped (and warned about) until MAX_SKIPS in a row end the run
    r = run_train(*small_flags(str(tiny_test_model), tmp_path / "nan", steps=20),
                  "--lr", "1e30", "--sync-every", "1000")
    assert r.returncode == 1
    assert "trainer-0 failed" in r.stderr
    assert f"{train.MAX_SKIPS} updates in a row skipped" in r.stderr
    assert "non-finite loss" in r.stderr


def test_learning_rate_schedules_by_hand():
    constant = train.Args(lr=1e-4, steps=10)
    linear = train.Args(lr=1e-4, steps=10, lr_schedule="linear")
    assert [train.lr_at(s, constant) for s in (0, 5, 9)] == [1e-4] * 3
    assert [train.lr_at(s, linear) for s in (0, 5, 9, 12)] == pytest.approx([1e-4, 5e-5, 1e-5, 0])


def test_health_stats_by_hand():
    # 2 rows, vocabulary of 4. Row 0: uniform logits on its two completion positions (entropy
    # log 4); row 1: one completion position with a certain token (entropy 0).
    a = train.trajectory([1, 2], [3, 0], [-1.0, -2.0], 1.0, 0.5, 0)
    b = train.trajectory([1], [3], [-0.5], -1.0, -0.5, 0)
    batch = train.collate([a, b], pad_id=0)  # rows a, b; positions 0..2
    logits = torch.zeros(2, 3, 4)
    logits[1, 0] = torch.tensor([0.0, 0.0, 0.0, 1000.0])
    logp = torch.tensor([[0.0, -1.5, -2.0], [-0.25, 0.0, 0.0]])
    values = torch.tensor([[9.0, 0.2, 0.4], [0.6, 9.0, 9.0]])
    adv = batch["mask"] * torch.tensor([[0.5], [-0.5]])
    h = diagnostics.health_stats(logits, logp, values, adv, batch)
    assert h["entropy"] == pytest.approx(2 * math.log(4) / 3)  # 3 policy tokens
    assert h["advantage_std"] == pytest.approx(torch.tensor([0.5, 0.5, -0.5]).std().item())
    assert h["value_mean"] == pytest.approx((0.2 + 0.4 + 0.6) / 3)
    assert h["value_start"] == pytest.approx((0.2 + 0.6) / 2)  # V at each first completion state
    assert h["reward_std"] == pytest.approx(torch.tensor([1.0, -1.0]).std().item())
    assert h["completion_len"] == 1.5
    # |logp - old|: row 0 |-1.5 + 1| and |-2 + 2|, row 1 |-0.25 + 0.5|
    assert h["logp_gap"] == pytest.approx((0.5 + 0.0 + 0.25) / 3)


def test_entropies_in_pieces_equal_the_whole_and_stay_small_at_a_real_vocabulary(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    valid = torch.rand(3, 5) > 0.4
    log_p = torch.log_softmax(logits, -1)
    whole = -(log_p.exp() * log_p).sum(-1)[valid]
    for elements in (7, 20, 1 << 22):  # one position per piece, two, all at once
        torch.testing.assert_close(diagnostics.token_entropies(logits, valid, elements), whole)
    # Qwen2.5's vocabulary: the float32 work never holds more than 2^22 logits (16 MiB) at a
    # time; the whole [B, T, V] in float32 (log-softmax, exp, product) is gigabytes at 600 tokens
    sizes = []
    real = torch.log_softmax

    def recording(x, *a, **k):
        sizes.append(x.numel())
        return real(x, *a, **k)
    monkeypatch.setattr(torch, "log_softmax", recording)
    big = torch.randn(2, 64, 151936).to(torch.bfloat16)
    got = diagnostics.token_entropies(big, torch.ones(2, 64, dtype=torch.bool))
    assert max(sizes) <= 1 << 22 and sum(sizes) == big.numel()
    log_p = real(big[1, 5].double(), -1)
    assert got[64 + 5].item() == pytest.approx(-(log_p.exp() * log_p).sum().item(), rel=1e-5)


def test_the_ddp_group_waits_out_rank_0s_eval(monkeypatch):
    """Collectives wait DDP_TIMEOUT (2 h), not NCCL's default 10 minutes: rank 0's eval at the
    blog's scale takes longer than that while the other ranks wait in an all-reduce."""
    seen = {}
    monkeypatch.setattr(infra.dist, "init_process_group", lambda *a, **k: seen.update(k))
    infra.init_process_group(torch.device("cpu"), 0, 2, 12345)
    assert seen["timeout"] == infra.DDP_TIMEOUT and infra.DDP_TIMEOUT.total_seconds() == 7200
    assert seen["world_size"] == 2 and seen["init_method"] == "tcp://127.0.0.1:12345"


def test_batch_format_rate_and_first_malformed_answer():
    from fakes import CharTokenizer

    texts = ["1+2=3</step><answer>1+2</answer>", "<answer>(1+2</answer>", "<answer>3*4)</answer>",
             "<answer>7</answer>"]
    batch = [train.trajectory([1], [ord(c) for c in t], [0.0] * len(t), 0.0, 0.0, 0) for t in texts]
    rate, malformed = diagnostics.batch_format(batch, CharTokenizer())
    assert rate == 0.5 and malformed == "<answer>(1+2</answer>"
    assert diagnostics.batch_format(batch[:1], CharTokenizer()) == (1.0, "")
