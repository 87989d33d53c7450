"""torch's Adam and AdamW with the global-norm gradient clip inside the step.

    opt = fastclip.optim.AdamW(model.parameters(), lr=3e-4, max_grad_norm=1.0)
    loss.backward()
    opt.step()        # = clip_grad_norm_(params, 1.0) + AdamW(fused=True).step(), in one op
    opt.grad_norm     # this step's pre-clip norm: a 0-dim tensor, nothing read back

Data path: step() gathers every param with a grad, its state and its group's
hyperparameters into one call of torch.ops.fastclip.adam_step_ (schema:
csrc/ops.cpp; kernels: csrc/cpu/adam_cpu.cpp, csrc/cuda/adam_cuda.cpp). That
op computes the global norm of all grads in one read (the norm
fastclip.clip_grad_norm_ computes, bitwise on the CPU), then updates params
and moments with each grad multiplied by the clip coefficient as it is read:
the grads are read twice, params and moments read and written once, against
three more grad passes for a clip followed by torch's fused step. On CUDA the
two phases are one cooperative launch with a grid barrier between them, and
the step counts live on the device, so the step can be captured in a CUDA
graph.

The update is torch's fused Adam/AdamW's (csrc/adam_math.h), the state is
torch's (step, exp_avg, exp_avg_sq, max_exp_avg_sq; step a float32 tensor on
the param's device, as with fused=True), so state_dict() and
load_state_dict() go both ways between these classes and torch's.
Differences from clip_grad_norm_ + step, all deliberate:
  - the grads are left as they were (the clip is applied to the update, not
    stored), where clip_grad_norm_ scales them in place;
  - foreach, fused and capturable are accepted and stored, but the fused op
    always runs (it is capturable); differentiable=True is refused;
  - amsgrad, maximize and decoupled weight decay must be the same in every
    param group (one kernel, one set of switches);
  - GradScaler: the scale and found_inf it sets are applied inside the op
    (grads divided by the scale before the norm, the whole step skipped on the
    device when found_inf is 1), as torch's fused optimizers do.
Where the op cannot run (the extension not built, params on several devices
or on a device without kernels, complex params, norm_type <= 0) the step is
fastclip.clip_grad_norm_ followed by torch's own step, which does clip the
grads in place.
"""

import functools

import torch
import torch.optim.optimizer as _optimizer

from . import _ops
from ._grads import FUSED_DTYPES, check_max_norm, check_norm_type, compiling
from .clip import clip_grad_norm_, get_total_norm

__all__ = ["Adam", "AdamW"]

_ABSENT = object()


class _ClipInStep:
    """The step of fastclip's Adam and AdamW (first in their MRO, before torch's class)."""

    _torch_class: type  # the torch optimizer this one extends: its step is the fallback

    def _init_clip(self, max_grad_norm, norm_type, differentiable):
        name = f"optim.{type(self).__name__}"
        if differentiable:
            raise ValueError(f"fastclip.{name}: differentiable=True is not supported (the step is one fused op)")
        self.max_grad_norm = None if max_grad_norm is None else check_max_norm(max_grad_norm, name, "max_grad_norm")
        self.norm_type = check_norm_type(norm_type, name)
        # The pre-clip global norm of the last step, a 0-dim tensor on the params' device.
        self.grad_norm = None
        # GradScaler then hands its scale and found_inf to step() (applied on the device)
        # instead of unscaling the grads itself and reading found_inf back to the host.
        self._step_supports_amp_scaling = True

    def _step(self, closure=None):
        """Perform a single optimization step: the global norm of all grads, then the update
        with every grad multiplied by ``min(max_grad_norm / (norm + 1e-6), 1)`` (by 1 when
        ``max_grad_norm`` is None). Sets ``self.grad_norm`` to the pre-clip norm.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        norm = None
        if _ops.adam_groups is not None and self.norm_type > 0 and not compiling():
            # The hot path: groups, grads and state read in C++ (csrc/eager_adam.h); None
            # where it does not apply (first step, a tensor lr, ...): then the Python path.
            norm = _ops.adam_groups(
                self.param_groups,
                self.state,
                self.max_grad_norm,
                self.norm_type,
                getattr(self, "grad_scale", None),
                getattr(self, "found_inf", None),
            )
        if norm is None:
            with torch.no_grad():
                norm = self._python_step()
        self.grad_norm = norm
        return loss

    def _python_step(self):
        args = self._fused_args()
        if args is None:
            return self._reference_step()
        if not args:  # no grads: nothing to update, a zero norm (as clip_grad_norm_ returns)
            return torch.tensor(0.0)
        return _ops.adam_step_(*args)

    def _fused_args(self):
        """adam_step_'s arguments (an empty tuple: no param has a grad), or None where the
        fused op does not run. Initialises the state of params seen for the first time."""
        if not _ops.LOADED or not self.norm_type > 0:
            return None
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, groups = [], [], [], [], [], [], []
        lrs, beta1s, beta2s, epss, weight_decays, lr_values = [], [], [], [], [], []
        device = dtype = None
        switches = _switches(self.param_groups[0])
        for group in self.param_groups:  # before any state is made
            if _switches(group) != switches:
                raise ValueError(
                    f"fastclip.optim.{type(self).__name__}: amsgrad, maximize and decoupled_weight_decay must be "
                    f"the same in every param group (one fused update), got {switches} and {_switches(group)}"
                )
        for index, group in enumerate(self.param_groups):
            amsgrad = group["amsgrad"]
            state_of = self.state
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
                if device is None:
                    device, dtype = p.device, g.dtype
                    if not _ops.has_kernels(device.type):
                        return None
                elif p.device != device:
                    return None
                if p.dtype not in FUSED_DTYPES:
                    return None
                if g.dtype != dtype:
                    dtype = torch.promote_types(dtype, g.dtype)
                state = state_of[p]
                if not state:
                    _init_state(state, p, amsgrad)
                params.append(p)
                grads.append(g)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if amsgrad:
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"])
                steps.append(state["step"])
                groups.append(index)
            beta1, beta2 = group["betas"]
            lr_values.append(group["lr"])
            beta1s.append(float(beta1))
            beta2s.append(float(beta2))
            epss.append(float(group["eps"]))
            weight_decays.append(float(group["weight_decay"]))
        if not params:
            return ()
        lr_tensors = []
        if any(isinstance(lr, torch.Tensor) for lr in lr_values):  # read by the op, on the device
            lr_tensors = [
                lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float64) for lr in lr_values
            ]
            lrs = [0.0] * len(lr_values)  # unused: lr_tensors are read instead
        else:
            lrs = [float(lr) for lr in lr_values]
        amsgrad, maximize, decoupled = switches
        return (
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            groups,
            lrs,
            beta1s,
            beta2s,
            epss,
            weight_decays,
            lr_tensors,
            amsgrad,
            maximize,
            decoupled,
            self.max_grad_norm,
            self.norm_type,
            getattr(self, "grad_scale", None),
            getattr(self, "found_inf", None),
            dtype,
        )

    def _reference_step(self):
        """fastclip's clip, then torch's own step: for what the fused op does not take. A
        GradScaler's scale and found_inf are applied here, as the fused op would: the grads
        unscaled in place first, and no step where found_inf is set (read on the host)."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if found_inf is not None and found_inf.item():
            return get_total_norm([p.grad for p in params], self.norm_type)
        if grad_scale is not None:
            for p in params:
                p.grad.div_(grad_scale.to(p.grad.device))
        if self.max_grad_norm is None:
            norm = get_total_norm([p.grad for p in params], self.norm_type)
        else:
            norm = clip_grad_norm_(params, self.max_grad_norm, self.norm_type)
        saved = {name: self.__dict__.pop(name, _ABSENT) for name in ("grad_scale", "found_inf")}
        try:  # without them: torch's unfused step refuses them, and they are applied already
            _unhooked_step(self._torch_class)(self)
        finally:
            self.__dict__.update({name: value for name, value in saved.items() if value is not _ABSENT})
        return norm

    def load_state_dict(self, state_dict):
        """torch's load_state_dict; then every step count is put where the fused op keeps it
        (a float32 tensor on its param's device), whatever optimizer saved it."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def _hooks_only_when_used(step):
    """step wrapped in torch's hooks-and-profiler wrapper (Optimizer.profile_hook_step) only
    when a step hook is registered or a profiler runs: its record_function costs ~7 µs per
    step on a CPU, a third of this step's whole cost on a small model. `hooked` tells
    torch.optim.Optimizer not to wrap it again."""
    hooked = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, closure=None):
        if (
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _optimizer._global_optimizer_pre_hooks
            or _optimizer._global_optimizer_post_hooks
            or torch._C._autograd._profiler_enabled()
        ):
            return hooked(self, closure)
        return step(self, closure)

    wrapper.hooked = True
    return wrapper


def _switches(group):
    return (bool(group["amsgrad"]), bool(group["maximize"]), bool(group["decoupled_weight_decay"]))


def _init_state(state, p, amsgrad):
    """torch's Adam state with fused=True: the step a float32 tensor on the param's device."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if amsgrad:
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _unhooked_step(torch_class):
    """torch_class.step without the hooks wrapper torch.optim.Optimizer puts around it (ours
    already ran the step hooks once)."""
    step = torch_class.step
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    return step


class Adam(_ClipInStep, torch.optim.Adam):
    """torch.optim.Adam with the global-norm gradient clip inside the step (see the module
    docstring). The arguments of torch.optim.Adam (passed on to it as given), plus:

    Args:
        max_grad_norm (float, optional, keyword-only): clip the grads' global norm to this, as
            ``clip_grad_norm_(params, max_grad_norm, norm_type)`` before the step would;
            None: no clip (the norm is still computed, into ``grad_norm``). Default: None
        norm_type (float or 'inf', keyword-only): the p-norm of the clip. Default: 2.0

    Attributes:
        grad_norm (Tensor): the last step's pre-clip global norm (None before the first step)
    """

    _torch_class = torch.optim.Adam
    step = _hooks_only_when_used(_ClipInStep._step)

    def __init__(self, params, *args, max_grad_norm=None, norm_type=2.0, **kwargs):
        torch.optim.Adam.__init__(self, params, *args, **kwargs)
        self._init_clip(max_grad_norm, norm_type, self.defaults["differentiable"])


class AdamW(_ClipInStep, torch.optim.AdamW):
    """torch.optim.AdamW with the global-norm gradient clip inside the step (see the module
    docstring). The arguments of torch.optim.AdamW, plus ``max_grad_norm`` and ``norm_type``
    (keyword-only) as in fastclip.optim.Adam; the norm of the last step is ``grad_norm``."""

    _torch_class = torch.optim.AdamW
    step = _hooks_only_when_used(_ClipInStep._step)

    def __init__(self, params, *args, max_grad_norm=None, norm_type=2.0, **kwargs):
        torch.optim.AdamW.__init__(self, params, *args, **kwargs)
        self._init_clip(max_grad_norm, norm_type, self.defaults["differentiable"])
