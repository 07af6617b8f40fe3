// patchify / unpatchify: NCHW images <-> [B, L, p*p*C] patch vectors in (pi, qi, c) order (MAE). Pure copies, so
// the element type only matters through its size.
#include <cstring>

#include "dtype.h"
#include "ops.h"

namespace fastmim {
namespace {

// Bytes of an element of size N with no alignment requirement: the fallback for sizes or addresses the unsigned
// integer types below cannot take. Copying one compiles to N-byte moves.
template <int N>
struct Bytes {
  unsigned char b[N];
};

// The geometry of one call. Work item (b, gi): patch row gi of sample b, i.e. the p image rows [gi*p, (gi+1)*p) of
// every channel (channel c: p*W contiguous elements at img + (b*C + c)*H*W + gi*p*W) and the gw patches
// l = gi*gw + gj (gw*D contiguous elements at patches + (b*L + gi*gw)*D). Within a patch, row pi of the image block
// fills [pi*p*C, (pi+1)*p*C) as (qi, c).
struct Geometry {
  int64_t C, H, W, p, gh, gw, D, HW;
};

// v[3*q + c] = s_c[q] for q < p, and back. Separate functions so that the restrict qualifiers (the four runs never
// overlap) reach the vectoriser.
template <class E, int kP>
inline void interleave3(E* __restrict v, const E* __restrict s0, const E* __restrict s1, const E* __restrict s2,
                        int64_t p_rt) {
  const int64_t p = kP ? kP : p_rt;
  for (int64_t q = 0; q < p; ++q) {
    v[3 * q] = s0[q];
    v[3 * q + 1] = s1[q];
    v[3 * q + 2] = s2[q];
  }
}

template <class E, int kP>
inline void deinterleave3(E* __restrict s0, E* __restrict s1, E* __restrict s2, const E* __restrict v, int64_t p_rt) {
  const int64_t p = kP ? kP : p_rt;
  for (int64_t q = 0; q < p; ++q) {
    s0[q] = v[3 * q];
    s1[q] = v[3 * q + 1];
    s2[q] = v[3 * q + 2];
  }
}

// One work item. kC / kP are C / p when fixed at compile time (0: read from g), so that the (qi, c) loops of the
// common cases (RGB, p = 16) have constant trip counts and vectorise. Patch vectors are walked in order (written or
// read sequentially); the image side is read or written in runs of p elements per (channel, row).
template <class E, int kC, int kP, bool kToPatches>
void copy_block(E* __restrict img, E* __restrict pat, const Geometry& g) {
  const int64_t C = kC ? kC : g.C, p = kP ? kP : g.p, W = g.W, HW = g.HW, pC = p * C;
  for (int64_t gj = 0; gj < g.gw; ++gj) {
    for (int64_t pi = 0; pi < p; ++pi) {
      E* v = pat + gj * g.D + pi * pC;  // (qi, c) for qi < p, c < C
      E* s = img + pi * W + gj * p;     // channel c, pixel qi at s[c * HW + qi]
      if (C == 1) {
        for (int64_t qi = 0; qi < p; ++qi) {
          if (kToPatches)
            v[qi] = s[qi];
          else
            s[qi] = v[qi];
        }
      } else if (kC == 3) {
        if (kToPatches)
          interleave3<E, kP>(v, s, s + HW, s + 2 * HW, p);
        else
          deinterleave3<E, kP>(s, s + HW, s + 2 * HW, v, p);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          E* sc = s + c * HW;
          for (int64_t qi = 0; qi < p; ++qi) {
            if (kToPatches)
              v[qi * C + c] = sc[qi];
            else
              sc[qi] = v[qi * C + c];
          }
        }
      }
    }
  }
}

// f(img_offset, patch_offset) for every work item (b, gi), offsets in elements; items in parallel (static schedule)
// unless `parallel` is false. Every item writes its own part of the output, so the result never depends on threads.
template <class F>
void for_each_block(int64_t B, const Geometry& g, bool parallel, const F& f) {
  const int64_t n = B * g.gh;
#ifdef FASTMIM_OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#else
  (void)parallel;
#endif
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = i / g.gh, gi = i % g.gh;
    f((b * g.C * g.H + gi * g.p) * g.W, i * g.gw * g.D);
  }
}

template <class E, int kC, int kP, bool kToPatches>
void copy_all(E* img, E* pat, int64_t B, const Geometry& g, bool parallel) {
  for_each_block(B, g, parallel,
                 [&](int64_t io, int64_t po) { copy_block<E, kC, kP, kToPatches>(img + io, pat + po, g); });
}

// Picks the compile-time specialisation for the shape.
template <class E, bool kToPatches>
void copy_typed(uintptr_t img, uintptr_t pat, int64_t B, const Geometry& g, bool parallel) {
  E* im = reinterpret_cast<E*>(img);
  E* pa = reinterpret_cast<E*>(pat);
  if (g.C == 3 && g.p == 16)
    copy_all<E, 3, 16, kToPatches>(im, pa, B, g, parallel);
  else if (g.C == 3)
    copy_all<E, 3, 0, kToPatches>(im, pa, B, g, parallel);
  else if (g.C == 1)
    copy_all<E, 1, 0, kToPatches>(im, pa, B, g, parallel);
  else
    copy_all<E, 0, 0, kToPatches>(im, pa, B, g, parallel);
}

// Any element size or alignment: the same walk, one memcpy of es bytes per element.
template <bool kToPatches>
void copy_bytes(char* img, char* pat, int64_t B, const Geometry& g, int64_t es, bool parallel) {
  const size_t ne = static_cast<size_t>(es);
  for_each_block(B, g, parallel, [&](int64_t io, int64_t po) {
    char* im = img + io * es;
    char* pa = pat + po * es;
    for (int64_t gj = 0; gj < g.gw; ++gj)
      for (int64_t pi = 0; pi < g.p; ++pi)
        for (int64_t qi = 0; qi < g.p; ++qi)
          for (int64_t c = 0; c < g.C; ++c) {
            char* v = pa + (gj * g.D + (pi * g.p + qi) * g.C + c) * es;
            char* s = im + (c * g.HW + pi * g.W + gj * g.p + qi) * es;
            if (kToPatches)
              std::memcpy(v, s, ne);
            else
              std::memcpy(s, v, ne);
          }
  });
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
  const Geometry g{C, H, W, p, H / p, W / p, p * p * C, H * W};
  const bool parallel = n * elem_size >= kParallelBytes;
  const uintptr_t img = kToPatches ? src : dst, pat = kToPatches ? dst : src;
  const uintptr_t both = src | dst;
  switch (elem_size) {
    case 1:
      return copy_typed<uint8_t, kToPatches>(img, pat, B, g, parallel);
    case 2:
      return both % 2 == 0 ? copy_typed<uint16_t, kToPatches>(img, pat, B, g, parallel)
                           : copy_typed<Bytes<2>, kToPatches>(img, pat, B, g, parallel);
    case 4:
      return both % 4 == 0 ? copy_typed<uint32_t, kToPatches>(img, pat, B, g, parallel)
                           : copy_typed<Bytes<4>, kToPatches>(img, pat, B, g, parallel);
    case 8:
      return both % 8 == 0 ? copy_typed<uint64_t, kToPatches>(img, pat, B, g, parallel)
                           : copy_typed<Bytes<8>, kToPatches>(img, pat, B, g, parallel);
    default:
      return copy_bytes<kToPatches>(reinterpret_cast<char*>(img), reinterpret_cast<char*>(pat), B, g, elem_size,
                                    parallel);
  }
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
