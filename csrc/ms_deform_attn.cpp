// Registers the op schema `sdo::ms_deform_attn` (+ its backward) and the CPU kernels.
// The CUDA kernels register themselves in cuda/ms_deform_attn_cuda.cu (CUDA builds only).
// Autograd and the fake (meta) kernel are registered from Python (model/ms_deform_attn.py).
#include <Python.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

// setup.py builds this library as the Python module `sdo_ops._C` (TORCH_EXTENSION_NAME=_C):
// importing it runs the static registrations below; the module itself is empty. The JIT build
// (`sdo ops build`) loads the same file with torch.ops.load_library instead.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define SDO_CONCAT_IMPL(a, b) a##b
#define SDO_CONCAT(a, b) SDO_CONCAT_IMPL(a, b)
#define SDO_STRINGIFY_IMPL(a) #a
#define SDO_STRINGIFY(a) SDO_STRINGIFY_IMPL(a)

extern "C" PyObject* SDO_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, SDO_STRINGIFY(TORCH_EXTENSION_NAME),
                                          "sdo native ops (torch.ops.sdo)", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(sdo, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_loc, "
      "Tensor attn_weight, int im2col_step) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_loc, Tensor attn_weight, int im2col_step) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sdo, CPU, m) {
  m.impl("ms_deform_attn", &sdo::ms_deform_attn_cpu_forward);
  m.impl("ms_deform_attn_backward", &sdo::ms_deform_attn_cpu_backward);
}
