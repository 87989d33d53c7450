"""Plain references of the two papers' algorithms, host-side with .item(), as their
public implementations are written. The tests compare fastclip.AutoClip / ZClip
against them; bench/bench_adaptive.py times them.

AutoClip: Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient
Clipping for Source Separation Networks", MLSP 2020 (Algorithm 1): append the
current norm to the history of all norms, clip to the p-th percentile of it
(numpy.percentile) with torch's clip_grad_norm_.

ZClip: Kumar, Owen, Roy Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for
LLM Pre-Training", 2025 (Algorithm 1, z-score mode with adaptive scaling):
warm-up collection, EMA of mean and variance, z-score spike test, clip to
mean + z_thresh * std / (z / z_thresh), EMA fed with the clipped value.
"""

import numpy as np
import torch


def host_norm(params):
    """The global L2 norm, read back to the host (the references' one sync per step)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, 2.0).item()


class ReferenceAutoClip:
    def __init__(self, percentile=10.0, history=None):
        self.percentile, self.history = percentile, history
        self.norms = []

    def step(self, params):
        """Clip in place; returns (pre-clip norm, threshold) as host floats."""
        norm = host_norm(params)
        self.norms.append(norm)
        window = self.norms if self.history is None else self.norms[-self.history :]
        threshold = float(np.percentile(window, self.percentile))
        torch.nn.utils.clip_grad_norm_(params, threshold)
        return norm, threshold


class ReferenceZClip:
    def __init__(
        self, alpha=0.97, z_thresh=2.5, warmup_steps=25, max_grad_norm=None, eps=1e-6, update_ema_with_raw_norm=False
    ):
        self.alpha, self.z_thresh, self.warmup_steps = alpha, z_thresh, warmup_steps
        self.max_grad_norm, self.eps = max_grad_norm, eps
        # A deliberately wrong variant, for the tests' negative control.
        self.update_ema_with_raw_norm = update_ema_with_raw_norm
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def step(self, params):
        """Clip in place; returns (pre-clip norm, threshold); threshold inf = not clipped."""
        norm = host_norm(params)
        cap = float("inf") if self.max_grad_norm is None else self.max_grad_norm
        if not self.initialized:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized, self.buffer = True, []
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            return norm, cap
        std = self.var**0.5
        z = (norm - self.mean) / (std + self.eps)
        clip_val = None
        if z > self.z_thresh:
            eta = z / self.z_thresh
            clip_val = self.mean + (self.z_thresh * std) / eta
        limit = clip_val if clip_val is not None else norm
        if self.max_grad_norm is not None:
            limit = min(limit, self.max_grad_norm)
        if norm > limit:
            coef = limit / (norm + 1e-6)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        x = norm if (clip_val is None or self.update_ema_with_raw_norm) else clip_val
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return norm, (cap if clip_val is None else min(clip_val, cap))
