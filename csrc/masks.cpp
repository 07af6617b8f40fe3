// Uniform (UM-MAE) and multi-block (I-JEPA) mask generation, multi-threaded over the batch (see masks.h).
#include "masks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "mask_rng.h"

namespace fastmim {
namespace {

// Salts of the per-sample streams (block_mask_keys has its own): one key, unrelated draws per strategy.
constexpr uint64_t kUniformSalt = 0x0A11F0C3D2E1B5A7ULL;
constexpr uint64_t kMultiBlockSalt = 0x3B10C45E7A9D2F61ULL;

// Largest grid side, as block_mask: keeps every size product far from int64 overflow.
constexpr int64_t kMaxSide = int64_t{1} << 15;

void uniform_sample(const UniformMaskParams& p, Rng& rng, uint8_t* choice, uint8_t* secondary) {
  const int64_t n = p.cells_h * p.cells_w;
  for (int64_t c = 0; c < n; ++c) choice[c] = static_cast<uint8_t>(rng.next() >> 62);  // top two bits: 0..3
  // Selection sampling (Knuth's algorithm S): cell c is taken with probability left / (n - c), which gives exactly
  // num_secondary cells, every subset equally likely, without a scratch buffer.
  uint64_t left = static_cast<uint64_t>(p.num_secondary);
  for (int64_t c = 0; c < n; ++c) {
    const bool take = rng.below(static_cast<uint64_t>(n - c)) < left;
    secondary[c] = take ? 1 : 0;
    left -= take ? 1 : 0;
  }
}

struct Rect {
  int64_t top, left, h, w;
};

// One block as MultiBlockMask._ref draws it: scale, aspect ratio (log-uniform), then top and left.
Rect draw_block(const MultiBlockParams& p, Rng& rng, double scale_min, double scale_max, double log_aspect_min,
                double log_aspect_max) {
  const double scale = rng.uniform(scale_min, scale_max);
  const double aspect = std::exp(rng.uniform(log_aspect_min, log_aspect_max));
  const double area = scale * static_cast<double>(p.height * p.width);
  Rect r;
  r.h = block_side(std::sqrt(area * aspect), p.height);
  r.w = block_side(std::sqrt(area / aspect), p.width);
  r.top = rng.randint(0, p.height - r.h);
  r.left = rng.randint(0, p.width - r.w);
  return r;
}

void fill_rect(uint8_t* plane, int64_t width, const Rect& r, uint8_t v) {
  for (int64_t i = r.top; i < r.top + r.h; ++i) {
    uint8_t* row = plane + i * width + r.left;
    std::fill(row, row + r.w, v);
  }
}

// Returns false when no context block kept more than min_keep tokens: after max_tries draws excluding every target, the next
// max_tries exclude one target fewer (the last), and so on down to none, as I-JEPA's collator gives up a constraint.
bool multiblock_sample(const MultiBlockParams& p, Rng& rng, uint8_t* context, uint8_t* targets, Rect* rects) {
  const int64_t n = p.height * p.width;
  const double la = std::log(p.aspect_min), ha = std::log(p.aspect_max);
  std::fill(targets, targets + p.num_targets * n, uint8_t{0});
  for (int64_t k = 0; k < p.num_targets; ++k) {
    rects[k] = draw_block(p, rng, p.target_scale_min, p.target_scale_max, la, ha);
    fill_rect(targets + k * n, p.width, rects[k], 1);
  }
  for (int64_t t = 0; t < p.max_tries * (p.num_targets + 1); ++t) {
    const int64_t excluded = p.num_targets - t / p.max_tries;
    std::fill(context, context + n, uint8_t{0});
    const Rect c = draw_block(p, rng, p.context_scale_min, p.context_scale_max, 0.0, 0.0);
    fill_rect(context, p.width, c, 1);
    for (int64_t k = 0; k < excluded; ++k) {  // minus the targets: clear the overlap of the two rectangles
      const Rect& r = rects[k];
      const int64_t top = std::max(c.top, r.top), bottom = std::min(c.top + c.h, r.top + r.h);
      const int64_t left = std::max(c.left, r.left), right = std::min(c.left + c.w, r.left + r.w);
      if (top < bottom && left < right) fill_rect(context, p.width, Rect{top, left, bottom - top, right - left}, 0);
    }
    int64_t kept = 0;
    for (int64_t i = c.top; i < c.top + c.h; ++i)
      for (int64_t j = c.left; j < c.left + c.w; ++j) kept += context[i * p.width + j];
    if (kept > p.min_keep) return true;  // more than min_keep, as I-JEPA's collator
  }
  return false;
}

void check_keys(const char* fn, const uint64_t* keys, int64_t batch, const void* out_a, const void* out_b) {
  if (batch < 0) fail(fn, "batch must be >= 0");
  if (batch > 0 && (keys == nullptr || out_a == nullptr || out_b == nullptr)) fail(fn, "null buffer");
}

bool in_unit(double v) { return v > 0.0 && v <= 1.0; }  // false for NaN

}  // namespace

void validate(const UniformMaskParams& p) {
  const char* fn = "uniform_mask_keys";
  if (p.cells_h < 1 || p.cells_w < 1) fail(fn, "cells_h and cells_w must be >= 1");
  if (p.cells_h > kMaxSide || p.cells_w > kMaxSide) fail(fn, "cells_h and cells_w must be <= 32768");
  const int64_t n = p.cells_h * p.cells_w;
  if (p.num_secondary < 0 || p.num_secondary > n)
    fail(fn, "num_secondary=" + std::to_string(p.num_secondary) + " is outside [0, " + std::to_string(n) + "]");
}

void validate(const MultiBlockParams& p) {
  const char* fn = "multiblock_mask_keys";
  if (p.height < 1 || p.width < 1) fail(fn, "grid height and width must be >= 1");
  if (p.height > kMaxSide || p.width > kMaxSide) fail(fn, "grid height and width must be <= 32768");
  if (p.num_targets < 1) fail(fn, "num_targets must be >= 1, got " + std::to_string(p.num_targets));
  if (!in_unit(p.target_scale_min) || !in_unit(p.target_scale_max))
    fail(fn, "target_scale_min and target_scale_max must be in (0, 1]");
  if (p.target_scale_min > p.target_scale_max) fail(fn, "target_scale_min must be <= target_scale_max");
  if (!(p.aspect_min > 0.0) || !std::isfinite(p.aspect_min) || !std::isfinite(p.aspect_max))
    fail(fn, "aspect_min and aspect_max must be finite numbers > 0");
  if (!(p.aspect_min <= p.aspect_max)) fail(fn, "aspect_min must be <= aspect_max");
  if (!in_unit(p.context_scale_min) || !in_unit(p.context_scale_max))
    fail(fn, "context_scale_min and context_scale_max must be in (0, 1]");
  if (p.context_scale_min > p.context_scale_max) fail(fn, "context_scale_min must be <= context_scale_max");
  const int64_t n = p.height * p.width;
  if (p.min_keep < 0 || p.min_keep >= n)  // a context keeps more than min_keep tokens
    fail(fn, "min_keep=" + std::to_string(p.min_keep) + " is outside [0, " + std::to_string(n - 1) + "]");
  if (p.max_tries < 1) fail(fn, "max_tries must be >= 1, got " + std::to_string(p.max_tries));
}

void uniform_mask_keys(const UniformMaskParams& p, const uint64_t* keys, int64_t batch, uint8_t* choice,
                       uint8_t* secondary, int64_t num_threads) {
  validate(p);
  check_keys("uniform_mask_keys", keys, batch, choice, secondary);
  const int64_t n = p.cells_h * p.cells_w;
  for_each_sample(batch, num_threads, [&](int64_t b) {
    Rng rng = key_rng(keys[b], kUniformSalt);
    uniform_sample(p, rng, choice + b * n, secondary + b * n);
  });
}

void multiblock_mask_keys(const MultiBlockParams& p, const uint64_t* keys, int64_t batch, uint8_t* context,
                          uint8_t* targets, int64_t num_threads) {
  const char* fn = "multiblock_mask_keys";
  validate(p);
  check_keys(fn, keys, batch, context, targets);
  const int64_t n = p.height * p.width;
  const int64_t tn = mul_checked(fn, p.num_targets, n);
  mul_checked(fn, tn, batch);
  // The first sample (lowest index) whose context failed, the same whatever the number of threads.
  int64_t first_failed = std::numeric_limits<int64_t>::max();
  ParallelError error;
#ifdef FASTMIM_OPENMP
  const int threads =
      num_threads > 0 ? static_cast<int>(std::min(num_threads, kMaxMaskThreads)) : omp_get_max_threads();
#pragma omp parallel num_threads(threads) if (batch > 1)
#else
  (void)num_threads;
#endif
  {
    std::vector<Rect> rects;  // one scratch list per thread
    try {
      rects.resize(static_cast<size_t>(p.num_targets));
    } catch (...) {
      error.capture();
    }
    const bool ok = rects.size() == static_cast<size_t>(p.num_targets);
#ifdef FASTMIM_OPENMP
#pragma omp for schedule(dynamic, 8) reduction(min : first_failed)
#endif
    for (int64_t b = 0; b < batch; ++b) {
      if (!ok) continue;
      Rng rng = key_rng(keys[b], kMultiBlockSalt);
      if (!multiblock_sample(p, rng, context + b * n, targets + b * tn, rects.data()) && b < first_failed)
        first_failed = b;
    }
  }
  error.rethrow();
  if (first_failed != std::numeric_limits<int64_t>::max())
    throw std::runtime_error(std::string(fn) + ": no context block kept more than min_keep=" + std::to_string(p.min_keep) +
                             " tokens, even without excluding the targets (max_tries=" + std::to_string(p.max_tries) +
                             " draws per target dropped; first failing sample: " + std::to_string(first_failed) +
                             "); lower min_keep or raise context_scale");
}

}  // namespace fastmim
