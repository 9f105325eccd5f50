#!/usr/bin/env bash
# The device check for a lent GPU machine, in one call (shared/gpu.md says how to fetch the wheels into .whl/
# here and carry them): run from the repository root there, e.g.
#     bash benchmarks/gpu_check.sh 2>&1 | tee "$OUT/gpu_check.log"
# Installs the packages the machine lacks into .site/, names the GPU, runs tests/test_gpu.py (CUDA training
# and evaluation against the CPU, CUDA graphs against eager, device-resident batches, evaluation precision),
# then the benchmark at full-MNIST epoch length, eager (with the whole test split's evaluation, 10,000 digits
# x K=5,000, at each eval.precision) and with trainer.compile=reduce-overhead.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl
export PYTHONPATH="$PWD/.site:$PWD/src" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, lightning; print(torch.cuda.get_device_name(), 'torch', torch.__version__, \
'lightning', lightning.__version__)"
status=0
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py || status=$?
bench=(python3 benchmarks/bench.py --trainer gpu --no-tracking --mnist-size --epochs 4 --repeats 1)
echo "== bench, eager"
"${bench[@]}" --full-eval || status=$?
echo "== bench, trainer.compile=reduce-overhead"
"${bench[@]}" --override trainer.compile=reduce-overhead || status=$?
exit "$status"
