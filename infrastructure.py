"""The blog's "Infrastructure" section on torch.multiprocessing: the plumbing under train.py that
a reader of the algorithm may skip. The blog runs Rust + gRPC + Redis; here:

- weights: one copy of the policy's state dict in shared-memory CPU tensors and a version
  counter (the blog's Redis pub/sub): rank 0 publishes, generators load between work items;
- trajectories: a queue of dicts of shared-memory tensors (the blog's Redis stream);
- checkpoints: step-NNNNNN.tmp -> fsync -> rename, then an atomically replaced `latest` pointer
  (the previous checkpoint kept; never non-finite weights; never ahead of metrics.jsonl);
- supervision: spawn the children, write their metric rows and events, show progress, and stop
  everything (exit 1 with the child's traceback) when one fails, dies or stops beating (a
  heartbeat a second; --stall-timeout-s); the first SIGINT/SIGTERM checkpoints the current step
  and exits 130, a second stops at once.

A run directory holds config.json (the flags), metrics.jsonl (one row per step, and the eval
rows), events.jsonl (process starts, weight syncs and publishes, checkpoints) and
checkpoints/step-NNNNNN/ (HF save_pretrained + value_head.safetensors + tokenizer +
trainer_state.pt: optimizer, step, RNG, data positions). `train.py --resume <run dir>`
continues from `latest`. Policy lag = trainer step minus the weight version that generated a
trajectory.

Functions take plain values, not train.Args, so this file imports nothing of ours. Two test
hooks are read from the environment, so they stay out of train.py's --help:
TREESEARCH_CHECKSUMS=1 adds a weights hash to every publish and sync event (tests check that a
sync delivers the published weights bit for bit); TREESEARCH_FAIL_AT=N makes generator 0 raise
when it queues its work item N (tests of failure handling).
"""

import errno
import hashlib
import json
import math
import os
import pickle
import queue
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import synchronize as mp_synchronize
from multiprocessing import util as mp_util
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from tqdm import tqdm

CTX = mp.get_context("spawn")
CHECKSUMS = os.environ.get("TREESEARCH_CHECKSUMS", "") == "1"
FAIL_AT = int(os.environ.get("TREESEARCH_FAIL_AT", "-1"))


def check_flags(prog: str, values: dict, rules: dict[str, tuple[str, ...]]) -> None:
    """Exit with one line at the first flag that breaks its rule: ">= 1", ">= 0",
    "finite >= 0" or "finite > 0" (NaN breaks every rule)."""
    ok = {">= 1": lambda v: v >= 1, ">= 0": lambda v: v >= 0,
          "finite >= 0": lambda v: math.isfinite(v) and v >= 0,
          "finite > 0": lambda v: math.isfinite(v) and v > 0}
    for rule, names in rules.items():
        for name in names:
            if not ok[rule](values[name]):
                raise SystemExit(f"{prog}: error: --{name.replace('_', '-')} must be "
                                 f"{rule.replace('finite', 'a finite number')}, got {values[name]}")


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
    stop: object             # mp.Event: main asks the children to finish
    finish: object           # mp.Event: a clean stop (SIGINT/SIGTERM): rank 0 checkpoints, then done
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
        stop=CTX.Event(), finish=CTX.Event(), logged=CTX.Value("q", logged, lock=False),
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
        while not sh.stop.is_set():
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
            if sh.stop.is_set() or (give_up is not None and give_up()):
                return None
    return batch


def generator_stats(sh: Shared) -> dict:
    """The generators' counters for a metrics row: tokens, weight version, busy share."""
    busy, waited, synced = (sum(a[:]) for a in (sh.gen_busy, sh.gen_wait, sh.gen_sync))
    return {"generated_tokens": sum(sh.gen_tokens[:]), "version": sh.version.value,
            "gen_busy_frac": busy / max(busy + waited + synced, 1e-9),
            "gen_busy_s": busy, "gen_wait_s": waited, "gen_sync_s": synced}


def warn(sh: Shared, step: int, message: str) -> None:
    """A warning the user sees now (stderr) and finds later (events.jsonl)."""
    print(f"train.py: warning: {message}", file=sys.stderr, flush=True)
    sh.log_q.put({"event": "warning", "step": step, "message": message})


class Alarms:
    """The trainer's warnings: every skipped update, and the first time the k3 KL to the start
    model passes `kl_warn` (0: never)."""

    def __init__(self, kl_warn: float):
        self.kl_warn, self.kl_warned, self.skipped = kl_warn, False, 0

    def check(self, sh: Shared, step: int, skipped_step: float, kl: float) -> None:
        if skipped_step:
            self.skipped += 1
            warn(sh, step, f"non-finite gradient norm at step {step}: update skipped "
                           f"({self.skipped} skipped so far; lower --lr / --max-grad-norm?)")
        if self.kl_warn and kl > self.kl_warn and not self.kl_warned:
            self.kl_warned = True
            warn(sh, step, f"KL to the start model {kl:.3f} > --kl-warn {self.kl_warn} at step "
                           f"{step}: the policy is drifting (lower --lr / --max-grad-norm?)")


# Rank 0 evaluates inside the loop (at the blog's scale 820 problems x 16 samples x up to 512
# tokens, plus the search gain) while the other ranks wait in their next all-reduce: a collective
# may wait that long. NCCL's own default is 10 minutes (gloo's 30); a dead rank is still caught
# at once by the supervisor's heartbeats, not by this timeout.
DDP_TIMEOUT = timedelta(hours=2)


def init_process_group(device: torch.device, rank: int, world_size: int, port: int) -> None:
    """Join the trainers' DDP group: nccl on GPU (one rank per GPU: the current device), gloo on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                            init_method=f"tcp://127.0.0.1:{port}", world_size=world_size,
                            timeout=DDP_TIMEOUT)


def global_means(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The values averaged over the trainer ranks (every rank must call it): global-batch means."""
    t = torch.tensor(list(values.values()), device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def restore_trainer(ckpt: str, opt: torch.optim.Optimizer) -> tuple[int, float]:
    """A resumed trainer's optimizer state and RNG from checkpoint `ckpt` -> (its step, its wall
    time); (0, 0.0) for a fresh run (ckpt "")."""
    if not ckpt:
        return 0, 0.0
    state = load_trainer_state(Path(ckpt))
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"], state["wall_time"]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every trainer when it is True on any (e.g. rank 0's clock ends the run for all)."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


# ------------------------------------------------------------------------------------------------
# Checkpoints: step-XXXXXX.tmp -> fsync -> rename -> `latest` pointer via os.replace


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")) + [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(run_dir: Path, policy, tokenizer, state: dict) -> Path:
    """Atomic under kill -9: `latest` only ever names a fully written, renamed directory; the
    previous checkpoint is kept until the next one is written. Non-finite weights are never
    written (FloatingPointError); a full disk is one line, its partial .tmp dir removed."""
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:06d}"
    if not all_finite(policy):  # the run stops here; the last checkpoints stay as they were
        raise FloatingPointError(f"non-finite weights at step {state['step']}: not checkpointed")
    tmp = ckpts / f"{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        policy.save_pretrained(tmp, tokenizer)
        torch.save(state, tmp / "trainer_state.pt")
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as "unexpected pos"
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(ckpts).free < 2**20
        shutil.rmtree(tmp, ignore_errors=True)  # else every later save (and resume) finds less room
        if full:
            raise SystemExit(f"no space left on device: checkpoint {name} not written to {ckpts} "
                             "(the previous one is kept; free space, then --resume)") from None
        raise
    final = ckpts / name
    shutil.rmtree(final, ignore_errors=True)  # a step saved twice (re-run after resume)
    os.replace(tmp, final)
    pointer = ckpts / f"latest.tmp-{os.getpid()}"
    pointer.write_text(name + "\n")
    _fsync_tree(pointer)
    os.replace(pointer, ckpts / "latest")
    _fsync_tree(ckpts)
    steps = sorted(p.name for p in ckpts.glob("step-*") if ".tmp" not in p.name and p.name < name)
    keep = {name, "latest", *steps[-1:]}  # the previous checkpoint too, in case this one is bad
    remove_leftovers(ckpts, keep)
    return final


def remove_leftovers(ckpts: Path, keep: set[str] | None = None) -> None:
    """Delete what killed or failed writers left (`*.tmp-PID`); given `keep`, also every other
    entry not in it (older checkpoints)."""
    for old in ckpts.iterdir() if ckpts.is_dir() else ():
        if ".tmp-" in old.name or (keep is not None and old.name not in keep):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def checkpoint(sh: Shared, run_dir: Path, policy, tokenizer, state: dict) -> bool:
    """Rank 0: the trainer's state plus the generators' data positions and token counts. Waits
    until main has written the step's row, so no checkpoint is ever ahead of metrics.jsonl (a
    resume after kill -9 of main loses no row) -> False if main asked to stop meanwhile."""
    while sh.logged.value < state["step"]:
        if sh.stop.is_set():
            return False
        time.sleep(0.05)
    state = {**state, "data_position": list(sh.data_pos[:]),
             "generated_tokens": list(sh.gen_tokens[:])}
    path = save_checkpoint(run_dir, policy, tokenizer, state)
    sh.log_q.put({"event": "checkpoint", "step": state["step"], "path": str(path),
                  "data_position": state["data_position"]})
    return True


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The directory `latest` points at, or a one-line error."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        raise SystemExit(f"train.py: error: no checkpoint to resume from in {run_dir} (missing {pointer})")
    name = pointer.read_text().strip()
    if not name or not (pointer.parent / name).is_dir():
        raise SystemExit(f"train.py: error: {pointer} names {name!r}, which is not a checkpoint "
                         f"in {pointer.parent}")
    return pointer.parent / name


def load_trainer_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # missing, cut short
        raise SystemExit(f"train.py: error: cannot read {ckpt / 'trainer_state.pt'} "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def keep_rows_until(path: Path, max_step: float) -> None:
    """On resume, drop rows logged after the checkpoint we continue from (they will be redone),
    and a line cut short (a crash or a full disk mid-write), with a warning."""
    if not path.is_file():
        return
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            print(f"train.py: warning: {path}:{i}: dropping a line cut short: {line[:60]!r}",
                  file=sys.stderr)
            continue
        if isinstance(row, dict) and row.get("step", 0) <= max_step:
            rows.append(line)
    path.write_text("".join(r + "\n" for r in rows))


# what a run writes (--overwrite deletes these, nothing else)
RUN_FILES = ("checkpoints", "metrics.jsonl", "events.jsonl", "config.json", "eval_t1.json")


def check_run_dir(out: Path, config: dict, resume: bool, overwrite: bool,
                  same: tuple[str, ...]) -> tuple[dict | None, Path | None]:
    """Before anything is written: a fresh run refuses a non-empty `out` unless `overwrite`; a
    resumed one must agree with its config.json on the keys `same` and not be at config["steps"]
    yet -> (trainer state, checkpoint) to resume from, or (None, None) for a fresh run."""
    if not resume:
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            what = "holds a run" if (out / "checkpoints" / "latest").exists() else "is not empty"
            raise SystemExit(f"train.py: error: {out} {what}; pass --resume {out} to continue it, "
                             "--overwrite to start afresh, or another --out")
        return None, None
    ckpt = latest_checkpoint(out)
    state = load_trainer_state(ckpt)
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"train.py: error: cannot read {out / 'config.json'} ({e})") from None
    for key in same:
        if saved[key] != config[key]:
            raise SystemExit(f"train.py: error: --{key.replace('_', '-')} {config[key]!r} "
                             f"differs from the run being resumed ({saved[key]!r})")
    if state["step"] >= config["steps"]:
        raise SystemExit(f"train.py: error: {out} is already at step {state['step']} >= "
                         f"--steps {config['steps']}")
    return state, ckpt


def claim_run_dir(out: Path, config: dict, resume_step: int | None, overwrite: bool) -> None:
    """Make `out` this run's: a resumed run's logs cut back to its checkpoint's step, or what
    `overwrite` replaces deleted; killed writers' leftovers removed; config.json written."""
    if resume_step is not None:
        keep_rows_until(out / "metrics.jsonl", resume_step)
        keep_rows_until(out / "events.jsonl", math.inf)  # only a line cut short goes
    elif overwrite:
        for name in RUN_FILES:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    remove_leftovers(out / "checkpoints")  # of a writer killed or out of disk space
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"train.py: error: cannot create --out {out} ({e.strerror})") from None
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Supervision: spawn, log, stop


def _heartbeat(parent: int, beats, i: int) -> None:
    """Beat every second for main (a stopped or frozen child stops beating); a child whose main
    process vanished (kill -9) exits instead of running on as an orphan."""
    while os.getppid() == parent:
        beats[i] = time.time()
        time.sleep(1.0)
    os._exit(1)


def _child(name: str, i: int, fn, threads: int, sh: Shared, fn_args: tuple) -> None:
    """Child entry point: its torch thread budget, no SIGINT (main stops us), errors -> main."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_heartbeat, args=(os.getppid(), sh.beats, i), daemon=True).start()
    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    tqdm.set_lock(threading.RLock())  # even a disabled bar would create a named semaphore
    sh.log_q.put({"event": "start", "process": name, "pid": os.getpid()})
    try:
        fn(*fn_args)
    except BaseException as e:  # noqa: BLE001 (any failure, even SystemExit, must reach main)
        one_line = isinstance(e, SystemExit) and isinstance(e.code, str)  # a message for the user
        sh.err_q.put((name, e.code if one_line else traceback.format_exc()))
        sh.err_q.close()
        sh.err_q.join_thread()  # the report is in the pipe before we go
        # no interpreter teardown: native threads (torch, tokenizers) can abort it with SIGABRT
        # ("terminate called without an active exception"), which would hide the report
        os._exit(1)
    finally:
        sh.traj_q.cancel_join_thread()  # never block exit on trajectories nobody will read


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _failed(name: str, report: str) -> str:
    """A child's report: a one-line message on the same line, a traceback below."""
    report = report.rstrip()
    sep = "\n" if "\n" in report else " "
    return f"{name} failed:{sep}{report}"


def _failure(procs: dict, sh: Shared, reports: dict[str, str]) -> str | None:
    """The root cause of a failed run: a child killed by a signal (whose peers then fail on its
    missing shared tensors) unless it reported a traceback before dying, else the first reported
    traceback, else a silent non-zero exit. `reports` collects the tracebacks across calls."""
    while True:
        try:
            name, tb = sh.err_q.get_nowait()
        except queue.Empty:
            break
        reports.setdefault(name, tb)
    for name, p in procs.items():
        if p.exitcode is not None and p.exitcode < 0:
            if name in reports:
                return _failed(name, reports[name])
            return f"{name} died (killed by {signal.Signals(-p.exitcode).name})"
    if reports:
        name, tb = next(iter(reports.items()))
        return _failed(name, tb)
    for name, p in procs.items():
        if p.exitcode is None or (p.exitcode == 0 and name.startswith("trainer")):
            continue
        try:  # it may have reported just before exiting
            name, tb = sh.err_q.get(timeout=2.0)
            return _failed(name, tb)
        except queue.Empty:
            return f"{name} exited early (exit code {p.exitcode})"
    return None


def _stalled(procs: dict, sh: Shared, t_start: float, timeout: float) -> str | None:
    """A child alive but silent (no heartbeat for `timeout` s; start-up gets twice that)."""
    now = time.time()
    for i, (name, p) in enumerate(procs.items()):
        last = sh.beats[i] or t_start + timeout
        if p.is_alive() and now - last > timeout:
            return (f"{name} stopped responding: no heartbeat for {now - last:.0f} s "
                    f"(--stall-timeout-s {timeout}); stopped (SIGSTOP), frozen or swapped out?")
    return None


def _unlink_semaphores(sh: Shared) -> None:
    """Once every child has opened them, the queues' and events' POSIX semaphores need no name in
    /dev/shm (Linux keeps them while open): unlinked now, even kill -9 of the whole process group
    leaves none behind, and no "leaked semaphore objects" warning is possible."""
    def semlocks(obj, depth=0):
        if isinstance(obj, mp_synchronize.SemLock):
            yield obj
        elif depth < 3 and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                yield from semlocks(v, depth + 1)
    names = {lock._semlock.name for lock in semlocks(sh)} - {None}
    for f in list(mp_util._finalizer_registry.values()):  # their unlink-at-exit: done here
        if f._callback is mp_synchronize.SemLock._cleanup and f._args[0] in names:
            f.cancel()
    for name in names:
        mp_synchronize.SemLock._cleanup(name)  # sem_unlink + forget it in the resource tracker


def _stop(procs: dict, sh: Shared, grace: float) -> None:
    """Ask nicely, then SIGTERM, then SIGKILL: bounded, so main never hangs on a stuck child."""
    sh.stop.set()
    deadline = time.time() + grace
    for p in procs.values():
        p.join(timeout=max(0.0, deadline - time.time()))
    for p in procs.values():
        if p.is_alive():
            p.terminate()
    for p in procs.values():
        p.join(timeout=3.0)
        if p.is_alive():
            p.kill()
            p.join()


def supervise(children: dict[str, tuple], sh: Shared, out: Path, t_start: float, threads: int,
              desc: str, time_limit_s: float, steps: int, start_step: int, eval_n: int,
              stall_timeout_s: float) -> int:
    """Start the children ({name: (function, its arguments)}), write their rows to
    metrics.jsonl and events to events.jsonl, show progress until a trainer reports done ->
    0; a failed child, or one silent for stall_timeout_s -> 1 with its traceback or name; the
    first SIGINT / SIGTERM -> the trainer checkpoints its current step, then 130; a second ->
    130 at once. Every exit path stops the children."""
    def on_signal(signum, frame) -> None:  # the first SIGINT/SIGTERM: checkpoint, then stop
        if sh.finish.is_set():
            raise KeyboardInterrupt  # the second: stop now
        sh.finish.set()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a named (leakable) semaphore
    procs = {name: CTX.Process(target=_child, args=(name, i, fn, threads, sh, fn_args))
             for i, (name, (fn, fn_args)) in enumerate(children.items())}
    for p in procs.values():
        p.start()
    eval_key = f"eval_mean_at_{eval_n}"
    # the bar follows whichever limit is set: minutes under --time-limit-min (the default), else steps
    by_time = time_limit_s > 0
    bar = tqdm(total=round(time_limit_s) if by_time else steps,
               initial=0 if by_time else start_step, desc=desc, unit="s" if by_time else "step",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} " + ("s" if by_time else "steps")
               + " {postfix}")
    metrics, events = open(out / "metrics.jsonl", "a"), open(out / "events.jsonl", "a")  # noqa: SIM115
    done, started, finish_by, msg = False, 0, 0.0, None
    reports: dict[str, str] = {}  # child name -> traceback it reported
    try:
        while True:
            try:
                msg = sh.log_q.get(timeout=0.5)
            except queue.Empty:
                msg = None
            if sh.finish.is_set() and not finish_by:
                finish_by = time.time() + stall_timeout_s
                tqdm.write("train.py: stopping: checkpointing the current step first "
                           "(interrupt again to stop at once)")
            done = msg is not None and "done" in msg
            if done:
                break
            if msg is not None and "row" in msg:
                row = msg["row"]
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                sh.logged.value = row["step"]  # a checkpoint of this step may be written now
                if eval_key in row:
                    tqdm.write(f"step {row['step']}: mean@{eval_n} {row[eval_key]:.2%} "
                               f"± {row['eval_ci95']:.2%}, format {row['eval_format_rate']:.1%}")
                if "train_reward" in row:
                    done_now = min(time.time() - t_start, bar.total) if by_time else row["step"]
                    bar.update(round(done_now) - bar.n)
                    bar.set_postfix(step=row["step"], reward=f"{row['train_reward']:.3f}",
                                    lag=f"{row['policy_lag']:.1f}", busy=f"{row['gen_busy_frac']:.0%}")
            elif msg is not None:
                events.write(json.dumps({"wall_time": time.time() - t_start, **msg}) + "\n")
                events.flush()
                started += msg.get("event") == "start"
                if started == len(procs) and msg.get("event") == "start":
                    _unlink_semaphores(sh)  # every child holds them now
            error = _failure(procs, sh, reports) or _stalled(procs, sh, t_start, stall_timeout_s)
            if finish_by and time.time() > finish_by:
                error = f"no checkpoint within --stall-timeout-s {stall_timeout_s} of the stop"
            if error:
                bar.close()
                print(f"train.py: error: {error}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        bar.close()
        print("train.py: interrupted, stopping children", file=sys.stderr)
        return 130
    except OSError as e:  # metrics.jsonl / events.jsonl: a full disk, a vanished directory
        bar.close()
        print(f"train.py: error: cannot write the logs in {out} ({e.strerror})", file=sys.stderr)
        return 1
    finally:  # every exit path, including an error in main itself, stops the children
        _stop(procs, sh, grace=5.0 if done else 1.0)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        metrics.close()
        events.close()
    bar.close()
    if finish_by:
        print(f"train.py: interrupted: stopped at step {msg['done']} with a checkpoint", file=sys.stderr)
        return 130
    return 0


def print_summary(out: Path, eval_n: int, n_problems: int) -> None:
    """mean@n before and after, from the run's metrics.jsonl."""
    eval_key = f"eval_mean_at_{eval_n}"
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if eval_key in r]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        print(f"mean@{eval_n} on {n_problems} test problems: step {first['step']} "
              f"{first[eval_key]:.2%} ± {first['eval_ci95']:.2%} -> step {last['step']} "
              f"{last[eval_key]:.2%} ± {last['eval_ci95']:.2%}")
    print(f"run directory: {out}")
