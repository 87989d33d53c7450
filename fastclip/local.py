"""Per-tensor norms, local (per-layer) clipping and adaptive (unit-wise) clipping.

Each function checks its arguments with fastclip/clip.py's input handling (so
bad input gets the same clear errors, before anything is touched), groups the
tensors by device and makes one fused op call per device (schemas:
csrc/ops.cpp; CPU: csrc/cpu/*_cpu.cpp; CUDA: csrc/cuda/*_cuda.cpp). Inputs the
fused ops do not take go through fastclip/_local_reference.py. Nothing is read
back to the host.
"""

import torch
from torch import nn

from . import _local_reference, _ops
from ._reference import accumulate_dtype
from .clip import _as_list, _check_grads, _check_max_norm, _check_norm_type, _check_tensor, _compiling, _norm_is_fused


def per_tensor_norms(tensors, norm_type=2.0):
    """The p-norm of each tensor, as one 1-D tensor (float32; float64 if any
    tensor is fp64) on the first tensor's device.

    One fused pass per device: accumulated in float32 (float64 for fp64),
    overflow- and underflow-safe, bitwise the same whatever the thread count.
    A zero-size tensor has norm 0. `tensors`: a Tensor, a list or an iterable.
    """
    fn = "per_tensor_norms"
    if isinstance(tensors, (list, tuple)) and _ops.tensor_norms is not None:
        norm_type = _check_norm_type(norm_type, fn)
        if norm_type > 0 and not _compiling():
            # The eager hot path: tensors checked and the op called from C++ (csrc/eager_params.h).
            norms = _ops.tensor_norms(tensors, norm_type)
            if norms is not None:
                return norms
    tensors = _as_list(tensors, fn, "tensors")
    for i, t in enumerate(tensors):
        _check_tensor(t, i, fn, "tensors")
    norm_type = _check_norm_type(norm_type, fn)
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    _check_grads(tensors, fn)
    with torch.no_grad():
        device = tensors[0].device
        if all(t.device == device for t in tensors):  # the common case: no regrouping
            return _norms_one_device(tensors, norm_type)
        return _norms_by_device(tensors, norm_type)


def _by_device(tensors):
    """{device: (positions in `tensors`, tensors)}, in first-seen order."""
    groups = {}
    for i, t in enumerate(tensors):
        positions, ts = groups.setdefault(t.device, ([], []))
        positions.append(i)
        ts.append(t)
    return groups


def _gather(groups, n, dtype, device, compute):
    """compute(positions, tensors) per device group, as one 1-D `dtype` tensor on `device`
    in the original order (index_copy_ of device tensors: no host sync)."""
    if len(groups) == 1:
        ((positions, ts),) = groups.values()
        return compute(positions, ts).to(dtype)
    out = torch.empty(n, dtype=dtype, device=device)
    for positions, ts in groups.values():
        out.index_copy_(0, torch.tensor(positions, device=device), compute(positions, ts).to(device, dtype))
    return out


def _norms_one_device(tensors, norm_type):
    """Both paths return the accumulation dtype (float32, float64 if any tensor is fp64)."""
    if _norm_is_fused(tensors, tensors[0].device, norm_type):
        return _ops.per_tensor_norms(tensors, norm_type)
    return _local_reference.per_tensor_norms(tensors, norm_type)


def _norms_by_device(tensors, norm_type):
    dtype = accumulate_dtype(tensors)
    return _gather(
        _by_device(tensors), len(tensors), dtype, tensors[0].device, lambda _, ts: _norms_one_device(ts, norm_type)
    )


# ---- local (per-layer) clipping ----------------------------------------------


def _layer_groups(module):
    """[(param, layer id)] for a module: the parameters of one submodule (its
    weight and bias) share an id. A parameter shared by two modules (tied
    weights) belongs to the first that holds it."""
    seen, out = set(), []
    for layer, m in enumerate(module.modules()):
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((p, layer))
    return out


def clip_grad_norm_per_layer_(parameters, max_norm, norm_type=2.0, by="tensor"):
    """Local clipping: each gradient (or each layer's gradients) clipped by its own norm.

    Every grad is scaled in place by min(max_norm / (norm + 1e-6), 1), where
    norm is its own p-norm (by="tensor"), or the p-norm of all grads of its
    layer, the parameters of one submodule such as a Linear's weight and bias
    (by="module"; `parameters` must then be an nn.Module). One fused op per
    device, no host sync; accumulated like clip_grad_norm_ (float32, float64
    for fp64 grads), and a coefficient of exactly 1 leaves a grad untouched.

    `parameters`: an nn.Module, a Tensor, a list or an iterable, as for
    clip_grad_norm_ (None grads skipped). Returns the pre-clip norms, one per
    parameter with a grad (its layer's norm with by="module"), as a 1-D
    float32 (float64 if any grad is fp64) tensor on the first grad's device.
    """
    fn = "clip_grad_norm_per_layer_"
    if by not in ("tensor", "module"):
        raise ValueError(f"fastclip.{fn}: by must be 'tensor' or 'module', got {by!r}")
    if isinstance(parameters, torch.Tensor):
        parameters = (parameters,)
    if by == "tensor" and isinstance(parameters, (list, tuple)) and _ops.per_layer_params is not None:
        max_norm = _check_max_norm(max_norm, fn)
        norm_type = _check_norm_type(norm_type, fn)
        if norm_type > 0 and not _compiling():
            # The eager hot path: grads read, checked and clipped in C++ (csrc/eager_params.h).
            norms = _ops.per_layer_params(parameters, max_norm, norm_type)
            if norms is not None:
                return norms
    if by == "module":
        if not isinstance(parameters, nn.Module):
            raise ValueError(f"fastclip.{fn}: by='module' needs an nn.Module, got {type(parameters).__name__}")
        tagged = _layer_groups(parameters)
    else:
        if isinstance(parameters, nn.Module):
            parameters = parameters.parameters()
        params = _as_list(parameters, fn, "parameters", warn_empty_generator=True)
        tagged = [(p, i) for i, p in enumerate(params)]
    for i, (p, _) in enumerate(tagged):
        _check_tensor(p, i, fn, "parameters")
    max_norm = _check_max_norm(max_norm, fn)
    norm_type = _check_norm_type(norm_type, fn)
    tagged = [(p.grad, layer) for p, layer in tagged if p.grad is not None]
    if not tagged:
        return torch.empty(0, dtype=torch.float32)
    grads = [g for g, _ in tagged]
    _check_grads(grads, fn)
    groups = _by_device(grads)
    layers = [layer for _, layer in tagged]
    if by == "module":
        _check_layers_on_one_device(groups, layers, fn)

    def clip(positions, gs):
        ids = _dense_ids([layers[i] for i in positions]) if by == "module" else []
        if _norm_is_fused(gs, gs[0].device, norm_type):
            return _ops.clip_grad_norm_per_layer_(gs, ids, max_norm, norm_type)
        return _local_reference.clip_grad_norm_per_layer_(gs, ids, max_norm, norm_type)

    with torch.no_grad():
        return _gather(groups, len(grads), accumulate_dtype(grads), grads[0].device, clip)


def _dense_ids(layers):
    """Layer ids renumbered 0, 1, ... in order of first appearance; [] when
    every grad is its own layer (the op's one-group-per-grad form)."""
    ids = {}
    out = [ids.setdefault(layer, len(ids)) for layer in layers]
    return [] if len(ids) == len(out) else out


def _check_layers_on_one_device(groups, layers, fn):
    device_of = {}
    for device, (positions, _) in groups.items():
        for i in positions:
            if device_of.setdefault(layers[i], device) != device:
                raise ValueError(f"fastclip.{fn}: the grads of one layer are on {device_of[layers[i]]} and {device}")


# ---- adaptive (unit-wise) clipping -------------------------------------------


def adaptive_clip_grad_(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021), in place.

    A unit is a row of a >= 2-D parameter (index 0, over all its other dims:
    an output channel of a linear or conv weight); a <= 1-D parameter is one
    unit. A unit whose grad p-norm reaches clip_factor * max(unit norm of the
    parameter, eps) is scaled to exactly that (by max / max(grad norm, 1e-6), as
    timm does: the 1e-6 guard matters only for thresholds below 1e-6); the
    others are left untouched.
    The same semantics as timm's adaptive_clip_grad, with the norms
    accumulated in float32 (float64 for fp64) whatever the grads' dtype, in one
    fused pass over params and grads per device, no host sync.

    `parameters`: a Tensor, a list or an iterable (None grads skipped).
    """
    fn = "adaptive_clip_grad_"
    clip_factor = _check_max_norm(clip_factor, fn, "clip_factor")
    eps = _check_max_norm(eps, fn, "eps")
    norm_type = _check_norm_type(norm_type, fn)
    if isinstance(parameters, torch.Tensor):
        parameters = (parameters,)
    if (
        isinstance(parameters, (list, tuple))
        and _ops.agc_params is not None
        and norm_type > 0
        and not _compiling()
        and _ops.agc_params(parameters, clip_factor, eps, norm_type)
    ):
        return  # the eager hot path: done in C++ (csrc/eager_params.h)
    params = _as_list(parameters, fn, "parameters", warn_empty_generator=True)
    for i, p in enumerate(params):
        _check_tensor(p, i, fn, "parameters")
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    _check_grads(grads, fn)
    for p in params:
        if not (p.is_floating_point() or p.is_complex()) or p.layout != torch.strided:
            raise TypeError(f"fastclip.{fn}: parameters must be dense floating point, got {p.dtype} {p.layout}")
    with torch.no_grad():
        for positions, gs in _by_device(grads).values():
            ps = [params[i].detach() for i in positions]
            if _norm_is_fused(gs + ps, gs[0].device, norm_type):
                _ops.adaptive_clip_grad_(ps, gs, clip_factor, eps, norm_type)
            else:
                _local_reference.adaptive_clip_grad_(ps, gs, clip_factor, eps, norm_type)
