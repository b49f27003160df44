"""The blog's "Infrastructure" section on torch.multiprocessing: the plumbing under train.py that
a reader of the algorithm may skip. The blog runs Rust + gRPC + Redis; here:

- weights: one copy of the policy's state dict in shared-memory CPU tensors and a version
  counter (the blog's Redis pub/sub): rank 0 publishes, generators load between work items;
- trajectories: a queue of dicts of shared-memory tensors (the blog's Redis stream);
- DDP: the trainers' process group (gloo on CPU, nccl on GPU) and its two collectives.

Policy lag = trainer step minus the weight version that generated a trajectory. The run
directory and its checkpoints are rundir.py; starting, watching and stopping the processes is
supervise.py.

Functions take plain values, not train.Args, so this file imports nothing of ours. Two test
hooks are read from the environment, so they stay out of train.py's --help:
TREESEARCH_CHECKSUMS=1 adds a weights hash to every publish and sync event (tests check that a
sync delivers the published weights bit for bit); TREESEARCH_FAIL_AT=N makes generator 0 raise
when it queues its work item N (tests of failure handling).
"""

import hashlib
import os
import queue
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CTX = mp.get_context("spawn")
CHECKSUMS = os.environ.get("TREESEARCH_CHECKSUMS", "") == "1"
FAIL_AT = int(os.environ.get("TREESEARCH_FAIL_AT", "-1"))


def device_for(index: int) -> torch.device:
    """Generators take the first GPUs, trainers the next ones (wrapping around); CPU otherwise."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", index % torch.cuda.device_count())


# ------------------------------------------------------------------------------------------------
# Shared state: the weights buffer (blog: Redis pub/sub) and the trajectory queue (Redis stream)


@dataclass
class Shared:
    weights: dict            # PolicyWithValue state dict in shared-memory CPU tensors
    version: object          # mp.Value: optimizer step whose weights are in `weights`
    lock: object             # guards `weights` during publish / load
    traj_q: object           # generator -> trainer trajectories (dicts of shared-memory tensors)
    log_q: object            # children -> main: metric rows and events
    err_q: object            # children -> main: (process name, traceback text)
    exit_now: object         # mp.Event: main stops the run: every child exits at once
    save_and_exit: object    # mp.Event: a signal came (SIGINT/SIGTERM): rank 0 checkpoints, then done
    logged: object           # mp.Value: the last step main has written to metrics.jsonl
    beats: object            # mp.Array: each child's last heartbeat (time.time())
    data_pos: object         # mp.Array: next work item of each generator (checkpointed)
    gen_tokens: object       # mp.Array: tokens sampled by each generator so far
    gen_busy: object         # mp.Array: seconds each generator spent producing trajectories
    gen_wait: object         # mp.Array: seconds each generator spent blocked on a full queue
    gen_sync: object         # mp.Array: seconds each generator spent loading weights


def make_shared(policy: torch.nn.Module, resumed: dict | None, n_generators: int,
                n_children: int, queue_size: int) -> Shared:
    """The shared state of a run: fresh, or `resumed` from a checkpoint's trainer state (its step
    is the weights' version and the last step in metrics.jsonl; each generator's data position
    and generated tokens go on). One heartbeat per child."""
    G = n_generators
    version, logged = (resumed["step"], resumed["step"]) if resumed else (0, -1)
    data_position = resumed["data_position"] if resumed else [0] * G
    generated_tokens = resumed["generated_tokens"] if resumed else [0] * G
    # counters without a lock (one writer per entry): a child stopped or killed while holding
    # one would block every reader
    return Shared(
        weights=share_weights(policy), version=CTX.Value("q", version), lock=CTX.Lock(),
        traj_q=CTX.Queue(maxsize=queue_size), log_q=CTX.Queue(), err_q=CTX.Queue(),
        exit_now=CTX.Event(), save_and_exit=CTX.Event(), logged=CTX.Value("q", logged, lock=False),
        beats=CTX.Array("d", n_children, lock=False),
        data_pos=CTX.Array("q", data_position, lock=False),
        gen_tokens=CTX.Array("q", generated_tokens, lock=False),
        gen_busy=CTX.Array("d", G, lock=False), gen_wait=CTX.Array("d", G, lock=False),
        gen_sync=CTX.Array("d", G, lock=False))


def share_weights(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU shared-memory copy of the state dict; tied tensors (embeddings/lm_head) stay one tensor."""
    by_ptr, shared = {}, {}
    for k, v in policy.state_dict().items():
        if v.data_ptr() not in by_ptr:
            by_ptr[v.data_ptr()] = v.detach().to("cpu", copy=True).share_memory_()
        shared[k] = by_ptr[v.data_ptr()]
    return shared


def weights_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """Order-independent exact fingerprint of a state dict, to check that a sync delivered the
    trainer's weights bit for bit."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def log_checksum(sh: Shared, rank: int, step: int, policy: torch.nn.Module) -> None:
    """Under TREESEARCH_CHECKSUMS=1 (tests), every rank logs its weights' checksum each step."""
    if CHECKSUMS:
        sh.log_q.put({"event": "weights", "rank": rank, "step": step,
                      "checksum": weights_checksum(policy.state_dict())})


def load_shared_weights(sh: Shared, policy: torch.nn.Module) -> None:
    """The weights the run starts from (the model, or the checkpoint it resumes)."""
    with sh.lock:
        policy.load_state_dict(sh.weights)


def all_finite(policy: torch.nn.Module) -> bool:
    """No inf/NaN weight: checked before weights are published or checkpointed."""
    return all(torch.isfinite(v).all() for v in policy.state_dict().values() if v.is_floating_point())


def publish_weights(sh: Shared, policy: torch.nn.Module, version: int) -> None:
    """Rank 0 -> shared buffer, then bump the version the generators poll."""
    if not all_finite(policy):
        raise FloatingPointError(f"non-finite weights at step {version}: not published")
    with sh.lock:
        for k, v in policy.state_dict().items():
            sh.weights[k].copy_(v.detach())
        sh.version.value = version
    event = {"event": "publish", "version": version}
    if CHECKSUMS:
        event["checksum"] = weights_checksum(policy.state_dict())
    sh.log_q.put(event)


def pull_weights(sh: Shared, g: int, sampler, data_position: int) -> int:
    """Generator g loads the published weights into its sampler -> their version."""
    t0 = time.perf_counter()
    with sh.lock:
        version = sh.version.value
        sampler.load_weights(sh.weights)
    dt = time.perf_counter() - t0
    sh.gen_sync[g] += dt
    event = {"event": "sync", "generator": g, "version": version, "seconds": round(dt, 4),
             "data_position": data_position}
    if CHECKSUMS:
        event["checksum"] = weights_checksum(sampler.policy.state_dict())
    sh.log_q.put(event)
    return version


def queue_trajectories(sh: Shared, g: int, trajs: list[dict], next_position: int,
                       tokens: int, busy_s: float) -> None:
    """Generator g's bookkeeping after a work item, then a blocking put of each trajectory that
    gives up when main asks to stop."""
    if g == 0 and next_position - 1 == FAIL_AT:
        raise RuntimeError(f"TREESEARCH_FAIL_AT: generator {g} fails at work item {FAIL_AT} on purpose")
    sh.data_pos[g] = next_position
    sh.gen_tokens[g] = tokens
    sh.gen_busy[g] += busy_s
    for t in trajs:
        t0 = time.perf_counter()
        while not sh.exit_now.is_set():
            try:
                sh.traj_q.put(t, timeout=0.5)
                break
            except queue.Full:
                pass
        sh.gen_wait[g] += time.perf_counter() - t0


def next_batch(sh: Shared, size: int, give_up: Callable[[], bool] | None = None
               ) -> list[dict] | None:
    """`size` trajectories from the queue, or None when main asks to stop or, while the queue
    is empty, `give_up()` says so (a time limit or a stop request that must hold even when no
    step completes). Timeouts keep the trainer responsive to both."""
    batch = []
    while len(batch) < size:
        try:
            batch.append(sh.traj_q.get(timeout=1.0))
        except queue.Empty:
            if sh.exit_now.is_set() or (give_up is not None and give_up()):
                return None
    return batch


def generator_stats(sh: Shared) -> dict:
    """The generators' counters for a metrics row: tokens, weight version, busy share."""
    busy, waited, synced = (sum(a[:]) for a in (sh.gen_busy, sh.gen_wait, sh.gen_sync))
    return {"generated_tokens": sum(sh.gen_tokens[:]), "version": sh.version.value,
            "gen_busy_frac": busy / max(busy + waited + synced, 1e-9),
            "gen_busy_s": busy, "gen_wait_s": waited, "gen_sync_s": synced}


# Rank 0 evaluates inside the loop (at the blog's scale 820 problems x 16 samples x up to 512
# tokens, plus the search gain) while the other ranks wait in their next all-reduce: a collective
# may wait that long. NCCL's own default is 10 minutes (gloo's 30); a dead rank is still caught
# at once by the supervisor's heartbeats, not by this timeout.
DDP_TIMEOUT = timedelta(hours=2)


def init_process_group(device: torch.device, rank: int, world_size: int, port: int,
                       timeout: timedelta = DDP_TIMEOUT) -> None:
    """Join the trainers' DDP group: nccl on GPU (one rank per GPU: the current device), gloo on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                            init_method=f"tcp://127.0.0.1:{port}", world_size=world_size,
                            timeout=timeout)


def global_means(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The values averaged over the trainer ranks (every rank must call it): global-batch means."""
    t = torch.tensor(list(values.values()), device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every trainer when it is True on any (e.g. rank 0's clock ends the run for all)."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0




def free_port() -> int:
    """A free TCP port for the trainers' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
