// Token gather / scatter for MAE-style masking: keep the visible tokens (encoder side), put them back among mask
// tokens (decoder side), and the gradients of both.
#include <cstring>
#include <limits>
#include <vector>

#include "dtype.h"
#include "ops.h"

namespace fastmim {
namespace {

constexpr int64_t kNoBad = std::numeric_limits<int64_t>::max();

inline const char* cptr(uintptr_t p) { return reinterpret_cast<const char*>(p); }
inline char* mptr(uintptr_t p) { return reinterpret_cast<char*>(p); }

// The smallest f(i) over i in [0, n) (kNoBad when n == 0), every f(i) run once, in parallel (static schedule) when
// `parallel` (callers pass whether the work reaches kParallelBytes: a parallel region on a few rows costs more than
// the copy, and a lot more when the cores are busy elsewhere). The kernels below return from f the flat position of a bad id they met, or kNoBad: the result
// is then the first bad id whatever the number of threads.
template <class F>
int64_t parallel_min(int64_t n, const F& f, bool parallel) {
  int64_t m = kNoBad;
#ifdef FASTMIM_OPENMP
#pragma omp parallel for schedule(static) reduction(min : m) if (parallel)
#else
  (void)parallel;
#endif
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = f(i);
    if (v < m) m = v;
  }
  return m;
}

// Inverse index map: for sample b, dst_src[b * n_dst + j] = i where ids[b * n_ids + i] = j (for j < n_dst), or -1
// if no id equals j. Every id must lie in [0, n_range). Returns the flat position of the first bad id (kNoBad if
// none). Per sample the ids are read in order (the last one wins on duplicates), so the map never depends on the
// number of threads.
int64_t build_inverse(const int64_t* ids, int64_t B, int64_t n_ids, int64_t n_range, int64_t n_dst,
                      int64_t* dst_src) {
  const bool parallel = B * (n_ids + n_dst) * 8 >= kParallelBytes;
  return parallel_min(B, [=](int64_t b) {
    int64_t* row = dst_src + b * n_dst;
    for (int64_t r = 0; r < n_dst; ++r) row[r] = -1;
    const int64_t* id = ids + b * n_ids;
    for (int64_t i = 0; i < n_ids; ++i) {
      const int64_t j = id[i];
      if (j < 0 || j >= n_range) return b * n_ids + i;
      if (j < n_dst) row[j] = i;
    }
    return kNoBad;
  }, parallel);
}

// Returns the flat position of the first bad id in ids_restore (kNoBad if none); its row of out is zeroed.
template <class T>
int64_t scatter_masked_impl(const T* x, const int64_t* ids, const T* mask_token, const T* pos, const T* cls,
                            int64_t cls_stride, T* out, int64_t B, int64_t N, int64_t K, int64_t D, bool has_cls,
                            bool has_pos) {
  const int64_t hc = has_cls ? 1 : 0;
  const int64_t R = N + hc;
  const bool parallel = B * R * D * static_cast<int64_t>(sizeof(T)) >= kParallelBytes;
  return parallel_min(B * R, [=](int64_t i) {
    const int64_t b = i / R, r = i % R;
    T* o = out + i * D;
    const T* src;
    if (r < hc) {
      src = cls + b * cls_stride;
    } else {
      const int64_t n = r - hc;
      const int64_t j = ids[b * N + n];
      if (j < 0 || j >= N) {
        if (D > 0) std::memset(static_cast<void*>(o), 0, static_cast<size_t>(D) * sizeof(T));
        return b * N + n;
      }
      src = j < K ? x + (b * K + j) * D : mask_token;
    }
    if (has_pos) {
      const T* pr = pos + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(to_float(src[d]) + to_float(pr[d]));
    } else if (D > 0) {
      std::memcpy(static_cast<void*>(o), static_cast<const void*>(src), static_cast<size_t>(D) * sizeof(T));
    }
    return kNoBad;
  }, parallel);
}

constexpr int64_t kPosChunk = 256;

template <class T>
void scatter_masked_backward_impl(const T* grad, const int64_t* ids, const int64_t* inv, T* grad_x,
                                  float* grad_mask_token, float* grad_pos, double* partial, int64_t B, int64_t N,
                                  int64_t K, int64_t D, bool has_cls) {
  const int64_t hc = has_cls ? 1 : 0;
  const int64_t R = N + hc;
  if (D == 0) return;
  const bool parallel = B * R * D * static_cast<int64_t>(sizeof(T)) >= kParallelBytes;
  // grad_x: every row written once, zeros where no id points
#ifdef FASTMIM_OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int64_t i = 0; i < B * K; ++i) {
    const int64_t b = i / K, n = inv[i];
    T* o = grad_x + i * D;
    if (n >= 0)
      std::memcpy(static_cast<void*>(o), static_cast<const void*>(grad + (b * R + hc + n) * D),
                  static_cast<size_t>(D) * sizeof(T));
    else
      std::memset(static_cast<void*>(o), 0, static_cast<size_t>(D) * sizeof(T));
  }
  // mask token: per-sample double partial sums (rows in order), then summed over the batch in order
  if (grad_mask_token) {
#ifdef FASTMIM_OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
    for (int64_t b = 0; b < B; ++b) {
      double* acc = partial + b * D;
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        if (ids[b * N + n] < K) continue;
        const T* g = grad + (b * R + hc + n) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<double>(to_float(g[d]));
      }
    }
#ifdef FASTMIM_OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
    for (int64_t d = 0; d < D; ++d) {
      double s = 0.0;
      for (int64_t b = 0; b < B; ++b) s += partial[b * D + d];
      grad_mask_token[d] = static_cast<float>(s);
    }
  }
  // position embedding: sum over the batch of every row (class row included), in double, batch in order
  if (grad_pos) {
    const int64_t chunks = (D + kPosChunk - 1) / kPosChunk;
#ifdef FASTMIM_OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
    for (int64_t i = 0; i < R * chunks; ++i) {
      const int64_t r = i / chunks, d0 = (i % chunks) * kPosChunk;
      const int64_t len = D - d0 < kPosChunk ? D - d0 : kPosChunk;
      double acc[kPosChunk];
      for (int64_t d = 0; d < len; ++d) acc[d] = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const T* g = grad + (b * R + r) * D + d0;
        for (int64_t d = 0; d < len; ++d) acc[d] += static_cast<double>(to_float(g[d]));
      }
      float* o = grad_pos + r * D + d0;
      for (int64_t d = 0; d < len; ++d) o[d] = static_cast<float>(acc[d]);
    }
  }
}

// Element counts of the buffers every token op takes, overflow-checked: the [B, K, D] visible tokens, the [B, R, D]
// full sequence (R = N, plus one class row in scatter_masked) and the op's own int64 index map `ids` [B, ids_cols].
struct TokenSizes {
  int64_t es;      // bytes per element
  int64_t R;       // rows per sample of the full sequence
  int64_t tokens;  // elements of [B, K, D]
  int64_t rows;    // elements of [B, R, D]
  int64_t ids;     // elements of ids [B, ids_cols]
};

// The checks that open every token op, in this order: B, N, K, D >= 0; then the element size (es() validates it);
// then the sizes above.
template <class ElemSize>
TokenSizes token_sizes(const char* fn, int64_t B, int64_t N, int64_t K, int64_t D, bool has_cls, int64_t ids_cols,
                       ElemSize es) {
  require_nonneg(fn, "B", B);
  require_nonneg(fn, "N", N);
  require_nonneg(fn, "K", K);
  require_nonneg(fn, "D", D);
  const int64_t e = es();
  const int64_t R = add_checked(fn, N, has_cls ? 1 : 0);
  return {e, R, numel_checked(fn, {B, K, D}, e), numel_checked(fn, {B, R, D}, e),
          numel_checked(fn, {B, ids_cols}, 8)};
}

// gather_visible(_backward): rows of elem_size bytes (any dtype); ids_keep [B, K].
TokenSizes gather_sizes(const char* fn, int64_t B, int64_t N, int64_t K, int64_t D, int64_t elem_size) {
  return token_sizes(fn, B, N, K, D, false, K, [&] {
    require_elem_size(fn, elem_size);
    return elem_size;
  });
}

// scatter_masked(_backward): elements of dtype code `dtype`; ids_restore [B, N].
TokenSizes scatter_sizes(const char* fn, int64_t B, int64_t N, int64_t K, int64_t D, bool has_cls, int64_t dtype) {
  return token_sizes(fn, B, N, K, D, has_cls, N, [&] { return elem_size_of(fn, "tensor", dtype); });
}

// Throws the range error of the first bad id (flat position `bad` in ids [., cols], valid range [0, hi)), if any.
void require_ids_in_range(const char* fn, const char* name, int64_t bad, const int64_t* ids, int64_t cols,
                          int64_t hi) {
  if (bad != kNoBad) throw std::invalid_argument(range_error(fn, name, bad, cols, ids[bad], hi));
}

}  // namespace

void gather_visible(uintptr_t x, uintptr_t ids, uintptr_t out, int64_t B, int64_t N, int64_t K, int64_t D,
                    int64_t elem_size) {
  const char* fn = "gather_visible";
  const TokenSizes s = gather_sizes(fn, B, N, K, D, elem_size);
  require_ptr(fn, "x", x, s.rows, 1);
  require_ptr(fn, "ids_keep", ids, s.ids, 8);
  require_ptr(fn, "out", out, s.tokens, 1);
  const int64_t* id = reinterpret_cast<const int64_t*>(ids);
  const char* src = cptr(x);
  char* dst = mptr(out);
  const int64_t row_bytes = D * elem_size;
  const int64_t bad = parallel_min(B * K, [=](int64_t i) {
    const int64_t j = id[i];
    if (j < 0 || j >= N) return i;
    if (row_bytes > 0)
      std::memcpy(dst + i * row_bytes, src + ((i / K) * N + j) * row_bytes, static_cast<size_t>(row_bytes));
    return kNoBad;
  }, s.tokens * elem_size >= kParallelBytes);
  require_ids_in_range(fn, "ids_keep", bad, id, K, N);
}

void gather_visible_backward(uintptr_t grad, uintptr_t ids, uintptr_t out, int64_t B, int64_t N, int64_t K,
                             int64_t D, int64_t elem_size) {
  const char* fn = "gather_visible_backward";
  const TokenSizes s = gather_sizes(fn, B, N, K, D, elem_size);
  numel_checked(fn, {B, N}, 8);
  require_ptr(fn, "grad", grad, s.tokens, 1);
  require_ptr(fn, "ids_keep", ids, s.ids, 8);
  require_ptr(fn, "out", out, s.rows, 1);
  const int64_t* id = reinterpret_cast<const int64_t*>(ids);
  // src_of[b * N + n] = k with ids[b, k] = n, or -1: validates every id before anything is written
  std::vector<int64_t> src_of(static_cast<size_t>(B * N));
  require_ids_in_range(fn, "ids_keep", build_inverse(id, B, K, N, N, src_of.data()), id, K, N);
  const char* g = cptr(grad);
  char* dst = mptr(out);
  const int64_t row_bytes = D * elem_size;
  if (row_bytes == 0) return;
#ifdef FASTMIM_OPENMP
#pragma omp parallel for schedule(static) if (s.rows * elem_size >= kParallelBytes)
#endif
  for (int64_t i = 0; i < B * N; ++i) {
    const int64_t k = src_of[i];
    if (k >= 0)
      std::memcpy(dst + i * row_bytes, g + ((i / N) * K + k) * row_bytes, static_cast<size_t>(row_bytes));
    else
      std::memset(dst + i * row_bytes, 0, static_cast<size_t>(row_bytes));
  }
}

void scatter_masked(uintptr_t x, uintptr_t ids_restore, uintptr_t mask_token, uintptr_t pos, uintptr_t cls,
                    int64_t cls_batch_stride, uintptr_t out, int64_t B, int64_t N, int64_t K, int64_t D, bool has_cls,
                    bool has_pos, int64_t dtype) {
  const char* fn = "scatter_masked";
  const TokenSizes s = scatter_sizes(fn, B, N, K, D, has_cls, dtype);
  const int64_t es = s.es;
  require_ptr(fn, "x", x, s.tokens, es);
  require_ptr(fn, "ids_restore", ids_restore, s.ids, 8);
  require_ptr(fn, "out", out, s.rows, es);
  // the mask token is read only when some sample has more patches than visible tokens
  require_ptr(fn, "mask_token", mask_token, B > 0 && N > K ? D : 0, es);
  if (has_pos) require_ptr(fn, "pos", pos, numel_checked(fn, {s.R, D}, es), es);
  if (has_cls) {
    if (cls_batch_stride != 0 && cls_batch_stride != D)
      fail(fn, "cls_batch_stride = " + std::to_string(cls_batch_stride) + " must be 0 (one class token) or D = " +
                   std::to_string(D));
    require_ptr(fn, "cls", cls, B > 0 ? (cls_batch_stride ? B * D : D) : 0, es);
  }
  const int64_t* id = reinterpret_cast<const int64_t*>(ids_restore);
  int64_t bad = kNoBad;
  dispatch_dtype(fn, "tensor", dtype, [&](auto tag) {
    using T = decltype(tag);
    bad = scatter_masked_impl<T>(reinterpret_cast<const T*>(x), id, reinterpret_cast<const T*>(mask_token),
                                 reinterpret_cast<const T*>(pos), reinterpret_cast<const T*>(cls), cls_batch_stride,
                                 reinterpret_cast<T*>(out), B, N, K, D, has_cls, has_pos);
  });
  require_ids_in_range(fn, "ids_restore", bad, id, N, N);
}

void scatter_masked_backward(uintptr_t grad, uintptr_t ids_restore, uintptr_t grad_x, uintptr_t grad_mask_token,
                             uintptr_t grad_pos, int64_t B, int64_t N, int64_t K, int64_t D, bool has_cls,
                             bool need_pos, int64_t dtype) {
  const char* fn = "scatter_masked_backward";
  const TokenSizes s = scatter_sizes(fn, B, N, K, D, has_cls, dtype);
  numel_checked(fn, {B, K}, 8);
  numel_checked(fn, {B, D}, 8);
  require_ptr(fn, "grad", grad, s.rows, s.es);
  require_ptr(fn, "ids_restore", ids_restore, s.ids, 8);
  require_ptr(fn, "grad_x", grad_x, s.tokens, s.es);
  require_ptr(fn, "grad_mask_token", grad_mask_token, D, 4);
  if (need_pos) require_ptr(fn, "grad_pos", grad_pos, numel_checked(fn, {s.R, D}, 4), 4);
  const int64_t* id = reinterpret_cast<const int64_t*>(ids_restore);
  // inv[b * K + j] = n with ids_restore[b, n] = j, or -1; validates every id before anything is written
  std::vector<int64_t> inv(static_cast<size_t>(B * K));
  require_ids_in_range(fn, "ids_restore", build_inverse(id, B, N, N, K, inv.data()), id, N, N);
  std::vector<double> partial(static_cast<size_t>(B * D));
  dispatch_dtype(fn, "tensor", dtype, [&](auto tag) {
    using T = decltype(tag);
    scatter_masked_backward_impl<T>(reinterpret_cast<const T*>(grad), id, inv.data(), reinterpret_cast<T*>(grad_x),
                                    reinterpret_cast<float*>(grad_mask_token),
                                    need_pos ? reinterpret_cast<float*>(grad_pos) : nullptr, partial.data(), B, N, K,
                                    D, has_cls);
  });
}

}  // namespace fastmim
