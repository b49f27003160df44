"""plots.py on small synthetic runs: inspect the drawn series, not only that a file exists."""

import json

import numpy as np
import pytest

import plots


def write_run(path, method, seed, rows, tail="", **config):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"method": method, "seed": seed, **config}))
    lines = [json.dumps(r) for r in rows]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)


def rows_for(offset: float, tokens_per_step: int):
    """Train rows every step, eval rows (eval_mean_at_16) every 2 steps."""
    rows = []
    for step in range(5):
        row = {"step": step, "wall_time": step * 1.0, "generated_tokens": step * tokens_per_step,
               "train_reward": offset + 0.1 * step, "loss": 0.0, "kl": 0.0, "policy_lag": 0}
        if step % 2 == 0:
            row["eval_mean_at_16"] = offset + 0.01 * step
        rows.append(row)
    return rows


@pytest.fixture
def runs(tmp_path):
    """2 methods x 2 seeds; cispo seed 1 ends in a truncated line (a run killed mid-write)."""
    dirs = []
    for method, base in (("mcts", 0.1), ("cispo", 0.0)):
        for seed in (0, 1):
            d = tmp_path / f"{method}-s{seed}"
            tail = '{"step": 5, "train_rew' if (method, seed) == ("cispo", 1) else ""
            write_run(d, method, seed, rows_for(base + 0.02 * seed, 100 + 100 * seed), tail)
            dirs.append(d)
    return dirs


def line(ax, label):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found.get_xdata(), found.get_ydata()


def test_eval_and_train_figures_hold_the_expected_series(runs, tmp_path):
    with pytest.warns(UserWarning, match="malformed JSONL line"):
        loaded = [plots.load_run(d) for d in runs]
    assert [len(r["rows"]) for r in loaded] == [5, 5, 5, 5]  # the truncated line was skipped
    fig = plots.eval_figure(loaded)
    by_step, by_tokens = fig.axes[:2]
    assert sorted(ln.get_label() for ln in by_step.get_lines()) == ["cispo", "mcts"]
    # mean over seeds of offset + 0.01*step at eval steps 0, 2, 4 (seed offsets 0 and 0.02)
    x, y = line(by_step, "mcts")
    np.testing.assert_allclose(x, [0, 2, 4])
    np.testing.assert_allclose(y, [0.11, 0.13, 0.15])
    # by generated tokens: seed 0 makes 100 tokens/step, seed 1 200: the common range is
    # [0, 400]; grid = union of both seeds' x there = {0, 200, 400, 800}∩[0,400] = 0, 200, 400.
    x, y = line(by_tokens, "cispo")
    np.testing.assert_allclose(x, [0, 200, 400])
    # seed 0 at 200 tokens = step 2 -> 0.02; seed 1 at 200 tokens = step 1, interpolated
    # between its eval points (0, 0.02) and (400, 0.04) -> 0.03; mean 0.025
    np.testing.assert_allclose(y, [0.01, 0.025, 0.04])
    # one min-max band per method and axis: seed 0 and seed 1 differ by 0.02 at step 0
    assert len(by_step.collections) == 2
    band = by_step.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.0) and band.max() == pytest.approx(0.06)
    png = plots.save(fig, tmp_path / "out" / "eval.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"

    fig = plots.train_figure(loaded)
    x, y = line(fig.axes[0], "mcts")
    np.testing.assert_allclose(x, range(5))
    np.testing.assert_allclose(y, [0.11 + 0.1 * s for s in range(5)])


def test_cli_writes_both_pngs(runs, tmp_path, capsys):
    with pytest.warns(UserWarning):
        plots.main([str(d) for d in runs] + ["--out", str(tmp_path / "figs")])
    for name in ("eval_mean_at_16.png", "train_reward.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 1000
    assert (tmp_path / "figs" / "results.md").read_text().count("\n") == 2 + len(runs)


def test_results_table_numbers_by_hand(tmp_path):
    # rows_for(0.1, 100): steps 0..4, reward 0.1 + 0.1 * step, eval 0.1 + 0.01 * step at 0, 2, 4;
    # 5 train rows -> quarter = 1 row: first 0.1, last 0.5; tokens 4 * 100
    rows = rows_for(0.1, 100)
    rows[-1]["eval_ci95"] = 0.02
    write_run(tmp_path / "mcts-s0", "mcts", 0, rows)
    table = plots.results_table([plots.load_run(tmp_path / "mcts-s0")])
    header, rule, line = table.splitlines()
    assert header.startswith("| run | method | steps |") and rule.startswith("| --- |")
    assert line == ("| mcts-s0 | mcts | 4 | 0.00 M | 10.00% -> 14.00% (± 2.00%) | "
                    "0.100 -> 0.500 | 0.000 |")


def test_eval_key_follows_the_runs_eval_n(tmp_path):
    # train.py --eval-n 2 logs eval_mean_at_2: drawn and tabled as mean@2
    rows = [{"step": 0, "generated_tokens": 0, "eval_mean_at_2": 0.25},
            {"step": 1, "generated_tokens": 10, "train_reward": 0.5, "kl": 0.0,
             "eval_mean_at_2": 0.5, "eval_ci95": 0.1}]
    write_run(tmp_path / "r", "cispo", 0, rows, eval_n=2)
    run = plots.load_run(tmp_path / "r")
    x, y = line(plots.eval_figure([run]).axes[0], "cispo")
    np.testing.assert_allclose(x, [0, 1])
    np.testing.assert_allclose(y, [0.25, 0.5])
    header, _, row = plots.results_table([run]).splitlines()
    assert "| mean@2 first -> last |" in header and "25.00% -> 50.00% (± 10.00%)" in row


def test_one_seed_draws_no_band(tmp_path):
    write_run(tmp_path / "bon", "bon", 0, rows_for(0.0, 10))
    fig = plots.train_figure([plots.load_run(tmp_path / "bon")])
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["bon"]
    assert not fig.axes[0].collections


def test_missing_metrics_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plots.load_run(tmp_path)


TREE = {"problem": {"nums": [1, 2, 3, 5], "target": 11}, "text": "", "N": 6, "Q": 0.1,
        "children": [
            {"text": "1+2=3</step>", "N": 4, "Q": 0.5, "children": [
                {"text": "3+3=6</step>", "N": 3, "Q": 0.7, "children": []},
                {"text": "3*3=9</step>", "N": 1, "Q": -0.2, "children": []}]},
            {"text": "5-3=2</step>", "N": 1, "Q": -0.6, "children": []},
            {"text": "2*5=10</step>", "N": 0, "Q": 0.0, "children": []}]}


def test_tree_figure_labels_every_node_and_scales_edges_by_visits(tmp_path):
    fig = plots.tree_figure(TREE)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == 6  # one label per node
    assert "root\nN=6" in labels and "1+2=3\nN=4" in labels
    edges = ax.get_lines()
    assert len(edges) == 5  # one per parent-child pair
    widths = sorted(e.get_linewidth() for e in edges)
    assert widths[0] == pytest.approx(0.5) and widths[-1] == pytest.approx(0.5 + 6 / 6 * 4)
    colours = ax.collections[0].get_array()
    np.testing.assert_allclose(sorted(colours), sorted([0.1, 0.5, 0.7, -0.2, -0.6, 0.0]))
    # layered: leaves at consecutive x, a parent over the mean of its children
    layout = {n["text"]: (x, d) for n, x, d, _ in plots.tree_layout(TREE)}
    assert layout["3+3=6</step>"] == (0, 2) and layout["3*3=9</step>"] == (1, 2)
    assert layout["1+2=3</step>"] == (0.5, 1) and layout[""] == (np.mean([0.5, 2, 3]), 0)
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(TREE))
    plots.main(["tree", str(path)])
    assert path.with_suffix(".png").stat().st_size > 1000


def test_budget_figure_one_line_per_method(tmp_path):
    summary = {"checkpoint": "tiny", "search": [
        {"method": m, "budget_tokens": b, "accuracy": acc, "ci95": 0.01}
        for m, accs in (("none", (0.1, 0.1)), ("bon", (0.1, 0.2)), ("mcts", (0.15, 0.3)))
        for b, acc in zip((256, 64), accs)]}
    fig = plots.budget_figure(summary)
    bars = {c.get_label(): c for c in fig.axes[0].containers}  # errorbar: one per method
    assert sorted(bars) == ["bon", "mcts", "none"]
    data_line = bars["mcts"].lines[0]
    np.testing.assert_allclose(np.asarray(data_line.get_xdata(), float), [64, 256])  # sorted by budget
    np.testing.assert_allclose(np.asarray(data_line.get_ydata(), float), [0.3, 0.15])
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    plots.main(["budget", str(path), "--out", str(tmp_path / "b.png")])
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_short_label():
    assert plots.short_label("12*13=156</step>", 8) == "12*13=1…"
    assert plots.short_label("<answer>1+2</answer>", 30) == "<answer>1+2</answer>"
    assert plots.short_label("1+2=3\n", 8) == "1+2=3"


def test_step0_eval_without_generated_tokens_is_drawn_at_zero_tokens(tmp_path):
    # runs logged before train.py wrote generated_tokens on the step-0 eval row: that row has
    # eval but no tokens; by tokens it takes the count before it (0), later rows keep theirs
    rows = [{"step": 0, "eval_mean_at_16": 0.03},
            {"step": 1, "generated_tokens": 500, "train_reward": 0.1},
            {"step": 2, "generated_tokens": 900, "train_reward": 0.2, "eval_mean_at_16": 0.05}]
    write_run(tmp_path / "old", "mcts", 0, rows)
    fig = plots.eval_figure([plots.load_run(tmp_path / "old")])
    x, y = line(fig.axes[1], "mcts")
    np.testing.assert_allclose(x, [0, 900])
    np.testing.assert_allclose(y, [0.03, 0.05])


def test_a_run_that_samples_nothing_is_left_out_of_the_tokens_panel(tmp_path):
    # train.py --method sft trains on solver traces: generated_tokens stays 0
    rows = [{"step": s, "generated_tokens": 0, "train_reward": 1.0, "eval_mean_at_16": 0.05 + s / 100}
            for s in range(3)]
    write_run(tmp_path / "sft", "sft", 0, rows)
    write_run(tmp_path / "mcts", "mcts", 0, rows_for(0.0, 10))
    fig = plots.eval_figure([plots.load_run(tmp_path / "sft"), plots.load_run(tmp_path / "mcts")])
    by_step, by_tokens = fig.axes[:2]
    assert sorted(ln.get_label() for ln in by_step.get_lines()) == ["mcts", "sft"]
    assert [ln.get_label() for ln in by_tokens.get_lines()] == ["mcts"]
    # a method keeps its colour in both panels although sft is missing from one
    colour = {ln.get_label(): ln.get_color() for ln in by_step.get_lines()}
    assert by_tokens.get_lines()[0].get_color() == colour["mcts"]


def test_train_reward_smoothing_is_a_trailing_mean_by_hand(tmp_path):
    np.testing.assert_allclose(plots.trailing_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2),
                               [1.0, 2.0, 4.0, 6.0])
    write_run(tmp_path / "bon", "bon", 0, rows_for(0.0, 10))  # rewards 0, .1, .2, .3, .4
    fig = plots.train_figure([plots.load_run(tmp_path / "bon")], smooth=3)
    x, y = line(fig.axes[0], "bon")
    np.testing.assert_allclose(x, range(5))
    np.testing.assert_allclose(y, [0.0, 0.05, 0.1, 0.2, 0.3])


def test_runs_of_one_method_with_different_settings_are_separate_lines(tmp_path):
    """An ablation (same method, one flag differs) is two lines, labelled with the flag; seeds
    and bookkeeping (out dir, time limit) still merge, and so does a key only some configs hold
    (a flag added or removed since); other methods keep their plain name."""
    specs = [("treerl", 0, 0.0, {"tree_reward": "dense", "out": "a", "lr": 3e-5, "checksums": 0}),
             ("treerl", 1, 0.02, {"tree_reward": "dense", "out": "b", "lr": 3e-5}),
             ("treerl", 0, 0.1, {"tree_reward": "sparse", "out": "c", "lr": 3e-5,
                                 "time_limit_min": 20}),
             ("cispo", 0, 0.2, {"tree_reward": "dense", "out": "d", "lr": 1e-4})]
    dirs = []
    for i, (method, seed, offset, config) in enumerate(specs):
        write_run(tmp_path / f"r{i}", method, seed, rows_for(offset, 100), **config)
        dirs.append(tmp_path / f"r{i}")
    runs = plots.label_runs([plots.load_run(d) for d in dirs])
    assert [r["label"] for r in runs] == ["treerl (tree_reward=dense)"] * 2 + [
        "treerl (tree_reward=sparse)", "cispo"]
    by_step = plots.eval_figure(runs).axes[0]
    assert sorted(ln.get_label() for ln in by_step.get_lines()) == [
        "cispo", "treerl (tree_reward=dense)", "treerl (tree_reward=sparse)"]
    _, dense = line(by_step, "treerl (tree_reward=dense)")
    np.testing.assert_allclose(dense, [0.01, 0.03, 0.05])  # mean of the two seeds' offsets 0, 0.02
    _, sparse = line(by_step, "treerl (tree_reward=sparse)")
    np.testing.assert_allclose(sparse, [0.1, 0.12, 0.14])
    assert "treerl (tree_reward=sparse)" in plots.results_table(runs)


def test_search_figure_draws_the_gain_and_the_per_batch_search_metrics(tmp_path):
    rows = []
    for step in range(4):
        row = {"step": step, "search_depth": 3.0 + step, "search_from_rollout": 1.0 - step / 4}
        if step % 2 == 0:
            row["eval_search_gain"] = 0.1 * step
        rows.append(row)
    write_run(tmp_path / "m0", "mcts", 0, rows)
    write_run(tmp_path / "c0", "cispo", 0, [{"step": 1, "eval_mean_at_16": 0.1}])
    runs = [plots.load_run(tmp_path / "m0"), plots.load_run(tmp_path / "c0")]
    assert plots.has_metric(runs, "eval_search_gain")
    assert not plots.has_metric(runs[1:], "eval_search_gain")
    fig = plots.search_figure(runs, smooth=2)
    gain, depth, rollout = fig.axes
    x, y = line(gain, "mcts")
    np.testing.assert_allclose(x, [0, 2]) and np.testing.assert_allclose(y, [0.0, 0.2])
    assert [ln.get_label() for ln in gain.get_lines() if not ln.get_label().startswith("_")] \
        == ["mcts"]  # cispo logs no search
    _, y = line(depth, "mcts")
    np.testing.assert_allclose(y, [3.0, 3.5, 4.5, 5.5])  # trailing mean of 2
    _, y = line(rollout, "mcts")
    np.testing.assert_allclose(y, [1.0, 0.875, 0.625, 0.375])


def test_empty_metrics_is_a_one_line_error(tmp_path):
    write_run(tmp_path / "run", "mcts", 0, [])
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match=r"^plots.py: error: .*metrics.jsonl holds no rows"):
        plots.main([str(tmp_path / "run"), "--out", str(tmp_path / "figs")])
    assert not (tmp_path / "figs").exists()


def test_corrupt_json_inputs_are_one_line_errors(tmp_path):
    write_run(tmp_path / "run", "mcts", 0, rows_for(0.0, 10))
    (tmp_path / "run" / "config.json").write_text('{"method": "mc')  # cut short
    with pytest.raises(SystemExit, match=r"^plots.py: error: cannot read .*config.json \("):
        plots.load_run(tmp_path / "run")
    for kind, text in (("tree", '{"children": [{"te'), ("budget", "[1, 2]"), ("budget", "{}")):
        path = tmp_path / f"{kind}.json"
        path.write_text(text)
        with pytest.raises(SystemExit) as err:
            plots.main([kind, str(path)])
        assert str(err.value).startswith("plots.py: error: ") and "\n" not in str(err.value)


def test_stability_figure_puts_the_guards_next_to_mean_at_16(tmp_path):
    rows = [{"step": s, "kl": 0.01 * s, "entropy": 1.0 - 0.1 * s, "train_format_rate": 1.0,
             "advantage_std": 0.5, "completion_len": 30 + s, "value_start": 0.1 * s,
             **({"eval_mean_at_16": 0.05 + 0.01 * s, "eval_format_rate": 0.98} if s % 2 == 0
                else {})} for s in range(5)]
    write_run(tmp_path / "m0", "mcts", 0, rows)
    fig = plots.stability_figure([plots.load_run(tmp_path / "m0")], smooth=1)
    axes = fig.axes
    assert len(axes) == 8
    x, y = line(axes[0], "mcts")
    np.testing.assert_allclose(x, [0, 2, 4]) and np.testing.assert_allclose(y, [0.05, 0.07, 0.09])
    labels = [ax.get_ylabel() for ax in axes]
    assert labels[1:4] == ["eval format rate", "kl", "entropy"]
    _, y = line(axes[2], "mcts")
    np.testing.assert_allclose(y, [0.0, 0.01, 0.02, 0.03, 0.04])
    _, y = line(axes[7], "mcts")
    np.testing.assert_allclose(y, [0.0, 0.1, 0.2, 0.3, 0.4])
