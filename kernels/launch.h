// Host-side launchers of the CUDA kernels in kernels/*.cu, called by the pybind11 module (module.cpp).
//
// Tensors cross as raw device pointers with element strides; the Python wrappers (fastmim/ops/_cuda.py) have
// validated shapes, dtypes and devices. Every launcher enqueues on `stream`, returns the launch's cudaError_t and
// never reads out of bounds whatever the index values: an id outside its range gives a NaN row (forward) or is
// skipped (backward), as in the Triton kernels.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastmim_cuda {

// dtype codes, as fastmim._C's
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// out[b, k, :] = x[b, ids[b, k], :]; out is [B, K, D] contiguous.
cudaError_t gather_visible(const void* x, int dtype, int64_t sx_b, int64_t sx_n, int64_t sx_d, const void* ids,
                           bool ids64, int64_t si_b, int64_t si_k, void* out, int64_t B, int64_t N, int64_t K,
                           int64_t D, cudaStream_t stream);

// out[b, n, :] = g[b, k, :] where ids[b, k] = n, zeros in every other row; out is [B, N, D] contiguous. Each output
// row is written once (no memset, no atomics): ids within a row are distinct.
cudaError_t gather_visible_backward(const void* g, int dtype, int64_t sg_b, int64_t sg_k, int64_t sg_d,
                                    const void* ids, bool ids64, int64_t si_b, int64_t si_k, void* out, int64_t B,
                                    int64_t N, int64_t K, int64_t D, cudaStream_t stream);

// MAE's decoder input: out[b, r] = (class token | x[b, j] | mask token) + pos[r]; out is [B, N + has_cls, D].
struct ScatterArgs {
  const void* x;
  int x_dtype;
  int64_t sx_b, sx_k, sx_d;
  const void* ids;
  bool ids64;
  int64_t si_b, si_n;
  const void* mask_token;
  int mt_dtype;
  int64_t smt_d;
  const void* pos;  // nullptr: none
  int pos_dtype;
  int64_t spos_r, spos_d;
  const void* cls;  // nullptr: none
  int cls_dtype;
  int64_t scls_b, scls_d;  // scls_b = 0: one class token for every sample
  int64_t B, N, K, D;
};
cudaError_t scatter_masked(const ScatterArgs& a, void* out, int out_dtype, cudaStream_t stream);

// Gradients of scatter_masked from g [B, R, D]: gx [B, K, D] (x's dtype, zero-filled here first), gmt [D] fp32,
// gpos [R, D] fp32 (if not nullptr), gcls [B, D] in gcls_dtype (if not nullptr: the per-sample class token's). The
// reductions go through the fp32 workspace (scatter_masked_workspace floats) and are deterministic.
struct ScatterBackwardArgs {
  const void* g;
  int g_dtype;
  int64_t sg_b, sg_r, sg_d;
  const void* ids;
  bool ids64;
  int64_t si_b, si_n;
  int64_t B, N, K, D;
  bool has_cls;
};
int64_t scatter_masked_workspace(const ScatterBackwardArgs& a, bool need_pos);
cudaError_t scatter_masked_backward(const ScatterBackwardArgs& a, void* gx, int x_dtype, float* gmt, float* gpos,
                                    void* gcls, int gcls_dtype, float* workspace, int64_t workspace_size,
                                    cudaStream_t stream);

// Masked (norm-pix) reconstruction loss. The target of patch (b, l), element e = (pi * P + qi) * C + c, is at
// b*s_b + (l / gw)*s_row + (l % gw)*s_col + pi*s_pi + qi*s_qi + c*s_c (images or [B, L, D] patches with P = 1).
struct LossArgs {
  const void* pred;
  int pred_dtype;
  int64_t sp_b, sp_l, sp_d;
  const void* target;
  int target_dtype;
  int64_t gw, s_b, s_row, s_col, P, C, s_pi, s_qi, s_c;
  const void* mask;
  int mask_dtype;
  int64_t sm_b, sm_l;
  int64_t B, L, D;
  float eps;
  bool norm_pix;
  int p_norm;  // 1 or 2
};
// Largest D the kernels take (a patch lives in shared memory); the Python side sends larger ones elsewhere.
constexpr int64_t kLossMaxD = 6144;
// out[0] = sum(w * patch_loss) / sum(w), out[1] = sum(w); fp32. workspace: 2 * max_blocks floats (the grid is at
// most max_blocks blocks; kLossBlocksPerSm per multiprocessor is what it uses when it can).
constexpr int64_t kLossBlocksPerSm = 12;  // 40 registers x 128 threads: 12 blocks fill an SM's register file
cudaError_t masked_loss_forward(const LossArgs& a, float* out, float* workspace, int64_t max_blocks,
                                cudaStream_t stream);
// grad [B, L, D] contiguous in pred's dtype; grad_loss and denom are fp32 device scalars.
cudaError_t masked_loss_backward(const LossArgs& a, const float* grad_loss, const float* denom, void* grad,
                                 cudaStream_t stream);

// [B, C, H, W] (strided) <-> [B, L, P*P*C]; to_patches: image -> patches (patches contiguous), else patches (strided)
// -> image (contiguous). A pure permutation: any 2- or 4-byte element type.
struct PatchifyArgs {
  const void* src;
  void* dst;
  int elem_size;
  int64_t B, C, gh, gw, P;
  int64_t si_b, si_c, si_h, si_w;  // image strides (source when to_patches)
  int64_t sp_b, sp_l, sp_e;        // patch strides (source when !to_patches)
};
cudaError_t patchify(const PatchifyArgs& a, bool to_patches, cudaStream_t stream);

}  // namespace fastmim_cuda
