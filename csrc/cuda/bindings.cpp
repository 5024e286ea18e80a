// Python bindings of the CUDA kernels (compiled by the host compiler; no torch headers).
// The stream is the integer value of a cudaStream_t (torch.cuda.current_stream().cuda_stream).
// Kernels are enqueued with the GIL released; a non-zero cudaError_t raises RuntimeError.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "mmfast/kernels.h"

namespace py = pybind11;

namespace mmfast {
namespace {

template <typename Params, int (*Kernel)(const Params&, void*)>
void enqueue(const char* name, const Params& params, std::uintptr_t stream) {
  int code = 0;
  {
    py::gil_scoped_release release;
    code = Kernel(params, reinterpret_cast<void*>(stream));
  }
  if (code != 0) {
    throw std::runtime_error(std::string("mmfast.") + name + ": " +
                             cudaGetErrorString(static_cast<cudaError_t>(code)));
  }
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.def(
      "routed_kd_cuda",
      [](const RoutedKDParams& params, std::uintptr_t stream) {
        enqueue<RoutedKDParams, routed_kd_cuda>("routed_kd_cuda", params, stream);
      },
      py::arg("params"), py::arg("stream"),
      "Enqueue the routed KD kernel on `stream` (a cudaStream_t as an int).");
  m.def(
      "mutual_kd_cuda",
      [](const MutualKDParams& params, std::uintptr_t stream) {
        enqueue<MutualKDParams, mutual_kd_cuda>("mutual_kd_cuda", params, stream);
      },
      py::arg("params"), py::arg("stream"),
      "Enqueue the mutual KD kernel on `stream` (a cudaStream_t as an int).");
  m.def(
      "masked_reconstruction_cuda",
      [](const MaskedReconParams& params, std::uintptr_t stream) {
        enqueue<MaskedReconParams, masked_reconstruction_cuda>("masked_reconstruction_cuda", params, stream);
      },
      py::arg("params"), py::arg("stream"),
      "Enqueue the masked reconstruction kernel on `stream` (a cudaStream_t as an int).");
  m.def(
      "fdistill_cuda",
      [](const FDistillParams& params, std::uintptr_t stream) {
        enqueue<FDistillParams, fdistill_cuda>("fdistill_cuda", params, stream);
      },
      py::arg("params"), py::arg("stream"),
      "Enqueue the f-distill kernels on `stream` (a cudaStream_t as an int).");
  m.def(
      "uni_instruct_cuda",
      [](const UniInstructParams& params, std::uintptr_t stream) {
        enqueue<UniInstructParams, uni_instruct_cuda>("uni_instruct_cuda", params, stream);
      },
      py::arg("params"), py::arg("stream"),
      "Enqueue the Uni-Instruct kernels on `stream` (a cudaStream_t as an int).");
  m.def(
      "fake_score_cuda",
      [](const FakeScoreParams& params, std::uintptr_t stream) {
        enqueue<FakeScoreParams, fake_score_cuda>("fake_score_cuda", params, stream);
      },
      py::arg("params"), py::arg("stream"),
      "Enqueue the fake-score kernels on `stream` (a cudaStream_t as an int).");
  m.def(
      "scale_unless_one_cuda",
      [](const GradScaleParams& params, std::uintptr_t stream) {
        enqueue<GradScaleParams, scale_unless_one_cuda>("scale_unless_one_cuda", params, stream);
      },
      py::arg("params"), py::arg("stream"),
      "Enqueue the in-place gradient scaling that skips blocks of unit factors on `stream`.");
  m.def("cuda_row_team", &cuda_row_team,
        "The row team of the routed/mutual KD and masked-reconstruction kernels: 0 automatic, 1 a block per row, "
        "2 a thread per row, 3 a thread-block cluster per row (sm_90+).");
  m.def("set_cuda_row_team", &set_cuda_row_team, py::arg("team"),  // std::invalid_argument -> ValueError
        "Forces the row team of the routed/mutual KD and masked-reconstruction kernels (tests): 0 automatic, "
        "1 block, 2 thread, 3 cluster.");
  m.def("cuda_sweep_order", &cuda_sweep_order,
        "How the routed/mutual KD kernels go over a row after pass 1: 0 automatic (block-per-row launches whose "
        "rows in flight exceed the L2: pass 2 backward, L2 evict-first hints), 1 back and forth with the hints, "
        "2 back and forth, 3 forward.");
  m.def("set_cuda_sweep_order", &set_cuda_sweep_order, py::arg("order"),  // std::invalid_argument -> ValueError
        "Forces the sweep order of the routed/mutual KD kernels (tests, benchmarks): 0 automatic, 1 back and forth "
        "with L2 evict-first hints, 2 back and forth, 3 forward.");
}

}  // namespace mmfast
