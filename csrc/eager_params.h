// The eager hot paths of fastclip.clip_grad_norm_ (fastclip/clip.py) and of
// fastclip.per_tensor_norms, clip_grad_norm_per_layer_ and adaptive_clip_grad_
// (fastclip/per_layer.py, fastclip/agc.py): read each parameter's .grad and check it in C++, then
// call the op through the C++ dispatcher (a typed call, not the boxed Python
// one). On a small model the Python version of this loop costs several times
// the op itself. Each returns None (false), touching nothing, when the set is
// not one the op takes as is (a non-tensor, sparse or non-float grads or
// params, several devices, a tensor subclass that dispatches to Python, such
// as DTensor): the Python path then raises the clear error or handles the
// case. Header-only: included by py_module.cpp, which registers the functions.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <vector>

#include "grad_checks.h"

namespace fastclip::eager {

inline bool has_kernels(const at::Device& d) {
#ifdef FASTCLIP_WITH_CUDA
  return d.is_cpu() || d.is_cuda();
#else
  return d.is_cpu();
#endif
}

inline bool plain(const at::Tensor& t) {
  return t.layout() == at::kStrided && is_fused_dtype(t.scalar_type()) && !t.key_set().has(c10::DispatchKey::Python);
}

// A Python float or int as a double; false for anything else (bool, numpy
// scalars, tensors, strings: the Python path converts or refuses those).
inline bool plain_number(py::handle h, double& out) {
  PyObject* o = h.ptr();
  if (PyFloat_CheckExact(o)) {
    out = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (!PyLong_CheckExact(o)) return false;
  out = PyLong_AsDouble(o);
  if (out == -1.0 && PyErr_Occurred()) {  // an int beyond a double's range
    PyErr_Clear();
    return false;
  }
  return true;
}

// The defined grads (and, with `params`, their parameters) of a tensor or a
// list or tuple of parameters, all plain and on one device with kernels. False:
// take the Python path (which also consumes generators and other iterables).
inline bool gather(py::handle obj, std::vector<at::Tensor>& grads, std::vector<at::Tensor>* params) {
  PyObject* one = obj.ptr();
  PyObject* const* items = &one;
  Py_ssize_t size = 1;
  if (PyList_CheckExact(one) || PyTuple_CheckExact(one)) {
    items = PySequence_Fast_ITEMS(one);
    size = PySequence_Fast_GET_SIZE(one);
  }
  grads.reserve(size);
  if (params != nullptr) params->reserve(size);
  for (Py_ssize_t i = 0; i < size; ++i) {
    if (!THPVariable_Check(items[i])) return false;
    const at::Tensor& p = THPVariable_Unpack(items[i]);
    const at::Tensor& g = p.mutable_grad();  // grad() would also ask whether p is a leaf, to warn
    if (!g.defined()) continue;
    if (!plain(g) || (grads.empty() ? !has_kernels(g.device()) : g.device() != grads[0].device())) return false;
    if (params != nullptr) {
      if (!plain(p) || p.device() != g.device() || p.sizes() != g.sizes()) return false;
      params->push_back(p);
    }
    grads.push_back(g);
  }
  return !grads.empty();
}

// clip_grad_norm_ for a tensor or a list/tuple of parameters on one device, a
// float or int max_norm >= 0 and norm_type > 0, no error check. Called first
// thing by fastclip.clip_grad_norm_, before any Python check: it returns the norm
// in torch's dtype (the grads' dtypes promoted), or None for anything else, so
// that the Python path checks it and raises its own clear error.
inline py::object clip_params(py::handle params, py::handle max_norm_obj, py::handle norm_type_obj) {
  double max_norm = 0.0, norm_type = 0.0;
  if (!plain_number(max_norm_obj, max_norm) || !plain_number(norm_type_obj, norm_type) || !(max_norm >= 0.0) ||
      !(norm_type > 0.0)) {
    return py::none();
  }
  std::vector<at::Tensor> grads;
  if (!gather(params, grads, nullptr)) return py::none();
  at::ScalarType dtype = grads[0].scalar_type();
  for (const at::Tensor& g : grads) dtype = c10::promoteTypes(dtype, g.scalar_type());
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

// per_tensor_norms(tensors, norm_type) for a list of plain tensors on one device.
inline py::object tensor_norms(const py::sequence& seq, double norm_type) {
  std::vector<at::Tensor> ts;
  ts.reserve(seq.size());
  for (const py::handle item : seq) {
    if (!THPVariable_Check(item.ptr())) return py::none();
    const at::Tensor& t = THPVariable_Unpack(item.ptr());
    if (!plain(t) || (ts.empty() ? !has_kernels(t.device()) : t.device() != ts[0].device())) return py::none();
    ts.push_back(t);
  }
  if (ts.empty()) return py::none();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastclip::per_tensor_norms", "")
                             .typed<at::Tensor(at::TensorList, double)>();
  at::Tensor norms;
  {
    py::gil_scoped_release no_gil;
    at::NoGradGuard no_grad;
    norms = op.call(ts, norm_type);
  }
  return py::cast(norms);
}

// clip_grad_norm_per_layer_(params, max_norm, norm_type), one group per grad.
inline py::object per_layer_params(py::handle seq, double max_norm, double norm_type) {
  std::vector<at::Tensor> grads;
  if (!gather(seq, grads, nullptr)) return py::none();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastclip::clip_grad_norm_per_layer_", "")
                             .typed<at::Tensor(at::TensorList, at::IntArrayRef, double, double)>();
  at::Tensor norms;
  {
    py::gil_scoped_release no_gil;
    at::NoGradGuard no_grad;
    norms = op.call(grads, {}, max_norm, norm_type);
  }
  return py::cast(norms);
}

// adaptive_clip_grad_(params, clip_factor, eps, norm_type). True when done.
inline bool agc_params(py::handle seq, double clip_factor, double eps, double norm_type) {
  std::vector<at::Tensor> grads, params;
  if (!gather(seq, grads, &params)) return false;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastclip::adaptive_clip_grad_", "")
                             .typed<void(at::TensorList, at::TensorList, double, double, double)>();
  py::gil_scoped_release no_gil;
  at::NoGradGuard no_grad;
  op.call(params, grads, clip_factor, eps, norm_type);
  return true;
}

// clip_params as a plain CPython function (METH_FASTCALL): pybind11's argument
// handling costs a call right after backward() ~0.9 µs, when the whole call is ~7.
inline PyObject* clip_params_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "clip_params(params, max_norm, norm_type) takes 3 positional arguments");
    return nullptr;
  }
  return clip_params(args[0], args[1], args[2]).release().ptr();
  END_HANDLE_TH_ERRORS
}

inline void register_functions(py::module_& m) {
  static PyMethodDef clip_params_def = {
      "clip_params", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&clip_params_entry)), METH_FASTCALL,
      "clip_params(params, max_norm, norm_type): eager hot path of fastclip.clip_grad_norm_ (csrc/eager_params.h)."};
  const py::object module_name = m.attr("__name__");
  m.add_object("clip_params",
               py::reinterpret_steal<py::object>(PyCFunction_NewEx(&clip_params_def, nullptr, module_name.ptr())));
  m.def("tensor_norms", &tensor_norms, py::arg("tensors"), py::arg("norm_type"),
        "Eager hot path of fastclip.per_tensor_norms (see csrc/eager_params.h).");
  m.def("per_layer_params", &per_layer_params, py::arg("params"), py::arg("max_norm"), py::arg("norm_type"),
        "Eager hot path of fastclip.clip_grad_norm_per_layer_ (see csrc/eager_params.h).");
  m.def("agc_params", &agc_params, py::arg("params"), py::arg("clip_factor"), py::arg("eps"), py::arg("norm_type"),
        "Eager hot path of fastclip.adaptive_clip_grad_ (see csrc/eager_params.h).");
}

}  // namespace fastclip::eager
