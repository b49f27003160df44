"""The blog's "Infrastructure" section on torch.multiprocessing: the plumbing under train.py that
a reader of the algorithm may skip. The blog runs Rust + gRPC + Redis; here:

- weights: one copy of the policy's state dict in shared-memory CPU tensors and a version
  counter (the blog's Redis pub/sub): rank 0 publishes, generators load between work items;
- trajectories: a queue of dicts of shared-memory tensors (the blog's Redis stream);
- checkpoints: step-NNNNNN.tmp -> fsync -> rename, then an atomically replaced `latest` pointer;
- supervision: spawn the children, write their metric rows and events, show progress, and stop
  everything (exit 1 with the child's traceback) when one fails, dies, or main is interrupted.

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

import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from tqdm import tqdm

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
    stop: object             # mp.Event: main asks the children to finish
    data_pos: object         # mp.Array: next work item of each generator (checkpointed)
    gen_tokens: object       # mp.Array: tokens sampled by each generator so far
    gen_busy: object         # mp.Array: seconds each generator spent producing trajectories
    gen_wait: object         # mp.Array: seconds each generator spent blocked on a full queue
    gen_sync: object         # mp.Array: seconds each generator spent loading weights


def make_shared(policy: torch.nn.Module, version: int, queue_size: int,
                data_position: list[int], generated_tokens: list[int]) -> Shared:
    """The shared state of a run; one entry per generator in data_position / generated_tokens."""
    G = len(data_position)
    return Shared(
        weights=share_weights(policy), version=CTX.Value("q", version), lock=CTX.Lock(),
        traj_q=CTX.Queue(maxsize=queue_size), log_q=CTX.Queue(), err_q=CTX.Queue(),
        stop=CTX.Event(), data_pos=CTX.Array("q", data_position),
        gen_tokens=CTX.Array("q", generated_tokens),
        gen_busy=CTX.Array("d", G), gen_wait=CTX.Array("d", G), gen_sync=CTX.Array("d", G))


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


def load_shared_weights(sh: Shared, policy: torch.nn.Module) -> None:
    """The weights the run starts from (the model, or the checkpoint it resumes)."""
    with sh.lock:
        policy.load_state_dict(sh.weights)


def publish_weights(sh: Shared, policy: torch.nn.Module, version: int) -> None:
    """Rank 0 -> shared buffer, then bump the version the generators poll."""
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


def next_batch(sh: Shared, size: int) -> list[dict] | None:
    """`size` trajectories from the queue, or None when main asks to stop (timeouts keep the
    trainer responsive to that)."""
    batch = []
    while len(batch) < size:
        try:
            batch.append(sh.traj_q.get(timeout=1.0))
        except queue.Empty:
            if sh.stop.is_set():
                return None
    return batch


def generator_stats(sh: Shared) -> dict:
    """The generators' counters for a metrics row: tokens, weight version, busy share."""
    busy, waited, synced = (sum(a[:]) for a in (sh.gen_busy, sh.gen_wait, sh.gen_sync))
    return {"generated_tokens": sum(sh.gen_tokens[:]), "version": sh.version.value,
            "gen_busy_frac": busy / max(busy + waited + synced, 1e-9),
            "gen_busy_s": busy, "gen_wait_s": waited, "gen_sync_s": synced}


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
    """Atomic under kill -9: `latest` only ever names a fully written, renamed directory."""
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:06d}"
    tmp = ckpts / f"{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, tokenizer)
    torch.save(state, tmp / "trainer_state.pt")
    _fsync_tree(tmp)
    final = ckpts / name
    shutil.rmtree(final, ignore_errors=True)  # a step saved twice (re-run after resume)
    os.replace(tmp, final)
    pointer = ckpts / f"latest.tmp-{os.getpid()}"
    pointer.write_text(name + "\n")
    _fsync_tree(pointer)
    os.replace(pointer, ckpts / "latest")
    _fsync_tree(ckpts)
    for old in ckpts.iterdir():  # older steps and leftovers of killed writers
        if old.name not in (name, "latest"):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return final


def checkpoint(sh: Shared, run_dir: Path, policy, tokenizer, state: dict) -> None:
    """Rank 0: the trainer's state plus the generators' data positions and token counts."""
    state = {**state, "data_position": list(sh.data_pos[:]),
             "generated_tokens": list(sh.gen_tokens[:])}
    path = save_checkpoint(run_dir, policy, tokenizer, state)
    sh.log_q.put({"event": "checkpoint", "step": state["step"], "path": str(path),
                  "data_position": state["data_position"]})


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The directory `latest` points at, or a one-line error."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        raise SystemExit(f"train.py: error: no checkpoint to resume from in {run_dir} (missing {pointer})")
    return pointer.parent / pointer.read_text().strip()


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", weights_only=True)


def keep_rows_until(path: Path, max_step: int) -> None:
    """On resume, drop rows logged after the checkpoint we continue from (they will be redone)."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= max_step]
        path.write_text("".join(r + "\n" for r in rows))


# ------------------------------------------------------------------------------------------------
# Supervision: spawn, log, stop


def _exit_with_parent(parent: int) -> None:
    """A child whose main process vanished (kill -9) exits instead of running on as an orphan."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a run like Ctrl-C: children stopped, exit 130


def _child(name: str, fn, threads: int, sh: Shared, fn_args: tuple) -> None:
    """Child entry point: its torch thread budget, no SIGINT (main stops us), errors -> main."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    sh.log_q.put({"event": "start", "process": name, "pid": os.getpid()})
    try:
        fn(*fn_args)
    except BaseException:  # noqa: BLE001 (any failure, even SystemExit, must reach main)
        sh.err_q.put((name, traceback.format_exc()))
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
                return f"{name} failed:\n{reports[name].rstrip()}"
            return f"{name} died (killed by {signal.Signals(-p.exitcode).name})"
    if reports:
        name, tb = next(iter(reports.items()))
        return f"{name} failed:\n{tb.rstrip()}"
    for name, p in procs.items():
        if p.exitcode is None or (p.exitcode == 0 and name.startswith("trainer")):
            continue
        try:  # it may have reported just before exiting
            name, tb = sh.err_q.get(timeout=2.0)
            return f"{name} failed:\n{tb.rstrip()}"
        except queue.Empty:
            return f"{name} exited early (exit code {p.exitcode})"
    return None


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
              desc: str, time_limit_s: float, steps: int, start_step: int, eval_n: int) -> int:
    """Start the children ({name: (function, its arguments)}), write their rows to
    metrics.jsonl and events to events.jsonl, show progress until a trainer reports done ->
    0; a failed child -> 1 with its traceback; SIGINT / SIGTERM -> 130. Every exit path stops
    the children."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    procs = {name: CTX.Process(target=_child, args=(name, fn, threads, sh, fn_args))
             for name, (fn, fn_args) in children.items()}
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
    done = False
    reports: dict[str, str] = {}  # child name -> traceback it reported
    try:
        while True:
            try:
                msg = sh.log_q.get(timeout=0.5)
            except queue.Empty:
                msg = None
            done = msg is not None and "done" in msg
            if done:
                break
            if msg is not None and "row" in msg:
                row = msg["row"]
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
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
            error = _failure(procs, sh, reports)
            if error:
                bar.close()
                print(f"train.py: error: {error}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        bar.close()
        print("train.py: interrupted, stopping children", file=sys.stderr)
        return 130
    finally:  # every exit path, including an error in main itself, stops the children
        _stop(procs, sh, grace=5.0 if done else 1.0)
        metrics.close()
        events.close()
    bar.close()
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
