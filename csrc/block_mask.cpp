#include "block_mask.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "mask_rng.h"

namespace fastmim {
namespace {

// One rectangle, as BEiT's generator draws it: up to max_attempts tries of a random area and log-uniform aspect
// ratio; a try counts only if it masks at least one new cell and no more than `budget` new cells.
// log_lo, log_hi: the log of the aspect range's ends (computed once per sample, not per block).
int64_t add_block(const BlockMaskParams& p, int64_t budget, double log_lo, double log_hi, Rng& rng, uint8_t* m) {
  for (int64_t attempt = 0; attempt < p.max_attempts; ++attempt) {
    const double area = rng.uniform(p.min_block, static_cast<double>(budget));
    const double aspect = std::exp(rng.uniform(log_lo, log_hi));
    // The sides rounded half away from zero must lie in [1, height) and [1, width): compared in double before
    // converting (a huge aspect ratio can make a side infinite), then x + 0.5 truncated, which is that rounding for
    // x >= 0.5 without a libm call (std::round is one, a tenth of the time here).
    const double hx = std::sqrt(area * aspect), wx = std::sqrt(area / aspect);
    if (!(hx >= 0.5 && wx >= 0.5 && hx < static_cast<double>(p.height) - 0.5 &&
          wx < static_cast<double>(p.width) - 0.5))
      continue;
    const int64_t h = static_cast<int64_t>(hx + 0.5), w = static_cast<int64_t>(wx + 0.5);
    const int64_t top = rng.randint(0, p.height - h);
    const int64_t left = rng.randint(0, p.width - w);
    int64_t already = 0;
    for (int64_t i = top; i < top + h; ++i)
      for (int64_t j = left; j < left + w; ++j) already += m[i * p.width + j];
    const int64_t fresh = h * w - already;
    if (fresh <= 0 || fresh > budget) continue;
    for (int64_t i = top; i < top + h; ++i)
      for (int64_t j = left; j < left + w; ++j) m[i * p.width + j] = 1;
    return fresh;
  }
  return 0;
}

void one_sample(const BlockMaskParams& p, Rng& rng, uint8_t* m) {
  const int64_t n = p.height * p.width;
  std::fill(m, m + n, uint8_t{0});
  int64_t count = 0;
  const double log_lo = std::log(p.min_aspect), log_hi = std::log(p.max_aspect);
  while (count < p.num_masked) {
    // clamp in double first: max_block may exceed int64's range, and that cast would be undefined
    const double remaining = static_cast<double>(p.num_masked - count);
    const int64_t budget = static_cast<int64_t>(std::min<double>(p.max_block, remaining));
    const int64_t added = budget > 0 ? add_block(p, budget, log_lo, log_hi, rng, m) : 0;
    if (added == 0) break;
    count += added;
  }
  if (count == p.num_masked || !p.exact) return;  // BEiT stops short when no block fits
  // Blocks could not reach the exact count: grow them, one random free cell next to a masked one at a time (any free
  // cell when none is), which keeps BEiT's block statistics (scattered single cells would add pieces).
  std::vector<int64_t> frontier;
  frontier.reserve(static_cast<size_t>(n));
  for (; count < p.num_masked; ++count) {
    frontier.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (m[i]) continue;
      const int64_t y = i / p.width, x = i % p.width;
      if ((y > 0 && m[i - p.width]) || (y + 1 < p.height && m[i + p.width]) || (x > 0 && m[i - 1]) ||
          (x + 1 < p.width && m[i + 1]))
        frontier.push_back(i);
    }
    if (frontier.empty())
      for (int64_t i = 0; i < n; ++i)
        if (!m[i]) frontier.push_back(i);
    m[frontier[rng.randint(0, static_cast<int64_t>(frontier.size()) - 1)]] = 1;
  }
}

}  // namespace

void validate(const BlockMaskParams& p, const char* fn) {
  auto fail = [fn](const std::string& msg) { throw std::invalid_argument(std::string(fn) + ": " + msg); };
  if (p.height < 1 || p.width < 1) fail("grid height and width must be >= 1");
  if (p.height > (1 << 15) || p.width > (1 << 15)) fail("grid height and width must be <= 32768");
  const int64_t n = p.height * p.width;
  if (p.num_masked < 0 || p.num_masked > n)
    fail("num_masked=" + std::to_string(p.num_masked) + " is outside [0, " + std::to_string(n) + "]");
  if (!(p.min_block >= 1.0) || !std::isfinite(p.min_block)) fail("min_num_patches must be a finite number >= 1");
  if (!(p.max_block >= p.min_block) || std::isnan(p.max_block)) fail("max_num_patches must be >= min_num_patches");
  if (!(p.min_aspect > 0.0) || !std::isfinite(p.min_aspect)) fail("min_aspect must be a finite number > 0");
  if (!(p.max_aspect >= p.min_aspect) || !std::isfinite(p.max_aspect)) fail("max_aspect must be finite and >= min_aspect");
  if (p.max_attempts < 1) fail("max_attempts must be >= 1");
}

void block_mask(const BlockMaskParams& p, int64_t batch, uint64_t seed, uint8_t* out, int64_t num_threads) {
  validate(p);
  if (batch < 0) throw std::invalid_argument("block_mask: batch must be >= 0");
  const int64_t n = p.height * p.width;
  for_each_sample(batch, num_threads, [&](int64_t b) {
    Rng rng(splitmix64(seed) ^ splitmix64(static_cast<uint64_t>(b) + 0x51ED270B7A3C0F1DULL));
    one_sample(p, rng, out + b * n);
  });
}

void block_mask_keys(const BlockMaskParams& p, const uint64_t* keys, int64_t batch, uint8_t* out,
                     int64_t num_threads) {
  validate(p, "block_mask_keys");
  if (batch < 0) throw std::invalid_argument("block_mask_keys: batch must be >= 0");
  if (batch > 0 && (keys == nullptr || out == nullptr)) throw std::invalid_argument("block_mask_keys: null buffer");
  const int64_t n = p.height * p.width;
  for_each_sample(batch, num_threads, [&](int64_t b) {
    Rng rng = key_rng(keys[b], 0xB10C3A5C0FFEE001ULL);
    one_sample(p, rng, out + b * n);
  });
}

}  // namespace fastmim
