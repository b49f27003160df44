"""Process supervision (the blog's "Infrastructure": plumbing under train.py): spawn the
children, write their metric rows and events, show progress, and stop everything (exit 1 with
the child's traceback) when one fails, dies or stops beating (a heartbeat a second;
--stall-timeout-s). The first SIGINT/SIGTERM asks rank 0 to checkpoint the current step
(`Shared.save_and_exit`) and exits 130; a second stops at once (`Shared.exit_now`, which every
exit path sets).
"""

import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from multiprocessing import synchronize as mp_synchronize
from multiprocessing import util as mp_util
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from infrastructure import CTX, Shared


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
    sh.exit_now.set()
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


def _on_signals(sh: Shared) -> None:
    """The first SIGINT/SIGTERM: rank 0 checkpoints, then the run stops; the second: stop now."""
    def on_signal(signum, frame) -> None:
        if sh.save_and_exit.is_set():
            raise KeyboardInterrupt
        sh.save_and_exit.set()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def _start(children: dict[str, tuple], sh: Shared, threads: int) -> dict:
    """Spawn the children ({name: (function, its arguments)}) -> {name: process}."""
    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a named (leakable) semaphore
    procs = {name: CTX.Process(target=_child, args=(name, i, fn, threads, sh, fn_args))
             for i, (name, (fn, fn_args)) in enumerate(children.items())}
    for p in procs.values():
        p.start()
    return procs


class RunLog:
    """Main's side of the log queue: rows -> metrics.jsonl and the progress bar (minutes under
    --time-limit-min, the default, else steps), events -> events.jsonl."""

    def __init__(self, out: Path, t_start: float, desc: str, time_limit_s: float, steps: int,
                 start_step: int, eval_n: int):
        self.t_start, self.eval_n, self.by_time = t_start, eval_n, time_limit_s > 0
        unit = "s" if self.by_time else "steps"
        self.bar = tqdm(total=round(time_limit_s) if self.by_time else steps,
                        initial=0 if self.by_time else start_step, desc=desc,
                        unit="s" if self.by_time else "step",
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} " + unit + " {postfix}")
        self.metrics = open(out / "metrics.jsonl", "a")  # noqa: SIM115
        self.events = open(out / "events.jsonl", "a")  # noqa: SIM115
        self.started = 0

    def row(self, row: dict) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        eval_key = f"eval_mean_at_{self.eval_n}"
        if eval_key in row:
            tqdm.write(f"step {row['step']}: mean@{self.eval_n} {row[eval_key]:.2%} "
                       f"± {row['eval_ci95']:.2%}, format {row['eval_format_rate']:.1%}")
        if "train_reward" in row:
            bar = self.bar
            done = min(time.time() - self.t_start, bar.total) if self.by_time else row["step"]
            bar.update(round(done) - bar.n)
            bar.set_postfix(step=row["step"], reward=f"{row['train_reward']:.3f}",
                            lag=f"{row['policy_lag']:.1f}", busy=f"{row['gen_busy_frac']:.0%}")

    def event(self, event: dict) -> None:
        self.events.write(json.dumps({"wall_time": time.time() - self.t_start, **event}) + "\n")
        self.events.flush()
        self.started += event.get("event") == "start"

    def close(self) -> None:
        self.metrics.close()
        self.events.close()


def supervise(children: dict[str, tuple], sh: Shared, out: Path, t_start: float, threads: int,
              desc: str, time_limit_s: float, steps: int, start_step: int, eval_n: int,
              stall_timeout_s: float) -> int:
    """Start the children ({name: (function, its arguments)}), log their rows and events until a
    trainer reports done -> 0; a failed child, or one silent for stall_timeout_s -> 1 with its
    traceback or name; the first SIGINT / SIGTERM -> the trainer checkpoints its current step,
    then 130; a second -> 130 at once. Every exit path stops the children."""
    _on_signals(sh)
    procs = _start(children, sh, threads)
    log = RunLog(out, t_start, desc, time_limit_s, steps, start_step, eval_n)
    done, save_by = None, 0.0  # the trainer's last step; the deadline of a signal's checkpoint
    reports: dict[str, str] = {}  # child name -> traceback it reported
    try:
        while done is None:
            try:
                msg = sh.log_q.get(timeout=0.5)
            except queue.Empty:
                msg = {}
            if sh.save_and_exit.is_set() and not save_by:
                save_by = time.time() + stall_timeout_s
                tqdm.write("train.py: stopping: checkpointing the current step first "
                           "(interrupt again to stop at once)")
            if "done" in msg:
                done = msg["done"]
                break
            if "row" in msg:
                log.row(msg["row"])
                sh.logged.value = msg["row"]["step"]  # a checkpoint of this step may be written now
            elif msg:
                log.event(msg)
                if log.started == len(procs) and msg.get("event") == "start":
                    _unlink_semaphores(sh)  # every child holds them now
            error = _failure(procs, sh, reports) or _stalled(procs, sh, t_start, stall_timeout_s)
            if save_by and time.time() > save_by:
                error = f"no checkpoint within --stall-timeout-s {stall_timeout_s} of the stop"
            if error:
                log.bar.close()
                print(f"train.py: error: {error}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        log.bar.close()
        print("train.py: interrupted, stopping children", file=sys.stderr)
        return 130
    except OSError as e:  # metrics.jsonl / events.jsonl: a full disk, a vanished directory
        log.bar.close()
        print(f"train.py: error: cannot write the logs in {out} ({e.strerror})", file=sys.stderr)
        return 1
    finally:  # every exit path, including an error in main itself, stops the children
        _stop(procs, sh, grace=5.0 if done is not None else 1.0)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        log.close()
    log.bar.close()
    if save_by:
        print(f"train.py: interrupted: stopped at step {done} with a checkpoint", file=sys.stderr)
        return 130
    return 0
