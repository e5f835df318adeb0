// The Python module clasp_ext._C. Importing it loads the shared library, whose static
// initialisers register the `clasp` ops with the dispatcher (csrc/torch_bindings.cpp); the module
// itself only adds build information.
#include <pybind11/pybind11.h>

#ifndef CLASP_TORCH_VERSION
#define CLASP_TORCH_VERSION "unknown"
#endif
#ifndef CLASP_CUDA_VERSION
#define CLASP_CUDA_VERSION ""
#endif
#ifndef CLASP_CUDA_ARCHS
#define CLASP_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "clasp_ext compiled kernels (ops live in torch.ops.clasp)";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["torch_version"] = CLASP_TORCH_VERSION;
#ifdef CLASP_WITH_CUDA
        info["with_cuda"] = true;
#else
        info["with_cuda"] = false;
#endif
        info["cuda_version"] = CLASP_CUDA_VERSION;
        info["cuda_archs"] = CLASP_CUDA_ARCHS;
#if defined(__clang__)
        info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
        info["compiler"] = "gcc " __VERSION__;
#else
        info["compiler"] = "unknown";
#endif
        return info;
      },
      "Versions and options the extension was compiled with.");
}
