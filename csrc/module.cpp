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
      .def_readwrite("dtype", &RoutedKDParams::dtype)
      .def_readwrite("workspace_floats", &RoutedKDParams::workspace_floats);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, x, const void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, z, const void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, w, const void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, idx, const int64_t);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, mask, const uint8_t);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, loss, void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, dx, void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, dw, void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, dz, void);
  MMFAST_PTR_FIELD(rk, RoutedKDParams, workspace, void);

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
      .def_readwrite("dtype", &MutualKDParams::dtype)
      .def_readwrite("workspace_floats", &MutualKDParams::workspace_floats);
  MMFAST_PTR_FIELD(mk, MutualKDParams, logits, const void);
  MMFAST_PTR_FIELD(mk, MutualKDParams, loss, void);
  MMFAST_PTR_FIELD(mk, MutualKDParams, grad, void);
  MMFAST_PTR_FIELD(mk, MutualKDParams, workspace, void);
  m.attr("row_split_workspace_floats") = kRowSplitWorkspaceFloats;
  m.attr("row_split_min_classes") = kRowSplitMinClasses;

  // The GIL is released: kernels touch only raw memory.
  m.def("routed_kd_cpu", &routed_kd_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("mutual_kd_cpu", &mutual_kd_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());

  // masked reconstruction
  py::class_<MaskedReconParams> mr(m, "MaskedReconParams");
  mr.def(py::init([]() { return MaskedReconParams{}; }))
      .def_readwrite("A", &MaskedReconParams::A)
      .def_readwrite("D", &MaskedReconParams::D)
      .def_readwrite("S", &MaskedReconParams::S)
      .def_readwrite("sp_a", &MaskedReconParams::sp_a)
      .def_readwrite("sp_d", &MaskedReconParams::sp_d)
      .def_readwrite("sp_s", &MaskedReconParams::sp_s)
      .def_readwrite("sy_a", &MaskedReconParams::sy_a)
      .def_readwrite("sy_d", &MaskedReconParams::sy_d)
      .def_readwrite("sy_s", &MaskedReconParams::sy_s)
      .def_readwrite("sm_a", &MaskedReconParams::sm_a)
      .def_readwrite("sm_d", &MaskedReconParams::sm_d)
      .def_readwrite("sm_s", &MaskedReconParams::sm_s)
      .def_readwrite("mask_kind", &MaskedReconParams::mask_kind)
      .def_readwrite("loss", &MaskedReconParams::loss)
      .def_readwrite("normalize_target", &MaskedReconParams::normalize_target)
      .def_readwrite("per_element", &MaskedReconParams::per_element)
      .def_readwrite("dtype", &MaskedReconParams::dtype)
      .def_readwrite("beta", &MaskedReconParams::beta)
      .def_readwrite("eps", &MaskedReconParams::eps)
      .def_readwrite("cos_eps", &MaskedReconParams::cos_eps);
  MMFAST_PTR_FIELD(mr, MaskedReconParams, pred, const void);
  MMFAST_PTR_FIELD(mr, MaskedReconParams, target, const void);
  MMFAST_PTR_FIELD(mr, MaskedReconParams, mask, const void);
  MMFAST_PTR_FIELD(mr, MaskedReconParams, row_weights, const void);
  MMFAST_PTR_FIELD(mr, MaskedReconParams, loss_out, void);
  MMFAST_PTR_FIELD(mr, MaskedReconParams, msum, void);
  MMFAST_PTR_FIELD(mr, MaskedReconParams, dp, void);
  MMFAST_PTR_FIELD(mr, MaskedReconParams, dy, void);
  MMFAST_PTR_FIELD(mr, MaskedReconParams, dm, void);
  m.def("masked_reconstruction_cpu", &masked_reconstruction_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());

  // score distillation: f-distill, Uni-Instruct, fake score
  m.attr("score_workspace_floats") = kScoreWorkspaceFloats;
  py::class_<FDistillParams> fd(m, "FDistillParams");
  fd.def(py::init([]() { return FDistillParams{}; }))
      .def_readwrite("B", &FDistillParams::B)
      .def_readwrite("D", &FDistillParams::D)
      .def_readwrite("sx", &FDistillParams::sx)
      .def_readwrite("sa", &FDistillParams::sa)
      .def_readwrite("sb", &FDistillParams::sb)
      .def_readwrite("scale", &FDistillParams::scale)
      .def_readwrite("dtype", &FDistillParams::dtype)
      .def_readwrite("workspace_floats", &FDistillParams::workspace_floats);
  MMFAST_PTR_FIELD(fd, FDistillParams, x, const void);
  MMFAST_PTR_FIELD(fd, FDistillParams, a, const void);
  MMFAST_PTR_FIELD(fd, FDistillParams, b, const void);
  MMFAST_PTR_FIELD(fd, FDistillParams, h, const void);
  MMFAST_PTR_FIELD(fd, FDistillParams, loss, void);
  MMFAST_PTR_FIELD(fd, FDistillParams, dx, void);
  MMFAST_PTR_FIELD(fd, FDistillParams, workspace, void);
  m.def("fdistill_cpu", &fdistill_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());

  py::class_<UniInstructParams> ui(m, "UniInstructParams");
  ui.def(py::init([]() { return UniInstructParams{}; }))
      .def_readwrite("B", &UniInstructParams::B)
      .def_readwrite("D", &UniInstructParams::D)
      .def_readwrite("sx", &UniInstructParams::sx)
      .def_readwrite("sa", &UniInstructParams::sa)
      .def_readwrite("sb", &UniInstructParams::sb)
      .def_readwrite("alpha", &UniInstructParams::alpha)
      .def_readwrite("scale", &UniInstructParams::scale)
      .def_readwrite("fgm", &UniInstructParams::fgm)
      .def_readwrite("di", &UniInstructParams::di)
      .def_readwrite("dtype", &UniInstructParams::dtype)
      .def_readwrite("workspace_floats", &UniInstructParams::workspace_floats);
  MMFAST_PTR_FIELD(ui, UniInstructParams, x, const void);
  MMFAST_PTR_FIELD(ui, UniInstructParams, a, const void);
  MMFAST_PTR_FIELD(ui, UniInstructParams, b, const void);
  MMFAST_PTR_FIELD(ui, UniInstructParams, coef, const void);
  MMFAST_PTR_FIELD(ui, UniInstructParams, di_norm, const void);
  MMFAST_PTR_FIELD(ui, UniInstructParams, loss, void);
  MMFAST_PTR_FIELD(ui, UniInstructParams, dx, void);
  MMFAST_PTR_FIELD(ui, UniInstructParams, da, void);
  MMFAST_PTR_FIELD(ui, UniInstructParams, db, void);
  MMFAST_PTR_FIELD(ui, UniInstructParams, workspace, void);
  m.def("uni_instruct_cpu", &uni_instruct_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());

  py::class_<FakeScoreParams> fs(m, "FakeScoreParams");
  fs.def(py::init([]() { return FakeScoreParams{}; }))
      .def_readwrite("B", &FakeScoreParams::B)
      .def_readwrite("D", &FakeScoreParams::D)
      .def_readwrite("sb", &FakeScoreParams::sb)
      .def_readwrite("sx", &FakeScoreParams::sx)
      .def_readwrite("scale", &FakeScoreParams::scale)
      .def_readwrite("dtype", &FakeScoreParams::dtype)
      .def_readwrite("workspace_floats", &FakeScoreParams::workspace_floats);
  MMFAST_PTR_FIELD(fs, FakeScoreParams, b, const void);
  MMFAST_PTR_FIELD(fs, FakeScoreParams, x, const void);
  MMFAST_PTR_FIELD(fs, FakeScoreParams, lam, const void);
  MMFAST_PTR_FIELD(fs, FakeScoreParams, loss, void);
  MMFAST_PTR_FIELD(fs, FakeScoreParams, db, void);
  MMFAST_PTR_FIELD(fs, FakeScoreParams, workspace, void);
  m.def("fake_score_cpu", &fake_score_cpu, py::arg("params"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  py::class_<GradScaleParams> gs(m, "GradScaleParams");
  gs.def(py::init([]() { return GradScaleParams{}; }))
      .def_readwrite("repeat", &GradScaleParams::repeat)
      .def_readwrite("rows", &GradScaleParams::rows)
      .def_readwrite("D", &GradScaleParams::D)
      .def_readwrite("Q", &GradScaleParams::Q)
      .def_readwrite("dtype", &GradScaleParams::dtype);
  MMFAST_PTR_FIELD(gs, GradScaleParams, grad, void);
  MMFAST_PTR_FIELD(gs, GradScaleParams, factor, const void);
  m.def("cpu_streaming_min_bytes", &cpu_streaming_min_bytes,
        "CPU kernels moving more bytes than this write large outputs with streaming stores");
  m.def("set_cpu_streaming_min_bytes", &set_cpu_streaming_min_bytes, py::arg("bytes"),
        "sets that threshold (a negative value: the default, the last-level cache size up to 64 MiB)");
  m.def("cpu_isa_level", &cpu_isa_level,
        "the x86-64 level (4: AVX-512, 3: AVX2, 0: baseline) the CPU kernels that write a cache line at a time "
        "run at");
  m.def("set_cpu_isa_level", &set_cpu_isa_level, py::arg("level"),
        "caps that level (0-2: the baseline; a negative value: this CPU's highest, the default)");
  m.def("cpu_row_tile_max_classes", &cpu_row_tile_max_classes,
        "the CPU routed-KD and mutual-KD kernels run rows of at most this many classes one per vector lane "
        "(-1: each kernel's own bound)");
  m.def("set_cpu_row_tile_max_classes", &set_cpu_row_tile_max_classes, py::arg("classes"),
        "sets that bound (0: never; a negative value: each kernel's own bound, the default)");

#ifdef MMFAST_WITH_CUDA
  m.attr("with_cuda") = true;
  bind_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
}
