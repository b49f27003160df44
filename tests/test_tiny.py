"""The embedded tiny default: char tokenizer, Qwen chat template, deterministic warm start, cache."""

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import countdown
import tiny
from value_head import PolicyWithValue, load_policy, model_checksum

TAGS = (countdown.STEP_END, countdown.ANSWER_OPEN, countdown.ANSWER_CLOSE)


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def problems():
    train, test = countdown.make_splits(0, n_train=64)
    return train + test[:64]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(path / "model.safetensors")),
            **{f"value_head.{k}": v for k, v in load_file(str(path / "value_head.safetensors")).items()}}


def test_round_trip_one_token_per_char(tok, problems):
    for p in problems:
        text = countdown.make_prompt(p, tok) + countdown.solution_trace(p) + tiny.IM_END
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        # every character is one token, except the 3 tags and the 3 chat markers (one each)
        multi = [*TAGS, tiny.IM_START, tiny.IM_END]
        assert len(ids) == len(text) - sum(text.count(t) * (len(t) - 1) for t in multi)
    for text in ["  a\n\n b ", "tab\there, crlf\r\n", "héllo ✓"]:  # no spaces added or lost
        assert tok.decode(tok.encode(text)) == text
        assert len(tok.encode(text)) == len(text.encode())  # one token per byte


def test_step_tags_are_single_non_special_tokens(tok):
    for tag in TAGS:
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] not in tok.all_special_ids
        assert tok.decode(tok.encode(f"1+2=3{tag}"), skip_special_tokens=True) == f"1+2=3{tag}"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    text = "<|im_start|>assistant\n1+2=3</step><|im_end|><|endoftext|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "assistant\n1+2=3</step>"


def test_chat_template_is_qwens(tok, problems):
    for p in problems[:5]:
        message = countdown.make_prompt(p, style="short")[:-1]  # plain text ends with a newline
        assert message == f"Use {' '.join(map(str, p.nums))} to make {p.target}."
        expected = f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
        assert countdown.make_prompt(p, tok) == expected


def test_tokenizer_save_load_round_trip(tok, problems, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for p in problems[:5]:
        text = countdown.make_prompt(p, tok) + countdown.solution_trace(p)
        assert countdown.make_prompt(p, loaded) == countdown.make_prompt(p, tok)
        assert loaded.encode(text) == tok.encode(text)
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert loaded.encode(TAGS[0], add_special_tokens=False) == tok.encode(TAGS[0])


def test_unknown_size_is_one_line_error(tok):
    with pytest.raises(ValueError, match="unknown tiny size 'huge'"):
        tiny.tiny_config(tok, "huge")


def test_collate_masks_prompt_and_padding():
    ids, labels = tiny.collate([([5, 6, 7], [8, 9]), ([5], [4])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 8, 9], [-100, 4, -100, -100, -100]]


def test_completion_loss_is_mean_ce_over_completion_tokens():
    """Against a hand-computed cross entropy from a fake LM with fixed logits."""
    logits = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0))

    class FakeLM(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": logits})

    ids, labels = tiny.collate([([1, 2], [3, 4])], pad_id=0)
    logp = logits.log_softmax(-1)[0]
    expected = -(logp[1, 3] + logp[2, 4]) / 2  # position t predicts token t+1
    assert torch.allclose(tiny.completion_loss(FakeLM(), ids, labels), expected)


def test_test_build_loads_as_policy_and_as_plain_causal_lm(tiny_test_model, tok, problems):
    policy = PolicyWithValue.from_pretrained(tiny_test_model)
    plain = AutoModelForCausalLM.from_pretrained(tiny_test_model).eval()
    assert plain.config.model_type == "qwen2" and plain.config.tie_word_embeddings
    assert plain.config.vocab_size == len(tok) and plain.config.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok.encode(countdown.make_prompt(problems[0], tok))])
    with torch.no_grad():
        logits, values = policy(ids)
        assert torch.equal(logits, plain(input_ids=ids).logits)
    assert values.shape == ids.shape and values.abs().max() < 1
    # the checkpoint's tokenizer encodes exactly as the one the model was trained with: next to a
    # qwen2 config.json, AutoTokenizer always rebuilds a Qwen2Tokenizer (any other char-level
    # pipeline would come back with Qwen's pre-tokenizer and lose spaces and newlines)
    loaded = AutoTokenizer.from_pretrained(tiny_test_model)
    for p in problems[:5]:
        text = countdown.make_prompt(p, loaded) + countdown.solution_trace(p) + tiny.IM_END
        assert loaded.encode(text) == tok.encode(text) and loaded.decode(tok.encode(text)) == text


def test_test_build_is_deterministic_and_atomic(tiny_test_model, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    (again / "stale.txt").write_text("from an older build")
    tiny.build_tiny(again, seed=0, size="test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp dir left behind
    assert not (again / "stale.txt").exists()
    a, b = weights(tiny_test_model), weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = weights(tiny.build_tiny(tmp_path / "seed1", seed=1, size="test"))
    assert not torch.equal(a["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert not torch.equal(a["value_head.net.1.weight"], other["value_head.net.1.weight"])


def test_warm_start_learns_the_traces(tiny_test_model, tok):
    """Held-out (test split) trace loss falls well below the same seed's untrained init."""
    _, test = countdown.make_splits(0, n_train=1)  # the test split does not depend on n_train
    ids, labels = tiny.collate(tiny.sft_examples(test[:64], tok), tok.pad_token_id)
    torch.manual_seed(0)  # build_tiny's init
    fresh = AutoModelForCausalLM.from_config(tiny.tiny_config(tok, "test")).eval()
    trained = AutoModelForCausalLM.from_pretrained(tiny_test_model).eval()
    with torch.no_grad():
        before = tiny.completion_loss(fresh, ids, labels).item()
        after = tiny.completion_loss(trained, ids, labels).item()
    assert before > 4.0  # ~ln(vocab) = ln(102) = 4.6 at init
    assert after < before - 1.5


def test_ensure_tiny_builds_once_under_a_lock(tmp_path, monkeypatch):
    """The second caller reaches the lock while the first is still building (events, no sleep):
    it waits, then finds the model built instead of building it again."""
    calls, building, release, second_at_lock = [], *(threading.Event() for _ in range(3))

    def fake_build(out_dir, seed=0, size="default"):
        calls.append(seed)
        building.set()
        release.wait(60)  # until the other caller is at the lock
        Path(out_dir).mkdir(parents=True)
        return Path(out_dir)

    real_flock = tiny.fcntl.flock

    def flock(fd, op):
        if building.is_set():  # only the second caller gets here during the build
            second_at_lock.set()
        return real_flock(fd, op)

    monkeypatch.setattr(tiny, "build_tiny", fake_build)
    monkeypatch.setattr(tiny.fcntl, "flock", flock)
    monkeypatch.setenv("TREESEARCH_CACHE", str(tmp_path))
    results = []
    threads = [threading.Thread(target=lambda: results.append(tiny.ensure_tiny(3)))
               for _ in range(2)]
    threads[0].start()
    assert building.wait(60)
    threads[1].start()
    assert second_at_lock.wait(60)
    release.set()
    for t in threads:
        t.join()
    assert calls == [3]
    assert results == [tmp_path / f"{tiny.CACHE_VERSION}-seed3"] * 2
    assert tiny.ensure_tiny(3) == results[0] and calls == [3]  # cached: no rebuild
    tiny.ensure_tiny(3, cache_dir=tmp_path / "elsewhere")
    assert calls == [3, 3] and (tmp_path / "elsewhere" / f"{tiny.CACHE_VERSION}-seed3").is_dir()


@pytest.mark.slow
def test_default_is_well_formatted_but_weak():
    """The blog's pre-RL instruct model: format >= 90%, 3% <= mean@16 <= 15% (blog: 3.1%)."""
    from eval import evaluate
    from sampler import TorchSampler

    path = tiny.resolve_model("tiny")  # the shipped start model
    sampler = TorchSampler(PolicyWithValue.from_pretrained(path),
                           AutoTokenizer.from_pretrained(path), seed=0)
    _, test = countdown.make_splits(0)
    r = evaluate(sampler, test[:200], n=16, temperature=1.0, progress=False)
    assert r["format_rate"] >= 0.9
    assert 0.03 <= r["mean_at_n"] <= 0.15


def test_the_shipped_start_model_is_the_one_every_result_used():
    """The repository's tiny_model/ weights hash to tiny.SHIPPED_CHECKSUM, which every committed
    run records as its start_checksum and the shipped start evals as their checkpoint_checksum."""
    assert model_checksum(str(tiny.SHIPPED)) == tiny.SHIPPED_CHECKSUM
    for t in (1.0, 0.2):
        start = tiny.start_eval(t)
        assert start["checkpoint_checksum"] == tiny.SHIPPED_CHECKSUM
        assert (start["n_problems"], start["n_samples"], start["temperature"]) == (820, 16, t)
        assert start["mean_at_n"] == pytest.approx(sum(start["per_problem"]) / 820)


def test_model_tiny_loads_the_shipped_model_and_never_builds(tmp_path, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("--model tiny started a build")
    monkeypatch.setattr(tiny, "build_tiny", no_build)
    monkeypatch.setenv("TREESEARCH_CACHE", str(tmp_path / "cache"))
    path = tiny.resolve_model("tiny")
    assert Path(path) == tiny.SHIPPED
    policy, tok = load_policy(path)
    assert tok.convert_tokens_to_ids("</step>") != tok.unk_token_id
    assert sum(p.numel() for p in policy.parameters()) > 500_000
    assert not (tmp_path / "cache").exists()  # nothing built, nothing cached
    assert tiny.resolve_model("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"


def test_a_missing_shipped_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "SHIPPED", tmp_path / "tiny_model")
    with pytest.raises(SystemExit, match="shipped tiny model is missing.*git checkout"):
        tiny.resolve_model("tiny")
