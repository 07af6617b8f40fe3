// Masked reconstruction loss (MAE norm-pix MSE, SimMIM-style L1) with patchify fused, forward and backward.
//
// One warp per patch. The target patch is read straight from the images (rows of P contiguous pixels per channel),
// kept in shared memory in the prediction's (pi, qi, c) order, normalised by its mean and unbiased variance (two
// passes over shared memory, as the reference), and compared with the prediction read in 16-byte vectors. Patches of
// weight 0 are never read. The forward writes one partial sum per block and a second launch adds them in a fixed
// order (deterministic, no atomics); the backward recomputes the target instead of storing anything.
#include "common.cuh"
#include "launch.h"

namespace fastmim_cuda {
namespace {

constexpr int kLossWarps = 4;
constexpr int kLossThreads = kLossWarps * kWarp;
constexpr int64_t kBlocksPerSm = kLossBlocksPerSm;

// kP > 0: patches of kP x kP pixels with kC = 3 channels known at compile time (MAE's 16 x 16 RGB), so every loop
// below has a constant trip count and unrolls: a lane has all its loads of a patch in flight at once (with run-time
// bounds the loops issued a few loads per DRAM round trip, and the loss ran at a quarter of the copy bandwidth).
constexpr int kFixedC = 3;

template <int kP>
__device__ __forceinline__ int64_t patch_values(const LossArgs& a) {
  if constexpr (kP > 0) {
    return kP * kP * kFixedC;
  } else {
    return a.D;
  }
}

// Loads patch (b, l) into t[0, D) (prediction order) and returns its mean and 1/std (or 0 and 1 without norm_pix).
template <class TT, int kP>
__device__ __forceinline__ void load_target(const LossArgs& a, int64_t b, int64_t l, float* t, int lane, float& mean,
                                            float& rstd) {
  const TT* tgt = static_cast<const TT*>(a.target);
  const int64_t base = b * a.s_b + (l / a.gw) * a.s_row + (l % a.gw) * a.s_col;
  const int64_t D = patch_values<kP>(a);
  float s = 0.f;
  if constexpr (kP > 0) {
    static_assert((kP * kP) % kWarp == 0, "a patch row block must fill whole warps");
    constexpr int kIters = kP * kP / kWarp;
    float v[kIters][kFixedC];  // every load of the lane issued before the first use
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int idx = it * kWarp + lane;
      const TT* src = tgt + base + (idx / kP) * a.s_pi + (idx % kP) * a.s_qi;
#pragma unroll
      for (int c = 0; c < kFixedC; ++c) v[it][c] = to_f32(src[c * a.s_c]);
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
#pragma unroll
      for (int c = 0; c < kFixedC; ++c) {
        t[(it * kWarp + lane) * kFixedC + c] = v[it][c];
        s += v[it][c];
      }
    }
  } else if (a.P == 1) {  // [B, L, D] targets: element e at base + e * s_c
    for (int64_t e = lane; e < a.D; e += kWarp) {
      const float v = to_f32(tgt[base + e * a.s_c]);
      t[e] = v;
      s += v;
    }
  } else {  // images: lanes along a row of the patch, every channel in turn
    const int64_t pp = a.P * a.P;
    for (int64_t idx = lane; idx < pp; idx += kWarp) {
      const int64_t pi = idx / a.P, qi = idx % a.P;
      const TT* src = tgt + base + pi * a.s_pi + qi * a.s_qi;
      float* dst = t + idx * a.C;
      for (int64_t c = 0; c < a.C; ++c) {
        const float v = to_f32(src[c * a.s_c]);
        dst[c] = v;
        s += v;
      }
    }
  }
  __syncwarp();
  if (!a.norm_pix) {
    mean = 0.f;
    rstd = 1.f;
    return;
  }
  mean = warp_sum(s) / static_cast<float>(D);
  float ss = 0.f;
  for (int64_t e = lane; e < D; e += kWarp) {
    const float d = t[e] - mean;
    ss += d * d;
  }
  const float var = warp_sum(ss) / static_cast<float>(D - 1);  // unbiased, as torch.var
  rstd = 1.f / sqrtf(var + a.eps);
}

template <class TP, int V>
__device__ __forceinline__ void load_pred(const TP* row, int64_t e, int64_t sp_d, float (&p)[V]) {
  if constexpr (V > 1) {
    load_vec<TP, V>(row + e, p);
  } else {
    p[0] = to_f32(row[e * sp_d]);
  }
}

template <class TP, class TT, int V, int kP>
__global__ void __launch_bounds__(kLossThreads) masked_loss_fwd_kernel(LossArgs a, float* __restrict__ part) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t D = patch_values<kP>(a);
  float* t = smem + warp * D;
  __shared__ float red[2][kLossWarps];
  float loss_acc = 0.f, w_acc = 0.f;
  const int64_t patches = a.B * a.L;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kLossWarps + warp; q < patches;
       q += static_cast<int64_t>(gridDim.x) * kLossWarps) {
    const int64_t b = q / a.L, l = q % a.L;
    const float w = load_any(a.mask, a.mask_dtype, b * a.sm_b + l * a.sm_l);
    w_acc += w;
    if (w == 0.f) continue;
    float mean, rstd;
    load_target<TT, kP>(a, b, l, t, lane, mean, rstd);
    const TP* row = static_cast<const TP*>(a.pred) + b * a.sp_b + l * a.sp_l;
    float err = 0.f;
    if constexpr (kP > 0) {  // all of the lane's prediction vectors in flight, then the arithmetic
      constexpr int kVecs = kP * kP * kFixedC / (kWarp * V);
      static_assert(kP * kP * kFixedC % (kWarp * V) == 0, "whole vectors per lane");
      float p[kVecs][V];
#pragma unroll
      for (int j = 0; j < kVecs; ++j) load_pred<TP, V>(row, (j * kWarp + lane) * V, a.sp_d, p[j]);
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float diff = p[j][i] - (t[(j * kWarp + lane) * V + i] - mean) * rstd;
          err += a.p_norm == 1 ? fabsf(diff) : diff * diff;
        }
      }
    } else {
      for (int64_t e = static_cast<int64_t>(lane) * V; e < D; e += kWarp * V) {
        float p[V];
        load_pred<TP, V>(row, e, a.sp_d, p);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float diff = p[i] - (t[e + i] - mean) * rstd;
          err += a.p_norm == 1 ? fabsf(diff) : diff * diff;
        }
      }
    }
    loss_acc += w * (warp_sum(err) / static_cast<float>(D));
    __syncwarp();  // t is rewritten by the next patch
  }
  if (lane == 0) {
    red[0][warp] = loss_acc;
    red[1][warp] = w_acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float s0 = 0.f, s1 = 0.f;
    for (int w = 0; w < kLossWarps; ++w) {
      s0 += red[0][w];
      s1 += red[1][w];
    }
    part[blockIdx.x] = s0;
    part[gridDim.x + blockIdx.x] = s1;
  }
}

// out = (sum part[0, n) / sum part[n, 2n), sum part[n, 2n)), summed in a fixed order by one block.
__global__ void loss_finalize_kernel(const float* __restrict__ part, int n, float* __restrict__ out) {
  __shared__ float red[2][256];
  float s0 = 0.f, s1 = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    s0 += part[i];
    s1 += part[n + i];
  }
  red[0][threadIdx.x] = s0;
  red[1][threadIdx.x] = s1;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h >>= 1) {
    if (static_cast<int>(threadIdx.x) < h) {
      red[0][threadIdx.x] += red[0][threadIdx.x + h];
      red[1][threadIdx.x] += red[1][threadIdx.x + h];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[0] = red[0][0] / red[1][0];
    out[1] = red[1][0];
  }
}

template <class TP, class TT, int V, int kP>
__global__ void __launch_bounds__(kLossThreads)
    masked_loss_bwd_kernel(LossArgs a, const float* __restrict__ grad_loss, const float* __restrict__ denom,
                           TP* __restrict__ grad) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t D = patch_values<kP>(a);
  float* t = smem + warp * D;
  const float scale = grad_loss[0] / denom[0] / static_cast<float>(D);
  const int64_t patches = a.B * a.L;
  constexpr int VO = 16 / sizeof(TP) < V ? 16 / sizeof(TP) : V;  // the output row is contiguous
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kLossWarps + warp; q < patches;
       q += static_cast<int64_t>(gridDim.x) * kLossWarps) {
    const int64_t b = q / a.L, l = q % a.L;
    const float w = load_any(a.mask, a.mask_dtype, b * a.sm_b + l * a.sm_l);
    TP* out = grad + q * D;
    const float coef = w * scale;
    if (w == 0.f) {  // weight 0: never read, so NaN or inf there cannot leak into the gradient
      for (int64_t e = static_cast<int64_t>(lane) * VO; e < D; e += kWarp * VO) {
        float z[VO];
#pragma unroll
        for (int i = 0; i < VO; ++i) z[i] = 0.f;
        if constexpr (VO > 1) {
          store_vec<TP, VO>(out + e, z);
        } else {
          out[e] = from_f32<TP>(0.f);
        }
      }
      continue;
    }
    float mean, rstd;
    load_target<TT, kP>(a, b, l, t, lane, mean, rstd);
    const TP* row = static_cast<const TP*>(a.pred) + b * a.sp_b + l * a.sp_l;
    if constexpr (kP > 0) {  // all of the lane's prediction vectors in flight, then the arithmetic and the stores
      constexpr int kVecs = kP * kP * kFixedC / (kWarp * V);
      float p[kVecs][V];
#pragma unroll
      for (int j = 0; j < kVecs; ++j) load_pred<TP, V>(row, (j * kWarp + lane) * V, a.sp_d, p[j]);
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
        const int e = (j * kWarp + lane) * V;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float diff = p[j][i] - (t[e + i] - mean) * rstd;
          const float local = a.p_norm == 1 ? (diff > 0.f ? 1.f : (diff < 0.f ? -1.f : 0.f)) : 2.f * diff;
          p[j][i] = local * coef;
        }
        store_vec<TP, V>(out + e, p[j]);
      }
    } else {
      for (int64_t e = static_cast<int64_t>(lane) * V; e < D; e += kWarp * V) {
        float p[V];
        load_pred<TP, V>(row, e, a.sp_d, p);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float diff = p[i] - (t[e + i] - mean) * rstd;
          const float local = a.p_norm == 1 ? (diff > 0.f ? 1.f : (diff < 0.f ? -1.f : 0.f)) : 2.f * diff;
          p[i] = local * coef;
        }
        if constexpr (V > 1) {
          store_vec<TP, V>(out + e, p);
        } else {
          out[e] = from_f32<TP>(p[0]);
        }
      }
    }
    __syncwarp();
  }
}

int loss_grid(const LossArgs& a, int64_t max_blocks) {
  const int64_t need = cdiv(a.B * a.L, kLossWarps);
  int64_t cap = static_cast<int64_t>(sm_count()) * kBlocksPerSm;
  if (max_blocks < cap) cap = max_blocks;
  return static_cast<int>(need < cap ? need : cap);
}

size_t loss_smem(const LossArgs& a) { return static_cast<size_t>(kLossWarps) * a.D * sizeof(float); }

template <class TP>
bool pred_vec_ok(const LossArgs& a) {
  constexpr int V = 16 / sizeof(TP);
  return a.sp_d == 1 && a.D % V == 0 && a.sp_l % V == 0 && a.sp_b % V == 0 && aligned(a.pred, 16);
}

// MAE's patches (16 x 16 RGB images) run the kernels compiled for that size.
constexpr int kMaePatch = 16;
bool fixed_patch(const LossArgs& a) {
  return a.P == kMaePatch && a.C == kFixedC && a.D == kMaePatch * kMaePatch * kFixedC;
}

// Kernels taking more than 48 KB of dynamic shared memory must say so once per device.
template <class K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace

cudaError_t masked_loss_forward(const LossArgs& a, float* out, float* workspace, int64_t max_blocks,
                                cudaStream_t stream) {
  if (a.D > kLossMaxD || a.D < 1 || max_blocks < 1) return cudaErrorInvalidValue;
  const int grid = loss_grid(a, max_blocks);
  if (grid == 0) {  // no patch: 0 / 0
    cudaError_t err = cudaMemsetAsync(workspace, 0, 2 * sizeof(float), stream);
    if (err != cudaSuccess) return err;
    loss_finalize_kernel<<<1, 256, 0, stream>>>(workspace, 1, out);
    return cudaGetLastError();
  }
  const size_t smem = loss_smem(a);
  FASTMIM_FLOAT_TYPE(a.pred_dtype, TP, {
    FASTMIM_FLOAT_TYPE(a.target_dtype, TT, {
      constexpr int V = 16 / sizeof(TP);
      if (pred_vec_ok<TP>(a) && fixed_patch(a)) {
        masked_loss_fwd_kernel<TP, TT, V, kMaePatch><<<grid, kLossThreads, smem, stream>>>(a, workspace);
      } else if (pred_vec_ok<TP>(a)) {
        cudaError_t err = allow_smem(masked_loss_fwd_kernel<TP, TT, V, 0>, smem);
        if (err != cudaSuccess) return err;
        masked_loss_fwd_kernel<TP, TT, V, 0><<<grid, kLossThreads, smem, stream>>>(a, workspace);
      } else {
        cudaError_t err = allow_smem(masked_loss_fwd_kernel<TP, TT, 1, 0>, smem);
        if (err != cudaSuccess) return err;
        masked_loss_fwd_kernel<TP, TT, 1, 0><<<grid, kLossThreads, smem, stream>>>(a, workspace);
      }
    });
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  loss_finalize_kernel<<<1, 256, 0, stream>>>(workspace, grid, out);
  return cudaGetLastError();
}

cudaError_t masked_loss_backward(const LossArgs& a, const float* grad_loss, const float* denom, void* grad,
                                 cudaStream_t stream) {
  if (a.D > kLossMaxD || a.D < 1) return cudaErrorInvalidValue;
  const int grid = loss_grid(a, INT32_MAX);
  if (grid == 0) return cudaSuccess;
  const size_t smem = loss_smem(a);
  FASTMIM_FLOAT_TYPE(a.pred_dtype, TP, {
    FASTMIM_FLOAT_TYPE(a.target_dtype, TT, {
      constexpr int V = 16 / sizeof(TP);
      if (pred_vec_ok<TP>(a) && aligned(grad, 16) && fixed_patch(a)) {
        masked_loss_bwd_kernel<TP, TT, V, kMaePatch>
            <<<grid, kLossThreads, smem, stream>>>(a, grad_loss, denom, static_cast<TP*>(grad));
      } else if (pred_vec_ok<TP>(a) && aligned(grad, 16)) {
        cudaError_t err = allow_smem(masked_loss_bwd_kernel<TP, TT, V, 0>, smem);
        if (err != cudaSuccess) return err;
        masked_loss_bwd_kernel<TP, TT, V, 0>
            <<<grid, kLossThreads, smem, stream>>>(a, grad_loss, denom, static_cast<TP*>(grad));
      } else {
        cudaError_t err = allow_smem(masked_loss_bwd_kernel<TP, TT, 1, 0>, smem);
        if (err != cudaSuccess) return err;
        masked_loss_bwd_kernel<TP, TT, 1, 0>
            <<<grid, kLossThreads, smem, stream>>>(a, grad_loss, denom, static_cast<TP*>(grad));
      }
    });
  });
  return cudaGetLastError();
}

}  // namespace fastmim_cuda
