"""What to do when the gradient norm is inf or NaN: one policy for
clip_grad_norm_ and the adaptive thresholds (fastclip/thresholds.py).

    "torch"  torch's behaviour (the default): scale by the coefficient torch's
             formula gives (a NaN norm makes every grad NaN, an inf norm zeroes
             them); the adaptive clippers also feed the norm into their state,
             as their papers' algorithms do.
    "error"  torch's error_if_nonfinite=True: RuntimeError before any grad (or
             clipper state) is touched. Reads the norm back to the host.
    "skip"   sync-free: the grads and the clipper state are left untouched and
             a 0-dim float32 `found_inf` tensor (1.0 / 0.0) says so, on the
             device. torch's fused optimizers skip their step on the device
             when it is 1.0 (docs/thresholds.md, "Non-finite gradients").
"""

import torch

POLICIES = ("torch", "error", "skip")


def check_policy(nonfinite, fn):
    if nonfinite not in POLICIES:
        raise ValueError(f"fastclip.{fn}: nonfinite must be one of {POLICIES}, got {nonfinite!r}")
    return nonfinite


def check_found_inf(found_inf, fn):
    """A caller-provided found_inf must be a 0-dim floating tensor we can write into."""
    if found_inf is None:
        return None
    if not isinstance(found_inf, torch.Tensor) or found_inf.dim() != 0 or not found_inf.is_floating_point():
        raise TypeError(f"fastclip.{fn}: found_inf must be a 0-dim floating-point tensor, got {found_inf!r}")
    return found_inf


def nonfinite_flag(norm):
    """1.0 where the norm is inf or NaN, else 0.0: a float32 0-dim tensor on the norm's
    device, the dtype torch's fused optimizers and GradScaler use for found_inf."""
    return torch.logical_not(torch.isfinite(norm)).to(torch.float32)


def skip_if_nonfinite(coef, norm):
    """The coefficient, or exactly 1 where the norm is non-finite (fastclip's scale_
    then stores nothing, so the grads are bitwise untouched)."""
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
