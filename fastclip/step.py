"""clip_and_step_: the global-norm clip handed to a torch fused optimizer's step.

    norm = fastclip.clip_and_step_(optimizer, max_norm)   # instead of clip_grad_norm_ + step()

torch's fused optimizers (Adam, AdamW, SGD, Adagrad with fused=True) read two
tensors GradScaler sets on them: they divide every grad by
``optimizer.grad_scale`` inside the step, and skip the step on the device
where ``optimizer.found_inf`` is 1. clip_and_step_ computes the global norm in
one fused read, hands the clip to the step as ``grad_scale = 1 / coef``, and
steps: no separate pass scales the grads, nothing is read back to the host.
The fused step writes the divided grads back, so afterwards the grads are
clipped, as after clip_grad_norm_.

Differences from clip_grad_norm_ + step(), all in the last bits: the grads are
divided by float32(1 / coef) instead of multiplied by coef, so a clipped grad
may differ in its last bit; and a coefficient below 1 / FLT_MAX (a norm above
~3e38 * max_norm) becomes a division by inf, zeroing the grads where the clip
would leave them tiny. A NaN norm makes the grads NaN and an inf norm zeroes
them, as torch's formula does (nonfinite="torch"), unless nonfinite="skip".
"""

from typing import Literal

import torch

from ._grads import (
    EPS,
    check_grads,
    check_max_norm,
    check_norm_type,
    combine_norms,
    device_norms,
    group_by_device,
    raise_if_nonfinite,
    result_dtype,
)
from .clip import NormType
from .nonfinite import check_policy, nonfinite_flag

__all__ = ["clip_and_step_"]


def clip_and_step_(
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    norm_type: NormType = 2.0,
    error_if_nonfinite: bool = False,
    *,
    nonfinite: Literal["torch", "error", "skip"] = "torch",
    scaler: "torch.amp.GradScaler | None" = None,
) -> torch.Tensor:
    """Clip the gradient norm of the optimizer's parameters inside its fused step, then step.

    Equivalent to ``clip_grad_norm_(params, max_norm, norm_type); optimizer.step()`` over every
    parameter of the optimizer that has a grad, with the scaling done by the fused step itself
    (through ``optimizer.grad_scale``), so the grads are read once for the norm and once by the
    step, and nothing is synchronised with the host unless ``error_if_nonfinite=True``.

    Args:
        optimizer (Optimizer): a torch optimizer whose step takes a ``grad_scale``:
            torch.optim.Adam, AdamW, SGD or Adagrad with ``fused=True`` (CPU or CUDA)
        max_norm (float): max norm of the gradients
        norm_type (float, optional): type of the p-norm. Can be ``'inf'``. Default: 2.0
        error_if_nonfinite (bool, optional): raise a RuntimeError, before anything is
            touched, when the norm is ``nan``, ``inf`` or ``-inf``. Default: False
        nonfinite (str, optional, keyword-only): ``"torch"`` (torch's formula), ``"error"``
            (as ``error_if_nonfinite=True``) or ``"skip"``: a non-finite norm skips the
            step on the device (params, state and step count untouched). Default: ``"torch"``
        scaler (GradScaler, optional, keyword-only): the GradScaler of this training loop:
            the step is ``scaler.step(optimizer)``, the norm is that of the unscaled grads
            (whether or not ``scaler.unscale_(optimizer)`` ran), and the two scales
            multiply; the scaler's own inf check decides whether the step runs. Call
            ``scaler.update()`` after, as usual. Default: None

    Returns:
        Total norm of the (unscaled) gradients before clipping: a 0-dim tensor in the
        gradients' dtype on the first gradient's device; ``tensor(0.)`` for none.
    """
    fn = "clip_and_step_"
    _check_optimizer(optimizer, fn)
    check_policy(nonfinite, fn)
    if error_if_nonfinite:
        if nonfinite == "skip":
            raise ValueError(f"fastclip.{fn}: nonfinite='skip' and error_if_nonfinite=True contradict each other")
        nonfinite = "error"
    max_norm = check_max_norm(max_norm, fn)
    norm_type = check_norm_type(norm_type, fn)
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        _step(optimizer, scaler)
        return torch.tensor(0.0)
    check_grads(grads, fn)
    dtype = result_dtype(grads)
    with torch.no_grad():
        norm = combine_norms(device_norms(group_by_device(grads), norm_type), norm_type, grads[0].device)
        if scaler is not None and scaler.is_enabled() and not _unscaled(scaler, optimizer):
            norm = norm / scaler._get_scale_async().to(norm)  # the grads still carry the scale
        if nonfinite == "error":
            raise_if_nonfinite(norm, norm_type, dtype)
        # 1 / min(max_norm / (norm + 1e-6), 1) in float64, in three ops on a fresh tensor
        # (exactly 1 when unclipped; inf for max_norm 0; NaN stays NaN).
        grad_scale = (norm + EPS).div_(max_norm).clamp_(min=1.0).to(torch.float32)
        found_inf = nonfinite_flag(norm) if nonfinite == "skip" else None
    _step(optimizer, scaler, grad_scale, found_inf)
    return norm.to(dtype)


def _check_optimizer(optimizer, fn):
    """Refuse, before anything is touched, an optimizer whose step ignores grad_scale: the
    grads would be stepped on unclipped."""
    fused = getattr(optimizer, "_step_supports_amp_scaling", False)
    groups = getattr(optimizer, "param_groups", None)
    if fused and groups is not None and type(optimizer).__module__.startswith("torch."):
        fused = all(group.get("fused") for group in groups)  # load_state_dict may have turned it off
    if not fused:
        raise TypeError(
            f"fastclip.{fn}: {type(optimizer).__name__} does not divide its grads by optimizer.grad_scale "
            "in its step, so it cannot apply the clip: use a torch optimizer built with fused=True "
            "(Adam, AdamW, SGD, Adagrad), fastclip.optim.Adam/AdamW(max_grad_norm=...), or "
            "fastclip.clip_grad_norm_ followed by optimizer.step()"
        )


def _unscaled(scaler, optimizer):
    """Whether scaler.unscale_(optimizer) already ran this iteration (GradScaler's own record)."""
    from torch.amp.grad_scaler import OptState

    return scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED


def _step(optimizer, scaler, grad_scale=None, found_inf=None):
    """optimizer.step() (scaler.step(optimizer) with a scaler) with grad_scale and found_inf
    set on the optimizer for the step only. GradScaler.step multiplies a grad_scale already
    there by its own scale and replaces found_inf with its own inf check."""
    if grad_scale is not None:
        optimizer.grad_scale = grad_scale
    if found_inf is not None:
        optimizer.found_inf = found_inf
    try:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    finally:
        for name in ("grad_scale", "found_inf"):
            optimizer.__dict__.pop(name, None)  # GradScaler.step removes them itself when enabled
