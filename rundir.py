"""The run directory and its checkpoints (the blog's "Infrastructure": plumbing under train.py).

A run directory holds config.json (the flags), metrics.jsonl (one row per step, and the eval
rows), events.jsonl (process starts, weight syncs and publishes, checkpoints) and
checkpoints/step-NNNNNN/ (HF save_pretrained + value_head.safetensors + tokenizer +
trainer_state.pt: optimizer, step, RNG, data positions). A checkpoint is written to
step-NNNNNN.tmp, fsynced and renamed, then an atomically replaced `latest` pointer names it: the
previous checkpoint is kept, non-finite weights are never written, and no checkpoint is ever
ahead of metrics.jsonl. `train.py --resume <run dir>` continues from `latest`.
"""

import errno
import json
import math
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import torch

from infrastructure import Shared, all_finite
from value_head import latest_checkpoint

# ------------------------------------------------------------------------------------------------
# Checkpoints: step-NNNNNN.tmp -> fsync -> rename -> `latest` pointer via os.replace



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


def checkpoint_step(sh: Shared, run_dir: Path, policy, tokenizer, state: dict) -> bool:
    """Rank 0: the trainer's state plus the generators' data positions and token counts. Waits
    until main has written the step's row, so no checkpoint is ever ahead of metrics.jsonl (a
    resume after kill -9 of main loses no row) -> False if main asked to stop meanwhile."""
    while sh.logged.value < state["step"]:
        if sh.exit_now.is_set():
            return False
        time.sleep(0.05)
    state = {**state, "data_position": list(sh.data_pos[:]),
             "generated_tokens": list(sh.gen_tokens[:])}
    path = save_checkpoint(run_dir, policy, tokenizer, state)
    sh.log_q.put({"event": "checkpoint", "step": state["step"], "path": str(path),
                  "data_position": state["data_position"]})
    return True


def trainer_state(step: int, opt: torch.optim.Optimizer, wall_time: float, n_generators: int
                  ) -> dict:
    """What a trainer checkpoints besides the weights (`restore_trainer` reads it back)."""
    return {"step": step, "optimizer": opt.state_dict(), "wall_time": wall_time,
            "rng": {"torch": torch.get_rng_state()}, "n_generators": n_generators}


def load_trainer_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # missing, cut short
        raise SystemExit(f"train.py: error: cannot read {ckpt / 'trainer_state.pt'} "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def restore_trainer(ckpt: str, opt: torch.optim.Optimizer) -> tuple[int, float]:
    """A resumed trainer's optimizer state and RNG from checkpoint `ckpt` -> (its step, its wall
    time); (0, 0.0) for a fresh run (ckpt "")."""
    if not ckpt:
        return 0, 0.0
    state = load_trainer_state(Path(ckpt))
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"], state["wall_time"]



# ------------------------------------------------------------------------------------------------
# The run directory: refused, claimed, cut back on resume


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
    try:
        ckpt = latest_checkpoint(out)
    except SystemExit as e:  # value_head's one-line error, as train.py's
        raise SystemExit(f"train.py: error: {e}") from None
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
