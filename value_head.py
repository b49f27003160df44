"""Policy + value head: one LM forward gives the policy logits and V(s_t) at every position.

Blog: "a value head V(s_t) ... implemented as an MLP followed by a tanh function applied to the
final hidden state of the transformer". MCTS reads V at step boundaries; the trainer at every token.
"""

import hashlib
import os
import platform
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """LayerNorm -> Linear(h,4h) -> ReLU -> Linear(4h,h) -> ReLU -> Linear(h,1) -> tanh (blog author's code)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        h = hidden_size
        self.net = nn.Sequential(
            nn.LayerNorm(h), nn.Linear(h, 4 * h), nn.ReLU(), nn.Linear(4 * h, h), nn.ReLU(),
            nn.Linear(h, 1), nn.Tanh(),
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [..., h] -> values [...] in (-1, 1), computed in float32."""
        return self.net(hidden.float()).squeeze(-1)


def seeded_value_head(hidden_size: int, seed: int = 0) -> ValueHead:
    """A fresh value head whose init does not depend on (or disturb) the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ValueHead(hidden_size)


class PolicyWithValue(nn.Module):
    """Any AutoModelForCausalLM plus a float32 value head on its final (post-norm) hidden state."""

    def __init__(self, lm: nn.Module, value_head: ValueHead | None = None):
        super().__init__()
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size
        self.value_head = value_head if value_head is not None else seeded_value_head(hidden)
        self.value_head.float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> (logits [B,T,V] in the LM's dtype, values [B,T] float32); V(s_t) reads position t."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids, output_hidden_states=True, use_cache=False)
        return out.logits, self.value_head(out.hidden_states[-1])

    def save_pretrained(self, path: str | os.PathLike,
                        tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """LM in HF format (loads with plain AutoModelForCausalLM) + value_head.safetensors."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(path)
        state = {k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
        save_file(state, str(path / VALUE_HEAD_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        **kw) -> "PolicyWithValue":
        """Load the LM (local dir or hub id); the value head from its file, else a seeded fresh one."""
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
        lm.eval()
        head = seeded_value_head(lm.config.get_text_config().hidden_size)
        head_file = Path(path) / VALUE_HEAD_FILE
        if head_file.is_file():
            head.load_state_dict(load_file(str(head_file)))
        return cls(lm, head)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of huggingface_hub's 30 s of retries when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _named_by(pointer: Path) -> Path:
    """The checkpoint directory a `latest` pointer file names, or a one-line error."""
    name = pointer.read_text().strip()
    if not name or not (pointer.parent / name).is_dir():
        raise SystemExit(f"{pointer} names {name!r}, which is not a checkpoint in {pointer.parent}")
    return pointer.parent / name


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a train.py run directory's `checkpoints/latest` names, or a one-line error."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        raise SystemExit(f"no checkpoint in {run_dir} (missing {pointer})")
    return _named_by(pointer)


def resolve_checkpoint(path: Path) -> Path:
    """A train.py run directory or its `checkpoints/latest` pointer file -> the checkpoint
    directory it names; any other path unchanged."""
    if path.is_dir() and (path / "checkpoints" / "latest").is_file():
        path = path / "checkpoints" / "latest"
    return _named_by(path) if path.is_file() and path.name == "latest" else path


def model_checksum(model: str) -> str | None:
    """Fingerprint of a local model's weight files (blake2b of every *.safetensors, by name), or
    None for a hub id. The tiny default is built on each box, and two CPUs' float rounding can
    build different start models: runs are compared only with runs from the same start."""
    path = resolve_checkpoint(Path(model).expanduser())
    if not path.is_dir():
        return None
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        with f.open("rb") as weights:  # in 16 MiB pieces: a real model's files are gigabytes
            while piece := weights.read(1 << 24):
                h.update(piece)
    return h.hexdigest()


def machine() -> str:
    """The CPU (name, family / model numbers, the vector ISA torch's kernels dispatch to) and the
    torch version: what decides float rounding, hence the tiny model's build and sampled tokens
    (two boxes both named "AMD EPYC" built different tiny models)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first core's entry
    except OSError:
        pass
    cpu = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    return (f"{cpu}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}")


def load_policy(model: str, dtype: torch.dtype = torch.float32
                ) -> tuple[PolicyWithValue, PreTrainedTokenizerBase]:
    """A local directory (a saved policy, a train.py run directory or its checkpoints/latest: the
    latest checkpoint) or a HF hub id. The entry scripts turn `tiny` into the cached tiny model's
    directory first (`tiny.resolve_model`)."""
    path = resolve_checkpoint(Path(model).expanduser())
    if path.is_dir():
        try:
            return PolicyWithValue.from_pretrained(path, dtype), AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # empty, corrupt, cut short
            where = "" if path == Path(model).expanduser() else f" {path}"
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SystemExit(f"cannot load model {model!r}: checkpoint{where} is incomplete or "
                             f"corrupt ({reason})") from None
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise SystemExit(f"cannot load model {model!r}: no such local directory")
    try:  # already in the local HF cache: no network needed
        return (PolicyWithValue.from_pretrained(model, dtype, local_files_only=True),
                AutoTokenizer.from_pretrained(model, local_files_only=True))
    except OSError:
        pass
    if not _hub_reachable():
        raise SystemExit(f"cannot load model {model!r}: not a local directory and the HF hub "
                         "is unreachable (offline)")
    try:
        return PolicyWithValue.from_pretrained(model, dtype), AutoTokenizer.from_pretrained(model)
    except OSError as e:
        raise SystemExit(f"cannot load model {model!r}: not a local directory and not found on "
                         f"the HF hub ({str(e).splitlines()[0]})") from None
