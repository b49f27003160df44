"""benchmarks/scaling.py: which runs the train part launches, and the search table, by hand."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("scaling", BENCH / "scaling.py")
scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scaling)


def test_train_part_moves_one_knob_at_a_time(tmp_path):
    jobs = scaling.train_jobs([6, 12, 24], [8, 16, 32], seed=3, steps=5, lr=3e-5,
                              runs=str(tmp_path / "r"), results=tmp_path / "res")
    # around the default (M = 12, 16 workers): 3 + 3 points sharing the default one -> 5 runs
    names = sorted(name for name, _ in jobs)
    assert names == sorted(f"mcts-tree-c2-m{m}-w{w}-seed3" for m, w in
                           [(6, 16), (12, 16), (24, 16), (12, 8), (12, 32)])
    train_cmd = dict(jobs)["mcts-tree-c2-m24-w16-seed3"][0]
    i, j = train_cmd.index("--mcts-iterations"), train_cmd.index("--mcts-workers")
    assert train_cmd[i + 1] == "24" and train_cmd[j + 1] == "16"
    # the default arm's flags come first (tree baseline, c_puct 2.0), the budget is --steps
    assert train_cmd[train_cmd.index("--mcts-baseline") + 1] == "tree"
    assert train_cmd[train_cmd.index("--steps") + 1] == "5"
    # the convergence comparison's schedule at --lr
    assert train_cmd[train_cmd.index("--lr-schedule") + 1] == "linear"
    assert train_cmd[train_cmd.index("--lr") + 1] == "3e-05"


def test_the_default_point_is_the_convergence_run_copied_only_at_its_lr(tmp_path):
    src = tmp_path / "conv" / "steps5" / "mcts-tree-c2-seed3"
    src.mkdir(parents=True)
    for t in scaling.compare.TEMPERATURES:
        scaling.compare.eval_path(src, t).write_text("{}")
    res = tmp_path / "res"
    lr = scaling.convergence.DEFAULT_LR
    assert not scaling.reuse_default(3, 5, 2 * lr, res, tmp_path / "conv")  # another schedule
    assert not scaling.reuse_default(3, 7, lr, res, tmp_path / "conv")  # no run at 7 steps
    assert scaling.reuse_default(3, 5, lr, res, tmp_path / "conv")
    assert (res / "mcts-tree-c2-m12-w16-seed3" / "eval_t1.json").read_text() == "{}"
    jobs = scaling.train_jobs([6, 12], [16], seed=3, steps=5, lr=lr, runs=str(tmp_path / "r"),
                              results=res)
    assert [name for name, _ in jobs] == ["mcts-tree-c2-m6-w16-seed3"]  # the default: not rerun


def test_search_table_by_hand():
    row = {"search": {"iterations": 8, "workers": 4}, "selected_sparse": 0.1875,
           "selected_dense": 0.4321, "sample_sparse": 0.05, "bon_sparse": 0.25,
           "bon_n_equal_tokens": 9, "tokens_per_tree": 312.4, "search_seconds": 41.6}
    lines = scaling.search_table([row, {**row, "search": {"iterations": 4, "workers": 4}}])
    # sorted by workers then M; exact as percentages with one decimal
    assert lines.splitlines()[2] == "| 4 | 4 | 18.8% | +0.43 | 5.0% | 25.0% (9) | 312 | 42 |"
    assert lines.splitlines()[3].startswith("| 8 | 4 |")
