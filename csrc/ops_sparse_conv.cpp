// Submanifold sparse depthwise convolution (FCMAE's sparse ConvNeXt V2) on the active rows [M, C] of a feature map:
// the forward (with the kernel flipped it is also grad_x, the neighbor table being symmetric) and the weight / bias
// gradients. A neighbor table nbr [K*K, M] int32 gives the input row of every tap, -1 for none (reads zero).
#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "dtype.h"
#include "ops.h"

namespace fastmim {
namespace {

constexpr int64_t kNoBad = std::numeric_limits<int64_t>::max();

// The weight gradient sums fixed chunks of rows (their size depends on M alone: at most kMaxChunks chunks of at
// least kMinChunkRows rows) into fp32 partials, then the partials in chunk order in double: the result does not
// depend on the number of threads.
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinChunkRows = 128;

struct ConvSizes {
  int64_t KK;  // taps
  int64_t MC;  // elements of [M, C]
};

// The checks every sparse conv kernel opens with: M, C >= 0, K a positive odd int, sizes that fit int64.
ConvSizes conv_sizes(const char* fn, int64_t M, int64_t C, int64_t K) {
  require_nonneg(fn, "M", M);
  require_nonneg(fn, "C", C);
  if (K < 1 || K % 2 == 0) fail(fn, "K = " + std::to_string(K) + " must be a positive odd int");
  const int64_t KK = mul_checked(fn, K, K);
  numel_checked(fn, {KK, M}, 4);
  numel_checked(fn, {KK + 1, C}, 8);
  return {KK, numel_checked(fn, {M, C}, 4)};
}

std::string nbr_error(const char* fn, int64_t flat, int64_t M, int64_t value) {
  return std::string(fn) + ": nbr[" + std::to_string(flat / M) + ", " + std::to_string(flat % M) +
         "] = " + std::to_string(value) + " is out of range [-1, " + std::to_string(M) + ")";
}

// Throws the range error of the first bad id (flat position `bad` in nbr [KK, M]), if any.
void require_nbr_in_range(const char* fn, int64_t bad, const int32_t* nbr, int64_t M) {
  if (bad != kNoBad) throw std::invalid_argument(nbr_error(fn, bad, M, nbr[bad]));
}

// Taps-major fp32 copy [KK, C] of a depthwise weight [C, KK] of dtype code `code`; with flip, tap t of the copy is
// tap KK - 1 - t of the weight (grad_x).
std::vector<float> weight_taps(const char* fn, uintptr_t w, int64_t code, int64_t C, int64_t KK, bool flip) {
  std::vector<float> out(static_cast<size_t>(C * KK));
  dispatch_dtype(fn, "weight", code, [&](auto tag) {
    using T = decltype(tag);
    const T* p = reinterpret_cast<const T*>(w);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < KK; ++t)
        out[static_cast<size_t>((flip ? KK - 1 - t : t) * C + c)] = to_float(p[c * KK + t]);
  });
  return out;
}

std::vector<float> floats(const char* fn, const char* what, uintptr_t ptr, int64_t code, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  dispatch_dtype(fn, what, code, [&](auto tag) {
    using T = decltype(tag);
    const T* p = reinterpret_cast<const T*>(ptr);
    for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = to_float(p[i]);
  });
  return out;
}

// out[r, :] = b + sum_t w[t, :] * x[nbr[t, r], :] with fp32 accumulators per row (a per-thread [C] buffer), channels
// innermost (contiguous, vectorised). Returns the flat position of the first bad id (kNoBad if none); a bad tap is
// skipped, never read.
template <class TX, class TO>
int64_t forward_impl(const TX* __restrict x, const int32_t* __restrict nbr, const float* __restrict w,
                     const float* __restrict b, TO* __restrict out, int64_t M, int64_t C, int64_t KK, bool parallel) {
  int64_t bad = kNoBad;
  ParallelError error;
#ifdef FASTMIM_OPENMP
#pragma omp parallel if (parallel) reduction(min : bad)
#else
  (void)parallel;
#endif
  {
    ThreadBuffer buf(C, error);
#ifdef FASTMIM_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t r = 0; r < M; ++r) {
      if (!buf.ok()) continue;
      float* __restrict acc = buf.data();
      if (b) {
        FASTMIM_SIMD
        for (int64_t c = 0; c < C; ++c) acc[c] = b[c];
      } else {
        FASTMIM_SIMD
        for (int64_t c = 0; c < C; ++c) acc[c] = 0.f;
      }
      for (int64_t t = 0; t < KK; ++t) {
        const int64_t id = nbr[t * M + r];
        if (id < 0 || id >= M) {
          if (id != -1 && t * M + r < bad) bad = t * M + r;
          continue;
        }
        const TX* __restrict xr = x + id * C;
        const float* __restrict wt = w + t * C;
        FASTMIM_SIMD
        for (int64_t c = 0; c < C; ++c) acc[c] += wt[c] * to_float(xr[c]);
      }
      TO* __restrict o = out + r * C;
      FASTMIM_SIMD
      for (int64_t c = 0; c < C; ++c) o[c] = from_float<TO>(acc[c]);
    }
  }
  error.rethrow();
  return bad;
}

// part [chunks, KK + 1, C] fp32: rows < KK the weight taps, row KK the bias, each chunk's rows summed in order.
// Returns the flat position of the first bad id (kNoBad if none); a bad tap is skipped.
template <class TG, class TX>
int64_t wgrad_impl(const TG* __restrict g, const TX* __restrict x, const int32_t* __restrict nbr,
                   float* __restrict part, int64_t M, int64_t C, int64_t KK, int64_t chunk_rows, int64_t chunks,
                   bool parallel) {
  int64_t bad = kNoBad;
  ParallelError error;
#ifdef FASTMIM_OPENMP
#pragma omp parallel if (parallel) reduction(min : bad)
#else
  (void)parallel;
#endif
  {
    ThreadBuffer buf(C, error);
#ifdef FASTMIM_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t k = 0; k < chunks; ++k) {
      if (!buf.ok()) continue;
      float* __restrict acc = part + k * (KK + 1) * C;
      for (int64_t i = 0; i < (KK + 1) * C; ++i) acc[i] = 0.f;
      float* __restrict gf = buf.data();
      const int64_t r1 = (k + 1) * chunk_rows < M ? (k + 1) * chunk_rows : M;
      for (int64_t r = k * chunk_rows; r < r1; ++r) {
        const TG* __restrict gr = g + r * C;
        float* __restrict ab = acc + KK * C;
        FASTMIM_SIMD
        for (int64_t c = 0; c < C; ++c) {
          gf[c] = to_float(gr[c]);
          ab[c] += gf[c];
        }
        for (int64_t t = 0; t < KK; ++t) {
          const int64_t id = nbr[t * M + r];
          if (id < 0 || id >= M) {
            if (id != -1 && t * M + r < bad) bad = t * M + r;
            continue;
          }
          const TX* __restrict xr = x + id * C;
          float* __restrict at = acc + t * C;
          FASTMIM_SIMD
          for (int64_t c = 0; c < C; ++c) at[c] += gf[c] * to_float(xr[c]);
        }
      }
    }
  }
  error.rethrow();
  return bad;
}

// Calls f(TA{}, TB{}) with the storage types of two dtype codes.
template <class F>
void dispatch_dtype2(const char* fn, const char* a, int64_t code_a, const char* b, int64_t code_b, F&& f) {
  dispatch_dtype(fn, a, code_a, [&](auto ta) { dispatch_dtype(fn, b, code_b, [&](auto tb) { f(ta, tb); }); });
}

}  // namespace

void sparse_dwconv_forward(uintptr_t x, uintptr_t nbr, uintptr_t weight, uintptr_t bias, uintptr_t out, int64_t M,
                           int64_t C, int64_t K, int64_t x_dtype, int64_t w_dtype, int64_t b_dtype, int64_t out_dtype,
                           bool flip) {
  const char* fn = "sparse_dwconv_forward";
  const ConvSizes s = conv_sizes(fn, M, C, K);
  const int64_t xes = elem_size_of(fn, "x", x_dtype), oes = elem_size_of(fn, "out", out_dtype);
  const int64_t wes = elem_size_of(fn, "weight", w_dtype);
  require_ptr(fn, "x", x, s.MC, xes);
  require_ptr(fn, "nbr", nbr, s.KK * M, 4);
  require_ptr(fn, "weight", weight, M > 0 ? s.KK * C : 0, wes);
  if (bias) require_ptr(fn, "bias", bias, C, elem_size_of(fn, "bias", b_dtype));
  require_ptr(fn, "out", out, s.MC, oes);
  if (M == 0 || C == 0) {
    // nothing to write, but every id is still checked (C == 0: the table can hold ids all the same)
    const int32_t* id = reinterpret_cast<const int32_t*>(nbr);
    for (int64_t i = 0; i < s.KK * M; ++i)
      if (id[i] < -1 || id[i] >= M) require_nbr_in_range(fn, i, id, M);
    return;
  }
  const std::vector<float> w = weight_taps(fn, weight, w_dtype, C, s.KK, flip);
  const std::vector<float> b = bias ? floats(fn, "bias", bias, b_dtype, C) : std::vector<float>();
  const int32_t* id = reinterpret_cast<const int32_t*>(nbr);
  const bool parallel = s.MC * s.KK * xes >= kParallelBytes;
  int64_t bad = kNoBad;
  dispatch_dtype2(fn, "x", x_dtype, "out", out_dtype, [&](auto tx, auto to) {
    using TX = decltype(tx);
    using TO = decltype(to);
    bad = forward_impl<TX, TO>(reinterpret_cast<const TX*>(x), id, w.data(), bias ? b.data() : nullptr,
                               reinterpret_cast<TO*>(out), M, C, s.KK, parallel);
  });
  require_nbr_in_range(fn, bad, id, M);
}

void sparse_dwconv_wgrad(uintptr_t grad, uintptr_t x, uintptr_t nbr, uintptr_t grad_weight, uintptr_t grad_bias,
                         int64_t M, int64_t C, int64_t K, int64_t grad_dtype, int64_t x_dtype) {
  const char* fn = "sparse_dwconv_wgrad";
  const ConvSizes s = conv_sizes(fn, M, C, K);
  const int64_t ges = elem_size_of(fn, "grad", grad_dtype), xes = elem_size_of(fn, "x", x_dtype);
  require_ptr(fn, "grad", grad, s.MC, ges);
  require_ptr(fn, "x", x, s.MC, xes);
  require_ptr(fn, "nbr", nbr, s.KK * M, 4);
  require_ptr(fn, "grad_weight", grad_weight, s.KK * C, 4);
  if (grad_bias) require_ptr(fn, "grad_bias", grad_bias, C, 4);
  const int32_t* id = reinterpret_cast<const int32_t*>(nbr);
  const int64_t chunk_rows = std::max(kMinChunkRows, (M + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (M + chunk_rows - 1) / chunk_rows;
  std::vector<float> part(static_cast<size_t>(chunks * (s.KK + 1) * C));
  int64_t bad = kNoBad;
  if (C > 0) {
    const bool parallel = chunks > 1 && s.MC * s.KK * xes >= kParallelBytes;
    dispatch_dtype2(fn, "grad", grad_dtype, "x", x_dtype, [&](auto tg, auto tx) {
      using TG = decltype(tg);
      using TX = decltype(tx);
      bad = wgrad_impl<TG, TX>(reinterpret_cast<const TG*>(grad), reinterpret_cast<const TX*>(x), id, part.data(), M,
                               C, s.KK, chunk_rows, chunks, parallel);
    });
  } else {
    for (int64_t i = 0; i < s.KK * M; ++i)
      if ((id[i] < -1 || id[i] >= M) && i < bad) bad = i;
  }
  require_nbr_in_range(fn, bad, id, M);
  // chunk partials in chunk order, in double; gw [C, KK] from the taps-major partials
  float* gw = reinterpret_cast<float*>(grad_weight);
  float* gb = reinterpret_cast<float*>(grad_bias);
  const int64_t row = (s.KK + 1) * C;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t <= s.KK; ++t) {
      double sum = 0.0;
      for (int64_t k = 0; k < chunks; ++k) sum += static_cast<double>(part[static_cast<size_t>(k * row + t * C + c)]);
      if (t < s.KK)
        gw[c * s.KK + t] = static_cast<float>(sum);
      else if (gb)
        gb[c] = static_cast<float>(sum);
    }
  }
}

}  // namespace fastmim
