#!/usr/bin/env bash
# The first run on a GPU machine, in one command: build the kernels for this GPU, run the fragment self-test, the
# start-of-run check at d12 shapes and the GPU tests, train d12 with --fsdp (compile, kernels) and continue its
# sharded checkpoint in one plain process, then record the GPU benchmark suites and the memory suite. Each step has a
# time limit and the run goes on after a failure; the summary at the end says which steps failed. Everything printed
# also goes to OUTDIR/log.txt, and the records to OUTDIR/RESULTS.md (a copy of bench/RESULTS.md). About 10 minutes
# at most on an H100; no network needed (HellaSwag falls back to synthetic val-shaped data, --fsdp trains on random
# tokens; the tokenize suite needs no GPU and runs elsewhere); the packages of requirements.txt must be installed.
#
#     bench/gpu_check.sh OUTDIR
set -u
if [ $# -ne 1 ]; then
    echo "usage: bench/gpu_check.sh OUTDIR  (OUTDIR gets log.txt and RESULTS.md)" >&2
    exit 2
fi
mkdir -p "$1" || exit 1
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 1
exec > >(tee -a "$OUT/log.txt") 2>&1

export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} ARCANA_REQUIRE_KERNELS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! ARCH=$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())'); then
    echo "error: torch sees no CUDA GPU here; run this on a machine with one"
    exit 1
fi
export TORCH_CUDA_ARCH_LIST=$ARCH  # this GPU's architecture only: a faster build
echo "gpu_check $(date -u '+%F %T') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
     "sm $ARCH, $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"

DEADLINE=$((SECONDS + 590))  # every step's limit is cut to what is left of the 10 minutes
SUMMARY=()
FAILED=0
step() {  # step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS and note how it ended
    local name=$1 limit=$2 start=$SECONDS left=$((DEADLINE - SECONDS - 5)) rc
    shift 2
    if [ "$left" -lt 10 ]; then
        SUMMARY+=("SKIPPED $name: no time left"); FAILED=$((FAILED + 1)); return
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    echo; echo "=== $name (at most ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@"
    rc=$?
    if [ $rc -eq 0 ]; then SUMMARY+=("ok      $name ($((SECONDS - start))s)")
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then SUMMARY+=("TIMEOUT $name (${limit}s)"); FAILED=$((FAILED + 1))
    else SUMMARY+=("FAILED  $name (exit $rc, $((SECONDS - start))s)"); FAILED=$((FAILED + 1))
    fi
}

step build 150 python setup.py build_ext --inplace --force
step selftest 45 python -m pytest -q tests/test_attention.py -k selftest -m cuda
# the start-of-run check of a d12 run (B=16, T=1024, bf16): each op's verdict and times, as a run prints them;
# fails where a kernel failed it
step start_check 40 python -c '
import sys, torch, train_gpt
ops, lines = train_gpt.select_run_ops("auto", "cuda", torch.bfloat16, train_gpt.GPTConfig(), 16)
print("\n".join(lines))
print("kernels used:", ", ".join(ops.kernels) or "none")
sys.exit(any(line.startswith("warning") for line in lines))'
PER_TEST=$(python -c 'import pytest_timeout' 2>/dev/null && echo --timeout=60)  # a hung kernel fails its own test
step tests 120 python -m pytest -m cuda --maxfail=10 -q $PER_TEST tests/test_kernels.py tests/test_attention.py tests/test_cross_entropy.py
step kernels 50 python bench.py kernels --record
step cross_entropy 25 python bench.py cross_entropy --record
step attention 45 python bench.py attention --T 1024 --record
step train 120 python bench.py train --steps 5 --record
step hellaswag 45 python bench.py hellaswag --record
# --fsdp on this machine's GPUs (one of them: sharded over one process), with compile and the kernels:
# bf16 weights gathered, float32 shards; a sharded checkpoint at step 8, continued by one plain process
mkdir -p "$OUT/shards"
python -c 'import sys, numpy as np; r = np.random.default_rng(0)
for split in ("val_000000", "train_000001"):
    np.save(f"{sys.argv[1]}/t_{split}.npy", r.integers(0, 50257, 2**21).astype(np.uint16))' "$OUT/shards"
FSDP="--model d12 --data_dir $OUT/shards --batch_size 16 --total_batch_size 65536 --max_steps 8 --warmup_steps 2 --val_every 4 --val_steps 1 --hellaswag_every 0 --sample_every 0"
step fsdp 120 python -m torch.distributed.run --standalone --nproc_per_node="$(nvidia-smi -L | wc -l)" train_gpt.py $FSDP --fsdp --compile --kernels cuda --log_dir "$OUT/fsdp"
step fsdp_resume 60 python train_gpt.py --log_dir "$OUT/fsdp" --resume auto --no-fsdp --no-compile --max_steps 9
step memory 60 python bench.py memory --record

cp bench/RESULTS.md "$OUT/RESULTS.md"
echo; echo "=== summary: $((${#SUMMARY[@]} - FAILED)) of ${#SUMMARY[@]} steps passed"
printf '  %s\n' "${SUMMARY[@]}"
[ "$FAILED" -eq 0 ]
