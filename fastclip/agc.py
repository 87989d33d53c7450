"""Adaptive gradient clipping, unit-wise (AGC, Brock et al. 2021), with timm's
semantics: each unit's gradient held to a fraction of that unit's weight norm.

One fused pass over params and grads per device (schema: csrc/ops.cpp; CPU:
csrc/cpu/agc_cpu.cpp; CUDA: csrc/cuda/norms_cuda.cpp), no host sync; inputs the
fused op does not take go through fastclip/_reference.py.
"""

import torch

from . import _ops, _reference
from ._grads import (
    as_list,
    check_grads,
    check_max_norm,
    check_norm_type,
    check_tensor,
    compiling,
    positions_by_device,
    runs_fused,
)


def adaptive_clip_grad_(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0) -> None:
    """Clip each unit's gradient adaptively (AGC), in place.

    A unit is a row of a >= 2-D parameter (index 0, over all its other dims: an output
    channel of a linear or conv weight); a <= 1-D parameter is one unit. A unit whose
    gradient p-norm reaches ``clip_factor * max(unit norm of the parameter, eps)`` is
    scaled to exactly that (by that bound / max(gradient norm, 1e-6), as timm does);
    the others are left untouched. The norms are accumulated in float32 (float64 for
    float64) whatever the gradients' dtype.

    Args:
        parameters (Iterable[Tensor] or Tensor): the parameters whose gradients are
            clipped (None gradients are skipped)
        clip_factor (float, optional): the fraction of the unit's weight norm a unit's
            gradient norm is held to. Default: 0.01
        eps (float, optional): the smallest weight norm the bound is taken from, so
            that zero-initialised units can move. Default: 1e-3
        norm_type (float, optional): type of the p-norm. Can be ``'inf'``. Default: 2.0

    Returns:
        None
    """
    fn = "adaptive_clip_grad_"
    clip_factor = check_max_norm(clip_factor, fn, "clip_factor")
    eps = check_max_norm(eps, fn, "eps")
    norm_type = check_norm_type(norm_type, fn)
    if isinstance(parameters, torch.Tensor):
        parameters = (parameters,)
    if (
        isinstance(parameters, (list, tuple))
        and _ops.agc_params is not None
        and norm_type > 0
        and not compiling()
        and _ops.agc_params(parameters, clip_factor, eps, norm_type)
    ):
        return  # the eager hot path: done in C++ (csrc/eager_params.h)
    params = as_list(parameters, fn, "parameters", warn_empty_generator=True)
    for i, p in enumerate(params):
        check_tensor(p, i, fn, "parameters")
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    check_grads(grads, fn)
    for p in params:
        if not (p.is_floating_point() or p.is_complex()) or p.layout != torch.strided:
            raise TypeError(f"fastclip.{fn}: parameters must be dense floating point, got {p.dtype} {p.layout}")
    with torch.no_grad():
        for positions, gs in positions_by_device(grads).values():
            ps = [params[i].detach() for i in positions]
            if runs_fused(gs + ps, gs[0].device, norm_type):
                _ops.adaptive_clip_grad_(ps, gs, clip_factor, eps, norm_type)
            else:
                _reference.adaptive_clip_grad_(ps, gs, clip_factor, eps, norm_type)
