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
  bool exact = true;       // true: reach num_masked by growing the blocks; false: stop short as BEiT does
};

// Throws std::invalid_argument naming the first bad field (message prefixed with `fn`).
void validate(const BlockMaskParams& p, const char* fn = "block_mask");

// Fills out[batch, height, width] (row-major, 1 = masked). Sample b uses its own RNG stream derived from (seed, b),
// so the result does not depend on the number of threads. num_threads: OpenMP threads (0: OpenMP's default).
void block_mask(const BlockMaskParams& p, int64_t batch, uint64_t seed, uint8_t* out, int64_t num_threads = 0);

// The same masks for samples keyed by keys[batch] (fastmim.masking.rng.sample_keys): sample b's stream depends on
// keys[b] alone, so a mask is a pure function of its key whatever the batch it is drawn in.
void block_mask_keys(const BlockMaskParams& p, const uint64_t* keys, int64_t batch, uint8_t* out,
                     int64_t num_threads = 0);

}  // namespace fastmim
