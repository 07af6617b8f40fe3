#!/usr/bin/env bash
# The prepared GPU check for one H100/H200 machine (Python 3.12, torch + CUDA, triton, cmake, ninja, pybind11, timm;
# no network, no DALI/spconv/flash-attn). Builds the extension, runs the GPU tests and the CPU suite there, measures
# throughput, and runs the CLI on CUDA. Usage: bash benchmarks/gpu_suite.sh RESULTS_DIR   (3-4 minutes on an H100 before the ops benchmark joined; not yet timed with it)
# The tree sent to a GPU machine has no .git: pass FASTMIM_COMMIT=$(git rev-parse --short HEAD) so results name it.
set -uo pipefail
RESULTS=${1:?usage: gpu_suite.sh RESULTS_DIR}
mkdir -p "$RESULTS"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 FASTMIM_CACHE=/tmp/fastmim-cache
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date -u +%T))"; }

step environment
nvidia-smi -L
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
$PY -c "import flash_attn" 2>/dev/null || echo "flash-attn: not installed here; its attention path is skipped"

step build fastmim._C
rm -f fastmim/_C*.so
$PY -m pip install --no-deps --no-build-isolation --no-index -e . >"$RESULTS/build.log" 2>&1 \
  || $PY setup.py build_ext --inplace >>"$RESULTS/build.log" 2>&1 || { echo "BUILD FAILED"; tail -30 "$RESULTS/build.log"; status=1; }
$PY -c "import fastmim; print('native extension:', fastmim.has_native_extension())"

step pytest -m gpu
FASTMIM_REQUIRE_EXT=1 $PY -m pytest -q -ra -p no:cacheprovider -m gpu tests || status=1

step pytest CPU suite on this machine "(Python/torch versions differ from CI)"
FASTMIM_REQUIRE_EXT=1 $PY -m pytest -q -ra -p no:cacheprovider -m "not gpu" -x tests || status=1

step "ops benchmark: fastmim.ops vs eager and compiled references (MAE ViT-B/16 shapes)"
$PY benchmarks/ops.py --out "$RESULTS/ops.jsonl" 2>"$RESULTS/ops.log" || { status=1; tail -20 "$RESULTS/ops.log"; }

step "throughput: MAE on fastmim.ops and on the plain reference path, bf16"
for spec in "mae_vit_base_patch16 256" "mae_vit_large_patch16 128"; do
  set -- $spec
  for mode in "" "--reference"; do
    $PY benchmarks/throughput.py --model "$1" --batch-size "$2" --amp bf16 --steps 20 --warmup 5 --peak-tflops 790 \
      $mode --out "$RESULTS/throughput.jsonl" || status=1
  done
done

step "CLI: the default demo run on CUDA"
rm -rf /tmp/fastmim-demo
/usr/bin/time -f "demo wall %e s" $PY -m fastmim.pretrain --output-dir /tmp/fastmim-demo 2>&1 | tr '\r' '\n' | grep -v "it/s]$" | tail -8 || status=1
cp /tmp/fastmim-demo/metrics.jsonl "$RESULTS/demo_metrics.jsonl" 2>/dev/null
cp /tmp/fastmim-demo/reconstructions/epoch_0030.png "$RESULTS/demo_reconstruction.png" 2>/dev/null

step "done, status $status"
exit $status
