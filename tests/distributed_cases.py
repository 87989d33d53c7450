"""The cases of tests/test_distributed.py, run inside each spawned rank.

    python tests/distributed_cases.py RANK WORLD STORE_FILE RESULT_JSON [BACKEND]

Every rank runs every case of its world size in the same order (the cases are
collective), records "ok" or the traceback per case, and writes them to
RESULT_JSON. Each case compares fastclip with torch's own clip on an identical
model in this same process group (or, where torch has no distributed
equivalent, with torch's clip on the full logical tensors).
"""

import datetime
import json
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import fastclip
from helpers import GRAD_RTOL  # this folder is sys.path[0]: the file runs as a script

CASES = []  # (name, function(ctx), min world size)


def case(min_world=1, max_world=64):
    def register(fn):
        CASES.append((fn.__name__, fn, min_world, max_world))
        return fn

    return register


class Ctx:
    def __init__(self, rank, world, device):
        self.rank, self.world, self.device = rank, world, device
        self.mesh = init_device_mesh(device.type, (world,))


# ---- comparison helpers ----------------------------------------------------------


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_norm_close(ours, theirs, dtype=torch.float32):
    ours, theirs = full(ours), full(theirs)
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, GRAD_RTOL.get(dtype, 1e-5))
    torch.testing.assert_close(ours.cpu(), theirs.cpu(), rtol=rtol, atol=0.0, equal_nan=True)


def assert_norm_as_accurate(ours, theirs, logical, norm_type):
    """Half-precision inputs (as flash-attention's tests hold them): our error against the fp64 norm of the
    logical values is at most 2x torch's own (or at fp32 rounding)."""
    exact = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in logical]), norm_type).item()
    ours, theirs = full(ours).double().item(), full(theirs).double().item()
    assert abs(ours - exact) <= max(2 * abs(theirs - exact), 1e-6 * exact), (ours, theirs, exact)


def assert_grads_scaled(ours_params, logical, norm, max_norm):
    """Each grad is its logical value times min(max_norm / (norm + 1e-6), 1)."""
    coef = min(max_norm / (full(norm).double().item() + 1e-6), 1.0)
    for p, t in zip(ours_params, logical):
        expected = (t.double() * coef).to(t.dtype)
        rtol = GRAD_RTOL[t.dtype]
        torch.testing.assert_close(full(p.grad), expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def assert_grads_close(ours_params, theirs_params):
    for a, b in zip(ours_params, theirs_params):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is None:
            continue
        a, b = full(a.grad).cpu(), full(b.grad).cpu()
        rtol = GRAD_RTOL[b.dtype]
        atol = rtol * float(b.abs().max()) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


def same_on_every_rank(t):
    """t (a local tensor) is bitwise equal on every rank."""
    t = t.detach().contiguous()  # on its device: NCCL takes only CUDA tensors
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, t) for g in gathered)


class CountAllReduce:
    """Counts torch.distributed.all_reduce calls (fastclip calls it through the module)."""

    def __enter__(self):
        self.calls, self.original = 0, dist.all_reduce

        def counting(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original


# ---- models ----------------------------------------------------------------------


def mlp(device, seed=0, dtype=torch.float32):
    """Out dims 7, 3, 1: uneven over 2 and 4 ranks, and empty shards on some ranks."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)
    ).to(device, dtype)


def fsdp_mlp(ctx, reshard=True, seed=0):
    model = mlp(ctx.device, seed)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=ctx.mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=ctx.mesh, reshard_after_forward=reshard)
    return model


def backward(model, ctx, step=0, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)  # the same batch on every rank
    x = torch.randn(8, 5, generator=gen).to(ctx.device)
    (model(x).pow(2).sum() * scale).backward()


def twin_fsdp(ctx, reshard=True):
    ours, theirs = fsdp_mlp(ctx, reshard), fsdp_mlp(ctx, reshard)
    backward(ours, ctx)
    backward(theirs, ctx)
    return list(ours.parameters()), list(theirs.parameters())


def torch_clip(theirs, max_norm, norm_type, **kw):
    """torch's clip on the DTensor twin; for the inf norm on the full logical
    grads instead: torch's inf norm of a DTensor raises on a rank holding an
    empty shard ("does not have an identity") and leaves the other ranks hanging."""
    if math.isinf(norm_type) and any(isinstance(p.grad, DTensor) for p in theirs):
        theirs[:] = [plain_param(p.grad.full_tensor()) for p in theirs]
    return torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, **kw)


# ---- cases -------------------------------------------------------------------------


@case()
def fsdp2_matches_torch(ctx):
    """The issue's reproduction, every norm type, with and without reshard_after_forward."""
    empty = 0
    for reshard in (True, False):
        for norm_type in (2.0, 1.0, 3.0, math.inf):
            ours, theirs = twin_fsdp(ctx, reshard)
            empty += sum(p.grad.to_local().numel() == 0 for p in ours)
            with CountAllReduce() as count:
                n_ours = fastclip.clip_grad_norm_(ours, 0.1, norm_type)
            n_torch = torch_clip(theirs, 0.1, norm_type)
            assert count.calls == 1, f"{count.calls} all-reduces for one mesh"
            assert isinstance(n_ours, DTensor) and n_ours.placements == (Replicate(),)
            assert_norm_close(n_ours, n_torch)
            assert full(n_ours) > 0.5  # it really clipped
            assert_grads_close(ours, theirs)
            assert same_on_every_rank(n_ours.to_local())
    empties = torch.tensor([empty], device=ctx.device)
    dist.all_reduce(empties)
    assert empties.item() > 0 or ctx.world == 1, "the model should leave some rank an empty shard"


@case()
def fsdp2_companions_match_torch(ctx):
    """get_total_norm, clip_grads_with_norm_ (with our norm and with torch's), clip_grad_value_."""
    for norm_type in (2.0, math.inf):
        ours, theirs = twin_fsdp(ctx)
        if math.isinf(norm_type):  # see torch_clip: torch's inf norm of the full grads
            theirs = [plain_param(p.grad.full_tensor()) for p in theirs]
        n_ours = fastclip.get_total_norm([p.grad for p in ours], norm_type)
        n_torch = torch.nn.utils.get_total_norm([p.grad for p in theirs], norm_type)
        assert isinstance(n_ours, DTensor)
        assert_norm_close(n_ours, n_torch)
        fastclip.clip_grads_with_norm_(ours, 0.1, n_torch)
        torch.nn.utils.clip_grads_with_norm_(theirs, 0.1, n_torch)
        assert_grads_close(ours, theirs)
    ours, theirs = twin_fsdp(ctx)  # torch's DTensor norm into ours
    n_torch = torch.nn.utils.get_total_norm([p.grad for p in theirs], 2.0)
    assert isinstance(n_torch, DTensor)
    fastclip.clip_grads_with_norm_(ours, 0.1, n_torch)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.1, n_torch)
    assert_grads_close(ours, theirs)
    ours, theirs = twin_fsdp(ctx)
    fastclip.clip_grad_value_(ours, 0.05)
    torch.nn.utils.clip_grad_value_(theirs, 0.05)
    assert_grads_close(ours, theirs)


@case(min_world=2)
def local_shards_alone_do_not_match(ctx):
    """Negative control: clipping each rank's shards on their own (no all-reduce)
    gives another norm, and the comparison used everywhere here catches it."""
    ours, theirs = twin_fsdp(ctx)
    local = [torch.nn.Parameter(p.detach().to_local().clone()) for p in ours]
    for q, p in zip(local, ours):
        q.grad = p.grad.to_local().clone()
    n_local = fastclip.clip_grad_norm_(local, 0.1)
    n_torch = torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    try:
        assert_norm_close(n_local, n_torch)
    except AssertionError:
        return
    raise AssertionError("a local-only norm passed the comparison with the global norm")


def sharded_param(logical, mesh, placements):
    """A DTensor parameter holding `logical` with a grad of the same placements."""
    p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(logical), mesh, placements))
    p.grad = distribute_tensor(logical.clone(), mesh, placements)  # (Replicate would share its storage)
    return p


def plain_param(logical):
    p = torch.nn.Parameter(torch.zeros_like(logical))
    p.grad = logical.clone()
    return p


def logical_grads(ctx, shapes_dtypes, seed=1):
    gen = torch.Generator().manual_seed(seed)  # the same logical values on every rank
    return [torch.randn(s, generator=gen, dtype=torch.float64).mul_(3).to(ctx.device, d) for s, d in shapes_dtypes]


@case(min_world=2)
def mixed_meshes_dtypes_and_plain(ctx):
    """Shard and Replicate DTensors on a 1-D and a 2-D mesh, plain grads, fp32/bf16/fp64
    in one call; the reference is torch's clip on the full logical tensors."""
    mesh2 = init_device_mesh(ctx.device.type, (2, ctx.world // 2), mesh_dim_names=("a", "b"))
    logical = logical_grads(
        ctx,
        [
            ((9, 4), torch.float32),
            ((5,), torch.bfloat16),
            ((3, 3), torch.float64),
            ((6,), torch.float32),
            ((7, 2), torch.float32),
            ((4,), torch.float32),
            ((2, 2), torch.bfloat16),
        ],
    )
    for norm_type in (2.0, 3.0, math.inf):
        ours = [
            sharded_param(logical[0], ctx.mesh, [Shard(0)]),
            sharded_param(logical[1], ctx.mesh, [Shard(0)]),
            sharded_param(logical[2], ctx.mesh, [Replicate()]),  # counted once, not world times
            sharded_param(logical[3], mesh2, [Shard(0), Replicate()]),
            sharded_param(logical[4], mesh2, [Shard(0), Shard(1)]),
            sharded_param(logical[5], mesh2, [Replicate(), Shard(0)]),
            plain_param(logical[6]),  # this rank's own grad (here equal on every rank)
        ]
        theirs = [plain_param(t) for t in logical]
        n_ours = fastclip.clip_grad_norm_(ours, 0.1, norm_type)
        n_torch = torch.nn.utils.clip_grad_norm_(theirs, 0.1, norm_type)
        assert not isinstance(n_ours, DTensor)  # several meshes: a plain tensor
        assert n_ours.dtype == n_torch.dtype == torch.float64  # promoted, like torch
        assert_norm_as_accurate(n_ours, n_torch, logical, norm_type)
        assert_grads_scaled(ours, logical, n_ours, 0.1)  # torch's coefficient is the less accurate one


@case(min_world=2)
def partial_placement_grads(ctx):
    """A Partial grad's local values sum to its value: its norm is that of the sum
    (not of the pieces), scaling the pieces scales the sum, and clamping the pieces
    is refused before anything is touched."""
    from torch.distributed.tensor import Partial

    logical = logical_grads(ctx, [((6, 4), torch.float32), ((5,), torch.float32)])
    pieces = [t * (ctx.rank + 1) / (ctx.world * (ctx.world + 1) / 2) for t in logical]  # sum to t
    for norm_type in (2.0, math.inf):
        ours = []
        for piece in pieces:
            p = torch.nn.Parameter(DTensor.from_local(torch.zeros_like(piece), ctx.mesh, [Partial()]))
            p.grad = DTensor.from_local(piece.clone(), ctx.mesh, [Partial()])
            ours.append(p)
        theirs = [plain_param(t) for t in logical]
        n_ours = fastclip.clip_grad_norm_(ours, 0.1, norm_type)
        n_torch = torch.nn.utils.clip_grad_norm_(theirs, 0.1, norm_type)
        assert_norm_close(n_ours, n_torch)
        assert_grads_close(ours, theirs)  # full_tensor() sums the scaled pieces
    before = [p.grad.to_local().clone() for p in ours]
    try:
        fastclip.clip_grad_value_(ours, 0.01)
    except NotImplementedError as exc:
        assert "Partial" in str(exc)
    else:
        raise AssertionError("clamping Partial pieces was not refused")
    assert all(torch.equal(p.grad.to_local(), b) for p, b in zip(ours, before))


def shard_rows(t, world):
    """Shard(0)'s split of t over `world` ranks: torch.chunk, empty pieces at the end."""
    chunks = list(torch.chunk(t, world))
    return chunks + [t[:0]] * (world - len(chunks))


@case(min_world=2)
def none_grads_on_some_ranks(ctx):
    """Rank 1's grads are all None: it still joins, its shards count as zero,
    every rank gets the same norm and the other ranks' shards are clipped."""
    logical = logical_grads(ctx, [((8, 3), torch.float32), ((5,), torch.float32)])
    ours = [sharded_param(t, ctx.mesh, [Shard(0)]) for t in logical]
    expected = []
    for p, t in zip(ours, logical):
        if ctx.rank == 1:
            p.grad = None
        chunks = shard_rows(t.clone(), ctx.world)
        chunks[1].zero_()  # views: rank 1's rows of the logical grad
        expected.append(plain_param(torch.cat(chunks)))
    n_ours = fastclip.clip_grad_norm_(ours, 0.1)
    n_torch = torch.nn.utils.clip_grad_norm_(expected, 0.1)
    assert isinstance(n_ours, DTensor)
    assert_norm_close(n_ours, n_torch)
    if ctx.rank != 1:
        for p, e in zip(ours, expected):
            mine = shard_rows(e.grad, ctx.world)[ctx.rank]
            torch.testing.assert_close(p.grad.to_local(), mine, rtol=GRAD_RTOL[torch.float32], atol=1e-7)


def partitioned(logical, rank, world):
    """ZeRO-style pieces: tensor i on rank i % world, the last tensor split by rows (some empty)."""
    *whole, split = logical
    mine = [t for i, t in enumerate(whole) if i % world == rank]
    return [plain_param(t) for t in mine + [torch.tensor_split(split, world)[rank]]]


def pieces_of(logical, ranks, world):
    """{rank: its pieces} and torch's twin of their union (one flat list)."""
    pieces = {r: partitioned(logical, r, world) for r in ranks}
    return pieces, [p for r in ranks for p in pieces[r]]


@case(min_world=2)
def group_plain_shards(ctx):
    """group=: disjoint plain pieces of one logical set (the pieces of every rank
    but the last, which passes no grads at all and still joins); sub-groups
    (pipeline stages) clip their own sets."""
    shapes = [((6, 5), torch.float32), ((4,), torch.float32), ((3, 2), torch.float32), ((3, 2), torch.float32)]
    holders = range(ctx.world - 1)
    for norm_type in (2.0, 1.0, math.inf):
        logical = logical_grads(ctx, shapes)
        pieces, theirs = pieces_of(logical, holders, ctx.world)
        ours = partitioned(logical, ctx.rank, ctx.world) if ctx.rank in holders else []
        n_get = fastclip.get_total_norm([p.grad for p in ours], norm_type, group=dist.group.WORLD)
        with CountAllReduce() as count:
            n_ours = fastclip.clip_grad_norm_(ours, 0.1, norm_type, group=dist.group.WORLD)
        assert count.calls == 1
        assert not isinstance(n_ours, DTensor)
        n_torch = torch.nn.utils.clip_grad_norm_(theirs, 0.1, norm_type)
        assert_norm_close(n_ours, n_torch)
        assert_norm_close(n_get, n_torch)
        assert_grads_close(ours, pieces.get(ctx.rank, []))  # torch clipped the same objects' twins
    if ctx.world >= 4:  # two stages of two ranks, each clipping its own layers
        stage, _ = dist.new_subgroups(2)
        logical = logical_grads(ctx, shapes, seed=10 + ctx.rank // 2)  # one set per stage
        pieces, theirs = pieces_of(logical, range(2), 2)
        ours = partitioned(logical, ctx.rank % 2, 2)
        n_ours = fastclip.clip_grad_norm_(ours, 0.1, group=stage)
        assert_norm_close(n_ours, torch.nn.utils.clip_grad_norm_(theirs, 0.1))
        assert_grads_close(ours, pieces[ctx.rank % 2])


@case()
def no_collective_without_group_or_dtensor(ctx):
    logical = logical_grads(ctx, [((6, 5), torch.float32), ((4,), torch.float32)], seed=ctx.rank)
    ours = [plain_param(t) for t in logical]
    theirs = [plain_param(t) for t in logical]
    with CountAllReduce() as count:
        n_ours = fastclip.clip_grad_norm_(ours, 0.1, error_if_nonfinite=True)
    assert count.calls == 0
    assert_norm_close(n_ours, torch.nn.utils.clip_grad_norm_(theirs, 0.1))


@case()
def nonfinite_on_one_rank(ctx):
    """A NaN (or inf) on rank 0 only: error_if_nonfinite raises on every rank with
    every grad untouched; without it every rank gets torch's non-finite norm."""
    for bad in (math.nan, math.inf):
        for norm_type in (2.0, math.inf):
            ours, theirs = twin_fsdp(ctx)
            for ps in (ours, theirs):
                if ctx.rank == 0:
                    ps[0].grad.to_local()[0, 0] = bad
            before = [p.grad.to_local().clone() for p in ours]
            try:
                fastclip.clip_grad_norm_(ours, 0.1, norm_type, error_if_nonfinite=True)
            except RuntimeError as exc:
                assert "non-finite" in str(exc)
            else:
                raise AssertionError("no RuntimeError on this rank")
            for p, b in zip(ours, before):  # bitwise untouched (NaN where the NaN was)
                torch.testing.assert_close(p.grad.to_local(), b, rtol=0, atol=0, equal_nan=True)
            n_ours = fastclip.clip_grad_norm_(ours, 0.1, norm_type)
            n_torch = torch_clip(theirs, 0.1, norm_type)
            assert_norm_close(n_ours, n_torch)
            assert not math.isfinite(full(n_ours).item())


@case()
def patched_unchanged_fsdp2_loop(ctx):
    """An FSDP2 training loop that calls torch.nn.utils.clip_grad_norm_, run
    under fastclip.patch() and as is: the same norms and the same weights."""

    def train(reshard):
        model = fsdp_mlp(ctx, reshard)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        norms = []
        for step in range(3):
            opt.zero_grad()
            backward(model, ctx, step)
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1).full_tensor())
            opt.step()
        return norms, [p.full_tensor() for p in model.parameters()]

    for reshard in (True, False):
        with fastclip.patch():
            assert torch.nn.utils.clip_grad_norm_ is fastclip.clip_grad_norm_
            n_ours, w_ours = train(reshard)
        n_torch, w_torch = train(reshard)
        for a, b in zip(n_ours, n_torch):
            assert_norm_close(a, b)
        for a, b in zip(w_ours, w_torch):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@case()
def patched_torchtitan_clip_on_fsdp2(ctx):
    """torchtitan's clip, unchanged, on FSDP2 DTensor grads under fastclip.patch(): torch's
    norm and grads, in two fused passes (the norm, the scale), one collective (the norm's
    all-reduce; full_tensor() of the replicated norm adds none) and no read of a value on
    the host."""
    from op_counts import CountOps
    from torch.distributed.tensor.debug import CommDebugMode
    from torchtitan_clip import titan_clip

    for norm_type in (2.0, math.inf):
        ours, theirs = twin_fsdp(ctx)
        if math.isinf(norm_type):  # see torch_clip: torch's inf norm of the full grads
            theirs = [plain_param(p.grad.full_tensor()) for p in theirs]
        with fastclip.patch(), CountOps() as ops, CommDebugMode() as comm:
            n_ours = titan_clip(ours, 0.1, norm_type)
        assert ops.fused == ["total_norm", "scale_"] and ops.host_reads == 0, (ops.fused, ops.host_reads)
        assert comm.get_total_counts() == 1, comm.get_comm_counts()
        with CommDebugMode() as torch_comm:
            n_torch = titan_clip(theirs, 0.1, norm_type)
        if not math.isinf(norm_type):  # the count can fail: it sees the collective of torch's full_tensor()
            assert torch_comm.get_total_counts() == 1, torch_comm.get_comm_counts()
        assert not isinstance(n_ours, DTensor)
        assert_norm_close(n_ours, n_torch)
        assert full(n_ours) > 0.5  # it really clipped
        assert_grads_close(ours, theirs)


@case()
def ddp_identical_on_every_rank(ctx):
    from torch.nn.parallel import DistributedDataParallel as DDP

    models = [DDP(mlp(ctx.device)) for _ in range(2)]
    for m in models:
        gen = torch.Generator().manual_seed(200 + ctx.rank)  # a different batch per rank
        m(torch.randn(8, 5, generator=gen).to(ctx.device)).pow(2).sum().backward()
    ours, theirs = (list(m.parameters()) for m in models)
    n_ours = fastclip.clip_grad_norm_(ours, 0.1)
    n_torch = torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    assert_norm_close(n_ours, n_torch)
    assert_grads_close(ours, theirs)
    assert same_on_every_rank(n_ours)
    assert all(same_on_every_rank(p.grad) for p in ours)


def tp_mlp(ctx, tp_mesh, seed=0):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5)).to(ctx.device)
    return parallelize_module(model, tp_mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


@case()
def tensor_parallel_matches_torch(ctx):
    for norm_type in (2.0, math.inf):
        ours, theirs = (tp_mlp(ctx, ctx.mesh) for _ in range(2))
        for m in (ours, theirs):
            m(torch.randn(4, 6, generator=torch.Generator().manual_seed(7)).to(ctx.device)).sum().backward()
        ours, theirs = list(ours.parameters()), list(theirs.parameters())
        n_ours = fastclip.clip_grad_norm_(ours, 0.1, norm_type)
        n_torch = torch_clip(theirs, 0.1, norm_type)
        assert isinstance(n_ours, DTensor)
        assert_norm_close(n_ours, n_torch)
        assert_grads_close(ours, theirs)


@case(min_world=4)
def fsdp_x_tp_2d_mesh(ctx):
    """FSDP2 over dp x tensor parallel over tp on a (2, world/2) mesh."""
    mesh = init_device_mesh(ctx.device.type, (2, ctx.world // 2), mesh_dim_names=("dp", "tp"))

    def build():
        model = tp_mlp(ctx, mesh["tp"])
        fully_shard(model, mesh=mesh["dp"])
        gen = torch.Generator().manual_seed(11 + mesh.get_coordinate()[0])  # a batch per dp rank
        model(torch.randn(4, 6, generator=gen).to(ctx.device)).pow(2).sum().backward()
        return list(model.parameters())

    for norm_type in (2.0, 1.0, math.inf):
        ours, theirs = build(), build()
        assert {len(p.grad.placements) for p in ours} == {2}
        with CountAllReduce() as count:
            n_ours = fastclip.clip_grad_norm_(ours, 0.1, norm_type)
        n_torch = torch_clip(theirs, 0.1, norm_type)
        assert count.calls == 1
        assert isinstance(n_ours, DTensor) and n_ours.placements == (Replicate(), Replicate())
        assert_norm_close(n_ours, n_torch)
        assert_grads_close(ours, theirs)


@case()
def distributed_errors_are_clear_and_collective_free(ctx):
    ours, _ = twin_fsdp(ctx)
    before = [p.grad.to_local().clone() for p in ours]
    for call, exc in (
        (lambda: fastclip.clip_grad_norm_(ours, 0.1, 0.0), NotImplementedError),
        (lambda: fastclip.clip_grad_norm_(ours, 0.1, group="world"), TypeError),
        (lambda: fastclip.clip_grad_norm_(ours, -1.0), ValueError),
    ):
        with CountAllReduce() as count:
            try:
                call()
            except exc:
                pass
            else:
                raise AssertionError(f"no {exc.__name__}")
        assert count.calls == 0
    assert all(torch.equal(p.grad.to_local(), b) for p, b in zip(ours, before))


# ---- driver --------------------------------------------------------------------------


def main(rank, world, store_file, result_json, backend="gloo"):
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{store_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    ctx = Ctx(rank, world, device)
    results = {}
    only = os.environ.get("FASTCLIP_DIST_CASES")
    for name, fn, min_world, max_world in CASES:
        if not min_world <= world <= max_world or (only and name not in only.split(",")):
            continue
        try:
            fn(ctx)
            results[name] = "ok"
        except BaseException:  # noqa: B036
            results[name] = traceback.format_exc()
        with open(result_json, "w") as f:  # after every case: a hang still leaves the earlier ones
            json.dump(results, f)
        if results[name] != "ok":
            # The ranks may now be out of step in their collectives: leave at once, so
            # the others fail fast on the closed connections instead of timing out.
            sys.stdout.flush()
            os._exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], *sys.argv[5:])
