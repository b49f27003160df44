"""Shared fixtures. Tests run on the 2-core box: two torch threads."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_test_model(tmp_path_factory) -> Path:
    """The size="test" tiny model (char tokenizer, 2-layer Qwen2, value head), built in seconds."""
    import tiny

    return tiny.build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0, size="test")


@pytest.fixture
def tiny_sampler(tiny_test_model):
    """A seeded TorchSampler over the test-size tiny model: the real-model checks of the search
    methods (trajectories vs a teacher-forced forward) start from it."""
    from sampler import TorchSampler
    from value_head import load_policy

    policy, tokenizer = load_policy(str(tiny_test_model))
    return TorchSampler(policy, tokenizer, seed=0)


@pytest.fixture(scope="session", autouse=True)
def no_child_process_outlives_the_suite():
    """A process left behind by a failed test would hang pytest's exit (multiprocessing joins its
    non-daemon children there): the suite ends by killing any that remain."""
    yield
    import multiprocessing

    for p in multiprocessing.active_children():
        p.kill()


@pytest.fixture(scope="module", autouse=True)
def no_module_leaks_its_process_state():
    """vLLM's in-process engine sets LD_PRELOAD (torch's libgomp), thread-binding variables and
    replaces torch.set_num_threads with a no-op for the rest of the process; every process a
    later test spawns would inherit them. Each test module hands back the state it was given."""
    env, set_threads = dict(os.environ), torch.set_num_threads
    threads, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    yield
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads = set_threads
    torch.set_num_threads(threads)
    os.sched_setaffinity(0, cores)
