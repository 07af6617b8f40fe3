// Device helpers shared by the CUDA kernels of fastmim._cuda: element types and their fp32 conversions, 16-byte
// vectors, warp reductions, dtype dispatch and the device's multiprocessor count.
//
// Every kernel computes in fp32 and rounds once to the output type (round to nearest even, as PyTorch does). Dtype
// codes are those of fastmim._C: 0 float32, 1 bfloat16, 2 float16 (index tensors: 3 int32, 4 int64).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace fastmim_cuda {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}

// One element of a small parameter tensor whose dtype is only known at run time (mask token, position embedding,
// class token, loss weights): a warp-uniform branch, cheap next to the bulk traffic.
__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// V elements p[off + i * stride] of a run-time dtype into v (added to v when kAdd); the dtype switch sits outside
// the element loop, so each branch is V plain loads.
template <int V, bool kAdd>
__device__ __forceinline__ void load_any_vec(const void* p, int dtype, int64_t off, int64_t stride, float (&v)[V]) {
  switch (dtype) {
    case kBF16: {
      const __nv_bfloat16* q = static_cast<const __nv_bfloat16*>(p) + off;
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = (kAdd ? v[i] : 0.f) + __bfloat162float(q[i * stride]);
    } break;
    case kF16: {
      const __half* q = static_cast<const __half*>(p) + off;
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = (kAdd ? v[i] : 0.f) + __half2float(q[i * stride]);
    } break;
    default: {
      const float* q = static_cast<const float*>(p) + off;
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = (kAdd ? v[i] : 0.f) + q[i * stride];
    }
  }
}

// Index tensors are int64 or int32: read either as int64.
__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// N elements of T in one aligned access (N * sizeof(T) = 16 bytes for the vector paths, 1 element otherwise).
template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <class T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f32(v.v[i]);
}

template <class T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  Vec<T, N> v;
#pragma unroll
  for (int i = 0; i < N; ++i) v.v[i] = from_f32<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float qnan() { return __int_as_float(0x7fc00000); }

constexpr int kWarp = 32;

// Multiprocessors of the current device, read once per device.
inline int sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cache[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
    cache[dev] = n;
  }
  return cache[dev];
}

__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// True when p is aligned to `bytes` and every stride (in elements) keeps it so.
inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace fastmim_cuda

// Runs the statement with T bound to the element type of a float dtype code; other codes return invalid value.
#define FASTMIM_FLOAT_TYPE(code, T, ...)                \
  switch (code) {                                       \
    case ::fastmim_cuda::kF32: {                        \
      using T = float;                                  \
      __VA_ARGS__;                                      \
    } break;                                            \
    case ::fastmim_cuda::kBF16: {                       \
      using T = __nv_bfloat16;                          \
      __VA_ARGS__;                                      \
    } break;                                            \
    case ::fastmim_cuda::kF16: {                        \
      using T = __half;                                 \
      __VA_ARGS__;                                      \
    } break;                                            \
    default:                                            \
      return cudaErrorInvalidValue;                     \
  }
