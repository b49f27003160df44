"""benchmarks/compare.py's report on synthetic run summaries: the table's numbers by hand."""

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "compare", Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def write_eval(d: Path, t: float, per_problem: list[float]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    compare.eval_path(d, t).write_text(json.dumps(
        {"mean_at_n": sum(per_problem) / len(per_problem), "per_problem": per_problem,
         "pass_at_n": sum(p > 0 for p in per_problem) / len(per_problem)}))


def write_run(results: Path, name: str, method: str, seed: int, per_problem: dict,
              steps: int = 4, tokens: int = 1000, kl: float = 0.01, evals=None) -> None:
    """A finished run: final evals, config, and metrics rows with 200-problem evals at `evals`
    ({step: mean@16}; default: 5% at the start and the end)."""
    d = results / name
    for t, pp in per_problem.items():
        write_eval(d, t, pp)
    (d / "config.json").write_text(json.dumps({"method": method, "seed": seed}))
    evals = evals or {0: 0.05, steps: 0.05}
    rows = [{"step": s, "train_reward": 0.1 * s, "generated_tokens": tokens * s // steps, "kl": kl,
             "completion_len": 25.0, **({"eval_mean_at_16": evals[s]} if s in evals else {})}
            for s in range(1, steps + 1)]
    rows = [{"step": 0, **({"eval_mean_at_16": evals[0]} if 0 in evals else {})}] + rows
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_report_table_by_hand(tmp_path):
    results, figures = tmp_path / "results", tmp_path / "figures"
    for t in compare.TEMPERATURES:
        write_eval(results / "start", t, [0.0, 0.5])  # 25%
    # cispo seeds 0/1 at T=1: [0.5, 0.5] and [0.0, 1.0] -> 50% both; gains vs start +25 points;
    # at T=0.2 75% and 25%: gains +50 and 0 points
    write_run(results, "cispo-seed0", "cispo", 0, {1.0: [0.5, 0.5], 0.2: [0.5, 1.0]}, kl=0.02,
              tokens=1_000_000, evals={0: 0.05, 4: 0.08})
    write_run(results, "cispo-seed1", "cispo", 1, {1.0: [0.0, 1.0], 0.2: [0.0, 0.5]}, kl=0.04,
              tokens=2_000_000, evals={0: 0.05, 2: 0.06, 4: 0.10})
    # sft seed 0: T=1 [0.25, 0.25] -> 25%, T=0.2 [0.0, 0.5] -> 25%; cispo seed 0 vs sft seed 0:
    # +25 points at T=1, +50 at T=0.2
    write_run(results, "sft-seed0", "sft", 0, {1.0: [0.25, 0.25], 0.2: [0.0, 0.5]}, tokens=0)
    (results / "mcts-seed0").mkdir()  # unfinished: no evals -> left out
    table = compare.report(results, figures).splitlines()
    # the equal-token budget is the cheapest sampling run's total (sft samples nothing): 1 M
    assert table[0].endswith("| 200-problem eval at 1.00 M tokens | KL (last 100) | "
                             "generated per trained token | pass@16 T=1.0 |")
    # pass@16: the share of problems with any correct sample ([0, 0.5] -> 50%)
    assert table[2] == "| start | | 0 | 0 | 25.00% | 25.00% | | | | | | | | 50.00% |"
    [cispo] = [line.split(" | ") for line in table if line.startswith("| cispo ")]
    # arm, seeds, steps, tokens, T=1 mean [min, max], T=0.2, gain T=1, gain T=0.2, vs sft T=1,
    # vs sft T=0.2, eval at equal tokens, KL
    assert cispo[1:4] == ["2", "4 [4, 4]", "1.50 M [1.00, 2.00]"]
    assert cispo[4] == "50.00% [50.00, 50.00]" and cispo[5] == "50.00% [25.00, 75.00]"
    assert cispo[6] == "25.00 pt [25.00, 25.00]" and cispo[7] == "25.00 pt [0.00, 50.00]"
    assert cispo[8:10] == ["25.00 pt", "50.00 pt"]  # one seed paired with the sft control
    # within 1 M tokens: seed 0's last eval (8%, at 1 M), seed 1's at step 2 (6%, at 1 M)
    assert cispo[10] == "7.00% [6.00, 8.00]"
    assert cispo[11] == "0.030 [0.020, 0.040]"
    # trained: 4 steps x 2 groups x 16 samples (train.py's cispo batch) x 25 tokens = 3,200;
    # generated 1 M and 2 M -> 312.5 and 625 per trained token
    assert cispo[12] == "468.8 [312.5, 625.0]"
    assert cispo[13] == "75.00% [50.00, 100.00] |"  # [0.5, 0.5] -> 100%, [0, 1] -> 50%
    assert not any(line.startswith("| mcts") for line in table)
    assert (figures / "results.md").read_text().splitlines() == table
    assert (figures / "eval_mean_at_16.png").stat().st_size > 1000
    [sft] = [line.split(" | ") for line in table if line.startswith("| sft ")]
    assert sft[8:11] == ["", "", ""]  # the control is not compared with itself


def test_the_shipped_models_own_evals_are_the_start_of_the_main_folder(tmp_path):
    assert compare.start_evals(tmp_path) == {t: compare.tiny.start_eval(t)
                                             for t in compare.TEMPERATURES}
    write_eval(tmp_path / "start", 1.0, [0.25])  # a history folder: its own start evals
    assert compare.start_evals(tmp_path) == {1.0: {"mean_at_n": 0.25, "per_problem": [0.25],
                                                   "pass_at_n": 1.0}}


def test_jobs_skip_finished_runs_and_resume_unfinished(tmp_path):
    class A:
        runs, steps, eval_every, train_flags = str(tmp_path / "runs"), 10, 5, ["--lr", "1e-5"]
    results = tmp_path / "results"
    for t in compare.TEMPERATURES:
        write_eval(results / "cispo-seed0", t, [0.0])
    assert compare.job_for("cispo", 0, A, results) is None  # summaries kept: done
    ckpts = tmp_path / "runs" / "mcts-seed1" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest").write_text("step-000005\n")
    name, cmds = compare.job_for("mcts", 1, A, results)
    train_cmd = cmds[0]
    assert name == "mcts-seed1" and "--resume" in train_cmd and "--lr" in train_cmd
    assert train_cmd[train_cmd.index("--steps") + 1] == "10"
    assert [c[c.index("--temperature") + 1] for c in cmds[1:3]] == ["1.0", "0.2"]
    assert callable(cmds[3])
    (ckpts / "latest").write_text("step-000010\n")  # trained to the budget: evals only
    _, cmds = compare.job_for("mcts", 1, A, results)
    assert cmds[0][1] == "eval.py"
    with pytest.raises(KeyError):
        compare.job_for("nope", 0, A, results)


def test_every_arm_parses_to_its_settings():
    """A typo in an arm's flags would otherwise surface only when that arm's run starts."""
    import train
    for arm, flags in compare.ARMS.items():
        args = train.parse_args(flags)
        assert args.method == flags[flags.index("--method") + 1], arm
    best = train.parse_args(compare.ARMS["mcts-tree-best"])
    assert (best.mcts_select, best.mcts_baseline, best.c_puct) == ("best_reward", "tree", 0.5)
    assert train.parse_args(compare.ARMS["mcts-tree-c2"]).c_puct == 2.0
    # the blog's advantage stays the "mcts" arm although train.py's default is the tree baseline
    assert train.parse_args(compare.ARMS["mcts"]).mcts_baseline == "value"
    whole = train.parse_args(compare.ARMS["mcts-whole"])
    assert (whole.mcts_distill, whole.mcts_credit, whole.c_puct) == ("whole", "leaf", 2.0)
    assert train.parse_args(compare.ARMS["mcts-whole-step"]).mcts_credit == "step"
    assert train.parse_args(compare.ARMS["mcts-whole-visits"]).mcts_credit == "visits"


def test_report_refuses_a_run_from_another_start_model(tmp_path):
    """Gains are paired with the start evals: a run from a different start model (the tiny model
    rebuilt on another CPU) must not be paired with them."""
    results = tmp_path / "results"
    for t in compare.TEMPERATURES:
        write_eval(results / "start", t, [0.0, 0.5])
        start = json.loads(compare.eval_path(results / "start", t).read_text())
        compare.eval_path(results / "start", t).write_text(
            json.dumps(start | {"checkpoint_checksum": "a" * 32}))
    write_run(results, "cispo-seed0", "cispo", 0, {t: [0.5, 0.5] for t in compare.TEMPERATURES})
    compare.report(results, tmp_path / "figures")  # no recorded start (older runs): paired
    config = results / "cispo-seed0" / "config.json"
    config.write_text(json.dumps({"method": "cispo", "seed": 0, "start_checksum": "a" * 32}))
    assert "| cispo | 1 |" in compare.report(results, tmp_path / "figures")
    config.write_text(json.dumps({"method": "cispo", "seed": 0, "start_checksum": "b" * 32}))
    with pytest.raises(SystemExit, match="started from model bbbbbbbbbbbb, but .* aaaaaaaaaaaa"):
        compare.report(results, tmp_path / "figures")
