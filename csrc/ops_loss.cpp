// Fused masked reconstruction loss (MAE / SimMIM): patchify + optional per-patch normalisation + error + masked
// mean, forward and backward, reading only the patches whose mask weight is non-zero.
#include <cmath>
#include <cstring>
#include <vector>

#include "dtype.h"
#include "ops.h"

namespace fastmim {
namespace {

// Element offset of the target of patch (b, l), element 0.
inline int64_t patch_base(const PatchGeometry& g, int64_t b, int64_t l) {
  return b * g.s_b + (l / g.gw) * g.s_row + (l % g.gw) * g.s_col;
}

// Checks the dtype codes, the geometry and that every target element the kernels can read lies in
// [0, target_numel). Returns pred's element size.
int64_t validate(const char* fn, const PatchGeometry& g, const MaskedLossOptions& o, uintptr_t pred,
                 int64_t pred_dtype, uintptr_t target, int64_t target_dtype, int64_t target_numel, uintptr_t mask) {
  const int64_t pred_es = elem_size_of(fn, "pred", pred_dtype), target_es = elem_size_of(fn, "target", target_dtype);
  require_nonneg(fn, "B", g.B);
  require_nonneg(fn, "L", g.L);
  require_nonneg(fn, "D", g.D);
  require_nonneg(fn, "target_numel", target_numel);
  if (g.gw < 1) fail(fn, "gw = " + std::to_string(g.gw) + " must be >= 1");
  if (g.P < 1) fail(fn, "P = " + std::to_string(g.P) + " must be >= 1");
  if (g.C < 1) fail(fn, "C = " + std::to_string(g.C) + " must be >= 1");
  const int64_t strides[] = {g.s_b, g.s_row, g.s_col, g.s_pi, g.s_qi, g.s_c};
  const char* names[] = {"s_b", "s_row", "s_col", "s_pi", "s_qi", "s_c"};
  for (int i = 0; i < 6; ++i) require_nonneg(fn, names[i], strides[i]);
  const int64_t ppc = mul_checked(fn, mul_checked(fn, g.P, g.P), g.C);
  if (ppc != g.D)
    fail(fn, "D = " + std::to_string(g.D) + " must equal P * P * C = " + std::to_string(ppc));
  if (o.p != 1 && o.p != 2) fail(fn, "p = " + std::to_string(o.p) + " must be 1 or 2");
  if (!std::isfinite(o.eps)) fail(fn, "eps must be finite");
  const int64_t npred = numel_checked(fn, {g.B, g.L, g.D}, pred_es);
  const int64_t nmask = numel_checked(fn, {g.B, g.L}, 4);
  mul_checked(fn, target_numel, target_es);
  require_ptr(fn, "pred", pred, npred, pred_es);
  require_ptr(fn, "mask", mask, nmask, 4);
  if (npred == 0) return pred_es;  // no target element is read
  // Largest reachable offset (all strides >= 0): the last sample, the largest patch offset, the largest element.
  const int64_t last = g.L - 1, row = last / g.gw;
  int64_t patch_max = add_checked(fn, mul_checked(fn, row, g.s_row), mul_checked(fn, last % g.gw, g.s_col));
  if (row >= 1) {  // the row above the last one is full, its last column may reach further
    const int64_t full = add_checked(fn, mul_checked(fn, row - 1, g.s_row), mul_checked(fn, g.gw - 1, g.s_col));
    if (full > patch_max) patch_max = full;
  }
  int64_t max_off = mul_checked(fn, g.B - 1, g.s_b);
  max_off = add_checked(fn, max_off, patch_max);
  max_off = add_checked(fn, max_off, mul_checked(fn, g.P - 1, g.s_pi));
  max_off = add_checked(fn, max_off, mul_checked(fn, g.P - 1, g.s_qi));
  max_off = add_checked(fn, max_off, mul_checked(fn, g.C - 1, g.s_c));
  if (max_off >= target_numel)
    fail(fn, "the target strides reach element " + std::to_string(max_off) + ", beyond target_numel = " +
                 std::to_string(target_numel));
  require_ptr(fn, "target", target, target_numel, target_es);
  return pred_es;
}

// t[(pi * P + qi) * C + c] = target element (pi, qi, c) of the patch at `base`, as float.
template <class T>
inline void load_patch(const T* __restrict base, const PatchGeometry& g, float* __restrict t) {
  const int64_t P = g.P, C = g.C;
  if (C >= P) {  // channel runs innermost (patchified targets: P = 1, C = D)
    for (int64_t pi = 0; pi < P; ++pi)
      for (int64_t qi = 0; qi < P; ++qi) {
        const T* s = base + pi * g.s_pi + qi * g.s_qi;
        float* o = t + (pi * P + qi) * C;
        if (g.s_c == 1) {
          FASTMIM_SIMD
          for (int64_t c = 0; c < C; ++c) o[c] = to_float(s[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) o[c] = to_float(s[c * g.s_c]);
        }
      }
  } else if (C == 3 && g.s_qi == 1) {  // RGB images: three contiguous pixel runs per patch row
    for (int64_t pi = 0; pi < P; ++pi) {
      const T* s0 = base + pi * g.s_pi;
      const T* s1 = s0 + g.s_c;
      const T* s2 = s1 + g.s_c;
      float* o = t + pi * P * 3;
      for (int64_t qi = 0; qi < P; ++qi) {
        o[3 * qi] = to_float(s0[qi]);
        o[3 * qi + 1] = to_float(s1[qi]);
        o[3 * qi + 2] = to_float(s2[qi]);
      }
    }
  } else {  // pixel runs innermost (images: s_qi = 1)
    for (int64_t pi = 0; pi < P; ++pi)
      for (int64_t c = 0; c < C; ++c) {
        const T* s = base + pi * g.s_pi + c * g.s_c;
        float* o = t + pi * P * C + c;
        for (int64_t qi = 0; qi < P; ++qi) o[qi * C] = to_float(s[qi * g.s_qi]);
      }
  }
}

// Sum of f(e) for e in [0, n) over kLanes independent float accumulators (the compiler keeps them in vector
// registers, so the loop is not bound by the add latency), combined in a fixed order: deterministic.
constexpr int64_t kLanes = 16;
template <class F>
inline float lane_sum(int64_t n, F f) {
  float acc[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += f(e + j);
  for (int64_t j = 0; e < n; ++e, ++j) acc[j] += f(e);
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// MAE's norm_pix target is (t - shift) * scale with shift = mean and scale = 1 / sqrt(var + eps), var unbiased
// (two passes in float, as torch in fp32); without norm_pix shift = 0, scale = 1.
struct Affine {
  float shift, scale;
};

inline Affine patch_affine(const float* __restrict t, int64_t D, bool norm_pix, float eps) {
  if (!norm_pix) return {0.f, 1.f};
  const float mean = lane_sum(D, [&](int64_t e) { return t[e]; }) / static_cast<float>(D);
  const float sq = lane_sum(D, [&](int64_t e) {
    const float d = t[e] - mean;
    return d * d;
  });
  const float var = sq / static_cast<float>(D - 1);  // D == 1: 0 / 0 = NaN, as torch.var
  return {mean, 1.f / std::sqrt(var + eps)};
}

template <class TP>
inline float patch_error_sum(const TP* __restrict pred, const float* __restrict t, int64_t D, int64_t p, Affine a) {
  if (p == 2)
    return lane_sum(D, [&](int64_t e) {
      const float d = to_float(pred[e]) - (t[e] - a.shift) * a.scale;
      return d * d;
    });
  return lane_sum(D, [&](int64_t e) { return std::fabs(to_float(pred[e]) - (t[e] - a.shift) * a.scale); });
}

template <class TP>
inline void patch_grad(const TP* __restrict pred, const float* __restrict t, TP* __restrict grad, int64_t D,
                       int64_t p, Affine a, float coef) {
  if (p == 2) {
    FASTMIM_SIMD
    for (int64_t e = 0; e < D; ++e) grad[e] = from_float<TP>(coef * (to_float(pred[e]) - (t[e] - a.shift) * a.scale));
  } else {
    FASTMIM_SIMD
    for (int64_t e = 0; e < D; ++e) {
      const float d = to_float(pred[e]) - (t[e] - a.shift) * a.scale;
      const float sign = static_cast<float>((d > 0.f) - (d < 0.f));  // sign(0) = sign(NaN) = 0, as torch
      grad[e] = from_float<TP>(coef * sign);
    }
  }
}

// Runs over the B * L patches in parallel (static schedule: each patch belongs to one thread). A patch with mask
// weight 0 gets skip(i); any other gets body(i, w, t, a) with t [D] its target as float (a per-thread buffer) and a its
// norm_pix affine. An exception (allocating the buffer) must not leave the region: it is kept, that thread's patches
// get skip(i), and it is rethrown after the region.
template <class TT, class Skip, class Body>
void for_each_patch(const TT* target, const float* mask, const PatchGeometry& g, const MaskedLossOptions& o,
                    const Skip& skip, const Body& body) {
  const int64_t patches = g.B * g.L, D = g.D;
  const float eps = static_cast<float>(o.eps);
  ParallelError error;
  // a few patches run on the calling thread: a parallel region costs more (much more when the cores are busy)
  const bool parallel = patches * D * static_cast<int64_t>(sizeof(float)) >= kParallelBytes;
#ifdef FASTMIM_OPENMP
#pragma omp parallel if (parallel)
#endif
  {
    ThreadBuffer buf(D, error);
#ifdef FASTMIM_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t i = 0; i < patches; ++i) {
      const float w = mask[i];
      if (w == 0.f || !buf.ok()) {
        skip(i);
        continue;
      }
      float* t = buf.data();
      load_patch(target + patch_base(g, i / g.L, i % g.L), g, t);
      body(i, w, static_cast<const float*>(t), patch_affine(t, D, o.norm_pix, eps));
    }
  }
  error.rethrow();
}

// contrib[i] = mask[i] * mean_e err of patch i (0 where the mask is 0).
template <class TP, class TT>
void loss_forward_impl(const TP* pred, const TT* target, const float* mask, const PatchGeometry& g,
                       const MaskedLossOptions& o, double* contrib) {
  const int64_t D = g.D, p = o.p;
  for_each_patch(
      target, mask, g, o, [contrib](int64_t i) { contrib[i] = 0.0; },
      [pred, contrib, D, p](int64_t i, float w, const float* t, Affine a) {
        const float err = patch_error_sum(pred + i * D, t, D, p, a);
        contrib[i] = static_cast<double>(w) * (static_cast<double>(err) / static_cast<double>(D));
      });
}

template <class TP, class TT>
void loss_backward_impl(double scale, const TP* pred, const TT* target, const float* mask, TP* grad,
                        const PatchGeometry& g, const MaskedLossOptions& o) {
  const int64_t D = g.D, p = o.p;
  const double dscale = scale * (p == 2 ? 2.0 : 1.0) / static_cast<double>(D);
  for_each_patch(
      target, mask, g, o,
      [grad, D](int64_t i) { std::memset(static_cast<void*>(grad + i * D), 0, static_cast<size_t>(D) * sizeof(TP)); },
      [pred, grad, D, p, dscale](int64_t i, float w, const float* t, Affine a) {
        patch_grad(pred + i * D, t, grad + i * D, D, p, a, static_cast<float>(dscale * static_cast<double>(w)));
      });
}

// Calls f(TP{}, TT{}) with the storage types of pred and target.
template <class F>
void dispatch_pred_target(const char* fn, int64_t pred_dtype, int64_t target_dtype, F&& f) {
  dispatch_dtype(fn, "pred", pred_dtype, [&](auto ptag) {
    dispatch_dtype(fn, "target", target_dtype, [&](auto ttag) { f(ptag, ttag); });
  });
}

}  // namespace

std::pair<double, double> masked_loss_forward(uintptr_t pred, int64_t pred_dtype, uintptr_t target,
                                              int64_t target_dtype, int64_t target_numel, uintptr_t mask,
                                              const PatchGeometry& g, const MaskedLossOptions& o) {
  const char* fn = "masked_loss_forward";
  validate(fn, g, o, pred, pred_dtype, target, target_dtype, target_numel, mask);
  const int64_t patches = g.B * g.L;
  const float* m = reinterpret_cast<const float*>(mask);
  std::vector<double> contrib(static_cast<size_t>(patches));
  if (g.D > 0) {
    dispatch_pred_target(fn, pred_dtype, target_dtype, [&](auto ptag, auto ttag) {
      using TP = decltype(ptag);
      using TT = decltype(ttag);
      loss_forward_impl<TP, TT>(reinterpret_cast<const TP*>(pred), reinterpret_cast<const TT*>(target), m, g, o,
                                contrib.data());
    });
  }
  // fixed-order double sums: the result does not depend on the number of threads
  double loss_sum = 0.0, mask_sum = 0.0;
  for (int64_t i = 0; i < patches; ++i) {
    loss_sum += contrib[i];
    mask_sum += static_cast<double>(m[i]);
  }
  return {loss_sum, mask_sum};
}

void masked_loss_backward(double scale, uintptr_t pred, int64_t pred_dtype, uintptr_t target, int64_t target_dtype,
                          int64_t target_numel, uintptr_t mask, uintptr_t grad, const PatchGeometry& g,
                          const MaskedLossOptions& o) {
  const char* fn = "masked_loss_backward";
  const int64_t pes = validate(fn, g, o, pred, pred_dtype, target, target_dtype, target_numel, mask);
  require_ptr(fn, "grad", grad, g.B * g.L * g.D, pes);
  if (g.D == 0) return;
  dispatch_pred_target(fn, pred_dtype, target_dtype, [&](auto ptag, auto ttag) {
    using TP = decltype(ptag);
    using TT = decltype(ttag);
    loss_backward_impl<TP, TT>(scale, reinterpret_cast<const TP*>(pred), reinterpret_cast<const TT*>(target),
                               reinterpret_cast<const float*>(mask), reinterpret_cast<TP*>(grad), g, o);
  });
}

}  // namespace fastmim
