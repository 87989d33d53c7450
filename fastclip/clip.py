"""fastclip's public functions: torch.nn.utils' clipping API, fused.

Data path: clip_grad_norm_ checks its scalar arguments and, in eager mode,
hands the parameter list to fastclip._C.clip_params (csrc/eager_params.h), which
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
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

from . import _ops, _reference
from . import distributed as _distributed  # [distributed] DTensor grads and group=
from .nonfinite import check_found_inf, check_policy, nonfinite_flag, skip_if_nonfinite

_compiling = torch.compiler.is_compiling

# What torch.nn.utils accepts for `parameters` / `tensors`: one tensor or any iterable of them.
TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]
NormType = float | int | str  # a number, or "inf"

_FUSED_DTYPES = frozenset((torch.float32, torch.float64, torch.float16, torch.bfloat16))

_NONFINITE_MSG = (
    "The total norm of order {} for gradients from `parameters` is non-finite, so it cannot be "
    "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
    "`error_if_nonfinite=False`"
)
_OVERFLOW_NOTE = (
    " (fastclip: the norm itself, {:.6g}, is finite, but it overflows {}, the dtype the norm is "
    "returned in; with `error_if_nonfinite=False` the grads are clipped by the finite norm)"
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
            f"fastclip.{fn}: {what} must be a Tensor or an iterable of Tensors, got {type(tensors).__name__}"
        ) from None
    if warn_empty_generator and is_generator and not tensors:
        warnings.warn(f"`{what}` is an empty generator, no gradient clipping will occur.", stacklevel=3)
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
        raise ValueError(f"fastclip.{fn}: norm_type must be a number or 'inf', got {norm_type!r}") from None


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


def _refuse_dataless(groups, error_if_nonfinite, fn, name_of):
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


def _index_of(tensor, tensors):
    return next(i for i, t in enumerate(tensors) if t is tensor)


def _scale_is_fused(grads, device):
    """Whether the fused ops take these grads (device with kernels, fused dtypes)."""
    return _ops.has_kernels(device.type) and all(g.dtype in _FUSED_DTYPES for g in grads)


def _norm_is_fused(grads, device, norm_type):
    """Whether the fused norm applies too: it takes p > 0 and inf only."""
    return norm_type > 0 and _scale_is_fused(grads, device)


# ---- the two halves, per device group ----------------------------------------


def _device_norms(groups, norm_type):
    """One accurate float64 norm per device group (a norm above FLT_MAX stays finite)."""
    norms = []
    for device, gs in groups.items():
        fused = _norm_is_fused(gs, device, norm_type)
        total_norm = _ops.total_norm if fused else _reference.total_norm
        norms.append(total_norm(gs, norm_type, torch.float64))
    return norms


def _combine_norms(norms, norm_type, device):
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def _scale_groups(groups, coef):
    for device, gs in groups.items():
        c = coef.to(device, non_blocking=True)
        if _scale_is_fused(gs, device):
            _ops.scale_(gs, c)
        else:
            _reference.scale_(gs, c)


def _raise_if_nonfinite(norm, norm_type, dtype):
    """error_if_nonfinite's contract: raise when the norm as returned (in the grads'
    dtype) is non-finite, as torch does, though fastclip's float64 norm may be finite."""
    returned = norm.to(dtype)
    if not torch.isfinite(returned).item():
        note = _OVERFLOW_NOTE.format(float(norm), dtype) if torch.isfinite(norm).item() else ""
        raise RuntimeError(_NONFINITE_MSG.format(norm_type) + note)
    return returned


# ---- public API ----------------------------------------------------------------


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: NormType = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: "ProcessGroup | None" = None,
) -> torch.Tensor:
    """torch.nn.utils.get_total_norm: the norm of all `tensors` seen as one vector.

    Accumulated in float32 (float64 for float64 tensors), returned in the
    tensors' (promoted) dtype on the first tensor's device. `foreach` is
    accepted for compatibility; fastclip is always fused. DTensors, and
    plain tensors that are disjoint shards over the ProcessGroup `group`, give
    the global norm (one all-reduce; every rank calls): fastclip/distributed.py.
    """
    fn = "get_total_norm"
    tensors = _as_list(tensors, fn, "tensors")
    for i, t in enumerate(tensors):
        _check_tensor(t, i, fn, "tensors")
    norm_type = _check_norm_type(norm_type, fn)
    if group is not None or _distributed.any_dtensor(tensors):  # [distributed]
        return _distributed.get_total_norm(tensors, norm_type, error_if_nonfinite, group, fn)
    if not tensors:
        return torch.tensor(0.0)
    _check_grads(tensors, fn)
    groups = _group_by_device(tensors)
    _refuse_dataless(groups, error_if_nonfinite, fn, lambda g: f"tensors[{_index_of(g, tensors)}]")
    with torch.no_grad():
        norm = _combine_norms(_device_norms(groups, norm_type), norm_type, tensors[0].device)
        if error_if_nonfinite:
            return _raise_if_nonfinite(norm, norm_type, _result_dtype(tensors))
        return norm.to(_result_dtype(tensors))


def clip_grads_with_norm_(
    parameters: TensorOrTensors, max_norm: float, total_norm: torch.Tensor | float, foreach: bool | None = None
) -> None:
    """torch.nn.utils.clip_grads_with_norm_: scale grads by min(max_norm / (total_norm + 1e-6), 1)."""
    fn = "clip_grads_with_norm_"
    grads = _grads_of(parameters, fn)
    max_norm = _check_max_norm(max_norm, fn)
    if not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(float(total_norm))
    if not grads:
        return
    grads = _distributed.local_shards(grads, fn)  # [distributed] DTensor grads: scale local shards
    total_norm = _distributed.local_norm(total_norm)  # [distributed] a DTensor norm: its value
    _check_grads(grads, fn)
    with torch.no_grad():
        # In float64 whatever total_norm's dtype, as the fused ops do: a float64
        # norm above FLT_MAX (or a coefficient below FLT_MIN) must not become inf (0).
        coef = _reference.clip_coef(max_norm, total_norm.to(torch.float64))
        _scale_groups(_group_by_device(grads), coef)


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: NormType = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: "ProcessGroup | None" = None,
    nonfinite: Literal["torch", "error", "skip"] = "torch",
    found_inf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clip the gradient norm of `parameters` in place; drop-in for torch.nn.utils.clip_grad_norm_.

    The norm over all grads (as one vector) is computed and the grads scaled by
    min(max_norm / (norm + 1e-6), 1) in one fused op per device. Returns the
    pre-clip total norm as a 0-dim tensor in the grads' dtype on the first
    grad's device. No host synchronisation unless error_if_nonfinite=True.
    fp16/bf16 norms are accumulated in float32, so the coefficient is accurate
    even where a half-precision norm would overflow. `foreach` is accepted for
    compatibility; fastclip is always fused.

    Distributed (fastclip/distributed.py): DTensor grads (FSDP2, tensor
    parallel) and plain grads that are disjoint shards over the ProcessGroup
    `group` are clipped by their global norm, one all-reduce per set of ranks;
    every rank must call, even one with no grads.

    Keyword-only (fastclip/nonfinite.py): nonfinite="torch" (default) | "error"
    (= error_if_nonfinite=True) | "skip": a non-finite norm leaves the grads
    untouched, with no host sync; `found_inf`, a 0-dim float tensor, if given,
    is set to 1.0 (non-finite) or 0.0 on the device, for a fused optimizer.
    """
    fn = "clip_grad_norm_"
    if nonfinite != "torch" or found_inf is not None:  # the keyword-only non-finite policy
        return _clip_grad_norm_policy(
            parameters, max_norm, norm_type, error_if_nonfinite, nonfinite, found_inf, group, fn
        )
    if isinstance(parameters, torch.Tensor):
        params = (parameters,)
    elif isinstance(parameters, (list, tuple)):
        params = parameters
    else:
        params = _as_list(parameters, fn, "parameters", warn_empty_generator=True)
    max_norm = _check_max_norm(max_norm, fn)
    norm_type = _check_norm_type(norm_type, fn)
    eager = _ops.clip_params is not None and norm_type > 0 and not error_if_nonfinite and not _compiling()
    if eager and group is None:
        # The eager hot path: grads read, checked and clipped in C++ (csrc/eager_params.h). It
        # declines (None) DTensor grads, which dispatch to Python, so they cost it nothing.
        norm = _ops.clip_params(params, max_norm, norm_type)
        if norm is not None:
            return norm
    if group is not None or _distributed.any_dtensor(params):  # [distributed]
        return _distributed.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, group, fn)
    return _clip_grad_norm_general(params, max_norm, norm_type, error_if_nonfinite, fn)


def _clip_grad_norm_general(params, max_norm, norm_type, error_if_nonfinite, fn, skip=False, found_inf=None):
    """Every other case: errors, several devices, the nonfinite check, p <= 0, tracing, and
    nonfinite="skip" (skip=True: a non-finite norm leaves the grads untouched; found_inf, if
    given, gets 1.0 or 0.0 on the device)."""
    grads = _grads_of(params, fn)
    if not grads:
        if found_inf is not None:
            found_inf.zero_()
        return torch.tensor(0.0)
    _check_grads(grads, fn)
    dtype = _result_dtype(grads)
    groups = _group_by_device(grads)
    _refuse_dataless(
        groups, error_if_nonfinite, fn, lambda g: f"parameters[{_index_of(g, [p.grad for p in params])}].grad"
    )
    with torch.no_grad():
        if len(groups) == 1 and not (error_if_nonfinite or skip):
            ((device, gs),) = groups.items()
            if _norm_is_fused(gs, device, norm_type):
                return _ops.clip_grad_norm_(gs, max_norm, norm_type, dtype)
        # Norm first (the check sees it before any grad is touched), then scale.
        norm = _combine_norms(_device_norms(groups, norm_type), norm_type, grads[0].device)
        if error_if_nonfinite:
            _raise_if_nonfinite(norm, norm_type, dtype)
        coef = _reference.clip_coef(max_norm, norm)
        if skip:  # a non-finite norm gives a coefficient of exactly 1: scale_ then stores nothing
            coef = skip_if_nonfinite(coef, norm)
        _scale_groups(groups, coef)
        if found_inf is not None:
            found_inf.copy_(nonfinite_flag(norm))
        return norm.to(dtype)


# ---- the keyword-only non-finite policy of clip_grad_norm_ ---------------------------------


def _clip_grad_norm_policy(parameters, max_norm, norm_type, error_if_nonfinite, nonfinite, found_inf, group, fn):
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
    if group is not None or _distributed.any_dtensor(params):  # [distributed]
        if nonfinite == "skip":
            raise NotImplementedError(
                f"fastclip.{fn}: nonfinite='skip' is not supported for distributed grads "
                "(DTensor or group=) yet; nonfinite='error' (error_if_nonfinite=True) is"
            )
        return _distributed.clip_grad_norm_(params, max_norm, norm_type, True, group, fn)
    if nonfinite == "error":
        return _clip_grad_norm_general(params, max_norm, norm_type, True, fn)
    return _clip_grad_norm_general(params, max_norm, norm_type, False, fn, skip=True, found_inf=found_inf)


clip_ = clip_grad_norm_


def clip_grad_value_(parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None) -> None:
    """torch.nn.utils.clip_grad_value_: clamp every grad to [-clip_value, clip_value] in place."""
    fn = "clip_grad_value_"
    grads = _grads_of(parameters, fn)
    clip_value = _check_max_norm(clip_value, fn, "clip_value")
    if not grads:
        return
    grads = _distributed.local_shards(grads, fn, linear=False)  # [distributed] clamp local shards
    _check_grads(grads, fn)
    if any(g.is_complex() for g in grads):
        raise TypeError(f"fastclip.{fn}: complex gradients have no order, so they cannot be clamped")
    with torch.no_grad():
        for gs in _group_by_dtype_and_device(grads).values():
            bound = _bound_in(clip_value, gs[0].dtype)
            torch._foreach_clamp_min_(gs, -bound)
            torch._foreach_clamp_max_(gs, bound)


def _group_by_dtype_and_device(grads):
    groups = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    return groups


def _bound_in(clip_value, dtype):
    """clip_value as the dtype holds it (rounded to nearest, inf beyond its range), so
    a bound too large for one dtype clamps nothing there instead of raising halfway
    through the grads: clamping to the rounded bound is the clamp computed in that dtype."""
    return torch.tensor(clip_value, dtype=torch.float64).to(dtype).item()
