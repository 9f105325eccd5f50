#!/usr/bin/env bash
# The device check for a lent GPU machine, in one call (shared/gpu.md says how to fetch the wheels into .whl/
# here and carry them): run from the repository root there, e.g.
#     bash benchmarks/gpu_check.sh 2>&1 | tee "$OUT/gpu_check.log"
# Installs the packages the machine lacks into .site/, names the GPU, runs tests/test_gpu.py (CUDA training
# and evaluation against the CPU, the whole-step CUDA graph and reduce-overhead against eager, device-resident
# batches, evaluation precision) and the known-answer tests' CUDA cases (estimators, likelihoods, two-layer
# models, evaluation), times a checkpoint write on the machine's disk, then runs the benchmark at
# full-MNIST epoch length with trainer.cuda_graph=true (500 optimiser steps per call of Lightning's
# training_step, trainer=gpu's trainer.steps_per_call: one call an epoch; and 50) and eagerly
# (trainer.cuda_graph=false: auto, trainer=gpu's default, graphs the step too), with the whole test split's evaluation, 10,000 digits x
# K=5,000, at each eval.precision; then profiles a training at trainer=gpu's defaults (profile_train.py:
# the functions an epoch's host time goes to: validation, checkpoints, Lightning's loop). Each part has
# its own time limit (seconds, below) so that one that hangs still leaves the others' figures, all inside GPU_CHECK_BUDGET (570 s: one device call; the lease is 15
# minutes in all, start included). tests/test_bench.py runs this script with stand-ins for python3 and
# nvidia-smi: each part's files, flags and config must exist, and its title must say what it runs.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/.site:$PWD/src" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, lightning; print(torch.cuda.get_device_name(), 'torch', torch.__version__, \
'lightning', lightning.__version__)"
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)  # one hung test fails alone
status=0
# The whole script stays inside one device call (at most 600 s): each part's limit is cut to what is left of
# BUDGET seconds, and a part with under 15 s left is skipped (and counted as a failure), so the figures of the
# parts that ran still come back.
BUDGET=${GPU_CHECK_BUDGET:-570}
start=$(date +%s)
part() {  # part SECONDS TITLE COMMAND...: one part under its time limit; its failure is remembered
  local limit=$1 title=$2 rc left
  shift 2
  left=$((BUDGET - ($(date +%s) - start)))
  if [ "$left" -lt 15 ]; then
    echo "== $title: skipped, ${left} s of the ${BUDGET} s budget left"
    status=124
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $title (limit ${limit} s) =="
  SECONDS=0
  timeout "$limit" "$@"
  rc=$?
  echo "== $title: exit $rc after ${SECONDS} s"
  [ "$rc" -eq 0 ] || status=$rc
}
part 200 "tests on CUDA" python3 -m pytest -v -rs -p no:cacheprovider --durations=15 "${per_test[@]}" \
  tests/test_gpu.py tests/test_estimators.py tests/test_likelihoods.py tests/test_hierarchy.py \
  tests/test_evaluate.py -k "cuda or test_gpu"
part 30 "a checkpoint's write (the weights of the benchmark's model, 3.3 MB)" python3 -c "
import tempfile, time, torch
from pathlib import Path
from vaerepro.trainer import AtomicCheckpointIO, BackgroundCheckpointIO
d = Path(tempfile.mkdtemp())
ckpt = {'state_dict': {f'w{i}': torch.randn(n, device='cuda') for i, n in enumerate((392000, 500, 20000, 10000, 784*500, 784))}}
bg = BackgroundCheckpointIO()
for name, save in (('torch.save', lambda p: torch.save(ckpt, p)), ('AtomicCheckpointIO (fsync)', lambda p: AtomicCheckpointIO().save_checkpoint(ckpt, p)), ('BackgroundCheckpointIO, the training thread\'s share', lambda p: bg.save_checkpoint(ckpt, p))):
    times = []
    for i in range(5):
        t = time.perf_counter(); save(d / f'{i}.ckpt'); times.append(time.perf_counter() - t)
        time.sleep(0.05)  # the write ends in the background, as during an epoch
    print(f'{name}: median {sorted(times)[2] * 1000:.2f} ms, max {max(times) * 1000:.2f} ms per write')
bg.teardown()
"
bench=(python3 benchmarks/bench.py --trainer gpu --no-tracking --mnist-size --epochs 6 --repeats 1)  # 4 timed epoch pairs
part 120 "bench, trainer.cuda_graph=true (500 steps a call, one an epoch)" "${bench[@]}" \
  --override trainer.cuda_graph=true
part 120 "bench, trainer.cuda_graph=true, 50 steps a call" "${bench[@]}" --override trainer.cuda_graph=true \
  --override trainer.steps_per_call=50
part 120 "bench, eager (trainer.cuda_graph=false), with the whole test split" "${bench[@]}" \
  --override trainer.cuda_graph=false --full-eval
# where the host's time goes (cProfile: per step, per call, per epoch), at trainer=gpu's defaults
part 90 "profile, trainer=gpu (the step one CUDA graph, 500 steps a call)" python3 benchmarks/profile_train.py \
  --epochs 4 --top 30 --override trainer=gpu
exit "$status"
