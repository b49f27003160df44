"""Sampler: greedy == HF generate, log-probs == teacher forcing, stop strings, shared-prefix fan-out,
ragged batches, values, weight sync and forward-token accounting."""

import pytest
import torch
from test_value_head import char_tokenizer, random_policy
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import sampler
from fast_decoder import MIN_SHARED_PREFIX, Qwen2Decoder, shared_prefix_groups
from sampler import HFDecoder, TorchSampler, choose_backend, left_pad, make_sampler
from value_head import PolicyWithValue

PROMPTS = ["12+3=15", "7*8", "(13-4)*3=27 ab", "x"]  # ragged lengths 7, 3, 14, 1


def spread_policy(seed: int = 0, **cfg) -> PolicyWithValue:
    """Random weights large enough that greedy text does not collapse into one repeated token."""
    return random_policy(seed, initializer_range=0.3, **cfg)


def encode(tok, texts):
    return [tok.encode(t) for t in texts]


def hf_greedy(lm, prompt: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    out = lm.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                      eos_token_id=eos_ids, pad_token_id=0)[0, len(prompt):].tolist()
    return out[: next((i + 1 for i, t in enumerate(out) if t in eos_ids), len(out))]


def teacher_forced(policy, prompt: list[int], tokens: list[int]) -> tuple[torch.Tensor, float]:
    """Log-probs of `tokens` after `prompt` and V at the last token, from one plain forward."""
    with torch.no_grad():
        logits, values = policy(torch.tensor([prompt + tokens]))
    logp = torch.log_softmax(logits[0].float(), -1)[len(prompt) - 1: -1]
    return logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0], float(values[0, -1])


@pytest.mark.parametrize("tie", [True, False])
def test_fast_forward_equals_hf_forward(tie):
    policy, tok = spread_policy(tie=tie), char_tokenizer()
    prompts = encode(tok, PROMPTS)
    sampler = TorchSampler(policy, tok)
    assert isinstance(sampler.decoder, Qwen2Decoder)
    with torch.inference_mode():
        ids, pos, valid = left_pad(prompts, torch.device("cpu"))
        logits, _ = sampler.decoder.prefill(ids, pos, valid, ids.shape[1] + 1)
        step_tokens = torch.tensor([5, 9, 11, 40])
        step_logits, _ = sampler.decoder.step(step_tokens, pos[:, -1] + 1)
    for row, p in enumerate(prompts):
        with torch.no_grad():
            ref = policy.lm(torch.tensor([p + [int(step_tokens[row])]])).logits[0]
        torch.testing.assert_close(logits[row], ref[-2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step_logits[row], ref[-1], rtol=1e-5, atol=1e-5)


def test_fast_forward_in_bfloat16_follows_hf_forward():
    """A bfloat16 model (RoPE runs in float32 there): logits within bfloat16 rounding of HF's."""
    policy, tok = spread_policy(), char_tokenizer()
    policy.lm.to(torch.bfloat16)
    prompts = encode(tok, PROMPTS)
    sampler = TorchSampler(policy, tok)
    with torch.inference_mode():
        ids, pos, valid = left_pad(prompts, torch.device("cpu"))
        logits, _ = sampler.decoder.prefill(ids, pos, valid, ids.shape[1] + 1)
        step_logits, _ = sampler.decoder.step(torch.tensor([5, 9, 11, 40]), pos[:, -1] + 1)
    for row, p in enumerate(prompts):
        with torch.no_grad():
            ref = policy.lm(torch.tensor([p + [[5, 9, 11, 40][row]]])).logits[0].float()
        scale = ref.abs().max()
        assert (logits[row] - ref[-2]).abs().max() < 0.05 * scale
        assert (step_logits[row] - ref[-1]).abs().max() < 0.05 * scale


def test_greedy_equals_hf_generate_ragged_batch():
    policy, tok = spread_policy(), char_tokenizer()
    sampler, prompts = TorchSampler(policy, tok), encode(tok, PROMPTS)
    out = sampler.generate(prompts, max_new_tokens=24, temperature=0, stop=())
    for p, (c,) in zip(prompts, out):
        assert c.tokens == hf_greedy(policy.lm, p, 24, sampler.eos_ids)
        assert c.finish_reason == ("eos" if c.tokens[-1] in sampler.eos_ids else "length")
        # one prompt at a time gives the same (ragged batching changes nothing)
        assert sampler.generate([p], max_new_tokens=24, temperature=0, stop=())[0][0].tokens == c.tokens
    assert len({tuple(c.tokens) for (c,) in out}) == len(out)  # the prompts really differ


def test_greedy_equals_hf_generate_tiny_model(tiny_test_model):
    path = tiny_test_model
    policy = PolicyWithValue.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    sampler = TorchSampler(policy, tok)
    prompts = encode(tok, ["<|im_start|>user\n3 5 7 9 -> 24<|im_end|>\n<|im_start|>assistant\n",
                           "<|im_start|>assistant\n13-4="])
    out = sampler.generate(prompts, max_new_tokens=40, temperature=0, stop=())
    for p, (c,) in zip(prompts, out):
        assert c.tokens == hf_greedy(policy.lm, p, 40, sampler.eos_ids)


def llama_policy() -> PolicyWithValue:
    """A small random Llama: not Qwen2, so the sampler runs it through HFDecoder."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, initializer_range=0.3,
                         bos_token_id=None, eos_token_id=2, pad_token_id=0)
    return PolicyWithValue(AutoModelForCausalLM.from_config(config)).eval()


def test_hf_fallback_for_other_architectures():
    policy, tok = llama_policy(), char_tokenizer()
    sampler, prompts = TorchSampler(policy, tok), encode(tok, PROMPTS)
    assert isinstance(sampler.decoder, HFDecoder)
    out = sampler.generate(prompts, n=2, max_new_tokens=16, temperature=0, stop=(), want_values=True)
    for p, pair in zip(prompts, out):
        assert pair[0].tokens == pair[1].tokens == hf_greedy(policy.lm, p, 16, sampler.eos_ids)
        logp, value = teacher_forced(policy, p, pair[0].tokens)
        torch.testing.assert_close(torch.tensor(pair[0].logprobs), logp, rtol=0, atol=1e-4)
        assert abs(pair[1].value - value) < 1e-5


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_logprobs_equal_teacher_forced(temperature, top_p):
    policy, tok = spread_policy(), char_tokenizer()
    sampler, prompts = TorchSampler(policy, tok, seed=3), encode(tok, PROMPTS)
    out = sampler.generate(prompts, n=3, max_new_tokens=20, temperature=temperature, top_p=top_p,
                           stop=())
    for p, samples in zip(prompts, out):
        for c in samples:
            logp, _ = teacher_forced(policy, p, c.tokens)  # raw model: temperature 1, no top-p
            torch.testing.assert_close(torch.tensor(c.logprobs), logp, rtol=0, atol=1e-4)
            assert c.text == tok.decode(c.tokens, skip_special_tokens=True)


def test_shared_prefix_samples_follow_the_model_distribution():
    policy, tok = spread_policy(), char_tokenizer()
    sampler, prompt = TorchSampler(policy, tok, seed=1), tok.encode("3*4=12")
    with torch.no_grad():
        logits = policy(torch.tensor([prompt]))[0][0, -1].float()
    n = 4000
    for temperature, top_p in [(1.0, 1.0), (0.5, 1.0), (1.0, 0.6)]:
        (samples,) = sampler.generate([prompt], n=n, max_new_tokens=1, temperature=temperature,
                                      top_p=top_p, stop=())
        counts = torch.bincount(torch.tensor([c.tokens[0] for c in samples]), minlength=64)
        probs = torch.softmax(logits / temperature, -1)
        if top_p < 1:  # the nucleus, by hand: most likely tokens until their mass reaches top_p
            order = probs.argsort(descending=True)
            cut = int((probs[order].cumsum(0) < top_p).sum()) + 1
            nucleus = torch.zeros_like(probs)
            nucleus[order[:cut]] = probs[order[:cut]]
            probs = nucleus / nucleus.sum()
            assert counts[probs == 0].sum() == 0
        freq = counts.float() / n
        assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 2e-3).all()


def test_n_samples_from_one_prefix_are_distinct_and_consistent():
    policy, tok = spread_policy(), char_tokenizer()
    sampler, prompts = TorchSampler(policy, tok, seed=0), encode(tok, PROMPTS[:2])
    out = sampler.generate(prompts, n=8, max_new_tokens=12, stop=())
    for p, samples in zip(prompts, out):
        assert len(samples) == 8 and len({tuple(c.tokens) for c in samples}) > 1
        for c in samples:  # fanned-out KV must be that prompt's own: log-probs check it
            logp, _ = teacher_forced(policy, p, c.tokens)
            torch.testing.assert_close(torch.tensor(c.logprobs), logp, rtol=0, atol=1e-4)


def test_seed_makes_sampling_reproducible():
    policy, tok = spread_policy(), char_tokenizer()
    prompts = encode(tok, PROMPTS)
    a = TorchSampler(policy, tok, seed=5).generate(prompts, n=2, max_new_tokens=10, stop=())
    b = TorchSampler(policy, tok, seed=5).generate(prompts, n=2, max_new_tokens=10, stop=())
    assert [[c.tokens for c in s] for s in a] == [[c.tokens for c in s] for s in b]


def test_multi_token_stop_string_cuts_right_after_completing_token():
    policy, tok = spread_policy(), char_tokenizer(single_token_tags=False)
    sampler, prompt = TorchSampler(policy, tok), tok.encode("12+3=15")
    (free,) = sampler.generate([prompt], max_new_tokens=30, temperature=0, stop=())[0]
    stop = free.text[6:10]  # four chars: four tokens of this char tokenizer
    end = next(k for k in range(len(free.tokens) + 1) if stop in free.text and
               stop in tok.decode(free.tokens[:k], skip_special_tokens=True))
    (cut,) = sampler.generate([prompt], max_new_tokens=30, temperature=0, stop=[stop, "#"])[0]
    assert cut.tokens == free.tokens[:end] and cut.finish_reason == "step"
    assert cut.text.endswith(stop) and cut.text.count(stop) == 1


@pytest.mark.parametrize("single_token_tags", [True, False])
def test_step_and_answer_tags_stop_sampling(single_token_tags):
    """Near-uniform random model: many samples run into </step> or </answer> by chance."""
    policy, tok = random_policy(0), char_tokenizer(single_token_tags)
    sampler = TorchSampler(policy, tok, seed=0)
    # without single-token tags the 7-char tags are too unlikely: use 2-char stand-ins too
    stop = ("</step>", "</answer>") if single_token_tags else ("</step>", "</answer>", "9<", "a)")
    (samples,) = sampler.generate([tok.encode("go:")], n=300, max_new_tokens=40, stop=stop)
    reasons = [c.finish_reason for c in samples]
    assert {"step", "answer", "length"} <= set(reasons) if single_token_tags else "step" in reasons
    for c in samples:
        text = c.text
        hits = [s for s in stop if s in text]
        if c.finish_reason == "length":
            assert not hits and len(c.tokens) == 40
        elif c.finish_reason == "eos":
            assert c.tokens[-1] in sampler.eos_ids and not hits
        else:
            ender = "</answer>" if c.finish_reason == "answer" else None
            assert any(text.endswith(s) for s in hits) and (ender is None or text.endswith(ender))
            shorter = tok.decode(c.tokens[:-1], skip_special_tokens=True)  # one token earlier no stop string was complete
            assert not any(s in shorter for s in stop)


def test_values_match_policy_forward():
    policy, tok = spread_policy(), char_tokenizer()
    sampler, prompts = TorchSampler(policy, tok), encode(tok, PROMPTS)
    out = sampler.generate(prompts, n=2, max_new_tokens=10, want_values=True, stop=("9<", "a"))
    seqs = []
    for p, samples in zip(prompts, out):
        for c in samples:
            _, value = teacher_forced(policy, p, c.tokens)
            assert c.value is not None and abs(c.value - value) < 1e-5
            seqs.append(p + c.tokens)
    values = sampler.values(seqs)
    expected = [teacher_forced(policy, s[:1], s[1:])[1] for s in seqs]
    torch.testing.assert_close(torch.tensor(values), torch.tensor(expected), rtol=0, atol=1e-5)
    assert len(set(expected)) > 1
    assert all(c.value is None for c in sampler.generate(prompts, max_new_tokens=3)[0])


def test_load_weights_gives_exactly_the_new_models_outputs():
    tok = char_tokenizer()
    prompts = encode(tok, PROMPTS)
    old, new = spread_policy(seed=0), spread_policy(seed=1)
    sampler = TorchSampler(old, tok)
    before = sampler.generate(prompts, max_new_tokens=16, temperature=0, stop=(), want_values=True)
    sampler.load_weights({k: v.clone() for k, v in new.state_dict().items()})
    after = sampler.generate(prompts, max_new_tokens=16, temperature=0, stop=(), want_values=True)
    ref = TorchSampler(new, tok).generate(prompts, max_new_tokens=16, temperature=0, stop=(),
                                          want_values=True)
    assert [s[0].tokens for s in after] == [s[0].tokens for s in ref] != [s[0].tokens for s in before]
    assert [s[0].logprobs for s in after] == [s[0].logprobs for s in ref]
    assert [s[0].value for s in after] == [s[0].value for s in ref]


def test_in_place_weight_change_is_picked_up():
    """A trainer stepping the very same module (no load_weights) must not leave stale fast weights."""
    policy, tok = spread_policy(), char_tokenizer()
    sampler, prompts = TorchSampler(policy, tok), encode(tok, PROMPTS)
    sampler.generate(prompts, max_new_tokens=4, temperature=0)
    with torch.no_grad():
        for p in policy.lm.parameters():
            p.mul_(1.5)
    (c,) = sampler.generate(prompts[:1], max_new_tokens=8, temperature=0, stop=())[0]
    assert c.tokens == hf_greedy(policy.lm, prompts[0], 8, sampler.eos_ids)
    logp, _ = teacher_forced(policy, prompts[0], c.tokens)
    torch.testing.assert_close(torch.tensor(c.logprobs), logp, rtol=0, atol=1e-4)


def test_forward_tokens_count_each_prompt_once():
    policy, tok = spread_policy(), char_tokenizer()
    sampler, prompt = TorchSampler(policy, tok), tok.encode("(13-4)*3=27")
    (samples,) = sampler.generate([prompt], n=4, max_new_tokens=10, stop=(), want_values=True)
    generated = sum(len(c.tokens) for c in samples)
    assert sampler.tokens_generated == generated
    assert sampler.forward_tokens == len(prompt) + generated  # not 4 * len(prompt)
    # without values the last sampled token of each sample never needs a forward
    sampler.forward_tokens = sampler.tokens_generated = 0
    out = sampler.generate([prompt, prompt, tok.encode("7")], n=2, max_new_tokens=10, stop=())
    generated = sum(len(c.tokens) for s in out for c in s)
    assert sampler.tokens_generated == generated
    assert sampler.forward_tokens == len(prompt) + 1 + generated - 6  # identical prompts: once


SHARED = ["<|im_start|>user\nuse 3 5 7 9 to make 24.<|im_end|>\n",  # > MIN_SHARED_PREFIX tokens
          "<|im_start|>user\nuse 1 2 3 4 to make 10.<|im_end|>\n"]


def test_shared_prefix_groups_by_hand():
    a, b = [1] * 10, [1] * 4 + [2] * 6  # share 4 tokens: too few to group across
    prompts = [a + [3], b + [5], a + [4, 4], b + [6], [9, 9], a + [3, 8]]
    group, prefix = shared_prefix_groups(prompts, min_shared=8)
    # a-prompts: 10 shared tokens each (a+[3] and a+[3,8] share 11, but the group's prefix is the
    # run's minimum); b-prompts: 10; [9, 9] alone: all but its last token in the first pass
    assert prefix == [10, 10, 10, 10, 1, 10]
    assert group[0] == group[2] == group[5] != group[1] == group[3] != group[4]
    assert len({group[0], group[1], group[4]}) == 3
    # saving (3 - 1) * 10 + (2 - 1) * 10 = 30 tokens; with no long shared prefix: no grouping
    assert shared_prefix_groups([a + [3], b + [5]], min_shared=8) == (None, [])
    # a subgroup sharing more is split off only when that saves more: 3 x 20 beats 1 x 10 + ...
    c = [1] * 20
    group, prefix = shared_prefix_groups([c + [1], c + [2], c + [3], a + [7]], min_shared=8)
    assert prefix == [20, 20, 20, 10] and len(set(group)) == 2


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("problems", [1, 2])
def test_common_prefix_encoded_once_gives_the_same_samples(arch, problems):
    """Prompts that share long prefixes (an MCTS round's leaves of one or two trees): each
    prefix is encoded once, each suffix appended after it (pads in the middle of the cache), and
    the results are those of HF generate on each whole prompt; the forward-token count shows
    each prefix counted once."""
    # "llama": the HF-module fallback path (DynamicCache) does the same
    policy = llama_policy() if arch == "llama" else spread_policy()
    tok = char_tokenizer()
    suffixes = ["a", "3+5=8 b", "(9-7)*3=6\nc", "x"]  # ragged: 1..12 tokens
    texts = [SHARED[i % problems] + s for i, s in enumerate(suffixes)]
    prompts = encode(tok, texts)
    # the shared part of each problem's prompts, counted by hand: the template and the problem
    shared = [len(tok.encode(s)) for s in SHARED[:problems]]
    assert min(shared) >= MIN_SHARED_PREFIX
    sampler = TorchSampler(policy, tok)
    out = sampler.generate(prompts, n=2, max_new_tokens=12, temperature=0, stop=(),
                           want_values=True)
    generated = sum(len(c.tokens) for s in out for c in s)
    own = sum(len(p) - shared[i % problems] for i, p in enumerate(prompts))
    assert sampler.forward_tokens == sum(shared) + own + generated
    for p, pair in zip(prompts, out):
        assert pair[0].tokens == pair[1].tokens == hf_greedy(policy.lm, p, 12, sampler.eos_ids)
        logp, value = teacher_forced(policy, p, pair[0].tokens)
        torch.testing.assert_close(torch.tensor(pair[0].logprobs), logp, rtol=0, atol=1e-4)
        assert abs(pair[1].value - value) < 1e-5
    # and sampled log-probs (temperature, top-p) still match teacher forcing
    for p, samples in zip(prompts, sampler.generate(prompts, n=3, max_new_tokens=10,
                                                    temperature=0.9, top_p=0.8, stop=())):
        for c in samples:
            logp, _ = teacher_forced(policy, p, c.tokens)
            torch.testing.assert_close(torch.tensor(c.logprobs), logp, rtol=0, atol=1e-4)


def test_short_common_prefix_is_not_split_off():
    policy, tok = spread_policy(), char_tokenizer()
    sampler = TorchSampler(policy, tok)
    prompts = encode(tok, ["12+3=15", "12+4"])  # 3 shared tokens < MIN_SHARED_PREFIX
    sampler.generate(prompts, max_new_tokens=1, stop=())
    assert sampler.forward_tokens == 7 + 4  # each prompt whole, no step needed after 1 token


def test_bad_arguments_and_backends():
    policy, tok = random_policy(), char_tokenizer()
    sampler = make_sampler("torch", policy, tok, seed=0)
    assert isinstance(sampler, TorchSampler)
    with pytest.raises(ValueError, match="temperature"):
        sampler.generate([[3, 4]], temperature=-1)
    with pytest.raises(ValueError, match="empty prompt"):
        sampler.generate([[]])
    with pytest.raises(ValueError, match="unknown sampler backend"):
        make_sampler("jax", policy, tok)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="needs the vllm package"):
            make_sampler("vllm", policy, tok)


def test_auto_backend_by_model_size(monkeypatch, capsys):
    big = torch.nn.Linear(10_000, 10_000, bias=False, device="meta")  # 1e8 parameters, no memory
    just_below = torch.nn.Linear(9_999, 10_000, bias=False, device="meta")
    monkeypatch.setattr(sampler, "find_spec", lambda name: object())  # vllm "installed"
    assert choose_backend("auto", big) == "vllm"
    assert choose_backend("auto", just_below) == "torch"
    assert (choose_backend("torch", big), choose_backend("vllm", just_below)) == ("torch", "vllm")
    monkeypatch.setattr(sampler, "find_spec", lambda name: None)  # not installed: torch, one note
    assert choose_backend("auto", big) == "torch"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -r requirements-vllm.txt" in err
