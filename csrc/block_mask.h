// BEiT-style block-wise mask generation on the CPU (see fastmim/masking/block.py for the Python reference).
#pragma once
#include <cstdint>

namespace fastmim {

struct BlockMaskParams {
  int64_t height;          // token grid rows
  int64_t width;           // token grid columns
  int64_t num_masked;      // exact number of masked cells per sample
  double min_block;        // smallest block area tried (patches)
  double max_block;        // largest block area tried (patches)
  double min_aspect;       // aspect ratio range, sampled log-uniformly
  double max_aspect;
  int64_t max_attempts;    // tries per block before giving up on that block
};

// Throws std::invalid_argument naming the first bad field.
void validate(const BlockMaskParams& p);

// Fills out[batch, height, width] (row-major, 1 = masked). Sample b uses its own RNG stream derived from (seed, b),
// so the result does not depend on the number of threads.
void block_mask(const BlockMaskParams& p, int64_t batch, uint64_t seed, uint8_t* out);

}  // namespace fastmim
