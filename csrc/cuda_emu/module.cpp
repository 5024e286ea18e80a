// The CUDA kernels' bindings (csrc/cuda/bindings.cpp) over the CPU emulation, as the module
// `_cuda_emu` that tests/cuda_emu.py builds: the same functions `mmfast._C` has when built with CUDA, taking
// the parameter structs that `mmfast._C` binds (import mmfast._C first) and host pointers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "cuda_emu.h"

namespace py = pybind11;

namespace mmfast {
void bind_cuda(py::module_& m);
}  // namespace mmfast

namespace mmfast_emu {
std::pair<int, std::vector<float>> run_selftest(const std::string& name, int threads, int arg);  // selftest.cu
}  // namespace mmfast_emu

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "mmfast's CUDA kernels run on the CPU by an emulation of the CUDA runtime (tests only)";
  mmfast::bind_cuda(m);
  m.def("set_sm_count", &mmfast_emu::set_sm_count, py::arg("sms"),
        "the SM count that the launchers' cudaDeviceGetAttribute reads (default 132)");
  m.def("set_compute_capability_major", &mmfast_emu::set_compute_capability_major, py::arg("major"),
        "the compute capability major that cudaDeviceGetAttribute reads (default 9); below 9, cluster launches "
        "fail as on such a device");
  m.def("set_l2_cache_bytes", &mmfast_emu::set_l2_cache_bytes, py::arg("bytes"),
        "the L2 size that cudaDeviceGetAttribute reads (default 50 MiB)");
  m.def("last_launch", &mmfast_emu::last_launch,
        "(blocks, threads per block, blocks per cluster) of the last kernel launch that passed the launch checks");
  m.def("evict_first_accesses", &mmfast_emu::evict_first_accesses,
        "how many evict-first (__ldcs, __stcs) loads and stores the kernels have made so far");
  m.def("run_selftest", &mmfast_emu::run_selftest, py::arg("name"), py::arg("threads"), py::arg("arg") = 0,
        "runs one of the emulation's self-test kernels (csrc/cuda_emu/selftest.cu): (cudaError code, outputs)");
}
