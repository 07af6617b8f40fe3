// Random numbers and the batch loop shared by the CPU mask generators (block_mask.cpp, masks.cpp). Every sample owns
// its RNG stream, so a batch is the same whatever the number of threads and whichever thread draws which sample.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "dtype.h"

#ifdef FASTMIM_OPENMP
#include <omp.h>
#endif

namespace fastmim {

// splitmix64: decorrelates the seeds fed to Rng (consecutive keys give unrelated streams).
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// xoshiro256** : small, fast, and its output is fully specified (unlike std:: distributions).
class Rng {
 public:
  explicit Rng(uint64_t seed) {
    for (auto& s : s_) s = seed = splitmix64(seed);
  }
  uint64_t next() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double a, double b) { return a + (b - a) * uniform(); }
  int64_t randint(int64_t lo, int64_t hi) {  // inclusive; multiply-shift, no 64-bit division (bias < range / 2^64)
    return lo + static_cast<int64_t>(below(static_cast<uint64_t>(hi - lo + 1)));
  }
  // Uniform integer in [0, n) for n >= 1 (multiply-shift: always < n, bias below n / 2^64).
  uint64_t below(uint64_t n) { return static_cast<uint64_t>((static_cast<unsigned __int128>(next()) * n) >> 64); }

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

// The stream of the sample with key `key` (fastmim.masking.rng.sample_keys) for the generator with salt `salt`: each
// generator has its own salt, so block, uniform and multi-block masks of one sample are unrelated draws.
inline Rng key_rng(uint64_t key, uint64_t salt) { return Rng(splitmix64(key ^ salt)); }

// A block side from its real-valued length: rounded half away from zero (std::round; Python's round() and
// torch.round round half to even, a difference of measure zero for continuous draws), clipped to [1, n]. Clipping
// happens in double, so an infinite or NaN length never reaches an integer conversion.
inline int64_t block_side(double x, int64_t n) {
  if (!(x >= 0.5)) return 1;  // also NaN
  if (x >= static_cast<double>(n) - 0.5) return n;
  return static_cast<int64_t>(x + 0.5);  // std::round for x >= 0.5, without its libm call
}

// Largest thread count a caller may ask for.
constexpr int64_t kMaxMaskThreads = 4096;

// Runs sample(b) for every b in [0, batch), spread over OpenMP threads: num_threads of them when > 0, else OpenMP's
// default (omp_get_max_threads: OMP_NUM_THREADS or the core count). An exception must not escape the parallel
// region (std::terminate): the first one is kept and rethrown after the loop.
template <class F>
void for_each_sample(int64_t batch, int64_t num_threads, const F& sample) {
  ParallelError error;
#ifdef FASTMIM_OPENMP
  const int threads =
      num_threads > 0 ? static_cast<int>(std::min(num_threads, kMaxMaskThreads)) : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads) if (batch > 1)
#else
  (void)num_threads;
#endif
  for (int64_t b = 0; b < batch; ++b) {
    try {
      sample(b);
    } catch (...) {
      error.capture();
    }
  }
  error.rethrow();
}

}  // namespace fastmim
