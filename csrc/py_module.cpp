// fastclip._C: importing it registers the ops; it also holds the eager hot
// path's entry, clip_params, which does in C++ what would otherwise be
// per-tensor Python work (read each .grad, check it) and then calls the one op
// through the C++ dispatcher (a typed call, not the boxed Python one).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include "grad_checks.h"
#include "local_params.h"

namespace {

bool has_kernels(const at::Device& d) {
#ifdef FASTCLIP_WITH_CUDA
  return d.is_cpu() || d.is_cuda();
#else
  return d.is_cpu();
#endif
}

// Collects the defined .grad of every parameter. Returns false, touching
// nothing, when the set is not one the fused op takes as is (a non-tensor,
// sparse or non-float grads, several devices, a tensor subclass that
// dispatches to Python): the caller then takes the Python path, which raises
// the clear error or handles the case.
bool gather_grads(const py::sequence& params, std::vector<at::Tensor>& grads, at::ScalarType& dtype) {
  grads.reserve(params.size());
  for (const py::handle item : params) {
    if (!THPVariable_Check(item.ptr())) return false;
    const at::Tensor& grad = THPVariable_Unpack(item.ptr()).grad();
    if (!grad.defined()) continue;
    if (grad.layout() != at::kStrided || !fastclip::is_fused_dtype(grad.scalar_type()) ||
        grad.key_set().has(c10::DispatchKey::Python)) {
      return false;
    }
    if (grads.empty()) {
      if (!has_kernels(grad.device())) return false;
      dtype = grad.scalar_type();
    } else {
      if (grad.device() != grads[0].device()) return false;
      dtype = c10::promoteTypes(dtype, grad.scalar_type());
    }
    grads.push_back(grad);
  }
  return !grads.empty();
}

// clip_grad_norm_ for a list/tuple of parameters on one device, p > 0, no error
// check. Returns the norm in torch's dtype, or None if the Python path must run.
py::object clip_params(const py::sequence& params, double max_norm, double norm_type) {
  std::vector<at::Tensor> grads;
  at::ScalarType dtype = at::kFloat;
  if (!gather_grads(params, grads, dtype)) return py::none();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastclip::clip_grad_norm_", "")
                             .typed<at::Tensor(at::TensorList, double, double, std::optional<at::ScalarType>)>();
  at::Tensor norm;
  {
    py::gil_scoped_release no_gil;
    at::NoGradGuard no_grad;  // grads may require grad (create_graph=True); clipping is not recorded
    norm = op.call(grads, max_norm, norm_type, dtype);
  }
  return py::cast(norm);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def(
      "cuda_built",
      []() {
#ifdef FASTCLIP_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled into this build.");
  m.def("clip_params", &clip_params, py::arg("params"), py::arg("max_norm"), py::arg("norm_type"),
        "Eager hot path of fastclip.clip_grad_norm_ (see csrc/py_module.cpp).");
  fastclip::local_params::register_functions(m);  // tensor_norms, per_layer_params, agc_params
}
