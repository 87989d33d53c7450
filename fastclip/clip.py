"""fastclip's public functions: torch.nn.utils' clipping API, fused.

Data path: clip_grad_norm_ checks its scalar arguments and, in eager mode,
hands the parameter list to fastclip._C.clip_params (csrc/py_module.cpp), which
reads and checks every .grad in C++ and calls torch.ops.fastclip.clip_grad_norm_
(schema: csrc/ops.cpp; kernels: csrc/cpu/clip_cpu.cpp, csrc/cuda/clip_cuda.cpp).
Everything else (bad input and its errors, several devices,
error_if_nonfinite, tracing under torch.compile) takes the Python path below:
group by device, one op per device. Inputs the fused ops do not take (p <= 0,
complex grads, devices without kernels) go through fastclip/_reference.py, as
does everything when the extension did not load.
"""
import types
import warnings

import torch

from . import _ops, _reference
from .nonfinite import check_found_inf, check_policy, nonfinite_flag, skip_if_nonfinite

_compiling = torch.compiler.is_compiling

_FUSED_DTYPES = frozenset((torch.float32, torch.float64, torch.float16, torch.bfloat16))

_NONFINITE_MSG = (
    "The total norm of order {} for gradients from `parameters` is non-finite, so it cannot be "
    "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
    "`error_if_nonfinite=False`"
)


# ---- input handling ---------------------------------------------------------


def _as_list(tensors, fn, what, warn_empty_generator=False):
    """A Tensor, a list or any iterable (a generator is consumed once) -> list."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    is_generator = isinstance(tensors, types.GeneratorType)
    try:
        tensors = list(tensors)
    except TypeError:
        raise TypeError(
            f"fastclip.{fn}: {what} must be a Tensor or an iterable of Tensors, "
            f"got {type(tensors).__name__}"
        ) from None
    if warn_empty_generator and is_generator and not tensors:
        warnings.warn(
            f"`{what}` is an empty generator, no gradient clipping will occur.", stacklevel=3
        )
    return tensors


def _check_tensor(t, i, fn, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastclip.{fn}: {what}[{i}] is a {type(t).__name__}, not a Tensor")


def _grads_of(parameters, fn, warn_empty_generator=False):
    params = _as_list(parameters, fn, "parameters", warn_empty_generator)
    grads = []
    for i, p in enumerate(params):
        _check_tensor(p, i, fn, "parameters")
        if p.grad is not None:
            grads.append(p.grad)
    return grads


def _check_grads(grads, fn):
    """Raise before anything is touched: every grad a strided floating (or complex) tensor."""
    for g in grads:
        if g.layout != torch.strided:
            raise TypeError(f"fastclip.{fn}: sparse gradients ({g.layout}) are not supported")
        if not (g.is_floating_point() or g.is_complex()):
            raise TypeError(f"fastclip.{fn}: gradients must be floating point, got one of dtype {g.dtype}")


def _check_max_norm(max_norm, fn, name="max_norm"):
    value = float(max_norm)
    if not value >= 0:  # also catches NaN
        raise ValueError(f"fastclip.{fn}: {name} must be a non-negative number, got {max_norm}")
    return value


def _check_norm_type(norm_type, fn):
    try:
        return float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(
            f"fastclip.{fn}: norm_type must be a number or 'inf', got {norm_type!r}"
        ) from None


def _result_dtype(grads):
    """The dtype torch returns the norm in: the grads' dtypes promoted together."""
    dtype = grads[0].dtype
    for g in grads:
        if g.dtype != dtype:
            dtype = torch.promote_types(dtype, g.dtype)
    return dtype


def _group_by_device(grads):
    groups = {}
    for g in grads:
        groups.setdefault(g.device, []).append(g)
    return groups


def _kernels_take(grads, device):
    return _ops.has_kernels(device.type) and all(g.dtype in _FUSED_DTYPES for g in grads)


def _fused_ok(grads, device, norm_type):
    return norm_type > 0 and _kernels_take(grads, device)


# ---- the two halves, per device group ----------------------------------------


def _device_norms(groups, norm_type):
    """One accurate (float32/float64) norm per device group."""
    norms = []
    for device, gs in groups.items():
        fused = _fused_ok(gs, device, norm_type)
        norms.append(_ops.total_norm(gs, norm_type) if fused else _reference.total_norm(gs, norm_type))
    return norms


def _combine_norms(norms, norm_type, device):
    if len(norms) == 1:
        return norms[0]
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]), norm_type)


def _scale_groups(groups, coef):
    for device, gs in groups.items():
        c = coef.to(device, non_blocking=True)
        if _kernels_take(gs, device):
            _ops.scale_(gs, c)
        else:
            _reference.scale_(gs, c)


def _raise_if_nonfinite(norm, norm_type):
    if not torch.isfinite(norm).item():
        raise RuntimeError(_NONFINITE_MSG.format(norm_type))


# ---- public API ----------------------------------------------------------------


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """torch.nn.utils.get_total_norm: the norm of all `tensors` seen as one vector.

    Accumulated in float32 (float64 for float64 tensors), returned in the
    tensors' (promoted) dtype on the first tensor's device. `foreach` is
    accepted for compatibility; fastclip is always fused.
    """
    fn = "get_total_norm"
    tensors = _as_list(tensors, fn, "tensors")
    for i, t in enumerate(tensors):
        _check_tensor(t, i, fn, "tensors")
    norm_type = _check_norm_type(norm_type, fn)
    if not tensors:
        return torch.tensor(0.0)
    _check_grads(tensors, fn)
    with torch.no_grad():
        norm = _combine_norms(_device_norms(_group_by_device(tensors), norm_type), norm_type, tensors[0].device)
        if error_if_nonfinite:
            _raise_if_nonfinite(norm, norm_type)
        return norm.to(_result_dtype(tensors))


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    """torch.nn.utils.clip_grads_with_norm_: scale grads by min(max_norm / (total_norm + 1e-6), 1)."""
    fn = "clip_grads_with_norm_"
    grads = _grads_of(parameters, fn)
    max_norm = _check_max_norm(max_norm, fn)
    if not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(float(total_norm))
    if not grads:
        return
    _check_grads(grads, fn)
    with torch.no_grad():
        acc = _reference.accumulate_dtype(grads)
        coef = _reference.clip_coef(max_norm, total_norm.to(acc))
        _scale_groups(_group_by_device(grads), coef)


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, *,
                    nonfinite="torch", found_inf=None):
    """Clip the gradient norm of `parameters` in place; drop-in for torch.nn.utils.clip_grad_norm_.

    The norm over all grads (as one vector) is computed and the grads scaled by
    min(max_norm / (norm + 1e-6), 1) in one fused op per device. Returns the
    pre-clip total norm as a 0-dim tensor in the grads' dtype on the first
    grad's device. No host synchronisation unless error_if_nonfinite=True.
    fp16/bf16 norms are accumulated in float32, so the coefficient is accurate
    even where a half-precision norm would overflow. `foreach` is accepted for
    compatibility; fastclip is always fused.

    Keyword-only (fastclip/nonfinite.py): nonfinite="torch" (default) | "error"
    (= error_if_nonfinite=True) | "skip": a non-finite norm leaves the grads
    untouched, with no host sync; `found_inf`, a 0-dim float tensor, if given,
    is set to 1.0 (non-finite) or 0.0 on the device, for a fused optimizer.
    """
    fn = "clip_grad_norm_"
    # ---- issue 13: the keyword-only non-finite policy (everything else takes the paths below)
    if nonfinite != "torch" or found_inf is not None:
        return _clip_grad_norm_policy(parameters, max_norm, norm_type, error_if_nonfinite, nonfinite,
                                      found_inf, fn)
    # ----
    if isinstance(parameters, torch.Tensor):
        params = (parameters,)
    elif isinstance(parameters, (list, tuple)):
        params = parameters
    else:
        params = _as_list(parameters, fn, "parameters", warn_empty_generator=True)
    max_norm = _check_max_norm(max_norm, fn)
    norm_type = _check_norm_type(norm_type, fn)
    if _ops.clip_params is not None and norm_type > 0 and not error_if_nonfinite and not _compiling():
        # The eager hot path: grads read, checked and clipped in C++ (csrc/py_module.cpp).
        norm = _ops.clip_params(params, max_norm, norm_type)
        if norm is not None:
            return norm
    return _clip_grad_norm_general(params, max_norm, norm_type, error_if_nonfinite, fn)


def _clip_grad_norm_general(params, max_norm, norm_type, error_if_nonfinite, fn):
    """Every other case: errors, several devices, the nonfinite check, p <= 0, tracing."""
    grads = _grads_of(params, fn)
    if not grads:
        return torch.tensor(0.0)
    _check_grads(grads, fn)
    dtype = _result_dtype(grads)
    with torch.no_grad():
        groups = _group_by_device(grads)
        if len(groups) == 1 and not error_if_nonfinite:
            (device, gs), = groups.items()
            if _fused_ok(gs, device, norm_type):
                return _ops.clip_grad_norm_(gs, max_norm, norm_type, dtype)
        # Norm first (the check sees it before any grad is touched), then scale.
        norm = _combine_norms(_device_norms(groups, norm_type), norm_type, grads[0].device)
        if error_if_nonfinite:
            _raise_if_nonfinite(norm, norm_type)
        _scale_groups(groups, _reference.clip_coef(max_norm, norm))
        return norm.to(dtype)


# ---- issue 13: the keyword-only non-finite policy of clip_grad_norm_ -----------------------


def _clip_grad_norm_policy(parameters, max_norm, norm_type, error_if_nonfinite, nonfinite, found_inf, fn):
    """clip_grad_norm_ with nonfinite="error" or "skip" (and found_inf)."""
    check_policy(nonfinite, fn)
    check_found_inf(found_inf, fn)
    if nonfinite == "skip" and error_if_nonfinite:
        raise ValueError(f"fastclip.{fn}: nonfinite='skip' and error_if_nonfinite=True contradict each other")
    if found_inf is not None and nonfinite != "skip":
        raise ValueError(f"fastclip.{fn}: found_inf is written only with nonfinite='skip', got {nonfinite!r}")
    params = _as_list(parameters, fn, "parameters", warn_empty_generator=True)
    max_norm = _check_max_norm(max_norm, fn)
    norm_type = _check_norm_type(norm_type, fn)
    if nonfinite == "error":
        return _clip_grad_norm_general(params, max_norm, norm_type, True, fn)
    grads = _grads_of(params, fn)
    if not grads:
        if found_inf is not None:
            found_inf.zero_()
        return torch.tensor(0.0)
    _check_grads(grads, fn)
    with torch.no_grad():
        groups = _group_by_device(grads)
        norm = _combine_norms(_device_norms(groups, norm_type), norm_type, grads[0].device)
        # A non-finite norm gives a coefficient of exactly 1: scale_ then stores nothing.
        _scale_groups(groups, skip_if_nonfinite(_reference.clip_coef(max_norm, norm), norm))
        if found_inf is not None:
            found_inf.copy_(nonfinite_flag(norm))
        return norm.to(_result_dtype(grads))


# ---- end of issue 13 -----------------------------------------------------------------------

clip_ = clip_grad_norm_


def clip_grad_value_(parameters, clip_value, foreach=None):
    """torch.nn.utils.clip_grad_value_: clamp every grad to [-clip_value, clip_value] in place."""
    fn = "clip_grad_value_"
    grads = _grads_of(parameters, fn)
    clip_value = _check_max_norm(clip_value, fn, "clip_value")
    if not grads:
        return
    _check_grads(grads, fn)
    with torch.no_grad():
        for gs in _group_by_device(grads).values():
            torch._foreach_clamp_min_(gs, -clip_value)
            torch._foreach_clamp_max_(gs, clip_value)
