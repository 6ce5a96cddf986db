#!/usr/bin/env bash
# The GPU pass, for a session that is lent a GPU machine (its python3 holds torch, timm, scipy, sklearn).
# Runs the CUDA tests and the GPU benchmarks; results land in $OUT (the device tool) or benchmarks/results.
#
#   bash benchmarks/gpu_session.sh all            # or: tests | gram | scale | engine | diffusion | pixels | kernel (one stage a call)
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_session.sh all   # plumbing check on a machine without a GPU
#
# faiss is not on the GPU image: carry wheels in .whl/ (see the device README) to include the index tests.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
RESULTS=${OUT:-benchmarks/results}
if [ -n "${QUICK:-}" ] && [ -z "${OUT:-}" ]; then RESULTS=$(mktemp -d); fi  # a plumbing check never overwrites results
mkdir -p "$RESULTS"
stage=${1:-all}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ -n "${QUICK:-}" ]; then  # tiny sizes: checks that every stage runs, measures nothing worth keeping
  scale_n="20000 40000"; engine=(--n 500 --d 32 --c 4 --max-refits 5); gram=(--n 20000 --d 128 --c 50 --peak-size 512)
  diffusion=(--N 64 256 --batch 4); pixels=(--img-size 56 --images 1 --permutations 2)
  kernel=(--n 500 1000 --nystroem-n 2000 --landmarks 256)
else
  scale_n="125000 250000 500000 1000000"; engine=(--n 1000 4000 16000 --d 128 384 768 --c 8 200); gram=()
  diffusion=(--N 64 256 576 1024 2304 --batch 64); pixels=(--images 4)
  kernel=(--n 2000 8000 16000 --nystroem-n 64000 128000 --landmarks 2048 4096)
fi
rc=0
run() { echo "== $*"; "$@" || { echo "!! failed ($?): $*"; rc=1; }; }
if [[ $stage == all || $stage == tests ]]; then
  run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  run $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
  run $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_head.py tests/test_influence.py tests/test_loo.py tests/test_kernel_head.py tests/test_kernel_nystroem.py
fi
[[ $stage == all || $stage == gram ]] && run $PY benchmarks/bench_gram.py --device "$DEVICE" "${gram[@]}" --out "$RESULTS/gram_$DEVICE.json"
[[ $stage == all || $stage == scale ]] && run $PY benchmarks/bench_scale.py --device "$DEVICE" --n $scale_n --out "$RESULTS/scale_$DEVICE"
[[ $stage == all || $stage == engine ]] && run $PY benchmarks/bench_engine.py --device "$DEVICE" "${engine[@]}" --out "$RESULTS/engine_$DEVICE"
[[ $stage == all || $stage == diffusion ]] && run $PY benchmarks/bench_diffusion.py --device "$DEVICE" "${diffusion[@]}" --out "$RESULTS/diffusion_$DEVICE"
[[ $stage == all || $stage == pixels ]] && run $PY benchmarks/bench_pixel_cost.py --device "$DEVICE" "${pixels[@]}" --out "$RESULTS/pixel_cost_$DEVICE"
[[ $stage == all || $stage == kernel ]] && run $PY benchmarks/bench_kernel_scale.py --device "$DEVICE" "${kernel[@]}" --out "$RESULTS/kernel_scale_$DEVICE"
exit $rc
