"""Adaptive clipping thresholds kept on the device: AutoClip and ZClip.

A step of either clipper, called as `norm = clipper(parameters)` after
backward(), is:

    global norm        one fused op per device (fastclip/_grads.py)
    threshold, coef    a few tensor ops on the state (history buffer, EMA mean/var)
    scale_             one fused op per device (no stores when coef is exactly 1)
    state update       in-place copies into the same state tensors

Nothing is read back to the host (unless nonfinite="error"), so a step can be
compiled with torch.compile(fullgraph=True) or captured in a CUDA graph. (On
CPU in eager mode the state is host memory already and the same step runs on
Python floats instead, see _call_on_host: cheaper there, and no sync to avoid.) The
state lives in float64 1-D tensors on the grads' device (allocated on the
first call, then only ever updated in place, so a CUDA graph and
optimizer.found_inf keep pointing at the right memory). Scalars of the state
are 1-element tensors, not 0-dim: under torch.compile (aot_eager, torch
2.13) an in-place copy_ into a captured 0-dim float64 CPU tensor is silently
lost (float32, int64 and 1-element tensors are fine). The papers' public
implementations read the norm with .item() every step; tests/test_adaptive.py
holds such references and checks these clippers against them.
"""

import math
from collections.abc import Iterable

import torch

from ._grads import (
    EPS,
    check_grads,
    check_max_norm,
    check_norm_type,
    clip_coef,
    combine_norms,
    device_norms,
    grads_of,
    group_by_device,
    raise_if_nonfinite,
    result_dtype,
    scale_groups,
)
from .nonfinite import check_policy, nonfinite_flag, skip_if_nonfinite

_STATE_DTYPE = torch.float64  # thresholds match an fp64 (.item()) reference to rounding
_STD_EPS = 1e-6  # ZClip's z = (norm - mean) / (std + eps)


def _check_int(value, name, fn, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"fastclip.{fn}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_open_interval(value, name, fn, lo, hi, hi_closed=False):
    x = float(value)
    if not (lo < x < hi or (hi_closed and x == hi)):
        interval = f"({lo}, {hi}]" if hi_closed else f"({lo}, {hi})"
        raise ValueError(f"fastclip.{fn}: {name} must be in {interval}, got {value!r}")
    return x


class _AdaptiveClipper:
    """The shared step: norm, threshold from state, scale, state update."""

    name = "adaptive"

    def __init__(self, norm_type, nonfinite):
        self.norm_type = check_norm_type(norm_type, self.name)
        self.nonfinite = check_policy(nonfinite, self.name)
        self._state = None  # {name: tensor}, allocated on the first call
        self.found_inf = None  # 0-dim float32: 1.0 when the last norm was inf/NaN
        self._threshold = None  # (1,) float64: the max norm the last call clipped to (inf: none)

    @property
    def threshold(self):
        """The max norm the last call clipped to (inf: no clipping), a 0-dim float64 view
        on the device (None before the first call)."""
        return None if self._threshold is None else self._threshold.reshape(())

    # -- subclasses ------------------------------------------------------------------
    def _new_state(self, device):
        raise NotImplementedError

    def _step(self, norm, state):
        """(threshold, coef, new state) from a float64 (1,) norm; pure tensor ops."""
        raise NotImplementedError

    def _host_step(self, norm, state, commit):
        """The same step on host floats, for CPU state in eager mode: (threshold, coef);
        writes the new state into the (CPU) state tensors `state` if `commit`."""
        raise NotImplementedError

    def _before_step(self):
        """Host-side bookkeeping that needs no device value (AutoClip's buffer growth)."""

    def _hyperparameters(self):
        raise NotImplementedError

    # -- the step --------------------------------------------------------------------
    def __call__(self, parameters: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
        """Clip the grads of `parameters` in place; returns the pre-clip global norm (0-dim,
        the grads' dtype, first grad's device), as clip_grad_norm_ does. Params without
        grads are skipped; with no grads at all nothing changes and tensor(0.) is returned."""
        grads = grads_of(parameters, self.name, warn_empty_generator=True)
        if not grads:
            return torch.tensor(0.0)
        check_grads(grads, self.name)
        with torch.no_grad():
            groups = group_by_device(grads)
            device = grads[0].device
            norm = combine_norms(device_norms(groups, self.norm_type), self.norm_type, device)
            if self.nonfinite == "error":
                raise_if_nonfinite(norm, self.norm_type, result_dtype(grads))  # before grads or state are touched
            self._ensure_state(device)
            self._before_step()
            if device.type == "cpu" and self._HOST_PATH_ON_CPU and not torch.compiler.is_compiling():
                self._call_on_host(norm, groups)
                return norm.to(result_dtype(grads))
            norm64 = norm.to(_STATE_DTYPE).reshape(1)
            threshold, coef, new_state = self._step(norm64, self._state)
            if self.nonfinite == "skip":
                finite = torch.isfinite(norm64)
                coef = skip_if_nonfinite(coef, norm64)
                for key, old in self._state.items():
                    old.copy_(torch.where(finite, new_state[key], old))
            else:
                for key, old in self._state.items():
                    old.copy_(new_state[key])
            self.found_inf.copy_(nonfinite_flag(norm))
            self._threshold.copy_(threshold)
            scale_groups(groups, coef.reshape(()))
            return norm.to(result_dtype(grads))

    # On CPU the state already is host memory: reading it is no sync, and ~50 one-element
    # tensor ops (~3 us each in eager mode) would cost more than the clip. The same algorithm
    # on Python floats then runs instead (tests check both paths against the references).
    _HOST_PATH_ON_CPU = True

    def _call_on_host(self, norm, groups):
        n = float(norm)
        finite = math.isfinite(n)
        skip = self.nonfinite == "skip" and not finite
        threshold, coef = self._host_step(n, self._state, commit=not skip)
        self.found_inf.fill_(0.0 if finite else 1.0)
        self._threshold.fill_(threshold)
        if not skip and coef != 1.0:  # a coefficient of exactly 1 stores nothing on either path
            scale_groups(groups, torch.tensor(coef, dtype=_STATE_DTYPE))

    def _ensure_state(self, device):
        if self._state is None:
            self._state = self._new_state(device)
        elif self._state["count"].device != device:  # loaded elsewhere, or the grads moved
            self._state = {k: v.to(device) for k, v in self._state.items()}
        if self.found_inf is None or self.found_inf.device != device:
            self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
            self._threshold = torch.full((1,), math.inf, dtype=_STATE_DTYPE, device=device)

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Hyperparameters and copies of the state tensors (None before the first call)."""
        state = None if self._state is None else {k: v.detach().clone() for k, v in self._state.items()}
        return {"hyperparameters": self._hyperparameters(), "state": state, **self._host_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue exactly where `state_dict` was taken. The hyperparameters must match."""
        if state_dict.get("hyperparameters") != self._hyperparameters():
            raise ValueError(
                f"fastclip.{self.name}.load_state_dict: hyperparameters {state_dict.get('hyperparameters')} "
                f"do not match this clipper's {self._hyperparameters()}"
            )
        state = state_dict["state"]
        if state is None:
            self._state = None
        elif self._state is not None and all(self._state[k].shape == v.shape for k, v in state.items()):
            for k, v in state.items():  # in place: a captured graph and optimizer.found_inf stay valid
                self._state[k].copy_(v)
        else:  # moved to the grads' device on the next call
            self._state = {k: v.detach().clone() for k, v in state.items()}
        self._load_host_state(state_dict)

    def _host_state(self):
        return {}

    def _load_host_state(self, state_dict):
        pass


class AutoClip(_AdaptiveClipper):
    """AutoClip (Seetharaman et al., 2020): clip to the `percentile`-th percentile of
    every gradient norm seen so far, the current one included.

    `history=None` keeps all norms, as the paper does: the device buffer doubles in
    eager mode when full (the host counts calls; no device value is read). Under
    torch.compile or CUDA-graph capture the buffer cannot grow, so pass a fixed
    `history=N`: the last N norms (a ring buffer). Each step sorts the buffer on the
    device (O(N log N)); the percentile interpolates linearly between the two
    nearest ranks, as numpy.percentile's default does.

    norm = clipper(parameters); grads are scaled by min(t / (norm + 1e-6), 1) with t
    the percentile (torch's clip_grad_norm_ formula). `threshold` is t, `found_inf`
    the non-finite flag (see fastclip/nonfinite.py for `nonfinite`).
    """

    name = "AutoClip"
    _INITIAL_CAPACITY = 1024

    def __init__(
        self, percentile: float = 10.0, history: int | None = None, *, norm_type: float = 2.0, nonfinite: str = "torch"
    ):
        self.percentile = _check_open_interval(percentile, "percentile", self.name, 0.0, 100.0, hi_closed=True)
        self.history = None if history is None else _check_int(history, "history", self.name, 1)
        super().__init__(norm_type, nonfinite)
        self._calls = 0  # host count of steps (an upper bound on the norms held), for growth only

    def _hyperparameters(self):
        return {"percentile": self.percentile, "history": self.history, "norm_type": self.norm_type}

    def _host_state(self):
        return {"calls": self._calls}

    def _load_host_state(self, state_dict):
        self._calls = int(state_dict.get("calls", 0))

    def _new_state(self, device):
        capacity = self.history or self._INITIAL_CAPACITY
        # Unused slots hold +inf: they sort after every real norm.
        return {
            "count": torch.zeros(1, dtype=torch.int64, device=device),
            "norms": torch.full((capacity,), math.inf, dtype=_STATE_DTYPE, device=device),
        }

    def _before_step(self):
        if self.history is not None:
            return
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            raise RuntimeError(
                "fastclip.AutoClip: history=None grows its buffer on the host, which a compiled or "
                "captured step cannot do; pass a fixed history=N (the last N norms) instead"
            )
        self._calls += 1
        norms = self._state["norms"]
        if self._calls > norms.numel():  # the next norm may not fit: double, on the device
            grown = torch.full(
                (2 * max(norms.numel(), self._calls - 1),), math.inf, dtype=norms.dtype, device=norms.device
            )
            grown[: norms.numel()].copy_(norms)
            self._state["norms"] = grown

    def _host_step(self, norm, state, commit):
        count, norms = int(state["count"]), state["norms"]
        slot, held = count % norms.numel(), min(count + 1, norms.numel())
        if commit:
            norms[slot] = norm
            state["count"].fill_(count + 1)
            window = norms[:held]  # slots fill from 0, so the held norms are the first ones
        else:
            window = norms[:held].clone()
            window[slot] = norm
        threshold = _host_percentile(window, self.percentile)
        return threshold, clip_coef(threshold, norm)

    def _step(self, norm, state):
        count, norms = state["count"], state["norms"]
        capacity = norms.numel()
        slot = torch.remainder(count, capacity)
        norms = norms.scatter(0, slot, norm)
        held = torch.clamp(count + 1, max=capacity).to(_STATE_DTYPE)
        threshold = _percentile(norms, held, self.percentile)
        return threshold, clip_coef(threshold, norm), {"count": count + 1, "norms": norms}


def _host_percentile(values, percentile):
    """numpy.percentile(values, percentile) (method 'linear') of a 1-D CPU tensor, as a
    float: one sort, then the two ranks it needs on the host."""
    ranked = torch.sort(values).values
    if math.isnan(ranked[-1]):  # NaN sorts last; numpy returns NaN when any value is NaN
        return math.nan
    q = percentile / 100.0
    virtual = (ranked.numel() - 1) * q  # numpy's virtual index for 'linear'
    lo = math.floor(virtual)
    gamma = virtual - lo
    pair = ranked[lo : lo + 2].tolist()  # ranked[lo], and ranked[hi] with hi = min(lo + 1, last)
    a, b = pair[0], pair[-1]
    diff = b - a
    return b - diff * (1.0 - gamma) if gamma >= 0.5 else a + diff * gamma


def _percentile(buffer, held, percentile):
    """numpy.percentile(buffer[valid], percentile) (method 'linear') on the device, as a
    (1,) tensor, where the `held` ((1,) tensor) valid values are wherever they are and
    every other slot is +inf."""
    q = percentile / 100.0
    ranked = torch.sort(buffer).values  # +inf padding (and NaN) sort last
    virtual = (held - 1.0) * q  # numpy's virtual index for 'linear'
    below = torch.floor(virtual)
    gamma = virtual - below
    lo = below.to(torch.int64)
    hi = torch.minimum(lo + 1, held.to(torch.int64) - 1)
    # gather with (1,) indices: ranked[lo] with a 0-dim tensor index would read it back to the host
    a, b = ranked.gather(0, lo), ranked.gather(0, hi)
    diff = b - a
    # numpy's _lerp: from the nearer end, so gamma = 1 gives b exactly.
    value = torch.where(gamma >= 0.5, b - diff * (1.0 - gamma), a + diff * gamma)
    # numpy returns NaN when any held value is NaN (+inf padding is never NaN).
    return torch.where(torch.isnan(buffer).any(), torch.full_like(value, math.nan), value)


class ZClip(_AdaptiveClipper):
    """ZClip (Kumar et al., 2025): clip norms whose z-score against an EMA of the norm's
    mean and variance exceeds `z_thresh`.

    The first `warmup_steps` norms are collected (grads clipped only to
    `max_grad_norm`, if given, with torch's formula); then mean and (population)
    variance start from them. After that, with std = sqrt(var) and
    z = (norm - mean) / (std + 1e-6): if z > z_thresh the norm is a spike and is
    clipped to t = mean + z_thresh * std / (z / z_thresh) (the "adaptive scaling"
    of the reference implementation), capped by `max_grad_norm`; the EMA is then
    updated with t (spike) or the norm: mean <- alpha mean + (1 - alpha) x,
    var <- alpha var + (1 - alpha) (x - mean)^2 with the new mean. A norm above the
    threshold is scaled by t / (norm + 1e-6); otherwise the grads are not touched.
    """

    name = "ZClip"

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_grad_norm: float | None = None,
        *,
        norm_type: float = 2.0,
        nonfinite: str = "torch",
    ):
        self.alpha = _check_open_interval(alpha, "alpha", self.name, 0.0, 1.0)
        z = float(z_thresh)
        if not (z > 0 and math.isfinite(z)):
            raise ValueError(f"fastclip.{self.name}: z_thresh must be a positive finite number, got {z_thresh!r}")
        self.z_thresh = z
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", self.name, 1)
        self.max_grad_norm = (
            None if max_grad_norm is None else check_max_norm(max_grad_norm, self.name, "max_grad_norm")
        )
        super().__init__(norm_type, nonfinite)

    def _hyperparameters(self):
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "max_grad_norm": self.max_grad_norm,
            "norm_type": self.norm_type,
        }

    def _new_state(self, device):
        return {
            "count": torch.zeros(1, dtype=torch.int64, device=device),
            "warmup_norms": torch.zeros(self.warmup_steps, dtype=_STATE_DTYPE, device=device),
            "mean": torch.zeros(1, dtype=_STATE_DTYPE, device=device),
            "var": torch.zeros(1, dtype=_STATE_DTYPE, device=device),
        }

    def _host_step(self, norm, state, commit):
        count, mean, var = int(state["count"]), float(state["mean"]), float(state["var"])
        w, zt, alpha = self.warmup_steps, self.z_thresh, self.alpha
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        if count < w:
            coef = 1.0 if self.max_grad_norm is None else clip_coef(self.max_grad_norm, norm)
            if commit:
                state["warmup_norms"][count] = norm
                if count == w - 1:
                    collected = state["warmup_norms"].tolist()
                    mean = sum(collected) / w
                    var = sum((x - mean) ** 2 for x in collected) / w
            threshold = cap
        else:
            std = var**0.5
            z = (norm - mean) / (std + _STD_EPS)
            spike = z > zt
            clip_to = mean + (zt * std) / (z / zt) if spike else math.nan
            limit = min(clip_to if spike else norm, cap)
            coef = limit / (norm + EPS) if norm > limit else 1.0  # the reference's test, torch's formula
            x = clip_to if spike else norm
            mean = alpha * mean + (1.0 - alpha) * x
            var = alpha * var + (1.0 - alpha) * (x - mean) ** 2
            threshold = min(clip_to, cap) if spike else cap
        if commit:
            state["count"].fill_(count + 1)
            state["mean"].fill_(mean)
            state["var"].fill_(var)
        return threshold, coef

    def _step(self, norm, state):
        count, warm, mean, var = state["count"], state["warmup_norms"], state["mean"], state["var"]
        w, zt, alpha = self.warmup_steps, self.z_thresh, self.alpha
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        one = torch.ones_like(norm)

        # Warm-up: collect the norm; the last warm-up step starts the EMA from the collection.
        in_warmup = count < w
        slot = torch.clamp(count, max=w - 1)
        warm = warm.scatter(0, slot, torch.where(in_warmup, norm, warm.gather(0, slot)))
        starts_now = count == w - 1
        warm_mean = warm.mean()
        warm_var = torch.square(warm - warm_mean).mean()
        warm_coef = one if self.max_grad_norm is None else clip_coef(self.max_grad_norm, norm)

        # After warm-up: z-score against the EMA (the reference's order of operations).
        std = torch.sqrt(var)
        z = (norm - mean) / (std + _STD_EPS)
        spike = torch.logical_and(torch.logical_not(in_warmup), z > zt)
        clip_to = mean + (zt * std) / (z / zt)
        limit = torch.where(spike, clip_to, norm)
        if self.max_grad_norm is not None:
            limit = torch.minimum(limit, torch.full_like(limit, cap))
        adaptive_coef = torch.where(norm > limit, limit / (norm + EPS), one)
        ema_in = torch.where(spike, clip_to, norm)
        ema_mean = alpha * mean + (1.0 - alpha) * ema_in
        ema_var = alpha * var + (1.0 - alpha) * torch.square(ema_in - ema_mean)

        coef = torch.where(in_warmup, warm_coef, adaptive_coef)
        capped = torch.full_like(norm, cap)
        threshold = torch.where(spike, torch.minimum(clip_to, capped), capped)
        new_mean = torch.where(in_warmup, torch.where(starts_now, warm_mean, mean), ema_mean)
        new_var = torch.where(in_warmup, torch.where(starts_now, warm_var, var), ema_var)
        return threshold, coef, {"count": count + 1, "warmup_norms": warm, "mean": new_mean, "var": new_var}
