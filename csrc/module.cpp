// The native module mmfast._C: parameter blocks and the kernel entry points.
// Python fills a parameter block from tensors (mmfast/_native.py) and calls a kernel; no torch
// headers are needed here, so this builds in seconds against any installed torch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "mmfast/kernels.h"

namespace py = pybind11;
using namespace mmfast;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

}  // namespace

#define MMFAST_PTR_FIELD(cls, Struct, field, T)                                                 \
  cls.def_property(                                                                           \
      #field, [](const Struct& s) { return reinterpret_cast<std::uintptr_t>(s.field); },       \
      [](Struct& s, std::uintptr_t v) { s.field = as_ptr<T>(v); })

#ifdef MMFAST_WITH_CUDA
namespace mmfast {
void bind_cuda(py::module_& m);
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmfast native kernels (C++ CPU kernels; CUDA kernels when built with MMFAST_WITH_CUDA)";

  py::class_<RoutedKDParams> rk(m, "RoutedKDParams");
  rk.def(py::init([]() { return RoutedKDParams{}; }))
      .def_readwrite("B", &RoutedKDParams::B)
      .def_readwrite("C", &RoutedKDParams::C)
      .def_readwrite("S", &RoutedKDParams::S)
      .def_readwrite("E", &RoutedKDParams::E)
      .def_readwrite("K", &RoutedKDParams::K)
      .def_readwrite("sx_b", &RoutedKDParams::sx_b)
      .def_readwrite("sx_c", &RoutedKDParams::sx_c)
      .def_readwrite("sx_s", &RoutedKDParams::sx_s)
      .def_readwrite("sz_e", &RoutedKDParams::sz_e)
      .def_readwrite("sz_b", &RoutedKDParams::sz_b)
      .def_readwrite("sz_c", &RoutedKDParams::sz_c)
      .def_readwrite("sz_s", &RoutedKDParams::sz_s)
      .def_readwrite("inv_tau", &RoutedKDParams::inv_tau)
      .def_readwrite("beta", &RoutedKDParams::beta)
      .def_readwrite("scale", &RoutedKDParams::scale)
      .def_readwrite("mix", &RoutedKDParams::mix)
      .def_readwrite("div", &RoutedKDParams::div)
      .def_readwrite("dtype", &RoutedKDParams::dtype);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, x, const void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, z, const void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, w, const void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, idx, const int64_t);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, mask, const uint8_t);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, loss, void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, dx, void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, dw, void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, dz, void);

  py::class_<MutualKDParams> mk(m, "MutualKDParams");
  mk.def(py::init([]() { return MutualKDParams{}; }))
      .def_readwrite("M", &MutualKDParams::M)
      .def_readwrite("N", &MutualKDParams::N)
      .def_readwrite("C", &MutualKDParams::C)
      .def_readwrite("s_m", &MutualKDParams::s_m)
      .def_readwrite("s_n", &MutualKDParams::s_n)
      .def_readwrite("s_c", &MutualKDParams::s_c)
      .def_readwrite("inv_tau", &MutualKDParams::inv_tau)
      .def_readwrite("scale", &MutualKDParams::scale)
      .def_readwrite("dtype", &MutualKDParams::dtype);
  MMFAST_PTR_FIELD(mk, MutualKDParams, logits, const void);
  MMFAST_PTR_FIELD(mk, MutualKDParams, loss, void);
  MMFAST_PTR_FIELD(mk, MutualKDParams, grad, void);

  // The GIL is released: kernels touch only raw memory.
  m.def("routed_kd_cpu", &routed_kd_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("mutual_kd_cpu", &mutual_kd_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());

#ifdef MMFAST_WITH_CUDA
  m.attr("with_cuda") = true;
  bind_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
}
