// patchify / unpatchify: [B, C, H, W] <-> [B, L, P*P*C], (pi, qi, c) order inside a patch (MAE).
//
// A block takes one strip of up to GX patches of one patch row: the C*P image rows of the strip are read (or
// written) along W, the strip's patches are written (or read) as one contiguous run, and shared memory in between
// holds the strip channel-last ([pi][x][c]), so that both sides are coalesced and neither needs a division per
// element. Elements are moved as raw 2- or 4-byte words.
#include "common.cuh"
#include "launch.h"

namespace fastmim_cuda {
namespace {

constexpr int kPatchThreads = 256;
constexpr int kPatchWarps = kPatchThreads / kWarp;
constexpr int64_t kTileBytes = 16 * 1024;

int64_t strip_patches(const PatchifyArgs& a) {
  const int64_t per_patch = a.P * a.P * a.C * a.elem_size;
  int64_t gx = kTileBytes / (per_patch > 0 ? per_patch : 1);
  if (gx < 1) gx = 1;
  return gx < a.gw ? gx : a.gw;
}

template <class E, bool kToPatches>
__global__ void __launch_bounds__(kPatchThreads) patchify_kernel(PatchifyArgs a, int64_t GX) {
  extern __shared__ unsigned char raw[];
  E* tile = reinterpret_cast<E*>(raw);  // [P][nx * P][C]
  const int64_t chunks = cdiv(a.gw, GX);
  const int64_t per_b = a.gh * chunks;
  const int64_t b = blockIdx.x / per_b;
  const int64_t gy = (blockIdx.x % per_b) / chunks;
  const int64_t gx0 = (blockIdx.x % chunks) * GX;
  const int64_t nx = a.gw - gx0 < GX ? a.gw - gx0 : GX;
  const int64_t wc = nx * a.P;  // strip width in pixels
  const int64_t pc = a.P * a.C;  // one patch row, channel-last
  const int64_t D = pc * a.P;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const E* src = static_cast<const E*>(a.src);
  E* dst = static_cast<E*>(a.dst);
  // image rows of the strip: (c, pi) per warp, x along the lanes
  const int64_t img0 = b * a.si_b + gy * a.P * a.si_h + gx0 * a.P * a.si_w;
  // patches gy * gw + gx0 ... of sample b: segment (g, pi) of pc values per warp
  const int64_t l0 = gy * a.gw + gx0;
  if (kToPatches) {
    for (int64_t row = warp; row < a.C * a.P; row += kPatchWarps) {
      const int64_t c = row / a.P, pi = row % a.P;
      const E* s = src + img0 + c * a.si_c + pi * a.si_h;
      E* t = tile + pi * wc * a.C + c;
      for (int64_t x = lane; x < wc; x += kWarp) t[x * a.C] = s[x * a.si_w];
    }
    __syncthreads();
    E* out = dst + b * a.sp_b + l0 * a.sp_l;  // patches are contiguous: sp_l = D, sp_e = 1
    for (int64_t seg = warp; seg < nx * a.P; seg += kPatchWarps) {
      const int64_t g = seg / a.P, pi = seg % a.P;
      const E* t = tile + pi * wc * a.C + g * pc;
      E* o = out + g * D + pi * pc;
      for (int64_t j = lane; j < pc; j += kWarp) o[j] = t[j];
    }
  } else {
    const E* in = src + b * a.sp_b + l0 * a.sp_l;
    for (int64_t seg = warp; seg < nx * a.P; seg += kPatchWarps) {
      const int64_t g = seg / a.P, pi = seg % a.P;
      E* t = tile + pi * wc * a.C + g * pc;
      const E* s = in + g * a.sp_l + pi * pc * a.sp_e;
      for (int64_t j = lane; j < pc; j += kWarp) t[j] = s[j * a.sp_e];
    }
    __syncthreads();
    for (int64_t row = warp; row < a.C * a.P; row += kPatchWarps) {
      const int64_t c = row / a.P, pi = row % a.P;
      E* o = dst + img0 + c * a.si_c + pi * a.si_h;  // the image is contiguous here
      const E* t = tile + pi * wc * a.C + c;
      for (int64_t x = lane; x < wc; x += kWarp) o[x * a.si_w] = t[x * a.C];
    }
  }
}

template <class E>
cudaError_t launch(const PatchifyArgs& a, bool to_patches, cudaStream_t stream) {
  const int64_t gx = strip_patches(a);
  const int64_t blocks = a.B * a.gh * cdiv(a.gw, gx);
  const size_t smem = static_cast<size_t>(gx * a.P * a.P * a.C) * sizeof(E);
  if (to_patches) {
    if (smem > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(patchify_kernel<E, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    patchify_kernel<E, true><<<static_cast<unsigned>(blocks), kPatchThreads, smem, stream>>>(a, gx);
  } else {
    if (smem > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(patchify_kernel<E, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    patchify_kernel<E, false><<<static_cast<unsigned>(blocks), kPatchThreads, smem, stream>>>(a, gx);
  }
  return cudaGetLastError();
}

}  // namespace

// One patch must fit in shared memory (P*P*C elements, up to 227 KB on Hopper); the Python side checks the size.
cudaError_t patchify(const PatchifyArgs& a, bool to_patches, cudaStream_t stream) {
  if (a.B * a.gh * a.gw == 0 || a.C == 0 || a.P == 0) return cudaSuccess;
  if (a.elem_size == 4) return launch<uint32_t>(a, to_patches, stream);
  if (a.elem_size == 2) return launch<uint16_t>(a, to_patches, stream);
  return cudaErrorInvalidValue;
}

}  // namespace fastmim_cuda
