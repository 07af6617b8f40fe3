// CPU kernels behind fastmim.ops (OpenMP; no libtorch). Buffers are raw addresses of contiguous tensors that the
// Python wrappers have validated; every function still checks sizes and every index read from data, and throws
// std::invalid_argument (ValueError in Python) instead of touching memory out of bounds. Index tensors are int64.
// dtype codes: 0 = float32, 1 = bfloat16, 2 = float16. Low-precision values are computed in float and rounded
// once; results do not depend on the number of threads.
#pragma once
#include <cstdint>
#include <utility>

namespace fastmim {

// out[b, k, :] = x[b, ids[b, k], :]; x [B, N, D], ids [B, K], out [B, K, D]; any dtype (rows are copied).
void gather_visible(uintptr_t x, uintptr_t ids, uintptr_t out, int64_t B, int64_t N, int64_t K, int64_t D,
                    int64_t elem_size);

// out [B, N, D] fully written: out[b, ids[b, k]] = grad[b, k], zeros in rows no id points to (each row written once).
void gather_visible_backward(uintptr_t grad, uintptr_t ids, uintptr_t out, int64_t B, int64_t N, int64_t K,
                             int64_t D, int64_t elem_size);

// MAE decoder input: out [B, N + has_cls, D]. Patch row n takes x[b, j] if j = ids_restore[b, n] < K, else
// mask_token; with has_cls row 0 is cls[b * cls_batch_stride :] and patch rows shift by one; with has_pos, pos
// [N + has_cls, D] is added (in float, rounded once).
void scatter_masked(uintptr_t x, uintptr_t ids_restore, uintptr_t mask_token, uintptr_t pos, uintptr_t cls,
                    int64_t cls_batch_stride, uintptr_t out, int64_t B, int64_t N, int64_t K, int64_t D, bool has_cls,
                    bool has_pos, int64_t dtype);

// Gradients of scatter_masked: grad_x [B, K, D] (dtype; rows no id points to are zero), grad_mask_token [D] float32
// (sum of the mask-token rows), grad_pos [N + has_cls, D] float32 (sum over the batch; only when need_pos).
void scatter_masked_backward(uintptr_t grad, uintptr_t ids_restore, uintptr_t grad_x, uintptr_t grad_mask_token,
                             uintptr_t grad_pos, int64_t B, int64_t N, int64_t K, int64_t D, bool has_cls,
                             bool need_pos, int64_t dtype);

// Where the target of patch (b, l), element e = (pi * P + qi) * C + c, lives: element offset
// b*s_b + (l / gw)*s_row + (l % gw)*s_col + pi*s_pi + qi*s_qi + c*s_c (MAE's patchify fused into the loss).
struct PatchGeometry {
  int64_t B, L, D, gw, s_b, s_row, s_col, P, C, s_pi, s_qi, s_c;
};

struct MaskedLossOptions {
  bool norm_pix;  // normalise each target patch by its mean and unbiased std (sqrt(var + eps))
  double eps;
  int64_t p;  // 2: squared error, 1: absolute error
};

// Returns (sum over patches of mask[b, l] * mean_e err, sum of mask). pred [B, L, D], mask [B, L] float32.
std::pair<double, double> masked_loss_forward(uintptr_t pred, int64_t pred_dtype, uintptr_t target,
                                              int64_t target_dtype, int64_t target_numel, uintptr_t mask,
                                              const PatchGeometry& g, const MaskedLossOptions& o);

// grad [B, L, D] (pred's dtype) = scale * mask[b, l] * d(mean_e err)/d pred; zeros where mask == 0.
void masked_loss_backward(double scale, uintptr_t pred, int64_t pred_dtype, uintptr_t target, int64_t target_dtype,
                          int64_t target_numel, uintptr_t mask, uintptr_t grad, const PatchGeometry& g,
                          const MaskedLossOptions& o);

// [B, C, H, W] -> [B, L, p*p*C], element (pi*p + qi)*C + c of patch l; and the exact inverse. Any dtype.
void patchify(uintptr_t img, uintptr_t out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p,
              int64_t elem_size);
void unpatchify(uintptr_t x, uintptr_t out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p,
                int64_t elem_size);

// Submanifold sparse depthwise KxK convolution of active rows (FCMAE's sparse ConvNeXt V2). x [M, C], nbr [K*K, M]
// int32 (input row of tap t for output row r, -1: none, reads zero; any other id outside [0, M) is an error),
// weight [C, K*K], bias [C] (or 0), out [M, C] (dtype out_dtype): out[r, c] = bias[c] + sum_t w[c, t] *
// x[nbr[t, r], c], in float. With flip, tap t uses weight tap K*K-1-t: grad_x, the table being symmetric.
void sparse_dwconv_forward(uintptr_t x, uintptr_t nbr, uintptr_t weight, uintptr_t bias, uintptr_t out, int64_t M,
                           int64_t C, int64_t K, int64_t x_dtype, int64_t w_dtype, int64_t b_dtype, int64_t out_dtype,
                           bool flip);

// grad_weight [C, K*K] float32 = sum_r grad[r, c] * x[nbr[t, r], c]; grad_bias [C] float32 (or 0) = sum_r grad[r, c].
// grad, x [M, C] of their dtype codes.
void sparse_dwconv_wgrad(uintptr_t grad, uintptr_t x, uintptr_t nbr, uintptr_t grad_weight, uintptr_t grad_bias,
                         int64_t M, int64_t C, int64_t K, int64_t grad_dtype, int64_t x_dtype);

}  // namespace fastmim
