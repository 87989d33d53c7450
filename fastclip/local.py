"""Per-tensor norms, local (per-layer) clipping and adaptive (unit-wise) clipping.

Each function checks its arguments with fastclip/clip.py's input handling (so
bad input gets the same clear errors, before anything is touched), groups the
tensors by device and makes one fused op call per device (schemas:
csrc/ops.cpp; CPU: csrc/cpu/*_cpu.cpp; CUDA: csrc/cuda/*_cuda.cpp). Inputs the
fused ops do not take go through fastclip/_local_reference.py. Nothing is read
back to the host.
"""
import torch

from . import _local_reference, _ops
from ._reference import accumulate_dtype
from .clip import _as_list, _check_grads, _check_norm_type, _check_tensor, _fused_ok


def per_tensor_norms(tensors, norm_type=2.0):
    """The p-norm of each tensor, as one 1-D tensor (float32; float64 if any
    tensor is fp64) on the first tensor's device.

    One fused pass per device: accumulated in float32 (float64 for fp64),
    overflow- and underflow-safe, bitwise the same whatever the thread count.
    A zero-size tensor has norm 0. `tensors`: a Tensor, a list or an iterable.
    """
    fn = "per_tensor_norms"
    tensors = _as_list(tensors, fn, "tensors")
    for i, t in enumerate(tensors):
        _check_tensor(t, i, fn, "tensors")
    norm_type = _check_norm_type(norm_type, fn)
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    _check_grads(tensors, fn)
    with torch.no_grad():
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
    """compute(tensors) per device group, as one 1-D `dtype` tensor on `device`
    in the original order (index_copy_ of device tensors: no host sync)."""
    if len(groups) == 1:
        ((_, ts),) = groups.values()
        return compute(ts).to(dtype)
    out = torch.empty(n, dtype=dtype, device=device)
    for positions, ts in groups.values():
        out.index_copy_(0, torch.tensor(positions, device=device), compute(ts).to(device, dtype))
    return out


def _norms_one_device(tensors, norm_type):
    if _fused_ok(tensors, tensors[0].device, norm_type):
        return _ops.per_tensor_norms(tensors, norm_type)
    return _local_reference.per_tensor_norms(tensors, norm_type)


def _norms_by_device(tensors, norm_type):
    dtype = accumulate_dtype(tensors)
    return _gather(_by_device(tensors), len(tensors), dtype, tensors[0].device,
                   lambda ts: _norms_one_device(ts, norm_type))
