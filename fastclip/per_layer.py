"""Per-tensor norms and local (per-layer) clipping: each gradient, or each
layer's gradients, clipped by its own norm.

Each function checks its arguments as clip_grad_norm_ does (fastclip/_grads.py:
the same clear errors, before anything is touched), groups the tensors by
device and makes one fused op call per device (schemas: csrc/ops.cpp; CPU:
csrc/cpu/norms_cpu.cpp, per_layer_cpu.cpp; CUDA: csrc/cuda/norms_cuda.cpp).
Inputs the fused ops do not take go through fastclip/_reference.py. Nothing is
read back to the host.
"""

import torch
from torch import nn

from . import _ops, _reference
from ._grads import (
    as_list,
    check_grads,
    check_max_norm,
    check_norm_type,
    check_tensor,
    clip_coef,
    compiling,
    positions_by_device,
    runs_fused,
)


def per_tensor_norms(tensors, norm_type=2.0) -> torch.Tensor:
    """Compute the p-norm of each tensor in one fused pass per device.

    The norms are accumulated in float32 (float64 for float64 tensors),
    overflow- and underflow-safe, and bitwise the same whatever the thread count.
    A zero-size tensor has norm 0. No host synchronisation.

    Args:
        tensors (Iterable[Tensor] or Tensor): the tensors (usually gradients)
        norm_type (float, optional): type of the p-norm. Can be ``'inf'`` for the
            infinity norm. Default: 2.0

    Returns:
        A 1-D tensor with one norm per tensor, in order: float32 (float64 if any
        tensor is float64), on the first tensor's device.
    """
    fn = "per_tensor_norms"
    if isinstance(tensors, (list, tuple)) and _ops.tensor_norms is not None:
        norm_type = check_norm_type(norm_type, fn)
        if norm_type > 0 and not compiling():
            # The eager hot path: tensors checked and the op called from C++ (csrc/eager_params.h).
            norms = _ops.tensor_norms(tensors, norm_type)
            if norms is not None:
                return norms
    tensors = as_list(tensors, fn, "tensors")
    for i, t in enumerate(tensors):
        check_tensor(t, i, fn, "tensors")
    norm_type = check_norm_type(norm_type, fn)
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    check_grads(tensors, fn)

    def norms(positions, ts):
        if runs_fused(ts, ts[0].device, norm_type):
            return _ops.per_tensor_norms(ts, norm_type)
        return _reference.per_tensor_norms(ts, norm_type)

    with torch.no_grad():
        return _in_order(positions_by_device(tensors), len(tensors), _reference.accumulate_dtype(tensors), norms)


def _in_order(groups, n, dtype, compute):
    """compute(positions, tensors) for each device group of positions_by_device(), as one
    1-D `dtype` tensor on the first group's device, in the original order (index_copy_ of
    device tensors: no host sync)."""
    if len(groups) == 1:
        ((positions, ts),) = groups.values()
        return compute(positions, ts).to(dtype)
    device = next(iter(groups))
    out = torch.empty(n, dtype=dtype, device=device)
    for positions, ts in groups.values():
        out.index_copy_(0, torch.tensor(positions, device=device), compute(positions, ts).to(device, dtype))
    return out


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


def clip_grad_norm_per_layer_(parameters, max_norm, norm_type=2.0, by="tensor") -> torch.Tensor:
    """Clip each gradient (or each layer's gradients) by its own norm, in place.

    Every gradient is scaled by ``min(max_norm / (norm + 1e-6), 1)``, where norm is
    its own p-norm (``by="tensor"``), or the p-norm of all gradients of its layer, the
    parameters of one submodule such as a Linear's weight and bias (``by="module"``).
    One fused op per device, no host sync; accumulated as in clip_grad_norm_, and a
    coefficient of exactly 1 leaves a gradient untouched.

    Args:
        parameters (nn.Module, Iterable[Tensor] or Tensor): the parameters whose
            gradients are clipped (None gradients are skipped); an nn.Module with
            ``by="module"``
        max_norm (float): max norm of each gradient (or layer)
        norm_type (float, optional): type of the p-norm. Can be ``'inf'``. Default: 2.0
        by (str, optional): ``"tensor"`` or ``"module"``. Default: ``"tensor"``

    Returns:
        The pre-clip norms, one per parameter with a gradient (its layer's norm with
        ``by="module"``): a 1-D float32 tensor (float64 if any gradient is float64)
        on the first gradient's device.
    """
    fn = "clip_grad_norm_per_layer_"
    if by not in ("tensor", "module"):
        raise ValueError(f"fastclip.{fn}: by must be 'tensor' or 'module', got {by!r}")
    if isinstance(parameters, torch.Tensor):
        parameters = (parameters,)
    if by == "tensor" and isinstance(parameters, (list, tuple)) and _ops.per_layer_params is not None:
        max_norm = check_max_norm(max_norm, fn)
        norm_type = check_norm_type(norm_type, fn)
        if norm_type > 0 and not compiling():
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
        params = as_list(parameters, fn, "parameters", warn_empty_generator=True)
        tagged = [(p, i) for i, p in enumerate(params)]
    for i, (p, _) in enumerate(tagged):
        check_tensor(p, i, fn, "parameters")
    max_norm = check_max_norm(max_norm, fn)
    norm_type = check_norm_type(norm_type, fn)
    tagged = [(p.grad, layer) for p, layer in tagged if p.grad is not None]
    if not tagged:
        return torch.empty(0, dtype=torch.float32)
    grads = [g for g, _ in tagged]
    check_grads(grads, fn)
    groups = positions_by_device(grads)
    layers = [layer for _, layer in tagged]
    if by == "module":
        _check_layers_on_one_device(groups, layers, fn)

    def clip(positions, gs):
        ids = _dense_ids([layers[i] for i in positions]) if by == "module" else []
        if runs_fused(gs, gs[0].device, norm_type):
            return _ops.clip_grad_norm_per_layer_(gs, ids, max_norm, norm_type)
        norms = _reference.group_norms(gs, ids, norm_type)
        _reference.scale_each_(gs, clip_coef(max_norm, norms))
        return norms

    with torch.no_grad():
        return _in_order(groups, len(grads), _reference.accumulate_dtype(grads), clip)


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
