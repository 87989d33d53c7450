"""What every clipping function does around its fused op, in one place (as
torch's clip_grad.py leans on torch/utils/_foreach_utils.py): gather the grads,
check them, group them by device, decide whether a fused kernel runs, compute
the norm per device group, the clip coefficient, and scale.

Used by clip.py (torch's API), per_layer.py, agc.py, thresholds.py,
distributed.py and monitor.py. It imports no public module, so none of them
import each other for their helpers.
"""

import types
import warnings

import torch

from . import _ops, _reference

compiling = torch.compiler.is_compiling

FUSED_DTYPES = frozenset((torch.float32, torch.float64, torch.float16, torch.bfloat16))

# torch.nn.utils.clip_grad_norm_'s epsilon: coef = max_norm / (norm + EPS).
EPS = 1e-6

_NONFINITE_MSG = (
    "The total norm of order {} for gradients from `parameters` is non-finite, so it cannot be "
    "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
    "`error_if_nonfinite=False`"
)
_OVERFLOW_NOTE = (
    " (fastclip: the norm itself, {:.6g}, is finite, but it overflows {}, the dtype the norm is "
    "returned in; with `error_if_nonfinite=False` the grads are clipped by the finite norm)"
)


# ---- the one test: can a fused kernel run here? -----------------------------------


def runs_fused(tensors, device, norm_type=None):
    """Whether the fused ops take `tensors` (one device group) on `device`: the extension
    has kernels for the device type and every tensor has a fused dtype; for a norm
    (norm_type given) also p > 0 or inf. Otherwise fastclip/_reference.py runs.

    csrc/eager_params.h makes the same test in C++ (has_kernels, plain) for the eager
    entries: keep the two in step."""
    if norm_type is not None and not norm_type > 0:
        return False
    return _ops.has_kernels(device.type) and all(t.dtype in FUSED_DTYPES for t in tensors)


# ---- arguments ---------------------------------------------------------------------


def as_list(tensors, fn, what, warn_empty_generator=False):
    """A Tensor, a list or any iterable (a generator is consumed once) -> list."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    is_generator = isinstance(tensors, types.GeneratorType)
    try:
        tensors = list(tensors)
    except TypeError:
        raise TypeError(
            f"fastclip.{fn}: {what} must be a Tensor or an iterable of Tensors, got {type(tensors).__name__}"
        ) from None
    if warn_empty_generator and is_generator and not tensors:
        warnings.warn(f"`{what}` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    return tensors


def check_tensor(t, i, fn, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastclip.{fn}: {what}[{i}] is a {type(t).__name__}, not a Tensor")


def grads_of(parameters, fn, warn_empty_generator=False):
    """The defined .grad of each parameter, in order."""
    params = as_list(parameters, fn, "parameters", warn_empty_generator)
    grads = []
    for i, p in enumerate(params):
        check_tensor(p, i, fn, "parameters")
        if p.grad is not None:
            grads.append(p.grad)
    return grads


def check_grads(grads, fn):
    """Raise before anything is touched: every grad a strided floating (or complex) tensor."""
    for g in grads:
        if g.layout != torch.strided:
            raise TypeError(f"fastclip.{fn}: sparse gradients ({g.layout}) are not supported")
        if not (g.is_floating_point() or g.is_complex()):
            raise TypeError(f"fastclip.{fn}: gradients must be floating point, got one of dtype {g.dtype}")


def check_max_norm(max_norm, fn, name="max_norm"):
    value = float(max_norm)
    if not value >= 0:  # also catches NaN
        raise ValueError(f"fastclip.{fn}: {name} must be a non-negative number, got {max_norm}")
    return value


def check_norm_type(norm_type, fn):
    try:
        return float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"fastclip.{fn}: norm_type must be a number or 'inf', got {norm_type!r}") from None


def result_dtype(grads):
    """The dtype torch returns the norm in: the grads' dtypes promoted together."""
    dtype = grads[0].dtype
    for g in grads:
        if g.dtype != dtype:
            dtype = torch.promote_types(dtype, g.dtype)
    return dtype


def group_by_device(grads):
    """{device: [grads]}, devices in first-seen order."""
    groups = {}
    for g in grads:
        groups.setdefault(g.device, []).append(g)
    return groups


def positions_by_device(tensors):
    """{device: (positions in `tensors`, tensors)}, devices in first-seen order."""
    groups = {}
    for i, t in enumerate(tensors):
        positions, ts = groups.setdefault(t.device, ([], []))
        positions.append(i)
        ts.append(t)
    return groups


def refuse_dataless(groups, error_if_nonfinite, fn, name_of):
    """Grads on the meta device have a shape but no values. Among themselves they
    clip as in torch (the norm is a meta tensor), but their norm cannot be
    combined with that of grads holding data, nor checked for non-finite values:
    say which grad, before anything is touched, instead of torch's "Cannot copy
    out of meta tensor" from deep inside. name_of(grad) -> how the caller named it."""
    meta = next((d for d in groups if d.type == "meta"), None)
    if meta is None or (len(groups) == 1 and not error_if_nonfinite):
        return
    grad = groups[meta][0]
    if len(groups) > 1:
        other = next(d for d in groups if d.type != "meta")
        why = f"its norm cannot be combined with that of the grads on {other}"
    else:
        why = "error_if_nonfinite=True cannot check its values"
    raise RuntimeError(
        f"fastclip.{fn}: {name_of(grad)} (shape {tuple(grad.shape)}) is on the meta device, which "
        f"holds no data, so {why}; give it storage first (e.g. module.to_empty(device=...))"
    )


# ---- the norm, the coefficient, the scale -------------------------------------------


def clip_coef(max_norm, norm):
    """torch's clip coefficient, min(max_norm / (norm + 1e-6), 1): a tensor for a tensor
    norm (no host sync), a float for a float."""
    coef = max_norm / (norm + EPS)
    return torch.clamp(coef, max=1.0) if isinstance(coef, torch.Tensor) else min(coef, 1.0)


def device_norms(groups, norm_type):
    """One accurate float64 norm per device group (a norm above FLT_MAX stays finite)."""
    norms = []
    for device, gs in groups.items():
        total_norm = _ops.total_norm if runs_fused(gs, device, norm_type) else _reference.total_norm
        norms.append(total_norm(gs, norm_type, torch.float64))
    return norms


def combine_norms(norms, norm_type, device):
    """The norm of the per-device norms, on `device`."""
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def scale_groups(groups, coef):
    """Every grad *= coef (a 0-dim tensor), one fused op per device group; a coefficient
    of exactly 1 stores nothing on the fused path."""
    for device, gs in groups.items():
        c = coef.to(device, non_blocking=True)
        if runs_fused(gs, device):
            _ops.scale_(gs, c)
        else:
            _reference.scale_(gs, c)


def raise_if_nonfinite(norm, norm_type, dtype):
    """error_if_nonfinite's contract: raise when the norm as returned (in the grads'
    dtype) is non-finite, as torch does, though fastclip's float64 norm may be finite.
    Returns the norm in `dtype`. Reads the norm back to the host."""
    returned = norm.to(dtype)
    if not torch.isfinite(returned).item():
        note = _OVERFLOW_NOTE.format(float(norm), dtype) if torch.isfinite(norm).item() else ""
        raise RuntimeError(_NONFINITE_MSG.format(norm_type) + note)
    return returned
