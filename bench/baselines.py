"""What the benchmarks time fastclip against, besides torch.nn.utils' own functions:
the plain-torch loops a user writes today. (The tests' oracles live in tests/, the
library's own plain-torch fallback in fastclip/_reference.py.)

- per-layer clipping: torch's clip_grad_norm_ called once per parameter;
- AGC: timm's adaptive_clip_grad loop (unit norms of weight and grad, masked rescale);
- AutoClip and ZClip: the papers' algorithms as their public code runs them, the norm
  read back with .item() every step and the state in Python.
"""

import numpy as np
import torch


def torch_per_layer_clip_(params, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Each parameter's grad clipped by its own norm; returns the pre-clip norms, stacked."""
    return torch.stack([torch.nn.utils.clip_grad_norm_([p], max_norm, norm_type) for p in params])


def torch_adaptive_clip_grad_(params, clip_factor: float = 0.01, eps: float = 1e-3, norm_type: float = 2.0) -> None:
    """AGC (Brock et al. 2021) as timm's adaptive_clip_grad writes it."""
    for p in params:
        g = p.grad
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        w_norm = torch.linalg.vector_norm(p.detach(), norm_type, dim=dims, keepdim=g.dim() > 1)
        g_norm = torch.linalg.vector_norm(g, norm_type, dim=dims, keepdim=g.dim() > 1)
        max_norm = w_norm.clamp(min=eps).mul_(clip_factor)
        g.detach().copy_(torch.where(g_norm < max_norm, g, g * (max_norm / g_norm.clamp(min=1e-6))))


def _host_norm(params):
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], 2.0).item()


class ItemAutoClip:
    """AutoClip (Seetharaman et al. 2020): clip to the percentile of the norm history."""

    def __init__(self, percentile=10.0, history=None):
        self.percentile, self.history, self.norms = percentile, history, []

    def __call__(self, params):
        self.norms.append(_host_norm(params))
        window = self.norms if self.history is None else self.norms[-self.history :]
        torch.nn.utils.clip_grad_norm_(params, float(np.percentile(window, self.percentile)))


class ItemZClip:
    """ZClip (Kumar et al. 2025), z-score mode with adaptive scaling, as its reference code."""

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup_steps=25):
        self.alpha, self.z_thresh, self.warmup_steps = alpha, z_thresh, warmup_steps
        self.buffer, self.mean, self.var = [], None, None

    def __call__(self, params):
        norm = _host_norm(params)
        if self.mean is None:
            self.buffer.append(norm)
            if len(self.buffer) == self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return
        std = self.var**0.5
        z = (norm - self.mean) / (std + 1e-6)
        x = norm
        if z > self.z_thresh:
            x = self.mean + (self.z_thresh * std) / (z / self.z_thresh)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(x / (norm + 1e-6))
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
