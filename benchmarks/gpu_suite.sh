#!/usr/bin/env bash
# The prepared check for one H100/H200 machine (Python 3.12, torch + CUDA, triton, nvcc, cmake, ninja, pybind11, timm;
# no network, DALI, spconv or flash-attn: those parts are skipped and the log says so). In priority order, within a
# time budget (GPU_SUITE_BUDGET_S, default 480 s; 300 leaves a 15-minute session room for a second call; a step that
# would not fit is skipped and named):
#   build fastmim._C and the CUDA kernels fastmim._cuda (sm_90 here); the ops' GPU tests for both GPU backends
#   (ops_tests); host time per call (host); the ops benchmark with host time and CUDA-graph timing (ops); MAE ViT-B/16
#   eager throughput with each GPU backend of the fused ops (vit_b_eager) and compiled (vit_b_compile); compiled ops
#   opaque vs Triton twins (twins); the CUDA-graph training step's, add_layer_norm's, layer_norm's, attention's and
#   bias_gelu's tests (graph_tests); the target and frequency ops' Triton tests (target_tests); the step's throughput,
#   MAE ViT-B/16 eager, with fused_norm, with fastmim attention, with fused bias+GELU, compiled, FCMAE
#   ConvNeXtV2-Base, with its fused norm (graph); MaskFeat, SimMIM and A2MIM (recipes); data2vec 2.0's amortisation and the
#   EMA update (teacher); torch.compile's modes (compile_modes); the CUDA kernels under compute-sanitizer
#   (sanitizer); then pytest -m gpu (the torch.compile tests later); FCMAE ConvNeXtV2-Base
#   throughput (batch 64) and the sparse conv benchmark, profiled; MAE ViT-B/16 throughput (batch 256, bf16) in all
#   four modes, profiled; the compile tests; the other benchmarks that exist (masks, data loading); ViT-L/16
#   throughput (batch 128); the CLI's default run on CUDA; transformers' ViTMAE patched (hf); GPU JPEG decoding
#   (gpu_data: --loader torch-gpu's tests, loader img/s, MAE ViT-B/16 on JPEGs vs synthetic); kNN feature extraction
#   (eval); the tables of this run.
# Usage: FASTMIM_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_suite.sh RESULTS_DIR
# GPU_SUITE_ONLY=ops_tests,ops,... runs only the named steps, in the order named (an unknown name stops the suite
# before anything runs): ops_tests, host, ops, vit_b_eager, vit_b_compile, twins, graph_tests, target_tests, graph,
# graph_compile, recipes, teacher, compile_modes (the default mode's row comes from vit_b_compile), sanitizer, tests,
# fcmae, sparse_conv, tune, vit_b, compile_tests, other, fcmae_compile, vit_l, cli, hf, gpu_data, eval; the
# environment, the build and the tables always run. GPU_SUITE_TESTS_K replaces the -k filter of the tests step ("not
# compile"); GPU_SUITE_OPS the ops step's --ops (issue 14's ops; the target ops run in target_tests);
# GPU_SUITE_DRY_RUN=1 prints each step's commands instead of running them (no GPU needed: a check of a selection).
# (the tree sent to a GPU machine has no .git, so FASTMIM_COMMIT names the commit in every row). The device tool returns
# at most 8 files per call: suite.log, profiles.tar (torch.profiler traces) and the .jsonl rows (throughput, ops,
# ops_compiled, host_overhead, demo_metrics, fsdp_metrics, sparse_conv, tune_*, hf_vit_mae, eval, masks, dataload);
# when there are more than 8 files, the .jsonl files go into one results.tar (a dry run leaves the folder as it is).
set -uo pipefail
RESULTS=${1:?usage: gpu_suite.sh RESULTS_DIR}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$RESULTS/suite.log") 2>&1
export PYTHONUNBUFFERED=1 FASTMIM_CACHE=/tmp/fastmim-cache
PY=${PYTHON:-python3}
BUDGET=${GPU_SUITE_BUDGET_S:-480}
# (a value that is not whole seconds turned the budget off: every step "fitted" and ran to its own limit)
# (nor with a leading zero: bash reads 0300 as octal, 0900 not at all)
[[ "$BUDGET" =~ ^(0|[1-9][0-9]*)$ ]] || { echo "GPU_SUITE_BUDGET_S: expected whole seconds (300), got '$BUDGET'"; exit 2; }
START=$(date +%s)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
status=0
DRY=${GPU_SUITE_DRY_RUN:-0}
STEPS="ops_tests host ops vit_b_eager vit_b_compile twins graph_tests target_tests graph graph_compile recipes teacher
  compile_modes sanitizer tests fcmae sparse_conv tune vit_b compile_tests other fcmae_compile vit_l cli hf gpu_data eval"
ORDER=$(echo $STEPS)
if [ -n "${GPU_SUITE_ONLY:-}" ]; then
  ORDER=${GPU_SUITE_ONLY//,/ }
  for name in $ORDER; do
    [[ " $(echo $STEPS) " == *" $name "* ]] || { echo "GPU_SUITE_ONLY: unknown step '$name'; the steps: $(echo $STEPS)"; exit 2; }
  done
fi
if [ -z "${FASTMIM_COMMIT:-}" ] && ! git rev-parse --short HEAD >/dev/null 2>&1; then
  echo "WARNING: FASTMIM_COMMIT is not set and this tree has no .git: every row's commit will read 'unknown'"
fi
# a dry run counts each step that fits as taking its estimate (fits' SECONDS): it shows which steps a call of this
# budget would skip were they to take that long (the commands' limits, DRY_TOTAL, are the worst case)
DRY_EXPECT=0
DRY_SKIPPED=""
left() {
  if [ "$DRY" = 1 ]; then echo $((BUDGET - DRY_EXPECT)); else echo $((BUDGET - ($(date +%s) - START))); fi
}
step() { echo; echo "=== $* (t=$(($(date +%s) - START))s)"; }
# fits SECONDS NAME: true when SECONDS of the budget remain, else says the step is skipped
fits() {
  if [ "$(left)" -lt "$1" ]; then
    echo "SKIPPED: $2 needs about $1 s, $(left) s of the ${BUDGET} s budget left"
    DRY_SKIPPED="${DRY_SKIPPED:+$DRY_SKIPPED; }$2"
    return 1
  fi
  if [ "$DRY" = 1 ]; then DRY_EXPECT=$((DRY_EXPECT + $1)); fi
  return 0
}
# run LIMIT CMD...: CMD under a time limit (seconds), never past the budget (with none left it is skipped: timeout 0
# would mean no limit); a failure or timeout fails the suite
DRY_TOTAL=0
# the arguments as a shell would take them back: quoted where they hold spaces or other special characters
quoted() {
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run() {
  local limit=$1; shift
  if [ "$DRY" = 1 ]; then
    DRY_TOTAL=$((DRY_TOTAL + limit))
    echo "DRY RUN (limit $limit s, $DRY_TOTAL s so far): $(quoted "$@")"; return 0
  fi
  local l; l=$(left); [ "$l" -lt "$limit" ] && limit=$l
  if [ "$limit" -le 0 ]; then echo "SKIPPED (the budget is spent): $*"; status=1; return 124; fi
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "TIMED OUT after ${limit} s: $*"
  [ $rc -ne 0 ] && status=1
  return $rc
}

if [ "$DRY" = 1 ]; then echo "DRY RUN: the steps' commands only, in this order: $ORDER"; else
step environment
nvidia-smi -L
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
for mod in flash_attn nvidia.dali spconv; do
  $PY -c "import $mod" 2>/dev/null && echo "$mod: installed" || echo "$mod: not installed here; its parts are skipped"
done

step "build fastmim._C and fastmim._cuda (FASTMIM_CUDA_ARCHS=${FASTMIM_CUDA_ARCHS:-90})"
rm -f fastmim/_C*.so fastmim/_cuda*.so
export FASTMIM_CUDA=1 FASTMIM_CUDA_ARCHS=${FASTMIM_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
# (a failed build stops the suite: every step after it would time a fallback, not the kernels it is for)
timeout 300 $PY -m pip install --no-deps --no-build-isolation --no-index -e . >"$SCRATCH/build.log" 2>&1 \
  || timeout 300 $PY setup.py build_ext --inplace >>"$SCRATCH/build.log" 2>&1 \
  || { echo "BUILD FAILED (the steps are not run: fix the build first)"; tail -60 "$SCRATCH/build.log"; exit 3; }
$PY -c "import fastmim, fastmim._ext as e; print('native extension:', fastmim.has_native_extension(), '| fastmim._cuda:', e.cuda_available(), e.cuda_load_error or '')"
$PY -c "import fastmim._ext as e, sys; sys.exit(0 if e.available() and e.cuda_available() else 1)" \
  || { echo "BUILD FAILED: an extension does not load (the steps are not run)"; tail -60 "$SCRATCH/build.log"; exit 3; }
fi

s_ops_tests() {
  step "pytest: the ops on CUDA for the cuda backend (small odd shapes) and both GPU backends at MAE scale" &&
    run 150 env FASTMIM_REQUIRE_EXT=1 $PY -m pytest -q -ra -p no:cacheprovider --durations=5 -m gpu \
    -k "cuda-cuda or test_gpu_ops or cuda_extension or triton_launch or raw_op" tests/ops tests/test_extension.py
}

# issue 14 first (the most important work): host time, the ops against eager and compiled, the fused ops in the
# MAE step, the compiled ops as opaque custom ops or as Triton kernels inductor launches
s_host() {
  step "host time per call of the fused ops and of what they are made of (tiny tensors: host-bound)" &&
    fits 30 "host overhead" && run 60 $PY benchmarks/host_overhead.py --out "$RESULTS/host_overhead.jsonl"
}

s_ops() {
  step "ops benchmark: fastmim.ops (cuda, triton) vs eager and compiled references, MAE ViT-B/16 shapes" &&
    fits 60 "ops benchmark" && run 150 $PY benchmarks/ops.py --cuda-graph \
    --ops "${GPU_SUITE_OPS:-gather,scatter,loss,patchify,grn,add_ln,ln,bias_gelu,attn,attn_enc}" \
    --out "$RESULTS/ops.jsonl"
}

s_vit_b_eager() {
  step "throughput: MAE ViT-B/16, batch 256, bf16, eager: reference, fused ops on cuda, on triton" &&
    fits 60 "ViT-B eager throughput" && {
    run 90 env FASTMIM_BACKEND=cuda $PY benchmarks/throughput.py --model vit_base_patch16 --batch-size 256 --amp bf16 \
      --steps 15 --warmup 4 --peak-tflops 790 --modes reference,fastmim --out "$RESULTS/throughput.jsonl"
    fits 30 "ViT-B eager throughput (triton)" && run 60 env FASTMIM_BACKEND=triton $PY benchmarks/throughput.py \
      --model vit_base_patch16 --batch-size 256 --amp bf16 --steps 15 --warmup 4 --peak-tflops 790 --modes fastmim \
      --out "$RESULTS/throughput.jsonl"
  }
}

s_vit_b_compile() {
  step "throughput: MAE ViT-B/16, batch 256, bf16, under torch.compile: reference vs fused ops (auto backends)" &&
    fits 120 "ViT-B compiled throughput" && run 200 $PY benchmarks/throughput.py --model vit_base_patch16 --batch-size 256 \
    --amp bf16 --steps 15 --warmup 4 --peak-tflops 790 --modes reference+compile,fastmim+compile \
    --out "$RESULTS/throughput.jsonl"
}

# issue 14 item 4: inductor launching fastmim's Triton kernels itself (set_compiled_ops("triton")) against the opaque
# custom ops, per op (fastmim+compile[opaque|triton] rows against the compiled reference) and in the compiled step
s_twins() {
  step "compiled fused ops: opaque custom ops vs Triton twins launched by inductor (ops, ViT-B step)" && {
    fits 60 "Triton twins test" && run 150 $PY -m pytest -q -ra -p no:cacheprovider -m gpu tests/ops/test_triton_twins.py
    fits 90 "compiled ops benchmark" && run 180 $PY benchmarks/ops.py --ops gather,scatter,loss,patchify --compiled-fused \
      --out "$RESULTS/ops_compiled.jsonl"
    fits 120 "ViT-B compiled throughput, Triton twins" && run 200 $PY benchmarks/throughput.py --model vit_base_patch16 \
      --batch-size 256 --amp bf16 --steps 15 --warmup 4 --peak-tflops 790 --modes fastmim+compile \
      --compiled-ops triton --out "$RESULTS/throughput.jsonl"
  }
}

s_graph_tests() {
  step "pytest: the training step captured in CUDA graphs against the eager step (tests/train/test_step_gpu.py)" &&
    fits 60 "CUDA-graph step tests" && run 150 env FASTMIM_REQUIRE_EXT=1 $PY -m pytest -q -ra -p no:cacheprovider \
    --durations=5 -m gpu -k "not compile" tests/train/test_step_gpu.py tests/ops/test_add_layer_norm.py \
    tests/ops/test_layer_norm.py tests/ops/test_attention.py tests/ops/test_bias_gelu.py
}

# issue 16: the target and frequency ops' Triton kernels on CUDA against their references (the ops_tests filter above
# selects the cuda backend's tests; these ops have Triton kernels only)
s_target_tests() {
  step "pytest: hog_target, fft_loss, patch_fft_loss, low_pass_target on CUDA (Triton backend)" &&
    fits 40 "target op tests" && run 120 $PY -m pytest -q -ra -p no:cacheprovider --durations=5 -m gpu -k "cuda-triton" \
    tests/ops/test_hog_target.py tests/ops/test_fft_loss.py tests/ops/test_patch_fft_loss.py \
    tests/ops/test_low_pass_target.py
  # (the rows whatever the tests say: a failed test is in the log, and is no reason to lose the timings)
  fits 40 "target ops benchmark" && run 90 $PY benchmarks/ops.py --cuda-graph --ops hog,fft,pfft,lowpass \
    --out "$RESULTS/ops.jsonl"
}

# issue 15: the whole step replayed from CUDA graphs against eager and compiled, MAE ViT-B/16 and FCMAE ConvNeXtV2-B
s_graph() {
  step "throughput: CUDA-graph modes, MAE ViT-B/16 b256 and FCMAE ConvNeXtV2-Base b64, bf16" && {
    fits 90 "ViT-B graph throughput" && run 150 $PY benchmarks/throughput.py --model vit_base_patch16 --batch-size 256 \
      --amp bf16 --steps 15 --warmup 5 --peak-tflops 790 --modes reference,fastmim,fastmim+graph \
      --out "$RESULTS/throughput.jsonl"
    fits 60 "ViT-B fused-norm throughput" && run 90 $PY benchmarks/throughput.py --model vit_base_patch16 \
      --batch-size 256 --amp bf16 --steps 15 --warmup 5 --peak-tflops 790 --no-flop-count --modes fastmim,fastmim+graph \
      --model-arg fused_norm=True --out "$RESULTS/throughput.jsonl"
    fits 60 "ViT-B fastmim-attention throughput" && run 90 $PY benchmarks/throughput.py --model vit_base_patch16 \
      --batch-size 256 --amp bf16 --steps 15 --warmup 5 --peak-tflops 790 --no-flop-count --modes fastmim,fastmim+graph \
      --model-arg attn_impl=fastmim --model-arg fused_norm=True --out "$RESULTS/throughput.jsonl"
    fits 60 "ViT-B fused bias+GELU throughput" && run 90 $PY benchmarks/throughput.py --model vit_base_patch16 \
      --batch-size 256 --amp bf16 --steps 15 --warmup 5 --peak-tflops 790 --no-flop-count --modes fastmim,fastmim+graph \
      --model-arg fused_norm=True --model-arg fused_gelu=True --out "$RESULTS/throughput.jsonl"
    fits 90 "FCMAE graph throughput" && run 150 $PY benchmarks/throughput.py --recipe fcmae --model convnextv2_base \
      --batch-size 64 --amp bf16 --steps 10 --warmup 5 --peak-tflops 790 --modes reference,fastmim,fastmim+graph \
      --out "$RESULTS/throughput.jsonl"
    fits 60 "FCMAE fused-norm throughput" && run 120 $PY benchmarks/throughput.py --recipe fcmae \
      --model convnextv2_base --batch-size 64 --amp bf16 --steps 10 --warmup 5 --peak-tflops 790 --no-flop-count \
      --modes fastmim,fastmim+graph --model-arg fused_norm=True --out "$RESULTS/throughput.jsonl"
    # every fused block at once, replayed (the likely best eager mode); then the graph mode profiled (issue 15: a miss
    # is reported with its profile)
    fits 60 "ViT-B all fused blocks throughput" && run 90 $PY benchmarks/throughput.py --model vit_base_patch16 \
      --batch-size 256 --amp bf16 --steps 15 --warmup 5 --peak-tflops 790 --no-flop-count --modes fastmim,fastmim+graph \
      --model-arg fused_norm=True --model-arg fused_gelu=True --model-arg attn_impl=fastmim \
      --out "$RESULTS/throughput.jsonl"
    fits 60 "ViT-B graph throughput, profiled" && run 90 $PY benchmarks/throughput.py --model vit_base_patch16 \
      --batch-size 256 --amp bf16 --steps 10 --warmup 5 --peak-tflops 790 --no-flop-count --modes fastmim+graph \
      --model-arg fused_norm=True --profile --profile-steps 2 --profile-dir "$SCRATCH/profiles" \
      --out "$RESULTS/throughput.jsonl"
  }
}

# issue 15: the compiled step replayed from CUDA graphs (its own step: the compile takes most of its time)
s_graph_compile() {
  step "throughput: MAE ViT-B/16 b256 bf16, compiled, and compiled replayed from CUDA graphs" &&
    fits 150 "ViT-B compiled graph throughput" && run 240 $PY benchmarks/throughput.py --model vit_base_patch16 \
      --batch-size 256 --amp bf16 --steps 15 --warmup 5 --peak-tflops 790 --modes fastmim+compile,fastmim+compile+graph \
      --out "$RESULTS/throughput.jsonl"
}

# issue 16: the new recipes end to end (MaskFeat's HOG target, SimMIM), fused ops against the plain-PyTorch path
s_recipes() {
  step "throughput: MaskFeat, SimMIM and A2MIM ViT-B/16, batch 256, bf16, reference vs fused ops" && {
    for recipe in maskfeat simmim; do
      fits 60 "$recipe throughput" && run 120 $PY benchmarks/throughput.py --recipe $recipe --model vit_base_patch16 \
        --batch-size 256 --amp bf16 --steps 10 --warmup 3 --peak-tflops 790 --modes reference,fastmim \
        --out "$RESULTS/throughput.jsonl"
    done
    # SimMIM's own ViT-B encoder (configs/simmim_vit_base_in1k.yaml): a shared relative position bias and no absolute
    # position embedding, layer scale and drop path 0.1. Prediction: 5-10% fewer img/s than the row above: SDPA cannot
    # use its flash kernel with a bias that needs a gradient (memory-efficient or cuDNN instead, whose backward also sums
    # the bias gradient over the batch), on 197 tokens in every block; layer scale and drop path add elementwise passes.
    fits 60 "simmim paper encoder throughput" && run 120 $PY benchmarks/throughput.py --recipe simmim \
      --model vit_base_patch16 --batch-size 256 --amp bf16 --steps 10 --warmup 3 --peak-tflops 790 --modes fastmim \
      --model-arg rel_pos_bias=shared --model-arg abs_pos_embed=false --model-arg init_values=0.1 \
      --model-arg drop_path_rate=0.1 --out "$RESULTS/throughput.jsonl"
    # The other two configs' encoders and targets. MaskFeat's (mmpretrain's): a learned position embedding and the
    # 16-px Gaussian window on the HOG magnitudes. Prediction: within 2% of the MaskFeat row above (the window is one
    # multiply per pixel inside hog_target's kernel; the learned embedding one more parameter gradient).
    fits 60 "maskfeat config encoder throughput" && run 120 $PY benchmarks/throughput.py --recipe maskfeat \
      --model vit_base_patch16 --batch-size 256 --amp bf16 --steps 10 --warmup 3 --peak-tflops 790 \
      --modes reference,fastmim --model-arg gaussian_window=16 --model-arg abs_pos_embed=learned \
      --out "$RESULTS/throughput.jsonl"
    # A2MIM's (openmixup's): a relative position bias per block, a learned position embedding, layer scale, drop path;
    # L1 + 0.1 x fft_loss. Prediction: fastmim within 5% of the SimMIM paper-encoder row (the frequency loss is one
    # FFT of the batch's mean spectrum, small beside ViT-B at batch 256; a table per block adds 12 small gradients),
    # and fastmim/reference above SimMIM's ratio (the reference's frequency loss takes 256 FFTs of 3x224x224 images).
    fits 60 "a2mim config encoder throughput" && run 120 $PY benchmarks/throughput.py --recipe a2mim \
      --model vit_base_patch16 --batch-size 256 --amp bf16 --steps 10 --warmup 3 --peak-tflops 790 \
      --modes reference,fastmim --model-arg rel_pos_bias=block --model-arg abs_pos_embed=learned \
      --model-arg init_values=0.1 --model-arg drop_path_rate=0.1 --out "$RESULTS/throughput.jsonl"
  }
}

# issue 17: data2vec 2.0's amortisation (16 masks per image: one teacher pass) against 16 separate passes, and the EMA
# update of ViT-B against the memory floor (rows in ops.jsonl, benchmark "ema")
s_teacher() {
  step "data2vec 2.0 ViT-B/16 (M=8, batch 32) vs separate passes; EMA update vs a copy; I-JEPA ViT-B/16" && {
    fits 60 "data2vec2 throughput" && run 120 $PY benchmarks/throughput.py --recipe data2vec2 --model vit_base_patch16 \
      --batch-size 32 --model-arg num_masks=8 --amp bf16 --steps 10 --warmup 3 --peak-tflops 790 \
      --modes reference,fastmim --out "$RESULTS/throughput.jsonl"
    fits 20 "EMA update" && run 60 $PY benchmarks/ema.py --model vit_base_patch16 --out "$RESULTS/ops.jsonl"
    fits 60 "I-JEPA throughput" && run 120 $PY benchmarks/throughput.py --recipe ijepa --model vit_base_patch16 \
      --batch-size 128 --amp bf16 --steps 10 --warmup 3 --peak-tflops 790 --modes reference,fastmim \
      --out "$RESULTS/throughput.jsonl"
  }
}

# torch.compile's modes on the fused MAE step, one run each (issue 15: the best becomes --compile's default; a torch
# whose mode regresses shows here, measured, not assumed)
s_compile_modes() {
  step "throughput: MAE ViT-B/16, batch 256, bf16, fastmim+compile in each torch.compile mode" && {
    # (the cheapest compile first: max-autotune's autotuning takes minutes on a machine without inductor's cache, so
    # a budget that runs out takes the dearest; best in a call of its own: GPU_SUITE_ONLY=compile_modes)
    for cmode in reduce-overhead max-autotune-no-cudagraphs max-autotune; do
      fits 150 "compile mode $cmode" && run 300 $PY benchmarks/throughput.py --model vit_base_patch16 --batch-size 256 \
        --amp bf16 --steps 15 --warmup 4 --peak-tflops 790 --modes fastmim+compile --compile-mode "$cmode" \
        --out "$RESULTS/throughput.jsonl"
    done
  }
}

s_sanitizer() {
  step "compute-sanitizer memcheck over every CUDA kernel" && fits 60 "compute-sanitizer" && {
    if command -v compute-sanitizer >/dev/null; then
      run 120 compute-sanitizer --tool memcheck --error-exitcode 9 $PY tests/ops/run_cuda_kernels.py
    else echo "compute-sanitizer not on PATH: skipped"; fi
  }
}

s_tests() {
  step "pytest -m gpu (-k ${GPU_SUITE_TESTS_K:-not compile})" && fits 60 "gpu tests" && run 200 env FASTMIM_REQUIRE_EXT=1 $PY -m pytest -q -ra -p no:cacheprovider --durations=8 -m gpu -k "${GPU_SUITE_TESTS_K:-not compile}" --ignore=tests/train/test_step_gpu.py --ignore=tests/ops/test_add_layer_norm.py --ignore=tests/ops/test_layer_norm.py --ignore=tests/ops/test_attention.py --ignore=tests/ops/test_bias_gelu.py tests
}

s_fcmae() {
  step "throughput: FCMAE ConvNeXtV2-Base, batch 64, bf16, ratio 0.6: dense_masked vs fastmim" &&
    fits 90 "FCMAE throughput" && run 150 $PY benchmarks/throughput.py --recipe fcmae --model convnextv2_base \
    --batch-size 64 --amp bf16 --steps 10 --warmup 3 --peak-tflops 790 --modes reference,fastmim \
    --profile --profile-steps 2 --profile-dir "$SCRATCH/profiles" --out "$RESULTS/throughput.jsonl"
}

s_sparse_conv() {
  step "benchmarks/sparse_conv.py: ConvNeXtV2-Base encoder fwd+bwd per backend and mask ratio" &&
    fits 45 "sparse_conv benchmark" && run 100 $PY benchmarks/sparse_conv.py --out "$RESULTS/sparse_conv.jsonl"
}

s_tune() {
  step "benchmarks/tune_sparse_dwconv.py: block sizes of the sparse depthwise kernels" &&
    fits 40 "sparse dwconv tuning" && run 90 $PY benchmarks/tune_sparse_dwconv.py --out "$RESULTS/tune_sparse_dwconv.jsonl"
  step "benchmarks/tune_triton_ops.py: tile sizes of the Triton patchify, token and loss kernels" &&
    fits 60 "Triton tile sweep" && run 180 $PY benchmarks/tune_triton_ops.py --out "$RESULTS/tune_triton_ops.jsonl"
}

s_vit_b() {
  step "throughput: MAE ViT-B/16, batch 256, bf16, four modes, profiled (MFU against 790 TFLOP/s)" &&
    fits 150 "ViT-B throughput" && run 240 $PY benchmarks/throughput.py --model vit_base_patch16 --batch-size 256 \
    --amp bf16 --steps 20 --warmup 5 --peak-tflops 790 --modes reference,fastmim,fastmim+compile,reference+compile \
    --profile --profile-steps 2 --profile-dir "$SCRATCH/profiles" --out "$RESULTS/throughput.jsonl"
}

s_compile_tests() {
  step "pytest -m gpu, the torch.compile tests (inductor on CUDA)" &&
    fits 60 "compile tests" && run 150 env FASTMIM_REQUIRE_EXT=1 $PY -m pytest -q -ra -p no:cacheprovider -m gpu -k compile tests
}

s_other() {
  for bench in masks dataload; do
    step "benchmarks/$bench.py"
    if [ -f "benchmarks/$bench.py" ]; then
      fits 45 "$bench benchmark" && run 90 $PY "benchmarks/$bench.py" --out "$RESULTS/$bench.jsonl"
    else
      echo "not written yet"
    fi
  done
}

s_fcmae_compile() {
  step "throughput: FCMAE ConvNeXtV2-Base under torch.compile" &&
    fits 120 "FCMAE compiled throughput" && run 200 $PY benchmarks/throughput.py --recipe fcmae --model convnextv2_base \
    --batch-size 64 --amp bf16 --steps 10 --warmup 3 --peak-tflops 790 --modes fastmim+compile,reference+compile \
    --out "$RESULTS/throughput.jsonl"
}

s_vit_l() {
  step "throughput: MAE ViT-L/16, batch 128, bf16 (peak memory in the rows); then with --grad-ckpt" && {
    fits 120 "ViT-L throughput" && run 200 $PY benchmarks/throughput.py --model vit_large_patch16 --batch-size 128 \
      --amp bf16 --steps 15 --warmup 4 --peak-tflops 790 --modes reference,fastmim,fastmim+compile \
      --out "$RESULTS/throughput.jsonl"
    # the modes meant to reach the issue's 2.0x the paper's code path: the whole step replayed, with the fused blocks
    fits 150 "ViT-L graph throughput" && run 240 $PY benchmarks/throughput.py --model vit_large_patch16 \
      --batch-size 128 --amp bf16 --steps 15 --warmup 5 --peak-tflops 790 --modes fastmim+graph,fastmim+compile+graph \
      --model-arg fused_norm=True --out "$RESULTS/throughput.jsonl"
    fits 60 "ViT-L throughput, activation checkpointing" && run 120 $PY benchmarks/throughput.py \
      --model vit_large_patch16 --batch-size 128 --amp bf16 --steps 10 --warmup 3 --peak-tflops 790 --modes fastmim \
      --grad-ckpt --out "$RESULTS/throughput.jsonl"
    # FSDP2 over one GPU (a group of one): its own cost in time and memory (bf16 gathered weights), predicted in
    # benchmarks/notes/fsdp.md
    fits 60 "ViT-L throughput, FSDP + activation checkpointing" && run 120 $PY benchmarks/throughput.py \
      --model vit_large_patch16 --batch-size 128 --amp bf16 --steps 10 --warmup 3 --peak-tflops 790 --modes fastmim \
      --grad-ckpt --fsdp --out "$RESULTS/throughput.jsonl"
  }
}

s_cli() {
  step "CLI: the default demo run on CUDA"
  if fits 90 "CLI demo, --fsdp"; then
    rm -rf "$SCRATCH/demo"
    run 60 $PY -m fastmim.pretrain --output-dir "$SCRATCH/demo" >"$SCRATCH/demo.log" 2>&1
    tr '\r' '\n' <"$SCRATCH/demo.log" | grep -v "it/s]$" | tail -4
    cp "$SCRATCH/demo/metrics.jsonl" "$RESULTS/demo_metrics.jsonl" 2>/dev/null
    # --fsdp on NCCL (a group of one), bf16 gathered weights, the fastmim kernels: trains, checkpoints, resumes
    rm -rf "$SCRATCH/fsdp"
    run 60 $PY -m fastmim.pretrain --fsdp --max-steps 4 --save-interval 2 --output-dir "$SCRATCH/fsdp" \
      >"$SCRATCH/fsdp.log" 2>&1 && run 60 $PY -m fastmim.pretrain --resume --output-dir "$SCRATCH/fsdp" \
      --max-steps 6 >>"$SCRATCH/fsdp.log" 2>&1
    tr '\r' '\n' <"$SCRATCH/fsdp.log" | grep -v "it/s]$" | tail -6
    cp "$SCRATCH/fsdp/metrics.jsonl" "$RESULTS/fsdp_metrics.jsonl" 2>/dev/null
  fi
}

# transformers' ViTMAE-Base step as transformers runs it vs patched by fastmim.integrations (issue 20; prediction in
# benchmarks/notes/hf-vit-mae.md). Where transformers is missing it is installed from .wheels/ (benchmarks/wheels.sh,
# carried with the tree) when that is there.
s_hf() {
  step "ViTMAE-Base (Hugging Face) training step, batch 64, bf16: transformers vs patch_hf_vit_mae" && {
    if [ "$DRY" != 1 ] && ! $PY -c "import transformers" 2>/dev/null && [ -d .wheels ]; then
      $PY -m pip install -q --no-index --find-links .wheels transformers 2>&1 | tail -2
    fi
    if $PY -c "import transformers" 2>/dev/null; then
      fits 60 "hf" && run 120 $PY -m pytest -q -p no:cacheprovider tests/integrations/test_hf.py
      # (each benchmark whatever the tests and the one before say)
      fits 60 "hf benchmark" && run 150 $PY benchmarks/hf_vit_mae.py --batch-size 64 --out "$RESULTS/hf_vit_mae.jsonl"
      fits 90 "hf, fused layers" && run 150 $PY benchmarks/hf_vit_mae.py --batch-size 64 --layers \
        --out "$RESULTS/hf_vit_mae.jsonl"
      fits 120 "hf, compiled" && run 240 $PY benchmarks/hf_vit_mae.py --batch-size 64 --compile \
        --out "$RESULTS/hf_vit_mae.jsonl"
    else
      echo "SKIPPED: transformers is not installed here and no .wheels/ was carried (bash benchmarks/wheels.sh)"
    fi
  }
}

# --loader torch-gpu (issue 22; predictions in benchmarks/notes/gpu-decode.md): the decode's GPU tests; the loader's
# img/s on 16,384 generated ImageNet-like JPEGs with 8 workers beside the CPU loader's, then with --sync-timing (where
# the time goes); MAE ViT-B/16 eager on those JPEGs beside synthetic images (real / synthetic >= 0.90)
s_gpu_data() {
  step "GPU JPEG decoding (--loader torch-gpu): tests, dataload rows, MAE ViT-B/16 on JPEGs vs synthetic" && {
    # the generated JPEGs first, in a command of their own: a time limit on a measuring command cannot cut them
    fits 120 "generating 16,384 JPEGs" && run 150 $PY benchmarks/dataload.py --images 16384 --prepare-only
    fits 40 "GPU decode tests" && run 120 $PY -m pytest -q -ra -p no:cacheprovider -m gpu tests/data/test_gpu_decode.py \
      tests/ops/test_resized_crop.py
    fits 60 "torch-gpu dataload" && run 150 $PY benchmarks/dataload.py --loaders torch-gpu,torchvision --workers 8 \
      --images 16384 --batch 256 --seconds 8 --out "$RESULTS/dataload.jsonl"
    fits 30 "torch-gpu dataload, --sync-timing" && run 60 $PY benchmarks/dataload.py --loaders torch-gpu --workers 8 \
      --images 16384 --batch 256 --seconds 5 --sync-timing --out "$RESULTS/dataload.jsonl"
    fits 30 "torch-gpu dataload, PixMIM's simple crop" && run 60 $PY benchmarks/dataload.py --loaders torch-gpu \
      --workers 8 --images 16384 --batch 256 --seconds 5 --sync-timing --crop simple --out "$RESULTS/dataload.jsonl"
    fits 90 "MAE ViT-B on real JPEGs" && run 180 $PY benchmarks/throughput.py --model vit_base_patch16 \
      --batch-size 256 --amp bf16 --steps 30 --warmup 5 --peak-tflops 790 --modes fastmim --no-flop-count \
      --data "$FASTMIM_CACHE/bench-jpegs-16384" --loader torch-gpu --workers 8 --also-synthetic \
      --out "$RESULTS/throughput.jsonl"
  }
}

# python -m fastmim.eval on CUDA: kNN feature-extraction speed of a ViT-B/16 at 224 px (bf16) on the built-in digits
# (scikit-learn is on the GPU machine; predicted in benchmarks/notes/eval.md)
s_eval() {
  step "python -m fastmim.eval knn: ViT-B/16 features at 224 px, bf16, 8 loader processes" &&
    fits 60 "eval" && run 90 $PY -m fastmim.eval knn --random vit_base_patch16 --no-cache --workers 8 \
      --out "$RESULTS/eval.jsonl"
}

for name in $ORDER; do
  "s_$name"
done

step "results of this run"
if [ -d "$SCRATCH/profiles" ]; then  # the device tool returns files up to 16 MiB: keep the traces under 15 MB together
  total=0
  for f in $(ls -S -r "$SCRATCH/profiles"); do
    size=$(stat -c %s "$SCRATCH/profiles/$f")
    if [ $((total + size)) -gt 15000000 ]; then echo "trace $f ($size bytes) left out: over the size limit"; rm -f "$SCRATCH/profiles/$f"
    else total=$((total + size)); fi
  done
  tar -cf "$RESULTS/profiles.tar" -C "$SCRATCH" profiles
fi
[ "$DRY" = 1 ] || $PY benchmarks/report.py --results "$RESULTS" || status=1
# the device tool returns 8 files: the rows in one archive (added to one a run before left in this folder: -r)
if [ "$DRY" != 1 ] && [ "$(ls "$RESULTS" | wc -l)" -gt 8 ] && ls "$RESULTS"/*.jsonl >/dev/null 2>&1; then
  (cd "$RESULTS" && tar -$([ -f results.tar ] && echo r || echo c)f results.tar ./*.jsonl && rm -f ./*.jsonl) &&
    echo "the .jsonl files are in results.tar"
fi
ls -la "$RESULTS"
if [ "$DRY" = 1 ]; then
  echo "DRY RUN: the commands' limits add up to $DRY_TOTAL s against a budget of $BUDGET s (plus about 40 s of set-up" \
    "and build inside it); a step that would not fit when its turn comes is skipped"
  echo "DRY RUN: at the steps' estimates (about $DRY_EXPECT s for those that fit), skipped: ${DRY_SKIPPED:-none}"
fi
step "done, status $status"
exit $status
