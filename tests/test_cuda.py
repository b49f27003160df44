"""The same model on CUDA and on CPU: the forward, the torch sampler and train.train_step (through
DDP on one nccl rank, as train.py's trainer runs it on a GPU) agree within float32 kernel noise.
Skipped without a GPU; benchmarks/gpu_check.sh runs them on a lent one."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
from test_sampler import PROMPTS, encode, spread_policy
from test_value_head import char_tokenizer

import infrastructure as infra
import train
from sampler import TorchSampler

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
TOL = {"rtol": 1e-4, "atol": 1e-4}  # float32, different kernels (cuBLAS / SDPA vs CPU)


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 matmuls on the GPU, so the comparison with the CPU is tight."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_forward_on_cuda_matches_cpu():
    policy = spread_policy()
    ids = torch.randint(3, 60, (3, 11))
    with torch.no_grad():
        logits, values = policy(ids)
        logits_gpu, values_gpu = copy.deepcopy(policy).to(CUDA)(ids.to(CUDA))
    torch.testing.assert_close(logits_gpu.cpu(), logits, **TOL)
    torch.testing.assert_close(values_gpu.cpu(), values, **TOL)


def test_sampler_on_cuda_matches_cpu():
    """Greedy tokens equal; log-probs and values close (ragged prompts, the KV-cache decoder)."""
    policy, tok = spread_policy(), char_tokenizer()
    prompts = encode(tok, PROMPTS)
    cpu = TorchSampler(policy, tok, seed=0)
    gpu = TorchSampler(copy.deepcopy(policy).to(CUDA), tok, seed=0)
    assert gpu.device.type == "cuda"
    kw = {"n": 2, "max_new_tokens": 16, "temperature": 0, "stop": (), "want_values": True}
    for a, b in zip(cpu.generate(prompts, **kw), gpu.generate(prompts, **kw), strict=True):
        for ca, cb in zip(a, b, strict=True):
            assert ca.tokens == cb.tokens
            torch.testing.assert_close(torch.tensor(cb.logprobs), torch.tensor(ca.logprobs), **TOL)
            assert cb.value == pytest.approx(ca.value, abs=1e-4)
    sampled = gpu.generate(prompts, n=4, max_new_tokens=8, temperature=1.0, stop=())
    assert all(len(c.tokens) <= 8 and all(math.isfinite(x) for x in c.logprobs)
               for row in sampled for c in row)


def trajectories(tok, n: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    prompts = encode(tok, PROMPTS)
    trajs = []
    for i in range(n):
        tokens = torch.randint(3, 60, (5 + 3 * i,), generator=gen).tolist()
        old = (-torch.rand(len(tokens), generator=gen) * 3).tolist()
        adv = None if i % 2 else 0.5  # mcts with the blog's advantage: the trainer's r - V
        trajs.append(train.trajectory(prompts[i % len(prompts)], tokens, old, float(i % 2), adv, 0))
    return trajs


def test_train_step_on_cuda_through_ddp_nccl_matches_cpu():
    """train.py's trainer on a GPU: DDP over one nccl rank, the same step as on the CPU."""
    tok, args = char_tokenizer(), train.Args(mcts_baseline="value")
    batch = train.collate(trajectories(tok), tok.pad_token_id)
    results = {}
    for device in ("cpu", "cuda"):
        policy = spread_policy().to(device)
        ref = copy.deepcopy(policy).requires_grad_(False)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        data = {k: v.to(device) for k, v in batch.items()}
        if device == "cuda":
            dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{infra.free_port()}",
                                    rank=0, world_size=1)
            try:
                stats = train.train_step(torch.nn.parallel.DistributedDataParallel(policy), ref,
                                         opt, data, args)
                torch.cuda.synchronize()
            finally:
                dist.destroy_process_group()
        else:
            stats = train.train_step(policy, ref, opt, data, args)
        # the gradients of the step (Adam's first update is ~lr x sign(grad): too touchy to compare)
        results[device] = stats, {k: p.grad.cpu() for k, p in policy.named_parameters()}
    (cpu_stats, cpu_grads), (gpu_stats, gpu_grads) = results["cpu"], results["cuda"]
    for key in ("total_loss", "policy_loss", "value_loss", "kl", "grad_norm"):
        assert gpu_stats[key] == pytest.approx(cpu_stats[key], rel=1e-4, abs=1e-6), key
    for k in cpu_grads:
        torch.testing.assert_close(gpu_grads[k], cpu_grads[k], rtol=1e-3, atol=1e-5)
