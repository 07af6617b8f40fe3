// Element types and helpers shared by the CPU kernels in csrc/ops_*.cpp: bfloat16 / float16 <-> float conversion
// (bit exact with PyTorch: round to nearest even, NaN stays NaN), dtype dispatch, overflow-checked size arithmetic,
// and capturing exceptions thrown inside OpenMP regions.
#pragma once
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

// `#pragma omp simd` on the next loop where OpenMP is on (vectorises the channel loops of the CPU kernels).
#ifdef FASTMIM_OPENMP
#define FASTMIM_PRAGMA(x) _Pragma(#x)
#define FASTMIM_SIMD FASTMIM_PRAGMA(omp simd)
#else
#define FASTMIM_SIMD
#endif

namespace fastmim {

// 16-bit float storage types. Plain structs (not _Float16) so every conversion is integer code that the compiler
// can vectorise without F16C, and the two formats never convert into each other by accident.
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2 && sizeof(fp16) == 2, "16-bit storage types must be 2 bytes");

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bits_f32(static_cast<uint32_t>(x.bits) << 16); }
inline float to_float(fp16 x) {
  // Branch-free (select-only) so loops over fp16 data vectorise.
  const uint32_t h = x.bits;
  const uint32_t em = (h & 0x7fffu) << 13;  // exponent and mantissa moved to float positions
  const uint32_t exp = em & (0x1fu << 23);
  const uint32_t normal = em + (112u << 23);                 // rebias 15 -> 127
  const uint32_t infnan = em + (224u << 23);                 // exponent 31 -> 255, payload kept
  // subnormal: 2^-14 * (1 + m/1024) - 2^-14 = m * 2^-24, exact
  const uint32_t sub = f32_bits(bits_f32(em + (113u << 23)) - bits_f32(113u << 23));
  const uint32_t mag = exp == (0x1fu << 23) ? infnan : (exp == 0 ? sub : normal);
  return bits_f32(mag | ((h & 0x8000u) << 16));
}

template <class T>
T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}

template <>
inline bf16 from_float<bf16>(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const uint32_t nan = (u >> 16) | 0x40u;                            // quiet NaN, sign kept
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16{static_cast<uint16_t>(is_nan ? nan : rounded)};
}

template <>
inline fp16 from_float<fp16>(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // |f| >= 65536 (or inf / NaN): all-ones exponent. Values in [65520, 65536) overflow through the rounding below.
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // |f| < 2^-14: the result is subnormal or zero. Adding 0.5 (whose ulp is 2^-24, the fp16 subnormal step) rounds
  // to nearest even in hardware; the low mantissa bits of the sum are the fp16 bits.
  const uint32_t sub = f32_bits(bits_f32(a) + 0.5f) - f32_bits(0.5f);
  // normal: rebias 127 -> 15 and round the 13 dropped bits to nearest even
  const uint32_t norm = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t mag = a >= (143u << 23) ? big : (a < (113u << 23) ? sub : norm);
  return fp16{static_cast<uint16_t>(mag | sign)};
}

// dtype codes shared with fastmim/ops: 0 = float32, 1 = bfloat16, 2 = float16.
inline std::string dtype_error(const char* fn, const char* what, int64_t code) {
  return std::string(fn) + ": " + what + " dtype code " + std::to_string(code) +
         " is not one of 0 (float32), 1 (bfloat16), 2 (float16)";
}

// Calls f(T{}) with T the storage type for `code`.
template <class F>
void dispatch_dtype(const char* fn, const char* what, int64_t code, F&& f) {
  switch (code) {
    case 0:
      f(float{});
      return;
    case 1:
      f(bf16{});
      return;
    case 2:
      f(fp16{});
      return;
    default:
      throw std::invalid_argument(dtype_error(fn, what, code));
  }
}

[[noreturn]] inline void fail(const char* fn, const std::string& msg) {
  throw std::invalid_argument(std::string(fn) + ": " + msg);
}

// Bytes per element of dtype `code` (4 or 2); throws dtype_error for an unknown code.
inline int64_t elem_size_of(const char* fn, const char* what, int64_t code) {
  if (code < 0 || code > 2) throw std::invalid_argument(dtype_error(fn, what, code));
  return code == 0 ? 4 : 2;
}

// Copies of fewer bytes than this run on the calling thread: starting a parallel region costs more than it saves.
constexpr int64_t kParallelBytes = int64_t{1} << 18;

// A raw element size (ops that only copy bytes) must be positive.
inline void require_elem_size(const char* fn, int64_t elem_size) {
  if (elem_size < 1) fail(fn, "elem_size = " + std::to_string(elem_size) + " must be >= 1");
}

inline void require_nonneg(const char* fn, const char* name, int64_t v) {
  if (v < 0) fail(fn, std::string(name) + " = " + std::to_string(v) + " must be >= 0");
}

// a * b for non-negative operands; throws instead of overflowing.
inline int64_t mul_checked(const char* fn, int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) fail(fn, "sizes are too large (int64 overflow)");
  return r;
}
inline int64_t add_checked(const char* fn, int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) fail(fn, "sizes are too large (int64 overflow)");
  return r;
}

// Number of elements of a buffer with the given dims; its size in bytes must fit in int64 too.
inline int64_t numel_checked(const char* fn, std::initializer_list<int64_t> dims, int64_t elem_size) {
  int64_t n = 1;
  for (int64_t d : dims) n = mul_checked(fn, n, d);
  mul_checked(fn, n, elem_size);
  return n;
}

// A buffer that will be read or written must not be null (an empty one may be).
inline void require_ptr(const char* fn, const char* name, uintptr_t ptr, int64_t numel, int64_t align) {
  if (numel <= 0) return;
  if (ptr == 0) fail(fn, std::string(name) + " is a null pointer");
  if (align > 1 && ptr % static_cast<uintptr_t>(align) != 0)
    fail(fn, std::string(name) + " is not aligned to " + std::to_string(align) + " bytes");
}

inline std::string range_error(const char* fn, const char* ids_name, int64_t flat, int64_t cols, int64_t value,
                               int64_t hi) {
  return std::string(fn) + ": " + ids_name + "[" + std::to_string(flat / cols) + ", " + std::to_string(flat % cols) +
         "] = " + std::to_string(value) + " is out of range [0, " + std::to_string(hi) + ")";
}

// An exception must not escape an OpenMP region (std::terminate): keep the first one, rethrow after the region.
class ParallelError {
 public:
  void capture() noexcept {
#ifdef FASTMIM_OPENMP
#pragma omp critical(fastmim_parallel_error)
#endif
    if (!error_) error_ = std::current_exception();
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_ = nullptr;
};

// A thread's fp32 scratch row inside a parallel region: a failed allocation is kept in `error` (rethrown after the
// region) and leaves ok() false, so the thread skips its work instead of terminating the process.
class ThreadBuffer {
 public:
  ThreadBuffer(int64_t n, ParallelError& error) noexcept {
    try {
      data_.resize(static_cast<size_t>(n));
    } catch (...) {
      error.capture();
      ok_ = false;
    }
  }
  bool ok() const { return ok_; }
  float* data() { return data_.data(); }

 private:
  std::vector<float> data_;
  bool ok_ = true;
};

}  // namespace fastmim
