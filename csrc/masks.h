// CPU generators of the keyed mask strategies (fastmim/masking/strategies.py: UniformMask, MultiBlockMask; the block
// strategy is block_mask_keys in block_mask.h). Sample b draws from its own stream, seeded from keys[b] alone: a mask
// is a pure function of its key, whatever the batch, its position in it or the number of threads. The streams differ
// from the torch and reference implementations': they agree in distribution, not bit for bit.
#pragma once
#include <cstdint>

namespace fastmim {

// UM-MAE's uniform sampling on a grid of cells_h x cells_w 2x2 cells.
struct UniformMaskParams {
  int64_t cells_h;
  int64_t cells_w;
  int64_t num_secondary;  // cells whose visible token becomes a mask token, in [0, cells_h * cells_w]
};

// Throws std::invalid_argument naming the first bad field.
void validate(const UniformMaskParams& p);

// choice[batch, cells_h, cells_w] in 0..3: the visible token of each cell ((dy, dx) = divmod(choice, 2)), uniform;
// secondary[batch, cells_h, cells_w] (0/1): exactly num_secondary cells per sample, uniform without replacement.
void uniform_mask_keys(const UniformMaskParams& p, const uint64_t* keys, int64_t batch, uint8_t* choice,
                       uint8_t* secondary, int64_t num_threads = 0);

// I-JEPA's multi-block masking (MultiBlockMask._ref). A block of scale s and aspect ratio a covers
// h = round(sqrt(s * H * W * a)) by w = round(sqrt(s * H * W / a)) tokens (each clipped to [1, side]) at a uniform
// top in [0, H - h] and left in [0, W - w].
struct MultiBlockParams {
  int64_t height;
  int64_t width;
  int64_t num_targets;
  double target_scale_min, target_scale_max;  // in (0, 1]
  double aspect_min, aspect_max;              // > 0, sampled log-uniformly
  double context_scale_min, context_scale_max;  // in (0, 1]; the context block has aspect ratio 1
  int64_t min_keep;                             // in [0, height * width - 1]
  int64_t max_tries;                            // >= 1
};

// Throws std::invalid_argument naming the first bad field.
void validate(const MultiBlockParams& p);

// targets[batch, num_targets, H, W] (0/1): the target blocks; context[batch, H, W] (1 = context token kept): the
// context block minus the union of the targets, redrawn up to max_tries times until it keeps > min_keep tokens.
// Throws std::runtime_error (RuntimeError in Python) naming min_keep, max_tries and the first failing sample when a
// sample's context never keeps enough tokens.
void multiblock_mask_keys(const MultiBlockParams& p, const uint64_t* keys, int64_t batch, uint8_t* context,
                          uint8_t* targets, int64_t num_threads = 0);

}  // namespace fastmim
