"""benchmarks/real_size.py: the published Qwen2.5 shapes, and its --quick run: every row makes
exactly the tokens asked for, the trainer step gives a finite loss, and at that shape the torch
sampler's greedy tokens are transformers' `generate`'s."""

import importlib.util
import math
from pathlib import Path

import pytest
from test_sampler import hf_greedy

import countdown
import tiny
from sampler import TorchSampler
from value_head import load_policy

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("real_size", REPO / "benchmarks" / "real_size.py")
real_size = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_size)


def test_config_is_the_published_qwen25_architecture():
    tok = tiny.build_tokenizer()
    cfg = real_size.qwen25_config("0.5b", tok)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size) == (
        896, 24, 14, 2, 4864, 151936)
    assert cfg.tie_word_embeddings and cfg.rope_parameters["rope_theta"] == 1e6
    assert cfg.rms_norm_eps == 1e-6 and not cfg.use_sliding_window
    big = real_size.qwen25_config("1.5b", tok, layers=3)
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads,
            big.intermediate_size) == (1536, 3, 12, 8960)
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id


def quick_prompts(tok, n):
    _, test = countdown.make_splits(0)
    return [tok.encode(countdown.make_prompt(p, tok)) for p in test[:n]]


def test_quick_run_generates_the_tokens_asked_for():
    args = real_size.parse_args(["--quick", "--backends", "generate,torch", "--threads", "1"])
    result = real_size.run(args)
    tok = tiny.build_tokenizer()
    for shape, (prompts, n) in {"mcts": (2, 4), "cispo": (1, 16)}.items():
        rows = result[shape]
        assert set(rows) == {"transformers generate", "torch sampler",
                             "floor: matrix products only"}
        for name, (tokens, seconds) in rows.items():
            assert tokens == prompts * n * 8, name
            assert seconds > 0
    step = result["train"]
    assert len(step["seconds"]) == 1 and all(math.isfinite(x) for x in step["losses"])
    # 2 trajectories: prompts 0 and 1, each with 8 completion tokens
    assert step["tokens"] == sum(map(len, quick_prompts(tok, 2))) + 2 * 8
    assert step["peak_gib"] > 0


def test_bad_backend_is_a_usage_error():
    with pytest.raises(SystemExit) as err:
        real_size.parse_args(["--backends", "torch,sglang"])
    assert err.value.code == 2


def test_torch_sampler_greedy_equals_generate_at_the_quick_shape(tmp_path):
    # initializer_range 0.2: top-2 logit gaps far above float32 noise, so greedy paths are exact
    path = real_size.build_model(tmp_path / "model", "quick", initializer_range=0.2)
    policy, tok = load_policy(str(path))  # saved and loaded like any checkpoint
    assert policy.lm.config.vocab_size == 1024 and policy.lm.config.num_hidden_layers == 2
    sampler = TorchSampler(policy, tok, seed=0)
    prompts = quick_prompts(tok, 3)
    out = sampler.generate(prompts, n=1, max_new_tokens=12, temperature=0, stop=())
    for p, [c] in zip(prompts, out, strict=True):
        assert c.tokens == hf_greedy(policy.lm, p, 12, sampler.eos_ids)
    assert any(len(c.tokens) == 12 for [c] in out)  # not all cut short by an EOS draw


@pytest.mark.vllm
def test_quick_vllm_row():
    pytest.importorskip("vllm")
    args = real_size.parse_args(["--quick", "--backends", "vllm", "--threads", "1"])
    result = real_size.run(args)
    for shape, (prompts, n) in {"mcts": (2, 4), "cispo": (1, 16)}.items():
        tokens, _ = result[shape]["vLLM backend"]
        assert 0 < tokens <= prompts * n * 8  # vLLM may still stop at a random EOS draw


_rs_spec = importlib.util.spec_from_file_location("real_shape_run",
                                                  REPO / "benchmarks" / "real_shape_run.py")
real_shape_run = importlib.util.module_from_spec(_rs_spec)
_rs_spec.loader.exec_module(real_shape_run)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_py_end_to_end_at_the_real_vocabulary(tmp_path):
    """The CI-sized real-shape run: Qwen2.5-0.5B's width and 151,936-token vocabulary with one
    layer, 2 generators + 2 gloo DDP trainers, mcts and cispo. Every step completes, and each
    trainer holds at least weights, gradients and AdamW's two moments (16 bytes a parameter)
    while a generator holds less (no optimizer)."""
    model = real_size.build_model(tmp_path / "model", "0.5b", layers=1)
    params = sum(p.numel() for p in load_policy(str(model))[0].parameters())
    args = real_shape_run.argparse.Namespace(steps=2, max_new_tokens=8, generators=2, trainers=2)
    for method in ("mcts", "cispo"):
        r = real_shape_run.run_one(model, method, tmp_path / method, args)
        assert r["steps"] == 2 and math.isfinite(r["seconds_per_step"])
        peaks = r["peak_rss_gib"]
        assert set(peaks) == {"main", "generator-0", "generator-1", "trainer-0", "trainer-1"}
        for rank in ("trainer-0", "trainer-1"):
            assert peaks[rank] >= 16 * params / real_shape_run.GIB
            assert peaks[rank] > max(peaks["generator-0"], peaks["generator-1"])
