#!/usr/bin/env bash
# The prepared GPU check (issue 21), for when a GPU machine is lent (one H200: torch with CUDA and
# transformers, no vLLM, no network, so the model is random weights from the published config).
# One command, at most ~11 minutes (each part has its own time limit):
#   1. the CUDA-marked tests (tests/test_cuda.py: forward, sampler, train_step via DDP on nccl)
#   2. a random Qwen2.5-1.5B-shaped model, built on the GPU and saved with save_pretrained
#   3. a short train.py run on it: torch backend, one generator, one DDP trainer rank; train.py
#      puts both on the GPU and the trainer's process group on nccl whenever CUDA is there
#   4. benchmarks/real_shape_run.py: train.py end to end (mcts, cispo) at that shape, host memory
#   5. benchmarks/real_size.py at that size: tokens/s of generate vs our sampler vs the floor on
#      the MCTS- and CISPO-shaped batches, the trainer step time and peak CUDA memory
# Without CUDA it says so and exits 0 (after checking its arguments), so CI can run it.
set -uo pipefail

usage() {
    cat <<'EOF'
usage: benchmarks/gpu_check.sh [--python EXE] [--size 1.5b|0.5b] [--help]

Runs the CUDA tests, a short train.py run (torch backend, DDP on nccl, one rank) and the
real-size sampler benchmark on a random Qwen2.5-shaped model, in at most ~11 minutes.
Exits 0 without doing anything where torch sees no CUDA device.

  --python EXE   the interpreter (default: $PYTHON, else python3)
  --size SIZE    the Qwen2.5 shape: 1.5b (default, the blog's model) or 0.5b
EOF
}

fail_usage() {
    echo "gpu_check.sh: error: $1 (see --help)" >&2
    exit 2
}

PY=${PYTHON:-python3}
SIZE=1.5b
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --python) [ $# -ge 2 ] || fail_usage "--python needs a value"; PY=$2; shift 2 ;;
        --size)
            case "${2:-}" in
                0.5b | 1.5b) SIZE=$2; shift 2 ;;
                *) fail_usage "--size takes 1.5b or 0.5b, got '${2:-}'" ;;
            esac ;;
        *) fail_usage "unknown argument '$1'" ;;
    esac
done

cd "$(dirname "$0")/.." || exit 1
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device here (torch.cuda.is_available() is not True for $PY): nothing to check"
    exit 0
fi

WORK=$(mktemp -d -t gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
FAILED=()

part() {  # part NAME SECONDS COMMAND...: run with a time limit, report, keep going on failure
    local name=$1 limit=$2 start=$SECONDS rc=0
    shift 2
    echo
    echo "=== $name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "=== $name: ok ($((SECONDS - start)) s)"
    else
        [ "$rc" -eq 124 ] && echo "=== $name: TIMED OUT after ${limit} s" || echo "=== $name: FAILED (exit $rc)"
        FAILED+=("$name")
    fi
    return "$rc"
}

"$PY" - <<'EOF'
import importlib.util, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name(0)}, nccl {torch.distributed.is_nccl_available()}")
missing = [m for m in ("transformers", "tyro", "tqdm", "safetensors", "pytest", "vllm")
           if importlib.util.find_spec(m) is None]
print("modules missing:", ", ".join(missing) or "none", "(vllm: the vLLM tests and rows skip)")
EOF

part "CUDA tests" 60 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py

MODEL=$WORK/qwen2.5-$SIZE
if part "build a random Qwen2.5-$SIZE" 90 "$PY" benchmarks/real_size.py --size "$SIZE" --device cuda --save "$MODEL"; then
    RUN=$WORK/run
    if part "train.py on CUDA (torch backend, DDP nccl, 1 rank)" 200 "$PY" train.py \
        --model "$MODEL" --out "$RUN" --backend torch --method mcts --n-generators 1 --n-trainers 1 \
        --steps 3 --batch-size 4 --prompts-per-call 4 --mcts-iterations 8 --mcts-workers 4 \
        --eval-problems 4 --eval-n 2 --eval-every 0 --sync-every 1 --checkpoint-every 3 \
        --time-limit-min 0 --torch-threads 4; then
        "$PY" - "$RUN" <<'EOF'
import json, sys
from pathlib import Path
rows = [json.loads(l) for l in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in rows if "train_reward" in r]
walls = [r["wall_time"] for r in steps]
print("train.py steps:", len(steps), "| wall time between steps (s):",
      [round(b - a, 2) for a, b in zip(walls, walls[1:])], "| policy loss:",
      [round(r["policy_loss"], 4) for r in steps], "| generated tokens:", steps[-1]["generated_tokens"])
EOF
    fi
    part "train.py end to end at $SIZE: mcts and cispo, 1 generator + 1 trainer" 180 "$PY" \
        benchmarks/real_shape_run.py --model "$MODEL" --generators 1 --trainers 1 --steps 3 \
        --max-new-tokens 64
    part "real-size benchmark at $SIZE on CUDA" 120 "$PY" benchmarks/real_size.py --model "$MODEL" \
        --device cuda --backends generate,torch,vllm --mcts-prompts 16 --cispo-prompts 8 \
        --new-tokens 64 --train-batch 8 --train-tokens 96 --train-steps 3 --repeats 2 --threads 8
fi

echo
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "gpu_check.sh: all parts passed"
else
    echo "gpu_check.sh: failed: ${FAILED[*]}"
    exit 1
fi
