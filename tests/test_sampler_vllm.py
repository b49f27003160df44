"""vLLM backend vs torch backend on one checkpoint: greedy equality, raw log-probs == teacher
forcing, stop strings, prefix-cache accounting, in-place weight sync.

Model: a random Qwen2 with the tiny tokenizer and head_dim 32 (vLLM's CPU attention kernel takes
head sizes 32, 64, 80, ...; the size="test" tiny model has head_dim 16). initializer_range 0.2
keeps the top-2 logit gap far above float32 noise, so greedy paths are exact.
"""

import pytest
import torch

try:
    import vllm  # noqa: F401
except ImportError:
    pytest.skip("vllm is not installed (pip install -r requirements-vllm.txt, see README)",
                allow_module_level=True)

from test_train import check_run, run_train, small_flags
from transformers import AutoModelForCausalLM

import countdown
import tiny
from losses import token_logprobs
from sampler import TorchSampler, make_sampler
from sampler_vllm import BLOCK_SIZE
from value_head import PolicyWithValue

pytestmark = pytest.mark.vllm

LOGPROB_TOL = 1e-4  # float32, different kernels (vLLM CPU attention vs torch SDPA): seen <= 3e-6
VALUE_TOL = 1e-5  # both values come from torch forwards (full sequence vs KV-cached steps)


def random_policy(tok, seed: int = 0, heads: int = 1) -> PolicyWithValue:
    cfg = tiny.tiny_config(tok, "test")  # hidden 32
    cfg.num_attention_heads = cfg.num_key_value_heads = heads
    cfg.initializer_range = 0.2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PolicyWithValue(AutoModelForCausalLM.from_config(cfg).eval())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tiny.build_tokenizer()
    path = tmp_path_factory.mktemp("vllm") / "model"
    random_policy(tok).save_pretrained(path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def setup(model_dir):
    """(vLLM sampler, torch sampler on a separate copy of the same weights, prompts)."""
    path, tok = model_dir, tiny.build_tokenizer()
    vs = make_sampler("vllm", PolicyWithValue.from_pretrained(path), tok, seed=0, model_dir=path)
    ts = TorchSampler(PolicyWithValue.from_pretrained(path), tok, seed=0)
    problems, _ = countdown.make_splits(0, n_train=8)
    prompts = [tok.encode(countdown.make_prompt(p, tok)) for p in problems]
    yield vs, ts, prompts
    del vs.llm


def teacher_forced(policy, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = policy(torch.tensor([prompt + tokens]))
    return token_logprobs(logits[:, len(prompt) - 1:-1], torch.tensor([tokens]))[0]


def greedy(sampler, prompts, **kw):
    return [row[0] for row in sampler.generate(prompts, temperature=0, max_new_tokens=48, **kw)]


def test_greedy_matches_torch_backend(setup):
    vs, ts, prompts = setup
    ours, ref = greedy(vs, prompts, want_values=True), greedy(ts, prompts, want_values=True)
    for a, b in zip(ours, ref, strict=True):
        assert (a.tokens, a.text, a.finish_reason) == (b.tokens, b.text, b.finish_reason)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < LOGPROB_TOL
        assert a.value == pytest.approx(b.value, abs=VALUE_TOL)
    assert vs.values([p + c.tokens for p, c in zip(prompts, ours)]) == pytest.approx(
        [c.value for c in ref], abs=VALUE_TOL)
    for row, c in zip(vs.generate(prompts, n=3, temperature=0, max_new_tokens=48), ref):
        assert [s.tokens for s in row] == [c.tokens] * 3  # vLLM refuses greedy n > 1 itself


def test_unsupported_head_size_is_a_one_line_error():
    tok = tiny.build_tokenizer()
    with pytest.raises(ValueError, match="has 16: use --backend torch"):
        make_sampler("vllm", random_policy(tok, heads=2), tok)


@pytest.mark.parametrize("temperature", [0.8, 2.0])
def test_sampled_logprobs_are_the_raw_model_logprobs(setup, temperature):
    """logprobs_mode raw_logprobs: log pi at temperature 1 whatever the sampling temperature."""
    vs, ts, prompts = setup
    rows = vs.generate(prompts[:4], n=4, temperature=temperature, max_new_tokens=32)
    assert [len(r) for r in rows] == [4] * 4
    for prompt, row in zip(prompts, rows):
        for c in row:
            assert len(c.logprobs) == len(c.tokens) > 0
            ref = teacher_forced(ts.policy, prompt, c.tokens)
            assert (torch.tensor(c.logprobs) - ref).abs().max() < LOGPROB_TOL


def test_stop_strings_cut_right_after_the_stop_token(setup):
    """Hot sampling (temperature 2, vLLM's maximum) hits </step>, </answer> and EOS within 48
    tokens. The call has its own seed: which reasons occur must not depend on the tests run
    before it on the same engine."""
    vs, ts, prompts = setup
    tok, eos = vs.tokenizer, set(ts.eos_ids)
    step_id, answer_id = tok.convert_tokens_to_ids([countdown.STEP_END, countdown.ANSWER_CLOSE])
    rows = vs.generate(prompts, n=8, temperature=2.0, max_new_tokens=48, seed=3)
    again = vs.generate(prompts, n=8, temperature=2.0, max_new_tokens=48, seed=3)
    assert [[c.tokens for c in r] for r in again] == [[c.tokens for c in r] for r in rows]
    seen = set()
    for c in (c for row in rows for c in row):
        seen.add(c.finish_reason)
        body = c.tokens[:-1]  # no stop token or EOS before the last token
        assert step_id not in body and answer_id not in body and not eos & set(body)
        assert c.text == tok.decode(c.tokens, skip_special_tokens=True)
        last = {"step": {step_id}, "answer": {answer_id}, "eos": eos}.get(c.finish_reason)
        if last is None:
            assert c.finish_reason == "length" and len(c.tokens) == 48
        else:
            assert c.tokens[-1] in last
    assert seen == {"step", "answer", "eos", "length"}
    assert vs.tokens_generated >= sum(len(c.tokens) for row in rows for c in row)


def test_prefix_cache_hits_count_whole_shared_blocks(setup):
    """n samples of one prompt of length L: the first computes it, the other n-1 reuse its full
    32-token blocks (vLLM always recomputes the last prompt token); a repeat call reuses all n."""
    vs, _, prompts = setup
    prompt, n = prompts[0], 4
    assert len(prompt) % BLOCK_SIZE != 0
    cached = (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
    vs.llm.reset_prefix_cache()
    for reused in (n - 1, n):
        queries, hits, fwd = vs.prefix_cache_queries, vs.prefix_cache_hits, vs.forward_tokens
        row = vs.generate([prompt], n=n, max_new_tokens=8, stop=())[0]
        assert vs.prefix_cache_queries - queries == n * len(prompt)
        assert vs.prefix_cache_hits - hits == reused * cached
        computed = n * len(prompt) - reused * cached + sum(len(c.tokens) - 1 for c in row)
        assert vs.forward_tokens - fwd == computed
    assert 0 < vs.prefix_cache_hit_rate < 1


def test_weight_sync_in_place_follows_the_torch_backend(setup):
    vs, ts, prompts = setup
    before = greedy(vs, prompts)
    original = {k: v.clone() for k, v in ts.policy.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    engine = vs.llm
    vs.load_weights(perturbed)
    ts.load_weights(perturbed)
    assert vs.llm is engine and vs.last_sync_seconds > 0  # no restart
    after, ref = greedy(vs, prompts, want_values=True), greedy(ts, prompts, want_values=True)
    assert [c.tokens for c in after] == [c.tokens for c in ref]
    assert [c.tokens for c in after] != [c.tokens for c in before]
    assert [c.value for c in after] == pytest.approx([c.value for c in ref], abs=VALUE_TOL)
    vs.load_weights(original)
    ts.load_weights(original)
    assert [c.tokens for c in greedy(vs, prompts)] == [c.tokens for c in before]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["mcts", "cispo", "bon"])
def test_train_end_to_end_on_vllm(model_dir, tmp_path, method):
    """The whole pipeline with vLLM generators: steps, evals, weights moved, syncs bit-exact."""
    out = tmp_path / method
    r = run_train(*small_flags(str(model_dir), out, steps=2), "--method", method,
                  "--backend", "vllm")
    assert r.returncode == 0, r.stderr[-3000:]
    check_run(out, str(model_dir), 2, method)
