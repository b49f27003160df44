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
        {"mean_at_n": sum(per_problem) / len(per_problem), "per_problem": per_problem}))


def write_run(results: Path, name: str, method: str, seed: int, per_problem: dict,
              steps: int = 4, tokens: int = 1000, kl: float = 0.01) -> None:
    d = results / name
    for t, pp in per_problem.items():
        write_eval(d, t, pp)
    (d / "config.json").write_text(json.dumps({"method": method, "seed": seed}))
    rows = [{"step": s, "train_reward": 0.1 * s, "generated_tokens": tokens * s // steps, "kl": kl,
             **({"eval_mean_at_16": 0.05} if s in (0, steps) else {})} for s in range(steps + 1)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_report_table_by_hand(tmp_path):
    results, figures = tmp_path / "results", tmp_path / "figures"
    for t in compare.TEMPERATURES:
        write_eval(results / "start", t, [0.0, 0.5])  # 25%
    # cispo seeds 0/1 at T=1: [0.5, 0.5] and [0.0, 1.0] -> 50% both; gains vs start +25 points
    write_run(results, "cispo-seed0", "cispo", 0, {1.0: [0.5, 0.5], 0.2: [0.5, 1.0]}, kl=0.02)
    write_run(results, "cispo-seed1", "cispo", 1, {1.0: [0.0, 1.0], 0.2: [0.0, 0.5]}, kl=0.04)
    # sft seed 0: T=1 [0.25, 0.25] -> 25%; cispo seed 0 vs sft seed 0 = +25 points
    write_run(results, "sft-seed0", "sft", 0, {1.0: [0.25, 0.25], 0.2: [0.0, 0.5]}, tokens=0)
    (results / "mcts-seed0").mkdir()  # unfinished: no evals -> left out
    table = compare.report(results, figures).splitlines()
    assert table[2] == "| start | | 0 | 0 | 25.00% | 25.00% | | | | |"
    [cispo] = [line.split(" | ") for line in table if line.startswith("| cispo ")]
    # arm, seeds, steps, tokens, T=1 mean [min, max], T=0.2, gain T=1, gain T=0.2, vs sft, KL
    assert cispo[1:4] == ["2", "4.00 [4.00, 4.00]", "0.00 M"]
    assert cispo[4].startswith("50.00%") and cispo[5].startswith("50.00%")
    assert cispo[6].startswith("25.00%") and cispo[7].startswith("25.00%")
    assert cispo[8] == "25.00%"  # one seed paired with the sft control
    assert cispo[9].startswith("0.03 [0.02, 0.04]")
    assert not any(line.startswith("| mcts") for line in table)
    assert (figures / "results.md").read_text().splitlines() == table
    assert (figures / "eval_mean_at_16.png").stat().st_size > 1000
    [sft] = [line.split(" | ") for line in table if line.startswith("| sft ")]
    assert sft[8] == ""  # the control is not compared with itself


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
