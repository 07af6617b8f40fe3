// pybind11 module fastmim._C. No libtorch: arrays cross as numpy buffers or raw pointers that the Python wrappers
// have validated. Every C++ exception becomes a Python exception (std::invalid_argument -> ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "block_mask.h"

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmim native CPU kernels (no libtorch dependency)";
  m.def("block_mask", &block_mask_py, py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("num_masked"),
        py::arg("min_num_patches"), py::arg("max_num_patches"), py::arg("min_aspect"), py::arg("max_aspect"),
        py::arg("max_attempts"), py::arg("seed"),
        "BEiT-style block-wise masks: bool array [batch, height, width] with exactly num_masked True per sample.");
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
