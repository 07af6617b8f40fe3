// Visible-token gather (MAE encoder) and decoder-input scatter (MAE decoder), forward and backward.
//
// One warp per row of D values; rows move in 16-byte vectors when the layout allows (last dim contiguous, D and the
// strides multiples of the vector, aligned base), else element by element through the strides.
#include "common.cuh"
#include "launch.h"

namespace fastmim_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;

// ---- gather_visible ------------------------------------------------------------------------------------------

template <class T, int V>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(const T* __restrict__ x, const void* __restrict__ ids,
                                                               bool ids64, T* __restrict__ out, int64_t rows,
                                                               int64_t N, int64_t K, int64_t D, int64_t sx_b,
                                                               int64_t sx_n, int64_t sx_d, int64_t si_b,
                                                               int64_t si_k) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const int64_t b = row / K, k = row % K;
  const int64_t id = load_index(ids, ids64, b * si_b + k * si_k);
  const bool ok = id >= 0 && id < N;
  const T* src = x + b * sx_b + (ok ? id : 0) * sx_n;
  T* dst = out + row * D;
  if constexpr (V > 1) {
#pragma unroll 4
    for (int64_t d = static_cast<int64_t>(lane) * V; d < D; d += kWarp * V) {
      Vec<T, V> v;
      if (ok) {
        v = *reinterpret_cast<const Vec<T, V>*>(src + d);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v.v[i] = from_f32<T>(qnan());
      }
      *reinterpret_cast<Vec<T, V>*>(dst + d) = v;
    }
  } else {
    for (int64_t d = lane; d < D; d += kWarp) dst[d] = ok ? src[d * sx_d] : from_f32<T>(qnan());
  }
}

// Rows [n0, n0 + kInvRows) of sample b: which gradient row (if any) lands in each, found by one pass over the ids.
constexpr int kInvRows = 32;

template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    gather_backward_kernel(const T* __restrict__ g, const void* __restrict__ ids, bool ids64, T* __restrict__ out,
                           int64_t N, int64_t K, int64_t D, int64_t sg_b, int64_t sg_k, int64_t sg_d, int64_t si_b,
                           int64_t si_k) {
  __shared__ int src_row[kInvRows];
  const int64_t chunks = cdiv(N, kInvRows);
  const int64_t b = blockIdx.x / chunks;
  const int64_t n0 = (blockIdx.x % chunks) * kInvRows;
  if (threadIdx.x < kInvRows) src_row[threadIdx.x] = -1;
  __syncthreads();
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const int64_t id = load_index(ids, ids64, b * si_b + k * si_k);
    if (id >= n0 && id < n0 + kInvRows && id < N) src_row[id - n0] = static_cast<int>(k);
  }
  __syncthreads();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int r = warp; r < kInvRows && n0 + r < N; r += kWarps) {
    const int k = src_row[r];
    const T* src = g + b * sg_b + static_cast<int64_t>(k < 0 ? 0 : k) * sg_k;
    T* dst = out + (b * N + n0 + r) * D;
    if constexpr (V > 1) {
#pragma unroll 4
      for (int64_t d = static_cast<int64_t>(lane) * V; d < D; d += kWarp * V) {
        Vec<T, V> v;
        if (k >= 0) {
          v = *reinterpret_cast<const Vec<T, V>*>(src + d);
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) v.v[i] = from_f32<T>(0.f);
        }
        *reinterpret_cast<Vec<T, V>*>(dst + d) = v;
      }
    } else {
      for (int64_t d = lane; d < D; d += kWarp) dst[d] = k >= 0 ? src[d * sg_d] : from_f32<T>(0.f);
    }
  }
}

// True when rows of D elements of T at `p` (row strides s1, s2; element stride sd) can move in V-vectors.
template <class T, int V>
bool vec_ok(const void* p, int64_t D, int64_t s1, int64_t s2, int64_t sd) {
  return V > 1 && sd == 1 && D % V == 0 && s1 % V == 0 && s2 % V == 0 && aligned(p, sizeof(T) * V);
}

// ---- scatter_masked ------------------------------------------------------------------------------------------

template <class TX, class TO, int V>
__global__ void __launch_bounds__(kThreads) scatter_masked_kernel(ScatterArgs a, TO* __restrict__ out) {
  const int has_cls = a.cls != nullptr;
  const int64_t R = a.N + has_cls;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= a.B * R) return;
  const int64_t b = row / R, r = row % R;
  int kind;  // 0 visible token, 1 mask token, 2 class token, 3 id out of range
  int64_t j = 0;
  if (has_cls && r == 0) {
    kind = 2;
  } else {
    j = load_index(a.ids, a.ids64, b * a.si_b + (r - has_cls) * a.si_n);
    kind = (j >= 0 && j < a.K) ? 0 : (j >= a.K && j < a.N) ? 1 : 3;
  }
  const TX* src = static_cast<const TX*>(a.x) + b * a.sx_b + (kind == 0 ? j : 0) * a.sx_k;
  TO* dst = out + row * a.D;
  for (int64_t d = static_cast<int64_t>(lane) * V; d < a.D; d += kWarp * V) {
    float v[V];
    if (kind == 0) {
      if constexpr (V > 1) {
        load_vec<TX, V>(src + d, v);
      } else {
        v[0] = to_f32(src[d * a.sx_d]);
      }
    } else if (kind == 1) {
      load_any_vec<V, false>(a.mask_token, a.mt_dtype, d * a.smt_d, a.smt_d, v);
    } else if (kind == 2) {
      load_any_vec<V, false>(a.cls, a.cls_dtype, b * a.scls_b + d * a.scls_d, a.scls_d, v);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = qnan();
    }
    if (a.pos != nullptr) load_any_vec<V, true>(a.pos, a.pos_dtype, r * a.spos_r + d * a.spos_d, a.spos_d, v);
    store_vec<TO, V>(dst + d, v);
  }
}

// Backward: a block takes kWarps output rows (one per warp) of samples [b0, b0 + b_per_block) and one column chunk
// of kChunk values (each lane kChunk / 32 of them, V at a time). Visible rows go to gx; masked rows are summed for the
// mask token (block partial through shared memory), every row for the position embedding (per-warp partial).
constexpr int kChunk = 512;
constexpr int kBwdBatch = 16;

__device__ __forceinline__ void store_any(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kBF16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    case kF16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

template <class TG, class TX, int V>
__global__ void __launch_bounds__(kThreads)
    scatter_backward_kernel(ScatterBackwardArgs a, TX* __restrict__ gx, void* gcls, int gcls_dtype,
                            float* __restrict__ part_mt, float* __restrict__ part_pos) {
  constexpr int kPerLane = kChunk / kWarp;  // values per lane
  constexpr int kSteps = kPerLane / V;
  __shared__ float red[kWarps][kChunk];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int has_cls = a.has_cls ? 1 : 0;
  const int64_t R = a.N + has_cls;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kBwdBatch;
  const int64_t b1 = min(b0 + kBwdBatch, a.B);
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * kChunk;
  float mt[kSteps][V], pos[kSteps][V];
#pragma unroll
  for (int s = 0; s < kSteps; ++s)
#pragma unroll
    for (int i = 0; i < V; ++i) mt[s][i] = pos[s][i] = 0.f;
  const TG* g = static_cast<const TG*>(a.g);
  if (r < R) {
    for (int64_t b = b0; b < b1; ++b) {
      int kind;  // 0 visible, 1 mask token, 2 class token, 3 bad id
      int64_t j = 0;
      if (has_cls && r == 0) {
        kind = 2;
      } else {
        j = load_index(a.ids, a.ids64, b * a.si_b + (r - has_cls) * a.si_n);
        kind = (j >= 0 && j < a.K) ? 0 : (j >= a.K && j < a.N) ? 1 : 3;
      }
      const TG* src = g + b * a.sg_b + r * a.sg_r;
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        const int64_t d = c0 + (static_cast<int64_t>(s) * kWarp + lane) * V;
        if (d >= a.D) continue;
        float v[V];
        if constexpr (V > 1) {
          load_vec<TG, V>(src + d, v);
        } else {
          v[0] = to_f32(src[d * a.sg_d]);
        }
#pragma unroll
        for (int i = 0; i < V; ++i) pos[s][i] += v[i];
        if (kind == 1) {
#pragma unroll
          for (int i = 0; i < V; ++i) mt[s][i] += v[i];
        } else if (kind == 0) {
          store_vec<TX, V>(gx + (b * a.K + j) * a.D + d, v);
        } else if (kind == 2 && gcls != nullptr) {
#pragma unroll
          for (int i = 0; i < V; ++i) store_any(gcls, gcls_dtype, b * a.D + d + i, v[i]);
        }
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kSteps; ++s)
#pragma unroll
    for (int i = 0; i < V; ++i) red[warp][(s * kWarp + lane) * V + i] = mt[s][i];
  if (part_pos != nullptr && r < R) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int64_t d = c0 + (static_cast<int64_t>(s) * kWarp + lane) * V;
#pragma unroll
      for (int i = 0; i < V; ++i)
        if (d + i < a.D) part_pos[(blockIdx.y * R + r) * a.D + d + i] = pos[s][i];
    }
  }
  __syncthreads();
  const int64_t prog = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  for (int c = threadIdx.x; c < kChunk; c += kThreads) {
    if (c0 + c >= a.D) break;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w][c];  // fixed order: deterministic
    part_mt[prog * a.D + c0 + c] = s;
  }
}

// out[c] = sum over p of part[p * width + c], in order of p.
__global__ void sum_parts_kernel(const float* __restrict__ part, int64_t parts, int64_t width,
                                 float* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= width) return;
  float s = 0.f;
  for (int64_t p = 0; p < parts; ++p) s += part[p * width + c];
  out[c] = s;
}

dim3 scatter_backward_grid(const ScatterBackwardArgs& a) {
  const int64_t R = a.N + (a.has_cls ? 1 : 0);
  return dim3(static_cast<unsigned>(cdiv(R, kWarps)), static_cast<unsigned>(cdiv(a.B, kBwdBatch)),
              static_cast<unsigned>(cdiv(a.D, kChunk)));
}

}  // namespace

cudaError_t gather_visible(const void* x, int dtype, int64_t sx_b, int64_t sx_n, int64_t sx_d, const void* ids,
                           bool ids64, int64_t si_b, int64_t si_k, void* out, int64_t B, int64_t N, int64_t K,
                           int64_t D, cudaStream_t stream) {
  const int64_t rows = B * K;
  if (rows == 0 || D == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(cdiv(rows, kWarps)));
  FASTMIM_FLOAT_TYPE(dtype, T, {
    constexpr int V = 16 / sizeof(T);
    if (vec_ok<T, V>(x, D, sx_b, sx_n, sx_d) && aligned(out, 16))
      gather_rows_kernel<T, V><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), ids, ids64,
                                                             static_cast<T*>(out), rows, N, K, D, sx_b, sx_n, sx_d,
                                                             si_b, si_k);
    else
      gather_rows_kernel<T, 1><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), ids, ids64,
                                                             static_cast<T*>(out), rows, N, K, D, sx_b, sx_n, sx_d,
                                                             si_b, si_k);
  });
  return cudaGetLastError();
}

cudaError_t gather_visible_backward(const void* g, int dtype, int64_t sg_b, int64_t sg_k, int64_t sg_d,
                                    const void* ids, bool ids64, int64_t si_b, int64_t si_k, void* out, int64_t B,
                                    int64_t N, int64_t K, int64_t D, cudaStream_t stream) {
  if (B * N == 0 || D == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(B * cdiv(N, kInvRows)));
  FASTMIM_FLOAT_TYPE(dtype, T, {
    constexpr int V = 16 / sizeof(T);
    if (vec_ok<T, V>(g, D, sg_b, sg_k, sg_d) && aligned(out, 16))
      gather_backward_kernel<T, V><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(g), ids, ids64, static_cast<T*>(out), N, K, D, sg_b, sg_k, sg_d, si_b, si_k);
    else
      gather_backward_kernel<T, 1><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(g), ids, ids64, static_cast<T*>(out), N, K, D, sg_b, sg_k, sg_d, si_b, si_k);
  });
  return cudaGetLastError();
}

cudaError_t scatter_masked(const ScatterArgs& a, void* out, int out_dtype, cudaStream_t stream) {
  const int64_t rows = a.B * (a.N + (a.cls != nullptr ? 1 : 0));
  if (rows == 0 || a.D == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(cdiv(rows, kWarps)));
  FASTMIM_FLOAT_TYPE(a.x_dtype, TX, {
    FASTMIM_FLOAT_TYPE(out_dtype, TO, {
      constexpr int V = 16 / sizeof(TO);
      // the x rows must take V-vectors too (V * sizeof(TX) bytes)
      if (vec_ok<TX, V>(a.x, a.D, a.sx_b, a.sx_k, a.sx_d) && aligned(out, 16))
        scatter_masked_kernel<TX, TO, V><<<grid, kThreads, 0, stream>>>(a, static_cast<TO*>(out));
      else
        scatter_masked_kernel<TX, TO, 1><<<grid, kThreads, 0, stream>>>(a, static_cast<TO*>(out));
    });
  });
  return cudaGetLastError();
}

int64_t scatter_masked_workspace(const ScatterBackwardArgs& a, bool need_pos) {
  const dim3 grid = scatter_backward_grid(a);
  const int64_t R = a.N + (a.has_cls ? 1 : 0);
  return static_cast<int64_t>(grid.x) * grid.y * a.D + (need_pos ? static_cast<int64_t>(grid.y) * R * a.D : 0);
}

cudaError_t scatter_masked_backward(const ScatterBackwardArgs& a, void* gx, int x_dtype, float* gmt, float* gpos,
                                    void* gcls, int gcls_dtype, float* workspace, int64_t workspace_size,
                                    cudaStream_t stream) {
  const int64_t R = a.N + (a.has_cls ? 1 : 0);
  if (workspace_size < scatter_masked_workspace(a, gpos != nullptr)) return cudaErrorInvalidValue;
  const int64_t x_size = x_dtype == kF32 ? 4 : 2;
  // rows of gx that no valid id points at stay zero
  cudaError_t err = cudaMemsetAsync(gx, 0, static_cast<size_t>(a.B * a.K * a.D * x_size), stream);
  if (err != cudaSuccess) return err;
  if (a.D == 0) return cudaSuccess;
  if (a.B == 0 || R == 0) {
    err = cudaMemsetAsync(gmt, 0, static_cast<size_t>(a.D) * 4, stream);
    if (err == cudaSuccess && gpos != nullptr) err = cudaMemsetAsync(gpos, 0, static_cast<size_t>(R * a.D) * 4, stream);
    return err;
  }
  const dim3 grid = scatter_backward_grid(a);
  float* part_mt = workspace;
  float* part_pos = gpos != nullptr ? workspace + static_cast<int64_t>(grid.x) * grid.y * a.D : nullptr;
  FASTMIM_FLOAT_TYPE(a.g_dtype, TG, {
    FASTMIM_FLOAT_TYPE(x_dtype, TX, {
      constexpr int V = 16 / sizeof(TG) < 16 / sizeof(TX) ? 16 / sizeof(TG) : 16 / sizeof(TX);
      if (vec_ok<TG, V>(a.g, a.D, a.sg_b, a.sg_r, a.sg_d) && aligned(gx, 16))
        scatter_backward_kernel<TG, TX, V><<<grid, kThreads, 0, stream>>>(a, static_cast<TX*>(gx), gcls, gcls_dtype,
                                                                         part_mt, part_pos);
      else
        scatter_backward_kernel<TG, TX, 1><<<grid, kThreads, 0, stream>>>(a, static_cast<TX*>(gx), gcls, gcls_dtype,
                                                                         part_mt, part_pos);
    });
  });
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  sum_parts_kernel<<<static_cast<unsigned>(cdiv(a.D, 256)), 256, 0, stream>>>(
      part_mt, static_cast<int64_t>(grid.x) * grid.y, a.D, gmt);
  if (gpos != nullptr)
    sum_parts_kernel<<<static_cast<unsigned>(cdiv(R * a.D, 256)), 256, 0, stream>>>(part_pos, grid.y, R * a.D, gpos);
  return cudaGetLastError();
}

}  // namespace fastmim_cuda
