"""Clipping across processes with torch.distributed (docs/distributed.md).

Two kinds of distributed gradients reach fastclip's functions:

- DTensor grads (FSDP2 `fully_shard`, tensor parallel, 1-D or N-D meshes):
  each rank holds local shards of the full logical tensors;
- plain-tensor grads passed with `group=`: disjoint pieces of one logical set
  (ZeRO-style partitioned optimizers, pipeline stages), one piece per rank.

The global p-norm is a reduction of per-rank partials. On every rank the fused
op computes the norm of the local shards it must count, raised to the p-th
power here (sum of |g|^p; max |g| for inf); one all-reduce per set of ranks
(SUM, or MAX for inf) combines the partials; the p-th root, the coefficient and
the in-place scale of the local shards follow on every rank. Nothing is read
back to the host unless error_if_nonfinite=True, so the call stays usable in
overlapped and captured steps.

Replication is handled by counting, not by choosing groups: a DTensor shard
is counted only on the rank whose coordinate is 0 on every mesh dim where the
grad is replicated (its copies elsewhere add 0), so one all-reduce over all the
mesh's ranks sums each logical element exactly once, whatever the placements.
Grads on meshes (or a `group`) that span the same ranks share that all-reduce.

Collective contract: every rank of each mesh/group calls the function with the
same parameters (a rank whose grads are all None, or that passes no grads with
`group=`, still joins and contributes 0). error_if_nonfinite is decided on the
all-reduced norm, so every rank raises together and none is left waiting.
Plain grads without `group` are this rank's own (DDP grads are already equal on
every rank): they are added to the reduced partial locally, after the
all-reduce, and no collective is issued for them.
"""

import math
import sys

import torch
import torch.distributed as dist

from ._grads import (
    check_grads,
    check_tensor,
    clip_coef,
    device_norms,
    group_by_device,
    raise_if_nonfinite,
    result_dtype,
    scale_groups,
)


def dtensor_type():
    """DTensor, or None while torch.distributed.tensor has not been imported
    (then no DTensor can exist, and the check costs one dict lookup)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def any_dtensor(tensors, _modules=sys.modules):
    """Whether any of `tensors` (parameters or grads) is a DTensor. On the
    single-process hot path: one dict lookup while DTensor is not imported."""
    module = _modules.get("torch.distributed.tensor")
    if module is None:
        return False
    dtensor = module.DTensor
    return any(isinstance(t, dtensor) for t in tensors)


def _check_group(group, fn):
    if group is None:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"fastclip.{fn}: group= needs torch.distributed to be initialized")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"fastclip.{fn}: group must be a torch.distributed ProcessGroup, got {type(group).__name__}")


def _check_norm_type(norm_type, fn):
    if not norm_type > 0:
        raise NotImplementedError(
            f"fastclip.{fn}: norm_type={norm_type} is not supported for distributed gradients "
            "(DTensor grads or group=); use a norm_type > 0 or inf"
        )


# ---- where each grad's partial goes ---------------------------------------------


def _device_of(group=None, mesh=None):
    """The device a collective on this group/mesh takes tensors on."""
    if mesh is not None:
        device_type = mesh.device_type
    else:
        device_type = "cuda" if "nccl" in str(dist.get_backend(group)) else "cpu"
    if device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, device_type)
    return torch.device(device_type, module.current_device())


_mesh_ranks = {}  # DeviceMesh -> its sorted global ranks (the layout only: no process group kept)


def _mesh_reduction(mesh):
    """(ranks, groups, device) of an all-reduce over every rank of `mesh`."""
    ranks = _mesh_ranks.get(mesh)
    if ranks is None:
        ranks = _mesh_ranks[mesh] = tuple(sorted(mesh.mesh.flatten().tolist()))
    if mesh.ndim == 1:
        groups = [mesh.get_group(0)]
    elif len(ranks) == dist.get_world_size():
        groups = [dist.group.WORLD]
    else:  # a sub-mesh of N dims: summing over each dim in turn sums over all its ranks
        groups = [mesh.get_group(d) for d in range(mesh.ndim)]
    return ranks, groups, _device_of(mesh=mesh)


def _group_reduction(group):
    return tuple(sorted(dist.get_process_group_ranks(group))), [group], _device_of(group=group)


def _full_replicas_on_partial_dims(g):
    """A Partial grad's local values are not its values: sum them over the
    partial dims first (a collective; FSDP2 and TP normally give Shard grads)."""
    from torch.distributed.tensor import Replicate

    placements = [Replicate() if p.is_partial() else p for p in g.placements]
    return g.redistribute(g.device_mesh, placements)


_counts_here = {}  # (mesh, placements) -> whether this rank counts such a shard


def _counted_local(g, local):
    """The values of DTensor `g` (local shard `local`) that this rank counts, or
    None: a shard replicated over some mesh dims is counted at coordinate 0 there."""
    placements = g.placements
    if any(p.is_partial() for p in placements):
        g = _full_replicas_on_partial_dims(g)
        placements, local = g.placements, g.to_local()
    key = (g.device_mesh, placements)
    counts = _counts_here.get(key)
    if counts is None:
        coordinate = g.device_mesh.get_coordinate()
        counts = _counts_here[key] = all(c == 0 for c, p in zip(coordinate, placements) if p.is_replicate())
    return local if counts else None


class _Plan:
    """Every local tensor of a call, sorted by the all-reduce its partial joins."""

    def __init__(self):
        self.reductions = {}  # ranks -> [groups, device, counted local tensors]
        self.own = []  # plain grads without group: counted here, no collective
        self.locals = []  # every local tensor (to check and to scale)
        self.meshes = []  # distinct meshes of the DTensors seen
        self.mesh_counted = {}  # mesh -> the counted list of its reduction, None off the mesh

    def join(self, reduction):
        ranks, groups, device = reduction
        return self.reductions.setdefault(ranks, [groups, device, []])[2]

    def add(self, param, grad, group):
        """`param` decides the reduction (so a None grad still joins it)."""
        dtensor = dtensor_type()
        if dtensor is not None and isinstance(param, dtensor):
            mesh = param.device_mesh
            if mesh not in self.mesh_counted:
                self.meshes.append(mesh)
                in_mesh = mesh.get_coordinate() is not None  # if not, nothing to count or join
                self.mesh_counted[mesh] = self.join(_mesh_reduction(mesh)) if in_mesh else None
            counted = self.mesh_counted[mesh]
            if counted is None:
                return
            if grad is not None:
                local = grad.to_local()
                self.locals.append(local)
                local = _counted_local(grad, local)
                if local is not None:
                    counted.append(local)
        elif group is not None:
            counted = self.join(_group_reduction(group))
            if grad is not None:
                self.locals.append(grad)
                counted.append(grad)
        elif grad is not None:
            self.locals.append(grad)
            self.own.append(grad)


def _plan(pairs, group):
    """pairs: (param, grad or None). DTensor grads of plain params are not expected."""
    plan = _Plan()
    for param, grad in pairs:
        plan.add(param, grad, group)
    if group is not None:
        plan.join(_group_reduction(group))  # joins even when this rank passes nothing
    return plan


# ---- the norm ------------------------------------------------------------------


def _partial(tensors, norm_type, device):
    """fp64 sum of |g|^p (max |g| for inf) over `tensors`, from the fused
    per-device norms (accurate, fp32 or fp64) raised to the p-th power in fp64:
    for any fp32 norm (< 2^128) that stays in fp64's range up to p = 7; the
    rounding of the fp32 norm costs p * 2^-24 relative, far below the fp32
    rounding of the result."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = device_norms(group_by_device(tensors), norm_type)
    norms = torch.stack([n.to(device, torch.float64) for n in norms])
    if math.isinf(norm_type):
        return norms.max()  # NaN-propagating
    return norms.pow(norm_type).sum()


def _all_reduce(partial, groups, norm_type):
    """Sum (max for inf) of `partial` over every rank of `groups`, no host sync."""
    if math.isinf(norm_type):
        # MAX reductions need not propagate NaN (gloo's does not): send a NaN flag beside it.
        isnan = torch.isnan(partial)
        packed = torch.stack([torch.where(isnan, 0.0, partial), isnan.to(partial.dtype)])
        for group in groups:
            dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        return torch.where(packed[1] > 0, math.nan, packed[0])
    packed = partial.reshape(1)  # sums propagate NaN and inf by themselves
    for group in groups:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed[0]


def _global_norm(plan, norm_type, device):
    """The fp64 global norm: every reduction in the same (sorted) order on every rank."""
    totals = [_partial(plan.own, norm_type, device)]
    for ranks in sorted(plan.reductions):
        groups, reduce_device, tensors = plan.reductions[ranks]
        reduced = _all_reduce(_partial(tensors, norm_type, reduce_device), groups, norm_type)
        totals.append(reduced.to(device))
    totals = torch.stack(totals)
    if math.isinf(norm_type):
        return totals.max()
    return totals.sum().pow(1.0 / norm_type)


def _result_device(plan):
    if plan.locals:
        return plan.locals[0].device
    if plan.reductions:
        return plan.reductions[min(plan.reductions)][1]
    return torch.device("cpu")


def _as_torch_returns(norm, plan):
    """A DTensor (replicated) when the DTensors share one mesh, as torch's clip
    returns for DTensor grads (so norm.full_tensor() keeps working); else a tensor."""
    if len(plan.meshes) != 1:
        return norm
    from torch.distributed.tensor import DTensor, Replicate

    mesh = plan.meshes[0]
    return DTensor.from_local(norm, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _norm_and_plan(pairs, norm_type, error_if_nonfinite, group, fn):
    """Checks (before any collective or write), then the accurate global norm
    (fp64, so a norm above FLT_MAX stays finite, as on one process) and the plan."""
    _check_group(group, fn)
    _check_norm_type(norm_type, fn)
    pairs = list(pairs)
    check_grads(local_shards([g for _, g in pairs if g is not None], fn), fn)
    plan = _plan(pairs, group)
    device = _result_device(plan)
    norm = _global_norm(plan, norm_type, device)
    if error_if_nonfinite:  # the same value on every rank: all raise
        raise_if_nonfinite(norm, norm_type, _returned_dtype(plan))
    return norm, plan


def _returned_dtype(plan):
    return result_dtype(plan.locals) if plan.locals else torch.float32


# ---- the distributed halves of fastclip/clip.py's functions ------------------------


def get_total_norm(tensors, norm_type, error_if_nonfinite, group, fn):
    with torch.no_grad():
        norm, plan = _norm_and_plan(((t, t) for t in tensors), norm_type, error_if_nonfinite, group, fn)
        return _as_torch_returns(norm.to(_returned_dtype(plan)), plan)


def clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, group, fn):
    """`params`: a list or tuple (clip.py has consumed any generator)."""
    for i, p in enumerate(params):
        check_tensor(p, i, fn, "parameters")
    with torch.no_grad():
        norm, plan = _norm_and_plan(((p, p.grad) for p in params), norm_type, error_if_nonfinite, group, fn)
        if plan.locals:
            scale_groups(group_by_device(plan.locals), clip_coef(max_norm, norm))
        return _as_torch_returns(norm.to(_returned_dtype(plan)), plan)


def local_shards(grads, fn, linear=True):
    """The local tensors of `grads` (DTensors or plain) for an in-place update.
    `linear=False` (clamping): a Partial grad's local values are not its
    values, so it is refused before anything is touched."""
    dtensor = dtensor_type()
    out = []
    for g in grads:
        if dtensor is not None and isinstance(g, dtensor):
            if not linear and any(p.is_partial() for p in g.placements):
                raise NotImplementedError(
                    f"fastclip.{fn}: a gradient with Partial placements {g.placements} cannot be "
                    "clamped shard by shard; redistribute it first"
                )
            g = g.to_local()
        out.append(g)
    return out


def local_norm(total_norm):
    """A DTensor norm (ours, or torch's Partial one) as a plain tensor on every rank."""
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(total_norm, dtensor):
        return total_norm.full_tensor()
    return total_norm
