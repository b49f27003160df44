"""Shared fixtures. Tests run on 2 cores (DEVELOPERS.md)."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_test_model(tmp_path_factory) -> Path:
    """The size="test" tiny model (char tokenizer, 2-layer Qwen2, value head), built in seconds."""
    import tiny

    return tiny.build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0, size="test")
