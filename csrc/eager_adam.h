// The eager hot path of fastclip.optim's Adam/AdamW step (fastclip/optim.py):
// reads the param groups, each param's .grad and its state in C++ and calls
// fastclip::adam_step_ through the C++ dispatcher (a typed call, not the boxed
// Python one). On a small model the Python version of this loop, and the boxed
// call of an op with twenty arguments, cost more than the update itself.
// Returns None, touching nothing, where the Python path must run: a param
// without state yet (Python creates it), a hyperparameter held in a tensor,
// switches that differ between groups, grads or params the op does not take
// as is (eager_params.h: gather's rules), several devices.
// Header-only: included by py_module.cpp, which registers the function.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "adam_checks.h"
#include "eager_params.h"

namespace fastclip::eager {

// The op's arguments, gathered from the optimizer.
struct AdamLists {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  std::vector<int64_t> groups;
  std::vector<double> lrs, beta1s, beta2s, epss, weight_decays;
  bool switches_set = false;
  bool amsgrad = false, maximize = false, decoupled = false;
};

// The dict keys read every step, made once: a lookup by an interned str object
// costs no string creation and reuses its hash.
struct Keys {
  PyObject *params, *lr, *betas, *eps, *weight_decay, *amsgrad, *maximize, *decoupled;
  PyObject *step, *exp_avg, *exp_avg_sq, *max_exp_avg_sq;
  static const Keys& get() {
    static const Keys keys{
        PyUnicode_InternFromString("params"),       PyUnicode_InternFromString("lr"),
        PyUnicode_InternFromString("betas"),        PyUnicode_InternFromString("eps"),
        PyUnicode_InternFromString("weight_decay"), PyUnicode_InternFromString("amsgrad"),
        PyUnicode_InternFromString("maximize"),     PyUnicode_InternFromString("decoupled_weight_decay"),
        PyUnicode_InternFromString("step"),         PyUnicode_InternFromString("exp_avg"),
        PyUnicode_InternFromString("exp_avg_sq"),   PyUnicode_InternFromString("max_exp_avg_sq")};
    return keys;
  }
};

// The tensor held under `key` in a dict, or nullptr.
inline const at::Tensor* tensor_item(PyObject* dict, PyObject* key) {
  PyObject* item = PyDict_GetItem(dict, key);  // borrowed
  return item != nullptr && THPVariable_Check(item) ? &THPVariable_Unpack(item) : nullptr;
}

// A float (or int) held under `key` (or the tuple item); false for anything else (a tensor).
inline bool number(PyObject* item, double* out) {
  if (item == nullptr || !(PyFloat_Check(item) || PyLong_Check(item))) return false;
  *out = PyFloat_AsDouble(item);
  return !(*out == -1.0 && PyErr_Occurred());
}

// A bool held under `key`; false for a missing key.
inline bool flag(PyObject* dict, PyObject* key) {
  PyObject* item = PyDict_GetItem(dict, key);
  return item != nullptr && PyObject_IsTrue(item) == 1;
}

// optimizer.state[param], borrowed, or nullptr. torch.Tensor hashes by id(): for a
// plain Tensor or Parameter the dict is searched with that hash directly, instead of
// calling Tensor.__hash__ in Python for every param (~0.4 µs each after a backward).
constexpr uintptr_t kPyHashModulus = (uintptr_t{1} << 61) - 1;  // CPython hashes ints modulo 2^61 - 1

inline PyObject* state_of(PyObject* state, PyObject* param) {
#if PY_VERSION_HEX < 0x030D0000
  static PyTypeObject* const parameter = reinterpret_cast<PyTypeObject*>(
      py::object(py::module_::import("torch.nn").attr("Parameter")).release().ptr());  // kept for the process
  static PyTypeObject* const tensor = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  const auto id = reinterpret_cast<uintptr_t>(param);
  if ((Py_TYPE(param) == parameter || Py_TYPE(param) == tensor) && id < kPyHashModulus) {
    return _PyDict_GetItem_KnownHash(state, param, static_cast<Py_hash_t>(id));  // hash(id) == id below it
  }
#endif
  return PyDict_GetItem(state, param);
}

inline bool gather_group(PyObject* group, int64_t index, PyObject* state, AdamLists& a) {
  const Keys& k = Keys::get();
  if (!PyDict_Check(group)) return false;
  const bool amsgrad = flag(group, k.amsgrad), maximize = flag(group, k.maximize), decoupled = flag(group, k.decoupled);
  if (a.switches_set && (amsgrad != a.amsgrad || maximize != a.maximize || decoupled != a.decoupled)) return false;
  a.switches_set = true;
  a.amsgrad = amsgrad;
  a.maximize = maximize;
  a.decoupled = decoupled;
  PyObject* betas = PyDict_GetItem(group, k.betas);
  PyObject* params = PyDict_GetItem(group, k.params);
  if (betas == nullptr || !PyTuple_Check(betas) || PyTuple_GET_SIZE(betas) != 2 || params == nullptr ||
      !PyList_Check(params)) {
    return false;
  }
  double lr, beta1, beta2, eps, weight_decay;
  if (!number(PyDict_GetItem(group, k.lr), &lr) || !number(PyTuple_GET_ITEM(betas, 0), &beta1) ||
      !number(PyTuple_GET_ITEM(betas, 1), &beta2) || !number(PyDict_GetItem(group, k.eps), &eps) ||
      !number(PyDict_GetItem(group, k.weight_decay), &weight_decay)) {
    return false;
  }
  a.lrs.push_back(lr);
  a.beta1s.push_back(beta1);
  a.beta2s.push_back(beta2);
  a.epss.push_back(eps);
  a.weight_decays.push_back(weight_decay);
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
    PyObject* item = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(item)) return false;
    const at::Tensor& p = THPVariable_Unpack(item);
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    if (!plain(p) || !plain(g) || g.scalar_type() != p.scalar_type()) return false;
    if (a.params.empty() ? !has_kernels(p.device()) : p.device() != a.params[0].device()) return false;
    PyObject* s = state_of(state, item);  // null: no state yet
    if (s == nullptr || !PyDict_Check(s)) return false;
    const at::Tensor* exp_avg = tensor_item(s, k.exp_avg);
    const at::Tensor* exp_avg_sq = tensor_item(s, k.exp_avg_sq);
    const at::Tensor* step = tensor_item(s, k.step);
    const at::Tensor* max_sq = amsgrad ? tensor_item(s, k.max_exp_avg_sq) : nullptr;
    if (exp_avg == nullptr || exp_avg_sq == nullptr || step == nullptr || (amsgrad && max_sq == nullptr)) return false;
    a.params.push_back(p);
    a.grads.push_back(g);
    a.exp_avgs.push_back(*exp_avg);
    a.exp_avg_sqs.push_back(*exp_avg_sq);
    if (amsgrad) a.max_exp_avg_sqs.push_back(*max_sq);
    a.steps.push_back(*step);
    a.groups.push_back(index);
  }
  return true;
}

inline std::optional<at::Tensor> optional_tensor(const py::object& o) {
  if (o.is_none()) return std::nullopt;
  return THPVariable_Unpack(o.ptr());
}

// fastclip.optim's step for param_groups and state (the optimizer's), or None.
inline py::object adam_groups(const py::list& param_groups, const py::dict& state, std::optional<double> max_norm,
                              double norm_type, const py::object& grad_scale, const py::object& found_inf) {
  AdamLists a;
  int64_t index = 0;
  for (const py::handle group : param_groups) {
    if (!gather_group(group.ptr(), index++, state.ptr(), a)) return py::none();
  }
  if (a.params.empty()) return py::none();
  for (const py::object* t : {&grad_scale, &found_inf}) {
    if (!t->is_none() && !THPVariable_Check(t->ptr())) return py::none();
  }
  at::ScalarType dtype = a.grads[0].scalar_type();
  for (const at::Tensor& g : a.grads) dtype = c10::promoteTypes(dtype, g.scalar_type());
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastclip::adam_step_", "").typed<AdamStepFn>();
  const std::optional<at::Tensor> scale = optional_tensor(grad_scale), inf = optional_tensor(found_inf);
  at::Tensor norm;
  {
    py::gil_scoped_release no_gil;
    at::NoGradGuard no_grad;  // params require grad; the update is not recorded
    norm = op.call(a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.max_exp_avg_sqs, a.steps, a.groups, a.lrs, a.beta1s,
                   a.beta2s, a.epss, a.weight_decays, {}, a.amsgrad, a.maximize, a.decoupled, max_norm, norm_type,
                   scale, inf, dtype);
  }
  return py::cast(norm);
}

inline void register_adam(py::module_& m) {
  m.def("adam_groups", &adam_groups, py::arg("param_groups"), py::arg("state"), py::arg("max_norm"),
        py::arg("norm_type"), py::arg("grad_scale"), py::arg("found_inf"),
        "Eager hot path of fastclip.optim's Adam/AdamW step (see csrc/eager_adam.h).");
}

}  // namespace fastclip::eager
