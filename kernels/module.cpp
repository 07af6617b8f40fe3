// pybind11 module fastmim._cuda: the CUDA kernels of kernels/*.cu behind raw device pointers, element strides, dtype
// codes (0 float32, 1 bfloat16, 2 float16), a device index and a stream handle. No libtorch, so one build serves
// every torch version; fastmim/ops/_cuda.py validates the tensors and passes them in. A CUDA error becomes a
// RuntimeError that names the op and the error; nothing is launched for arguments the kernels cannot take.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launch.h"

#ifndef FASTMIM_CUDA_ARCHS_TEXT
#define FASTMIM_CUDA_ARCHS_TEXT ""  // (a build that did not say: fastmim.ops does not check the GPU against it)
#endif

namespace py = pybind11;
namespace fc = fastmim_cuda;

namespace {

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  DeviceGuard(const char* op, int device) : op_(op) {
    check(cudaGetDevice(&prev_));
    if (prev_ != device) check(cudaSetDevice(device));
    set_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (set_) cudaSetDevice(prev_);
  }
  void check(cudaError_t err) const {
    if (err != cudaSuccess) throw std::runtime_error(std::string(op_) + ": CUDA error: " + cudaGetErrorString(err));
  }

 private:
  const char* op_;
  int prev_ = 0;
  bool set_ = false;
};

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check_dtype(const char* op, const char* name, int code) {
  if (code < fc::kF32 || code > fc::kF16)
    throw std::invalid_argument(std::string(op) + ": " + name + " has dtype code " + std::to_string(code) +
                                ", expected 0 (float32), 1 (bfloat16) or 2 (float16)");
}

void check_sizes(const char* op, std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes)
    if (s < 0) throw std::invalid_argument(std::string(op) + ": negative size " + std::to_string(s));
}

void gather_visible(uintptr_t x, int dtype, int64_t sx_b, int64_t sx_n, int64_t sx_d, uintptr_t ids, bool ids64,
                    int64_t si_b, int64_t si_k, uintptr_t out, int64_t B, int64_t N, int64_t K, int64_t D, int device,
                    uintptr_t stream) {
  const char* op = "gather_visible";
  check_dtype(op, "x", dtype);
  check_sizes(op, {B, N, K, D});
  DeviceGuard guard(op, device);
  guard.check(fc::gather_visible(ptr<const void>(x), dtype, sx_b, sx_n, sx_d, ptr<const void>(ids), ids64, si_b, si_k,
                                 ptr<void>(out), B, N, K, D, stream_of(stream)));
}

void gather_visible_backward(uintptr_t g, int dtype, int64_t sg_b, int64_t sg_k, int64_t sg_d, uintptr_t ids,
                             bool ids64, int64_t si_b, int64_t si_k, uintptr_t out, int64_t B, int64_t N, int64_t K,
                             int64_t D, int device, uintptr_t stream) {
  const char* op = "gather_visible_backward";
  check_dtype(op, "grad", dtype);
  check_sizes(op, {B, N, K, D});
  DeviceGuard guard(op, device);
  guard.check(fc::gather_visible_backward(ptr<const void>(g), dtype, sg_b, sg_k, sg_d, ptr<const void>(ids), ids64,
                                          si_b, si_k, ptr<void>(out), B, N, K, D, stream_of(stream)));
}

void scatter_masked(uintptr_t x, int x_dtype, int64_t sx_b, int64_t sx_k, int64_t sx_d, uintptr_t ids, bool ids64,
                    int64_t si_b, int64_t si_n, uintptr_t mask_token, int mt_dtype, int64_t smt_d, uintptr_t pos,
                    int pos_dtype, int64_t spos_r, int64_t spos_d, uintptr_t cls, int cls_dtype, int64_t scls_b,
                    int64_t scls_d, uintptr_t out, int out_dtype, int64_t B, int64_t N, int64_t K, int64_t D,
                    int device, uintptr_t stream) {
  const char* op = "scatter_masked";
  check_dtype(op, "x_vis", x_dtype);
  check_dtype(op, "mask_token", mt_dtype);
  check_dtype(op, "output", out_dtype);
  if (pos) check_dtype(op, "pos_embed", pos_dtype);
  if (cls) check_dtype(op, "cls_token", cls_dtype);
  check_sizes(op, {B, N, K, D});
  fc::ScatterArgs a{ptr<const void>(x), x_dtype,   sx_b,   sx_k,   sx_d,      ptr<const void>(ids),
                    ids64,              si_b,      si_n,   ptr<const void>(mask_token), mt_dtype,
                    smt_d,              pos ? ptr<const void>(pos) : nullptr, pos_dtype, spos_r, spos_d,
                    cls ? ptr<const void>(cls) : nullptr, cls_dtype, scls_b, scls_d, B, N, K, D};
  DeviceGuard guard(op, device);
  guard.check(fc::scatter_masked(a, ptr<void>(out), out_dtype, stream_of(stream)));
}

fc::ScatterBackwardArgs backward_args(uintptr_t g, int g_dtype, int64_t sg_b, int64_t sg_r, int64_t sg_d,
                                      uintptr_t ids, bool ids64, int64_t si_b, int64_t si_n, int64_t B, int64_t N,
                                      int64_t K, int64_t D, bool has_cls) {
  return fc::ScatterBackwardArgs{ptr<const void>(g), g_dtype, sg_b, sg_r, sg_d, ptr<const void>(ids), ids64, si_b,
                                 si_n, B, N, K, D, has_cls};
}

int64_t scatter_masked_workspace(int64_t B, int64_t N, int64_t K, int64_t D, bool has_cls, bool need_pos) {
  check_sizes("scatter_masked_backward", {B, N, K, D});
  fc::ScatterBackwardArgs a{};
  a.B = B;
  a.N = N;
  a.K = K;
  a.D = D;
  a.has_cls = has_cls;
  return fc::scatter_masked_workspace(a, need_pos);
}

void scatter_masked_backward(uintptr_t g, int g_dtype, int64_t sg_b, int64_t sg_r, int64_t sg_d, uintptr_t ids,
                             bool ids64, int64_t si_b, int64_t si_n, int64_t B, int64_t N, int64_t K, int64_t D,
                             bool has_cls, uintptr_t gx, int x_dtype, uintptr_t gmt, uintptr_t gpos, uintptr_t gcls,
                             int gcls_dtype, uintptr_t workspace, int64_t workspace_size, int device,
                             uintptr_t stream) {
  const char* op = "scatter_masked_backward";
  check_dtype(op, "grad", g_dtype);
  check_dtype(op, "x_vis", x_dtype);
  if (gcls) check_dtype(op, "cls_token", gcls_dtype);
  check_sizes(op, {B, N, K, D});
  auto a = backward_args(g, g_dtype, sg_b, sg_r, sg_d, ids, ids64, si_b, si_n, B, N, K, D, has_cls);
  DeviceGuard guard(op, device);
  guard.check(fc::scatter_masked_backward(a, ptr<void>(gx), x_dtype, ptr<float>(gmt),
                                          gpos ? ptr<float>(gpos) : nullptr, gcls ? ptr<void>(gcls) : nullptr,
                                          gcls_dtype, ptr<float>(workspace), workspace_size, stream_of(stream)));
}

fc::LossArgs loss_args(const char* op, uintptr_t pred, int pred_dtype, int64_t sp_b, int64_t sp_l, int64_t sp_d,
                       uintptr_t target, int target_dtype, const py::tuple& geometry, uintptr_t mask, int mask_dtype,
                       int64_t sm_b, int64_t sm_l, int64_t B, int64_t L, int64_t D, float eps, bool norm_pix,
                       int p_norm) {
  check_dtype(op, "pred", pred_dtype);
  check_dtype(op, "target", target_dtype);
  check_dtype(op, "mask", mask_dtype);
  check_sizes(op, {B, L, D});
  if (geometry.size() != 9) throw std::invalid_argument(std::string(op) + ": geometry must have 9 values");
  if (p_norm != 1 && p_norm != 2) throw std::invalid_argument(std::string(op) + ": p must be 1 or 2");
  if (D < 1 || D > fc::kLossMaxD)
    throw std::invalid_argument(std::string(op) + ": patches of " + std::to_string(D) +
                                " values; the CUDA kernel takes 1 to " + std::to_string(fc::kLossMaxD));
  int64_t g[9];
  for (int i = 0; i < 9; ++i) g[i] = geometry[i].cast<int64_t>();
  if (g[0] < 1 || g[4] < 1 || g[5] < 1 || g[4] * g[4] * g[5] != D)
    throw std::invalid_argument(std::string(op) + ": geometry does not match D=" + std::to_string(D));
  return fc::LossArgs{ptr<const void>(pred), pred_dtype, sp_b, sp_l, sp_d, ptr<const void>(target), target_dtype,
                      g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], ptr<const void>(mask), mask_dtype, sm_b,
                      sm_l, B, L, D, eps, norm_pix, p_norm};
}

void masked_loss_forward(uintptr_t pred, int pred_dtype, int64_t sp_b, int64_t sp_l, int64_t sp_d, uintptr_t target,
                         int target_dtype, const py::tuple& geometry, uintptr_t mask, int mask_dtype, int64_t sm_b,
                         int64_t sm_l, int64_t B, int64_t L, int64_t D, float eps, bool norm_pix, int p_norm,
                         uintptr_t out, uintptr_t workspace, int64_t max_blocks, int device, uintptr_t stream) {
  const char* op = "masked_loss_forward";
  if (max_blocks < 1) throw std::invalid_argument(std::string(op) + ": the workspace must hold at least one block");
  auto a = loss_args(op, pred, pred_dtype, sp_b, sp_l, sp_d, target, target_dtype, geometry, mask, mask_dtype, sm_b,
                     sm_l, B, L, D, eps, norm_pix, p_norm);
  DeviceGuard guard(op, device);
  guard.check(fc::masked_loss_forward(a, ptr<float>(out), ptr<float>(workspace), max_blocks, stream_of(stream)));
}

void masked_loss_backward(uintptr_t pred, int pred_dtype, int64_t sp_b, int64_t sp_l, int64_t sp_d, uintptr_t target,
                          int target_dtype, const py::tuple& geometry, uintptr_t mask, int mask_dtype, int64_t sm_b,
                          int64_t sm_l, int64_t B, int64_t L, int64_t D, float eps, bool norm_pix, int p_norm,
                          uintptr_t grad_loss, uintptr_t denom, uintptr_t grad, int device, uintptr_t stream) {
  const char* op = "masked_loss_backward";
  auto a = loss_args(op, pred, pred_dtype, sp_b, sp_l, sp_d, target, target_dtype, geometry, mask, mask_dtype, sm_b,
                     sm_l, B, L, D, eps, norm_pix, p_norm);
  DeviceGuard guard(op, device);
  guard.check(fc::masked_loss_backward(a, ptr<const float>(grad_loss), ptr<const float>(denom), ptr<void>(grad),
                                       stream_of(stream)));
}

void patchify(uintptr_t src, uintptr_t dst, int elem_size, int64_t B, int64_t C, int64_t gh, int64_t gw, int64_t P,
              int64_t si_b, int64_t si_c, int64_t si_h, int64_t si_w, int64_t sp_b, int64_t sp_l, int64_t sp_e,
              bool to_patches, int device, uintptr_t stream) {
  const char* op = to_patches ? "patchify" : "unpatchify";
  check_sizes(op, {B, C, gh, gw, P});
  if (elem_size != 2 && elem_size != 4)
    throw std::invalid_argument(std::string(op) + ": elements of " + std::to_string(elem_size) +
                                " bytes; 2 or 4 expected");
  if (P * P * C * elem_size > 200 * 1024)
    throw std::invalid_argument(std::string(op) + ": one patch (" + std::to_string(P * P * C * elem_size) +
                                " bytes) does not fit the kernel's shared memory");
  fc::PatchifyArgs a{ptr<const void>(src), ptr<void>(dst), elem_size, B, C, gh, gw, P, si_b, si_c, si_h, si_w,
                     sp_b, sp_l, sp_e};
  DeviceGuard guard(op, device);
  guard.check(fc::patchify(a, to_patches, stream_of(stream)));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastmim's CUDA kernels (raw device pointers; use fastmim.ops, which validates and dispatches)";
  m.attr("LOSS_MAX_D") = fc::kLossMaxD;
  // CMake's CUDA_ARCHITECTURES of this build, comma-separated ("80-real,90": sm_80 code, sm_90 code + PTX): a GPU
  // none of them runs on (a T4's sm_75) gets Triton instead of "no kernel image is available"
  m.attr("ARCHS") = FASTMIM_CUDA_ARCHS_TEXT;
  m.def("gather_visible", &gather_visible);
  m.def("gather_visible_backward", &gather_visible_backward);
  m.def("scatter_masked", &scatter_masked);
  m.def("scatter_masked_workspace", &scatter_masked_workspace);
  m.def("scatter_masked_backward", &scatter_masked_backward);
  m.attr("LOSS_BLOCKS_PER_SM") = fc::kLossBlocksPerSm;
  m.def("masked_loss_forward", &masked_loss_forward);
  m.def("masked_loss_backward", &masked_loss_backward);
  m.def("patchify", &patchify);
  m.def("device_count", []() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  });
}
