// pybind11 module fastmim._C. No libtorch: arrays cross as numpy buffers or raw pointers that the Python wrappers
// have validated. Every C++ exception becomes a Python exception (std::invalid_argument -> ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "block_mask.h"
#include "ops.h"

#ifdef FASTMIM_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

py::array_t<bool> block_mask_py(int64_t batch, int64_t height, int64_t width, int64_t num_masked,
                                double min_num_patches, double max_num_patches, double min_aspect,
                                double max_aspect, int64_t max_attempts, uint64_t seed) {
  fastmim::BlockMaskParams p{height, width, num_masked, min_num_patches, max_num_patches,
                             min_aspect, max_aspect, max_attempts};
  fastmim::validate(p);  // before allocating, so a bad shape never reaches the allocator
  if (batch < 0) throw std::invalid_argument("block_mask: batch must be >= 0");
  if (batch > 0 && height * width > std::numeric_limits<int64_t>::max() / batch / 2)
    throw std::invalid_argument("block_mask: batch * height * width is too large");
  py::array_t<bool> out(std::vector<py::ssize_t>{batch, height, width});
  static_assert(sizeof(bool) == 1, "numpy bool is one byte");
  auto* ptr = reinterpret_cast<uint8_t*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    fastmim::block_mask(p, batch, seed, ptr);
  }
  return out;
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
  m.def("block_mask", &block_mask_py, py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("num_masked"),
        py::arg("min_num_patches"), py::arg("max_num_patches"), py::arg("min_aspect"), py::arg("max_aspect"),
        py::arg("max_attempts"), py::arg("seed"),
        "BEiT-style block-wise masks: bool array [batch, height, width] with exactly num_masked True per sample.");

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
