"""benchmarks/gpu_check.sh where CI runs: its arguments are checked, and without CUDA it says so
and exits 0 (on a GPU box the same call would run the whole check: those cases skip there)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def gpu_check(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *flags],
                          capture_output=True, text=True, timeout=120, check=False)


def test_help():
    r = gpu_check("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: benchmarks/gpu_check.sh")


@pytest.mark.parametrize("flags, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--size", "7b"], "--size takes 1.5b or 0.5b, got '7b'"),
    (["--size"], "--size takes 1.5b or 0.5b, got ''"),
])
def test_bad_arguments_exit_2_with_one_line(flags, message):
    r = gpu_check(*flags)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"gpu_check.sh: error: {message} (see --help)\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole check")
@pytest.mark.parametrize("flags", [[], ["--size", "0.5b"]])
def test_without_cuda_it_says_so_and_exits_0(flags):
    r = gpu_check(*flags)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("gpu_check.sh: no CUDA device here")
    assert r.stdout.count("\n") == 1  # that one line: nothing was run
