// pybind11 module fastmim._C. No libtorch: arrays cross as numpy buffers or raw pointers that the Python wrappers
// have validated. Every C++ exception becomes a Python exception (std::invalid_argument -> ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "block_mask.h"
#include "mask_rng.h"
#include "masks.h"
#include "ops.h"

#ifdef FASTMIM_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

void check_threads(const char* fn, int64_t num_threads) {
  if (num_threads < 0 || num_threads > fastmim::kMaxMaskThreads)
    throw std::invalid_argument(std::string(fn) + ": num_threads=" + std::to_string(num_threads) + " is outside [0, " +
                                std::to_string(fastmim::kMaxMaskThreads) + "] (0: OpenMP's default)");
}

// A new bool / uint8 array of the given shape; its element count is checked first, so a bad shape never reaches the
// allocator as a wrapped-around size.
template <class T>
py::array_t<T> new_array(const char* fn, std::vector<py::ssize_t> shape) {
  int64_t n = 1;
  for (auto d : shape) n = fastmim::mul_checked(fn, n, static_cast<int64_t>(d));
  if (n > std::numeric_limits<int64_t>::max() / 2) fastmim::fail(fn, "the output is too large");
  static_assert(sizeof(T) == 1, "mask outputs are one byte per element (numpy bool is one byte)");
  return py::array_t<T>(shape);
}

template <class T>
uint8_t* bytes(py::array_t<T>& a) {
  return reinterpret_cast<uint8_t*>(a.mutable_data());
}

// Per-sample keys: a 1-D array of any integer dtype, as a C-contiguous uint64 array (a copy when it is not one).
py::array_t<uint64_t> as_keys(const char* fn, const py::array& keys) {
  if (keys.ndim() != 1)
    fastmim::fail(fn, "keys must be a 1-D integer array [batch], got " + std::to_string(keys.ndim()) + " dims");
  const char kind = keys.dtype().kind();
  if (kind != 'u' && kind != 'i')
    fastmim::fail(fn, std::string("keys must be an integer array (uint64), got dtype kind '") + kind + "'");
  auto out = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(keys);
  if (!out) throw py::error_already_set();
  return out;
}

py::array_t<bool> block_mask_py(int64_t batch, int64_t height, int64_t width, int64_t num_masked,
                                double min_num_patches, double max_num_patches, double min_aspect,
                                double max_aspect, int64_t max_attempts, uint64_t seed, int64_t num_threads,
                                bool exact) {
  fastmim::BlockMaskParams p{height, width, num_masked, min_num_patches, max_num_patches,
                             min_aspect, max_aspect, max_attempts, exact};
  fastmim::validate(p);  // before allocating, so a bad shape never reaches the allocator
  if (batch < 0) throw std::invalid_argument("block_mask: batch must be >= 0");
  if (batch > 0 && height * width > std::numeric_limits<int64_t>::max() / batch / 2)
    throw std::invalid_argument("block_mask: batch * height * width is too large");
  check_threads("block_mask", num_threads);
  py::array_t<bool> out(std::vector<py::ssize_t>{batch, height, width});
  static_assert(sizeof(bool) == 1, "numpy bool is one byte");
  auto* ptr = reinterpret_cast<uint8_t*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    fastmim::block_mask(p, batch, seed, ptr, num_threads);
  }
  return out;
}

py::array_t<bool> block_mask_keys_py(const py::array& keys, int64_t height, int64_t width, int64_t num_masked,
                                     double min_num_patches, double max_num_patches, double min_aspect,
                                     double max_aspect, int64_t max_attempts, int64_t num_threads, bool exact) {
  const char* fn = "block_mask_keys";
  fastmim::BlockMaskParams p{height, width, num_masked, min_num_patches, max_num_patches,
                             min_aspect, max_aspect, max_attempts, exact};
  fastmim::validate(p, fn);
  check_threads(fn, num_threads);
  auto k = as_keys(fn, keys);
  const int64_t batch = k.shape(0);
  auto out = new_array<bool>(fn, {batch, height, width});
  const uint64_t* kp = k.data();
  uint8_t* ptr = bytes(out);
  {
    py::gil_scoped_release release;
    fastmim::block_mask_keys(p, kp, batch, ptr, num_threads);
  }
  return out;
}

py::tuple uniform_mask_keys_py(const py::array& keys, int64_t cells_h, int64_t cells_w, int64_t num_secondary,
                               int64_t num_threads) {
  const char* fn = "uniform_mask_keys";
  fastmim::UniformMaskParams p{cells_h, cells_w, num_secondary};
  fastmim::validate(p);
  check_threads(fn, num_threads);
  auto k = as_keys(fn, keys);
  const int64_t batch = k.shape(0);
  auto choice = new_array<uint8_t>(fn, {batch, cells_h, cells_w});
  auto secondary = new_array<bool>(fn, {batch, cells_h, cells_w});
  const uint64_t* kp = k.data();
  uint8_t *c = bytes(choice), *s = bytes(secondary);
  {
    py::gil_scoped_release release;
    fastmim::uniform_mask_keys(p, kp, batch, c, s, num_threads);
  }
  return py::make_tuple(choice, secondary);
}

py::tuple multiblock_mask_keys_py(const py::array& keys, int64_t height, int64_t width, int64_t num_targets,
                                  double target_scale_min, double target_scale_max, double aspect_min,
                                  double aspect_max, double context_scale_min, double context_scale_max,
                                  int64_t min_keep, int64_t max_tries, int64_t num_threads) {
  const char* fn = "multiblock_mask_keys";
  fastmim::MultiBlockParams p{height,     width,      num_targets,       target_scale_min, target_scale_max,
                              aspect_min, aspect_max, context_scale_min, context_scale_max, min_keep,
                              max_tries};
  fastmim::validate(p);
  check_threads(fn, num_threads);
  auto k = as_keys(fn, keys);
  const int64_t batch = k.shape(0);
  auto context = new_array<bool>(fn, {batch, height, width});
  auto targets = new_array<bool>(fn, {batch, num_targets, height, width});
  const uint64_t* kp = k.data();
  uint8_t *c = bytes(context), *t = bytes(targets);
  {
    py::gil_scoped_release release;
    fastmim::multiblock_mask_keys(p, kp, batch, c, t, num_threads);
  }
  return py::make_tuple(context, targets);
}

fastmim::PatchGeometry geometry(int64_t B, int64_t L, int64_t D, int64_t gw, int64_t s_b, int64_t s_row,
                                int64_t s_col, int64_t P, int64_t C, int64_t s_pi, int64_t s_qi, int64_t s_c) {
  return fastmim::PatchGeometry{B, L, D, gw, s_b, s_row, s_col, P, C, s_pi, s_qi, s_c};
}

py::tuple masked_loss_forward_py(uintptr_t pred, int64_t pred_dtype, uintptr_t target, int64_t target_dtype,
                                 int64_t target_numel, uintptr_t mask, int64_t B, int64_t L, int64_t D, int64_t gw,
                                 int64_t s_b, int64_t s_row, int64_t s_col, int64_t P, int64_t C, int64_t s_pi,
                                 int64_t s_qi, int64_t s_c, bool norm_pix, double eps, int64_t p) {
  std::pair<double, double> r;
  {
    py::gil_scoped_release release;
    r = fastmim::masked_loss_forward(pred, pred_dtype, target, target_dtype, target_numel, mask,
                                     geometry(B, L, D, gw, s_b, s_row, s_col, P, C, s_pi, s_qi, s_c),
                                     fastmim::MaskedLossOptions{norm_pix, eps, p});
  }
  return py::make_tuple(r.first, r.second);
}

void masked_loss_backward_py(double scale, uintptr_t pred, int64_t pred_dtype, uintptr_t target, int64_t target_dtype,
                             int64_t target_numel, uintptr_t mask, uintptr_t grad, int64_t B, int64_t L, int64_t D,
                             int64_t gw, int64_t s_b, int64_t s_row, int64_t s_col, int64_t P, int64_t C,
                             int64_t s_pi, int64_t s_qi, int64_t s_c, bool norm_pix, double eps, int64_t p) {
  py::gil_scoped_release release;
  fastmim::masked_loss_backward(scale, pred, pred_dtype, target, target_dtype, target_numel, mask, grad,
                                geometry(B, L, D, gw, s_b, s_row, s_col, P, C, s_pi, s_qi, s_c),
                                fastmim::MaskedLossOptions{norm_pix, eps, p});
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmim native CPU kernels (no libtorch dependency)";
  // What fastmim._ext checks: a build from other sources (a checkout pulled without `pip install -e .`) is not used.
  // Raise it whenever a function's meaning or signature changes (2: multi-block contexts keep more than min_keep).
  m.attr("SOURCE_VERSION") = 2;
  m.def("block_mask", &block_mask_py, py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("num_masked"),
        py::arg("min_num_patches"), py::arg("max_num_patches"), py::arg("min_aspect"), py::arg("max_aspect"),
        py::arg("max_attempts"), py::arg("seed"), py::arg("num_threads") = 0, py::arg("exact") = true,
        "BEiT-style block-wise masks: bool array [batch, height, width] with exactly num_masked True per sample "
        "(blocks grown to the count; exact=False: as BEiT, at most num_masked).");

  // Keyed mask strategies (fastmim/masking/strategies.py, impl="cpp"): sample b's stream depends on keys[b] alone
  // (keys: 1-D integer array), so masks do not depend on the batch or on num_threads (0: OpenMP's default).
  m.def("block_mask_keys", &block_mask_keys_py, py::arg("keys"), py::arg("height"), py::arg("width"),
        py::arg("num_masked"), py::arg("min_num_patches"), py::arg("max_num_patches"), py::arg("min_aspect"),
        py::arg("max_aspect"), py::arg("max_attempts"), py::arg("num_threads") = 0, py::arg("exact") = true,
        "Block-wise masks of the samples keyed by keys [B]: bool array [B, height, width], num_masked True each "
        "(exact=False: at most num_masked, as BEiT).");
  m.def("uniform_mask_keys", &uniform_mask_keys_py, py::arg("keys"), py::arg("cells_h"), py::arg("cells_w"),
        py::arg("num_secondary"), py::arg("num_threads") = 0,
        "UM-MAE uniform masks of the samples keyed by keys [B]: (choice uint8 [B, cells_h, cells_w] in 0..3, the "
        "visible token of each 2x2 cell; secondary bool [B, cells_h, cells_w], exactly num_secondary True each).");
  m.def("multiblock_mask_keys", &multiblock_mask_keys_py, py::arg("keys"), py::arg("height"), py::arg("width"),
        py::arg("num_targets"), py::arg("target_scale_min"), py::arg("target_scale_max"), py::arg("aspect_min"),
        py::arg("aspect_max"), py::arg("context_scale_min"), py::arg("context_scale_max"), py::arg("min_keep"),
        py::arg("max_tries"), py::arg("num_threads") = 0,
        "I-JEPA multi-block masks of the samples keyed by keys [B]: (context bool [B, H, W], True = context token "
        "kept; targets bool [B, num_targets, H, W]). A context keeping < min_keep tokens is redrawn; every max_tries "
        "draws one target fewer is excluded; RuntimeError when even none excluded fails.");

  // Tensor kernels (fastmim/ops): pointers are data_ptr() ints of contiguous tensors validated in Python; sizes are
  // re-checked here and every index read from data is range-checked (ValueError on a bad one). GIL released.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("gather_visible", &fastmim::gather_visible, nogil, py::arg("x_ptr"), py::arg("ids_ptr"), py::arg("out_ptr"),
        py::arg("B"), py::arg("N"), py::arg("K"), py::arg("D"), py::arg("elem_size"),
        "out[b, k, :] = x[b, ids[b, k], :] for x [B, N, D], ids [B, K] int64, out [B, K, D] (any dtype).");
  m.def("gather_visible_backward", &fastmim::gather_visible_backward, nogil, py::arg("grad_ptr"), py::arg("ids_ptr"),
        py::arg("out_ptr"), py::arg("B"), py::arg("N"), py::arg("K"), py::arg("D"), py::arg("elem_size"),
        "out [B, N, D] = zeros with out[b, ids[b, k], :] = grad[b, k, :] (each row written once).");
  m.def("scatter_masked", &fastmim::scatter_masked, nogil, py::arg("x_ptr"), py::arg("ids_restore_ptr"),
        py::arg("mask_token_ptr"), py::arg("pos_ptr"), py::arg("cls_ptr"), py::arg("cls_batch_stride"),
        py::arg("out_ptr"), py::arg("B"), py::arg("N"), py::arg("K"), py::arg("D"), py::arg("has_cls"),
        py::arg("has_pos"), py::arg("dtype"),
        "MAE decoder input out [B, N + has_cls, D]: visible tokens x [B, K, D] unshuffled by ids_restore [B, N] "
        "among mask tokens, optional class row 0 and position embedding [N + has_cls, D].");
  m.def("scatter_masked_backward", &fastmim::scatter_masked_backward, nogil, py::arg("grad_ptr"),
        py::arg("ids_restore_ptr"), py::arg("grad_x_ptr"), py::arg("grad_mask_token_ptr"), py::arg("grad_pos_ptr"),
        py::arg("B"), py::arg("N"), py::arg("K"), py::arg("D"), py::arg("has_cls"), py::arg("need_pos"),
        py::arg("dtype"),
        "Gradients of scatter_masked: grad_x [B, K, D] (dtype), grad_mask_token [D] and grad_pos [N + has_cls, D] "
        "(float32, summed in double).");
  m.def("masked_loss_forward", &masked_loss_forward_py, py::arg("pred_ptr"), py::arg("pred_dtype"),
        py::arg("target_ptr"), py::arg("target_dtype"), py::arg("target_numel"), py::arg("mask_ptr"), py::arg("B"),
        py::arg("L"), py::arg("D"), py::arg("gw"), py::arg("s_b"), py::arg("s_row"), py::arg("s_col"), py::arg("P"),
        py::arg("C"), py::arg("s_pi"), py::arg("s_qi"), py::arg("s_c"), py::arg("norm_pix"), py::arg("eps"),
        py::arg("p"),
        "Fused masked reconstruction loss: returns (sum of mask-weighted per-patch mean errors, mask sum).");
  m.def("masked_loss_backward", &masked_loss_backward_py, py::arg("scale"), py::arg("pred_ptr"),
        py::arg("pred_dtype"), py::arg("target_ptr"), py::arg("target_dtype"), py::arg("target_numel"),
        py::arg("mask_ptr"), py::arg("grad_ptr"), py::arg("B"), py::arg("L"), py::arg("D"), py::arg("gw"),
        py::arg("s_b"), py::arg("s_row"), py::arg("s_col"), py::arg("P"), py::arg("C"), py::arg("s_pi"),
        py::arg("s_qi"), py::arg("s_c"), py::arg("norm_pix"), py::arg("eps"), py::arg("p"),
        "Gradient [B, L, D] (pred dtype) of scale * masked loss sum with respect to pred; zeros where mask == 0.");
  m.def("patchify", &fastmim::patchify, nogil, py::arg("img_ptr"), py::arg("out_ptr"), py::arg("B"), py::arg("C"),
        py::arg("H"), py::arg("W"), py::arg("p"), py::arg("elem_size"),
        "[B, C, H, W] -> [B, L, p*p*C], patch element (pi*p + qi)*C + c (any dtype).");
  m.def("unpatchify", &fastmim::unpatchify, nogil, py::arg("x_ptr"), py::arg("out_ptr"), py::arg("B"), py::arg("C"),
        py::arg("H"), py::arg("W"), py::arg("p"), py::arg("elem_size"), "The exact inverse of patchify.");
  m.def("sparse_dwconv_forward", &fastmim::sparse_dwconv_forward, nogil, py::arg("x_ptr"), py::arg("nbr_ptr"),
        py::arg("weight_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("M"), py::arg("C"), py::arg("K"),
        py::arg("x_dtype"), py::arg("weight_dtype"), py::arg("bias_dtype"), py::arg("out_dtype"), py::arg("flip"),
        "Submanifold depthwise conv of rows x [M, C] through nbr [K*K, M] int32 (-1: zero): out [M, C] = bias + "
        "sum_t weight[:, t] * x[nbr[t]] (weight [C, K*K], bias [C] or 0; flip: tap t uses weight tap K*K-1-t).");
  m.def("sparse_dwconv_wgrad", &fastmim::sparse_dwconv_wgrad, nogil, py::arg("grad_ptr"), py::arg("x_ptr"),
        py::arg("nbr_ptr"), py::arg("grad_weight_ptr"), py::arg("grad_bias_ptr"), py::arg("M"), py::arg("C"),
        py::arg("K"), py::arg("grad_dtype"), py::arg("x_dtype"),
        "Weight gradient [C, K*K] float32 (and bias gradient [C] float32, if its pointer is not 0) of "
        "sparse_dwconv_forward for the output gradient grad [M, C].");
  m.def("num_threads", []() {
#ifdef FASTMIM_OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
#ifdef FASTMIM_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
#ifdef FASTMIM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
