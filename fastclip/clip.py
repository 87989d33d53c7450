"""torch.nn.utils' clipping API, fused: clip_grad_norm_ (clip_), get_total_norm,
clip_grads_with_norm_ and clip_grad_value_, with the same signatures and semantics.

Data path: in eager mode clip_grad_norm_ first hands its arguments as they are
to fastclip._C.clip_params (csrc/eager_params.h), which reads and checks them and
every .grad in C++ and calls torch.ops.fastclip.clip_grad_norm_ (schema:
csrc/ops.cpp; kernels: csrc/cpu/clip_cpu.cpp, csrc/cuda/clip_cuda.cpp).
Everything it declines (bad input and its errors, generators, several devices)
and error_if_nonfinite or tracing under torch.compile take the Python path below:
group by device, one op per device (fastclip/_grads.py). Inputs the fused ops
do not take (p <= 0, complex grads, devices without kernels) go through
fastclip/_reference.py, as does everything when the extension did not load.
DTensor grads and group= go through fastclip/distributed.py.
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

from . import _ops
from . import distributed as _distributed
from ._grads import (
    as_list,
    check_grads,
    check_max_norm,
    check_norm_type,
    check_tensor,
    clip_coef,
    combine_norms,
    compiling,
    device_norms,
    grads_of,
    group_by_device,
    raise_if_nonfinite,
    refuse_dataless,
    result_dtype,
    runs_fused,
    scale_groups,
)
from .nonfinite import check_found_inf, check_policy, nonfinite_flag, skip_if_nonfinite

# What torch.nn.utils accepts for `parameters` / `tensors`: one tensor or any iterable of them.
TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]
NormType = float | int | str  # a number, or "inf"


def _index_of(tensor, tensors):
    return next(i for i, t in enumerate(tensors) if t is tensor)


# ---- public API ----------------------------------------------------------------


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: NormType = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: "ProcessGroup | None" = None,
) -> torch.Tensor:
    """Compute the norm of an iterable of tensors, as torch.nn.utils.get_total_norm.

    The norm is computed over the norms of the individual tensors, as if they were
    concatenated into a single vector; it is accumulated in float32 (float64 for
    float64 tensors) in one fused pass per device, with no host synchronisation.

    Args:
        tensors (Iterable[Tensor] or Tensor): an iterable of Tensors or a single
            Tensor whose norm is computed (usually the gradients)
        norm_type (float, optional): type of the p-norm. Can be ``'inf'`` for the
            infinity norm. Default: 2.0
        error_if_nonfinite (bool, optional): if True, raise a RuntimeError when the
            total norm is ``nan``, ``inf`` or ``-inf``. Default: False
        foreach (bool, optional): accepted for compatibility and ignored: fastclip
            is always fused. Default: ``None``
        group (ProcessGroup, optional, keyword-only): the tensors are disjoint shards
            of one set over this process group; every rank calls, and gets the
            global norm (one all-reduce). DTensors need no group. Default: ``None``

    Returns:
        Total norm of the tensors (viewed as a single vector): a 0-dim tensor in the
        tensors' (promoted) dtype on the first tensor's device; ``tensor(0.)`` for none.
    """
    fn = "get_total_norm"
    tensors = as_list(tensors, fn, "tensors")
    for i, t in enumerate(tensors):
        check_tensor(t, i, fn, "tensors")
    norm_type = check_norm_type(norm_type, fn)
    if group is not None or _distributed.any_dtensor(tensors):
        return _distributed.get_total_norm(tensors, norm_type, error_if_nonfinite, group, fn)
    if not tensors:
        return torch.tensor(0.0)
    check_grads(tensors, fn)
    groups = group_by_device(tensors)
    refuse_dataless(groups, error_if_nonfinite, fn, lambda g: f"tensors[{_index_of(g, tensors)}]")
    with torch.no_grad():
        norm = combine_norms(device_norms(groups, norm_type), norm_type, tensors[0].device)
        if error_if_nonfinite:
            return raise_if_nonfinite(norm, norm_type, result_dtype(tensors))
        return norm.to(result_dtype(tensors))


def clip_grads_with_norm_(
    parameters: TensorOrTensors, max_norm: float, total_norm: torch.Tensor | float, foreach: bool | None = None
) -> None:
    """Scale the gradients of an iterable of parameters given a pre-computed total norm,
    as torch.nn.utils.clip_grads_with_norm_.

    Every gradient is multiplied in place by ``min(max_norm / (total_norm + 1e-6), 1)``,
    computed in float64 whatever the norm's dtype; a coefficient of exactly 1 leaves
    the gradients untouched.

    Args:
        parameters (Iterable[Tensor] or Tensor): an iterable of Tensors or a single
            Tensor whose gradients are scaled
        max_norm (float): max norm of the gradients
        total_norm (Tensor or float): the total norm of the gradients (a DTensor
            norm, torch's or fastclip's, is accepted)
        foreach (bool, optional): accepted for compatibility and ignored. Default: ``None``

    Returns:
        None
    """
    fn = "clip_grads_with_norm_"
    grads = grads_of(parameters, fn)
    max_norm = check_max_norm(max_norm, fn)
    if not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(float(total_norm))
    if not grads:
        return
    grads = _distributed.local_shards(grads, fn)  # DTensor grads: their local shards
    total_norm = _distributed.local_norm(total_norm)  # a DTensor norm: its value
    check_grads(grads, fn)
    with torch.no_grad():
        # In float64 whatever total_norm's dtype, as the fused ops do: a float64
        # norm above FLT_MAX (or a coefficient below FLT_MIN) must not become inf (0).
        coef = clip_coef(max_norm, total_norm.to(torch.float64))
        scale_groups(group_by_device(grads), coef)


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
    """Clip the gradient norm of an iterable of parameters, as torch.nn.utils.clip_grad_norm_.

    The norm is computed over the norms of the individual gradients, as if they were
    concatenated into a single vector, and the gradients are modified in place:
    scaled by ``min(max_norm / (norm + 1e-6), 1)``, in one fused op per device. The
    norm is accumulated in float32 (float64 for float64 grads), so the coefficient
    is accurate even where a half-precision norm would overflow. No host
    synchronisation unless ``error_if_nonfinite=True``.

    Args:
        parameters (Iterable[Tensor] or Tensor): an iterable of Tensors or a single
            Tensor that will have gradients normalized
        max_norm (float): max norm of the gradients
        norm_type (float, optional): type of the p-norm. Can be ``'inf'`` for the
            infinity norm. Default: 2.0
        error_if_nonfinite (bool, optional): if True, raise a RuntimeError, with the
            gradients untouched, when the total norm is ``nan``, ``inf`` or ``-inf``.
            Default: False
        foreach (bool, optional): accepted for compatibility and ignored: fastclip
            is always fused. Default: ``None``
        group (ProcessGroup, optional, keyword-only): the gradients are disjoint
            shards of one set over this process group: clipped by their global norm
            (one all-reduce); every rank calls, even one with no gradients. DTensor
            gradients (FSDP2, tensor parallel) need no group. Default: ``None``
        nonfinite (str, optional, keyword-only): what a non-finite norm does:
            ``"torch"`` (torch's behaviour), ``"error"`` (as ``error_if_nonfinite=True``)
            or ``"skip"`` (gradients left untouched, no host sync); see
            fastclip/nonfinite.py. Default: ``"torch"``
        found_inf (Tensor, optional, keyword-only): with ``nonfinite="skip"``, a 0-dim
            float tensor set on the device to 1.0 (non-finite norm) or 0.0, for a
            fused optimizer to skip its step. Default: ``None``

    Returns:
        Total norm of the parameter gradients before clipping (viewed as a single
        vector): a 0-dim tensor in the gradients' dtype on the first gradient's device.
    """
    fn = "clip_grad_norm_"
    fast = _ops.clip_params is not None and not error_if_nonfinite and group is None and found_inf is None
    if fast and nonfinite == "torch" and not compiling():
        # The eager hot path, before any Python work: grads read, checked and clipped in C++
        # (csrc/eager_params.h). It declines (None), touching nothing, whatever is not a plain
        # list/tuple/tensor of parameters on one device with float arguments (bad input,
        # generators, DTensor grads): the code below then checks, converts or raises.
        norm = _ops.clip_params(parameters, max_norm, norm_type)
        if norm is not None:
            return norm
    if nonfinite != "torch" or found_inf is not None:  # the keyword-only non-finite policy
        return _clip_grad_norm_policy(
            parameters, max_norm, norm_type, error_if_nonfinite, nonfinite, found_inf, group, fn
        )
    if isinstance(parameters, torch.Tensor):
        params = (parameters,)
    elif isinstance(parameters, (list, tuple)):
        params = parameters
    else:
        params = as_list(parameters, fn, "parameters", warn_empty_generator=True)
    max_norm = check_max_norm(max_norm, fn)
    norm_type = check_norm_type(norm_type, fn)
    if fast and not compiling():  # converted (a generator now a list, a numpy max_norm a float): try again
        norm = _ops.clip_params(params, max_norm, norm_type)
        if norm is not None:
            return norm
    if group is not None or _distributed.any_dtensor(params):
        return _distributed.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, group, fn)
    return _clip_grad_norm_general(params, max_norm, norm_type, error_if_nonfinite, fn)


def _clip_grad_norm_general(params, max_norm, norm_type, error_if_nonfinite, fn, skip=False, found_inf=None):
    """Every other case: errors, several devices, the nonfinite check, p <= 0, tracing, and
    nonfinite="skip" (skip=True: a non-finite norm leaves the grads untouched; found_inf, if
    given, gets 1.0 or 0.0 on the device)."""
    grads = grads_of(params, fn)
    if not grads:
        if found_inf is not None:
            found_inf.zero_()
        return torch.tensor(0.0)
    check_grads(grads, fn)
    dtype = result_dtype(grads)
    groups = group_by_device(grads)
    refuse_dataless(
        groups, error_if_nonfinite, fn, lambda g: f"parameters[{_index_of(g, [p.grad for p in params])}].grad"
    )
    with torch.no_grad():
        if len(groups) == 1 and not (error_if_nonfinite or skip):
            ((device, gs),) = groups.items()
            if runs_fused(gs, device, norm_type):
                return _ops.clip_grad_norm_(gs, max_norm, norm_type, dtype)
        # Norm first (the check sees it before any grad is touched), then scale.
        norm = combine_norms(device_norms(groups, norm_type), norm_type, grads[0].device)
        if error_if_nonfinite:
            raise_if_nonfinite(norm, norm_type, dtype)
        coef = clip_coef(max_norm, norm)
        if skip:  # a non-finite norm gives a coefficient of exactly 1: scale_ then stores nothing
            coef = skip_if_nonfinite(coef, norm)
        scale_groups(groups, coef)
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
    params = as_list(parameters, fn, "parameters", warn_empty_generator=True)
    max_norm = check_max_norm(max_norm, fn)
    norm_type = check_norm_type(norm_type, fn)
    if group is not None or _distributed.any_dtensor(params):
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
    """Clip the gradients of an iterable of parameters at a value, as torch.nn.utils.clip_grad_value_.

    Gradients are modified in place: clamped to ``[-clip_value, clip_value]``, the
    bound taken as each gradient's dtype holds it.

    Args:
        parameters (Iterable[Tensor] or Tensor): an iterable of Tensors or a single
            Tensor that will have gradients clamped
        clip_value (float): maximum allowed magnitude of the gradients
        foreach (bool, optional): accepted for compatibility and ignored. Default: ``None``

    Returns:
        None
    """
    fn = "clip_grad_value_"
    grads = grads_of(parameters, fn)
    clip_value = check_max_norm(clip_value, fn, "clip_value")
    if not grads:
        return
    grads = _distributed.local_shards(grads, fn, linear=False)  # DTensor grads: their local shards
    check_grads(grads, fn)
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
