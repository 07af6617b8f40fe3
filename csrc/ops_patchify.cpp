// patchify / unpatchify: NCHW images <-> [B, L, p*p*C] patch vectors in (pi, qi, c) order (MAE). Pure copies, so
// the element type only matters through its size.
#include <cstring>

#include "dtype.h"
#include "ops.h"

namespace fastmim {
namespace {

// Work item (b, h): image row h of sample b, i.e. patch row gi = h / p, row pi = h % p inside those patches.
// In patch l = gi * gw + gj, that image row fills elements [pi*p*C, (pi+1)*p*C) as (qi, c), qi = w % p.
template <class E, bool kToPatches>
void copy_rows(E* img, E* patches, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p) {
  const int64_t gw = W / p, L = (H / p) * gw, D = p * p * C, HW = H * W;
#ifdef FASTMIM_OPENMP
#pragma omp parallel for schedule(static)
#endif
  for (int64_t i = 0; i < B * H; ++i) {
    const int64_t b = i / H, h = i % H, gi = h / p, pi = h % p;
    E* im = img + b * C * HW + h * W;                          // channel c at im + c * HW
    E* pa = patches + (b * L + gi * gw) * D + pi * p * C;      // patch gj at pa + gj * D
    if (C == 1) {
      for (int64_t gj = 0; gj < gw; ++gj) {
        if (kToPatches)
          std::memcpy(pa + gj * D, im + gj * p, static_cast<size_t>(p) * sizeof(E));
        else
          std::memcpy(im + gj * p, pa + gj * D, static_cast<size_t>(p) * sizeof(E));
      }
      continue;
    }
    for (int64_t gj = 0; gj < gw; ++gj) {
      E* v = pa + gj * D;
      for (int64_t c = 0; c < C; ++c) {
        E* s = im + c * HW + gj * p;
        if (kToPatches)
          for (int64_t qi = 0; qi < p; ++qi) v[qi * C + c] = s[qi];
        else
          for (int64_t qi = 0; qi < p; ++qi) s[qi] = v[qi * C + c];
      }
    }
  }
}

// Any element size or alignment: the same walk, one memcpy per element.
template <bool kToPatches>
void copy_rows_bytes(char* img, char* patches, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p, int64_t es) {
  const int64_t gw = W / p, L = (H / p) * gw, D = p * p * C, HW = H * W;
  const size_t n = static_cast<size_t>(es);
#ifdef FASTMIM_OPENMP
#pragma omp parallel for schedule(static)
#endif
  for (int64_t i = 0; i < B * H; ++i) {
    const int64_t b = i / H, h = i % H, gi = h / p, pi = h % p;
    char* im = img + (b * C * HW + h * W) * es;
    char* pa = patches + ((b * L + gi * gw) * D + pi * p * C) * es;
    for (int64_t gj = 0; gj < gw; ++gj)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t qi = 0; qi < p; ++qi) {
          char* v = pa + (gj * D + qi * C + c) * es;
          char* s = im + (c * HW + gj * p + qi) * es;
          if (kToPatches)
            std::memcpy(v, s, n);
          else
            std::memcpy(s, v, n);
        }
  }
}

template <bool kToPatches>
void dispatch_copy(const char* fn, uintptr_t src, uintptr_t dst, int64_t B, int64_t C, int64_t H, int64_t W,
                   int64_t p, int64_t elem_size) {
  require_nonneg(fn, "B", B);
  require_nonneg(fn, "C", C);
  require_nonneg(fn, "H", H);
  require_nonneg(fn, "W", W);
  if (p < 1) fail(fn, "patch size p = " + std::to_string(p) + " must be >= 1");
  if (H % p != 0 || W % p != 0)
    fail(fn, "image size " + std::to_string(H) + "x" + std::to_string(W) + " is not divisible by the patch size " +
                 std::to_string(p));
  require_elem_size(fn, elem_size);
  const int64_t n = numel_checked(fn, {B, C, H, W}, elem_size);
  require_ptr(fn, kToPatches ? "img" : "x", src, n, 1);
  require_ptr(fn, "out", dst, n, 1);
  if (n == 0) return;
  const uintptr_t both = src | dst;
  auto run = [&](auto tag) {
    using E = decltype(tag);
    E* img = reinterpret_cast<E*>(kToPatches ? src : dst);
    E* pat = reinterpret_cast<E*>(kToPatches ? dst : src);
    copy_rows<E, kToPatches>(img, pat, B, C, H, W, p);
  };
  if (elem_size == 4 && both % 4 == 0)
    run(uint32_t{});
  else if (elem_size == 2 && both % 2 == 0)
    run(uint16_t{});
  else if (elem_size == 1)
    run(uint8_t{});
  else if (elem_size == 8 && both % 8 == 0)
    run(uint64_t{});
  else
    copy_rows_bytes<kToPatches>(reinterpret_cast<char*>(kToPatches ? src : dst),
                                reinterpret_cast<char*>(kToPatches ? dst : src), B, C, H, W, p, elem_size);
}

}  // namespace

void patchify(uintptr_t img, uintptr_t out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p,
              int64_t elem_size) {
  dispatch_copy<true>("patchify", img, out, B, C, H, W, p, elem_size);
}

void unpatchify(uintptr_t x, uintptr_t out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p,
                int64_t elem_size) {
  dispatch_copy<false>("unpatchify", x, out, B, C, H, W, p, elem_size);
}

}  // namespace fastmim
