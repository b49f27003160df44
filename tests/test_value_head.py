"""Value head range/shapes, save -> load round trip, plain-HF loading, one-line load errors."""

import shutil

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

import tiny
from value_head import PolicyWithValue, ValueHead, load_policy

TAGS = ["</step>", "<answer>", "</answer>"]


def char_tokenizer(single_token_tags: bool = True) -> PreTrainedTokenizerFast:
    """A small character-level tokenizer (51 symbols: fits the random policies' vocabulary);
    tags optionally one token each."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = list("0123456789+-*/=()<> abcdefghijklmnopqrstuvwxyz:,.\n")
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + chars)},
                                     unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    if single_token_tags:
        tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def random_policy(seed: int = 0, vocab_size: int = 64, tie: bool = True, **cfg) -> PolicyWithValue:
    """A small random Qwen2 (2 layers, GQA 4/2 heads) with a random value head, in eval mode."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         max_position_embeddings=512, tie_word_embeddings=tie,
                         bos_token_id=None, eos_token_id=2, pad_token_id=0, **cfg)
    policy = PolicyWithValue(AutoModelForCausalLM.from_config(config))
    # a fresh LayerNorm is the identity and the last Linear is small: randomise so values spread
    for p in policy.value_head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return policy.eval()


def test_value_head_shape_and_range():
    torch.manual_seed(0)
    head = ValueHead(8)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)  # spread the outputs over tanh's range
    v = head(torch.randn(3, 5, 8))
    assert v.shape == (3, 5) and v.dtype == torch.float32
    assert (v.abs() < 1).all() and v.abs().max() > 0.5
    # the head is the blog's MLP: recompute it by hand from its weights
    x = torch.randn(2, 8)
    ln, l1, _, l2, _, l3, _ = head.net
    h = torch.relu(l1(torch.nn.functional.layer_norm(x, (8,), ln.weight, ln.bias)))
    expected = torch.tanh(l3(torch.relu(l2(h)))).squeeze(-1)
    torch.testing.assert_close(head(x), expected)


def test_forward_values_read_final_hidden_state():
    policy = random_policy()
    ids = torch.randint(3, 60, (2, 7))
    logits, values = policy(ids)
    assert logits.shape == (2, 7, 64) and values.shape == (2, 7)
    assert values.dtype == torch.float32 and (values.abs() < 1).all()
    final_hidden = policy.lm.model(ids).last_hidden_state  # post final RMSNorm
    torch.testing.assert_close(values, policy.value_head(final_hidden))
    torch.testing.assert_close(logits, policy.lm.lm_head(final_hidden))


def test_value_head_stays_float32_under_bf16_lm():
    policy = random_policy()
    policy.lm.to(torch.bfloat16)
    logits, values = policy(torch.randint(3, 60, (1, 4)))
    assert logits.dtype == torch.bfloat16 and values.dtype == torch.float32


def test_save_load_round_trip(tmp_path):
    policy, tok = random_policy(seed=1), tiny.build_tokenizer()
    policy.save_pretrained(tmp_path, tokenizer=tok)
    assert (tmp_path / "value_head.safetensors").is_file()
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        logits, values = policy(ids)
        loaded, loaded_tok = load_policy(str(tmp_path))
        logits2, values2 = loaded(ids)
        torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
        torch.testing.assert_close(values2, values, rtol=0, atol=0)
        assert loaded_tok.encode("12</step>") == tok.encode("12</step>")
        # users who only want the policy: plain HF loading of the same directory
        plain = AutoModelForCausalLM.from_pretrained(tmp_path)
        torch.testing.assert_close(plain(ids).logits, logits, rtol=0, atol=0)


def test_missing_value_head_file_gives_seeded_head(tmp_path):
    random_policy(seed=2).lm.save_pretrained(tmp_path)  # e.g. a hub model without a value head
    a, b = PolicyWithValue.from_pretrained(tmp_path), PolicyWithValue.from_pretrained(tmp_path)
    ids = torch.randint(3, 60, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(a(ids)[1], b(ids)[1], rtol=0, atol=0)


@pytest.mark.parametrize("name, message", [
    ("./no/such/dir", "no such local directory"),
    ("no-such-org/no-such-model-xyz", "not a local directory"),
])
def test_bad_model_name_is_one_line_error(name, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the CI box has no hub; make it so everywhere
    with pytest.raises(SystemExit) as err:
        load_policy(name)
    text = str(err.value)
    assert message in text and name in text and "\n" not in text


def test_run_directory_and_latest_pointer_load_the_latest_checkpoint(tmp_path):
    # a train.py run layout: checkpoints/step-000002/ (the policy) and checkpoints/latest
    ckpts = tmp_path / "run" / "checkpoints"
    policy, tok = random_policy(seed=3), char_tokenizer()
    policy.save_pretrained(ckpts / "step-000002", tokenizer=tok)
    random_policy(seed=4).save_pretrained(ckpts / "step-000001", tokenizer=tok)  # an older one
    (ckpts / "latest").write_text("step-000002\n")
    ids = torch.randint(3, 60, (1, 7))
    with torch.no_grad():
        expected = policy(ids)[0]
        for where in (tmp_path / "run", ckpts / "latest", ckpts / "step-000002"):
            loaded, _ = load_policy(str(where))
            torch.testing.assert_close(loaded(ids)[0], expected, rtol=0, atol=0)


def _cut(name):
    def cut(d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:len(data) // 2])
    return cut


@pytest.mark.parametrize("damage", [
    lambda d: [p.unlink() for p in d.iterdir()],                    # an empty directory
    lambda d: (d / "config.json").write_text('{"model_type": '),    # corrupt config.json
    lambda d: (d / "model.safetensors").unlink(),                   # config without weights
    _cut("model.safetensors"), _cut("value_head.safetensors"), _cut("tokenizer.json"),
], ids=["empty", "corrupt-config", "no-weights", "cut-weights", "cut-value-head", "cut-tokenizer"])
def test_broken_model_dir_is_one_line_error(tiny_test_model, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_test_model, model)
    damage(model)
    with pytest.raises(SystemExit) as err:
        load_policy(str(model))
    text = str(err.value)
    assert text.startswith(f"cannot load model {str(model)!r}: checkpoint is incomplete or corrupt (")
    assert "\n" not in text


@pytest.mark.parametrize("pointer", ["step-000009\n", ""])
def test_latest_naming_no_checkpoint_is_one_line_error(tmp_path, pointer):
    ckpts = tmp_path / "run" / "checkpoints"
    random_policy().save_pretrained(ckpts / "step-000002", tokenizer=char_tokenizer())
    (ckpts / "latest").write_text(pointer)
    with pytest.raises(SystemExit) as err:
        load_policy(str(tmp_path / "run"))
    assert str(err.value) == (f"{ckpts / 'latest'} names {pointer.strip()!r}, which is not a "
                              f"checkpoint in {ckpts}")


def test_machine_names_the_cpu_generation_and_kernel_isa():
    """Two boxes both called "AMD EPYC" built different tiny models: the record must tell CPU
    generations (family / model from /proc/cpuinfo, read here independently) and the vector ISA
    torch dispatches to apart."""
    from pathlib import Path

    from value_head import machine
    record = machine()
    assert f", {torch.backends.cpu.get_cpu_capability()}, " in record
    assert record.endswith(f"torch {torch.__version__}")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        family = next((line.split(":")[1].strip() for line in cpuinfo.read_text().splitlines()
                       if line.startswith("cpu family")), None)
        if family is not None:
            assert f"(family {family}, model " in record
