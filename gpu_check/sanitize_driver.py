#!/usr/bin/env python
"""Every CUDA kernel path of fastclip once, small: the program gpu_check/run.sh runs under
compute-sanitizer (memcheck, racecheck, synccheck).

Paths, and the set that takes each (descriptor counts: <= 16 and <= 1000 travel in the kernel's
parameters, more in a device table filled by upload_kernel):

  mixed        7 tensors, fp32/fp64/fp16/bf16 in one launch, a zero-size grad, multi-tile tensors
  misaligned   views at odd element offsets: the scalar head before the 16-byte loads, scalar tails
  strided      a transposed (dense, permuted) and a non-dense view (copied, clipped, written back)
  one_tile     one tile: like misaligned, strided and overflow (sets under 128 KiB and 16
               tensors), the one-block small kernel: no grid barrier, partials in shared memory
  inline_large 300 tensors (the 1000-descriptor parameter block)
  table        1100 tensors (the device table and its upload launches)
  overflow     finite fp32/bf16 values ~3e19 whose fp32 sum of squares overflows (the overflow
               rescue: the norm must be the finite fp64 one, on CPU and GPU alike)
  big          (--big) > 4096 tiles: block 0 reduces the partials, a second grid barrier
               publishes the coefficient

Each set runs total_norm and clip_grad_norm_ for p = 1, 2, inf, 3, 0.5, clip_grad_norm_ with
norm_dtype (the norm written in half precision), a call that does not clip (coefficient 1: no
stores), scale_ with an fp32 and an fp64 coefficient, and fastclip.clip_grad_norm_ on parameters
(the eager hot path). The kernel taken depends on the environment, set by gpu_check.sh: the fused
cooperative kernel (FASTCLIP_CUDA_MAX_GRID caps its grid so the cooperative launch fits even when
the sanitizer's instrumentation lowers occupancy) or the three-launch fallback
(FASTCLIP_CUDA_NO_COOP=1).

Results are checked loosely against an fp64 reference (a sanitizer run must not pass on garbage);
precision is the CUDA tests' job. Any other torch.ops.fastclip op is called with generic arguments
when its schema is simple (a Tensor[] then floats); otherwise the log says NOT RUN and why, and a
recipe belongs in OP_RECIPES below. Exit status: 0 ok, 2 no CUDA kernels, 3 a result is wrong.

    python gpu_check/sanitize_driver.py [--big]     (run.sh sets PYTHONPATH to the repository)
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

NORM_TYPES = (1.0, 2.0, math.inf, 3.0, 0.5)
# Loose tolerances on clipped grads (relative to the largest): catch garbage, not rounding.
GRAD_RTOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NORM_RTOL = 1e-3


def grad_sets(device: str, big: bool) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(n, dtype=torch.float32):
        return torch.randn(n, generator=gen, device=device).to(dtype)

    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    sets = {
        "mixed": [randn(n, dtypes[i % 4]) for i, n in enumerate([1, 7, 64, 8193, 40000, 3])]
        + [torch.empty(0, device=device)],
        "misaligned": [
            randn(n + 5, dt)[1 + i % 3 : 1 + i % 3 + n]
            for i, (dt, n) in enumerate(
                [(torch.float16, 16390), (torch.float32, 8195), (torch.float64, 4099), (torch.bfloat16, 9)]
            )
        ],
        "strided": [randn(1200).view(30, 40).t(), randn(2400).view(40, 60)[:, ::3]],
        "one_tile": [randn(100)],
        "inline_large": [randn(i % 600 + 1, dtypes[i % 2 * 3]) for i in range(300)],
        "table": [randn(i % 50 + 1) for i in range(1100)],
        "overflow": [randn(5000).sign_().mul_(3e19), randn(300).sign_().mul_(3e19).bfloat16()],
    }
    if big:
        sets["big"] = [randn(35_000_000), randn(513, torch.float16)]
    return sets


def ref_norm(grads, p) -> float:
    flat = torch.cat([g.reshape(-1).double() for g in grads])
    return torch.linalg.vector_norm(flat, p).item() if flat.numel() else 0.0


class Checker:
    """Collects what was wrong; a sanitizer run that computes garbage must not pass."""

    def __init__(self):
        self.errors, self.notes, self.calls = [], [], 0

    def norm(self, what, got, want, rtol=NORM_RTOL):
        self.calls += 1
        got = float(got)
        if not abs(got - want) <= rtol * abs(want):
            self.errors.append(f"{what}: norm {got:.9g}, fp64 reference {want:.9g}")
            return False
        return True

    def grads(self, what, got, before, coef):
        for i, (g, g0) in enumerate(zip(got, before)):
            if g.numel() == 0:
                continue
            want = g0.double() * coef
            tol = GRAD_RTOL[g.dtype] * max(want.abs().max().item(), 1e-30)
            err = (g.double() - want).abs().max().item()
            if not err <= tol:
                self.errors.append(f"{what}: grad {i} ({g.dtype}) off by {err:.3g} (allowed {tol:.3g})")
                return


def exercise_set(name, grads, check):
    for p in NORM_TYPES:
        want = ref_norm(grads, p)
        check.norm(f"{name} total_norm p={p}", torch.ops.fastclip.total_norm(grads, p), want)
        clipped = [g.clone() for g in grads]
        norm = torch.ops.fastclip.clip_grad_norm_(clipped, 0.5 * want, p)
        if check.norm(f"{name} clip_grad_norm_ p={p}", norm, want):
            check.grads(f"{name} clip_grad_norm_ p={p}", clipped, grads, min(0.5 * want / (float(norm) + 1e-6), 1.0))

    want = ref_norm(grads, 2.0)
    for norm_dtype in (torch.float16, torch.bfloat16):  # the norm written in half precision
        norm = torch.ops.fastclip.clip_grad_norm_([g.clone() for g in grads], 0.5 * want, 2.0, norm_dtype)
        if norm.dtype != norm_dtype:
            check.errors.append(f"{name} clip_grad_norm_ norm_dtype={norm_dtype}: got {norm.dtype}")
        elif want <= torch.finfo(norm_dtype).max:  # rounded to the half dtype: its epsilon is the tolerance
            check.norm(f"{name} clip_grad_norm_ norm_dtype={norm_dtype}", norm, want, rtol=torch.finfo(norm_dtype).eps)
    unclipped = [g.clone() for g in grads]  # coefficient 1: nothing may be stored
    norm = torch.ops.fastclip.clip_grad_norm_(unclipped, 10 * want + 1.0, 2.0)
    if check.norm(f"{name} clip_grad_norm_ not clipping", norm, want):
        if not all(torch.equal(a, b) for a, b in zip(unclipped, grads)):
            check.errors.append(f"{name} clip_grad_norm_ without clipping changed the grads")

    device = grads[0].device
    for coef in (torch.tensor(0.5, device=device), torch.tensor(1.0, dtype=torch.float64, device=device)):
        scaled = [g.clone() for g in grads]
        torch.ops.fastclip.scale_(scaled, coef)
        check.grads(f"{name} scale_ {coef.dtype}", scaled, grads, float(coef))

    import fastclip

    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for prm, g in zip(params, grads):
        prm.grad = g.clone()
    norm = fastclip.clip_grad_norm_(params, 0.5 * want)  # the norm comes back in the grads' dtype
    if want <= torch.finfo(norm.dtype).max:
        check.norm(f"{name} fastclip.clip_grad_norm_", norm, want, rtol=max(NORM_RTOL, torch.finfo(norm.dtype).eps))


# Recipes for ops beyond the three above: name -> fn(grads) calling torch.ops.fastclip.<name>.
# A new op with a simple schema (Tensor[] grads, then floats) needs none: generic_call covers it.
def _per_layer(grads):
    """Both forms: one group per grad ([]), and pairs of grads sharing a group."""
    torch.ops.fastclip.clip_grad_norm_per_layer_([g.clone() for g in grads], [], 0.5, 2.0)
    torch.ops.fastclip.clip_grad_norm_per_layer_(
        [g.clone() for g in grads], [i // 2 for i in range(len(grads))], 0.5, 2.0
    )


def _agc(grads):
    """Weights the grads' shapes, so units (rows) of every size are clipped."""
    params = [torch.randn_like(g) for g in grads]
    torch.ops.fastclip.adaptive_clip_grad_(params, [g.clone() for g in grads], 0.01, 1e-3, 2.0)


def _adam(grads):
    """fastclip.optim's op: Adam with amsgrad and a lr tensor on the device, then AdamW, params
    and state laid out as their grads (a strided grad is staged through a copy)."""
    n = len(grads)
    device = grads[0].device
    for amsgrad, decoupled in ((True, False), (False, True)):
        params = [torch.randn(g.shape, device=device).to(g.dtype) for g in grads]
        zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
        torch.ops.fastclip.adam_step_(
            params, grads, zeros(), zeros(), zeros() if amsgrad else [],
            [torch.zeros((), device=device) for _ in grads], [i % 2 for i in range(n)], [1e-3, 3e-3],
            [0.9, 0.8], [0.999, 0.99], [1e-8, 1e-6], [0.0, 0.1],
            [torch.tensor(1e-3, device=device), torch.tensor(3e-3, device=device)] if amsgrad else [],
            amsgrad, False, decoupled, 0.5, 2.0,
        )  # fmt: skip


OP_RECIPES = {
    "total_norm": None,  # exercised by exercise_set
    "scale_": None,
    "clip_grad_norm_": None,
    "clip_grad_norm_per_layer_": _per_layer,
    "adaptive_clip_grad_": _agc,
    "adam_step_": _adam,
}


def fastclip_schemas():
    return [s for s in torch._C._jit_get_all_schemas() if s.name.startswith("fastclip::")]


def generic_call(schema, grads):
    """Call an op whose arguments are a Tensor[] then floats (defaults left as they are);
    None when its schema is not that simple."""
    args = schema.arguments
    if not args or str(args[0].type) != "List[Tensor]":
        return None
    values = [[g.clone() for g in grads]]
    for a in args[1:]:
        if a.has_default_value():
            break
        if str(a.type) != "float":
            return None
        values.append(2.0)  # a valid norm type, max norm or threshold alike
    op = getattr(torch.ops.fastclip, schema.name.split("::", 1)[1])
    overload = getattr(op, schema.overload_name or "default")
    return lambda: overload(*values)


def exercise_other_ops(sets, check):
    for schema in fastclip_schemas():
        name = schema.name.split("::", 1)[1]
        if name in OP_RECIPES and OP_RECIPES[name] is None:
            continue
        for grads in sets.values():
            fn = (lambda g=grads: OP_RECIPES[name](g)) if name in OP_RECIPES else generic_call(schema, grads)
            if fn is None:
                print(
                    f"NOT RUN: op fastclip::{name}: no recipe for its schema {schema}; "
                    "add one to OP_RECIPES in gpu_check/sanitize_driver.py"
                )
                break
            fn()
            check.calls += 1
        else:
            print(f"exercised fastclip::{name} on every set ({schema})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="every fastclip CUDA kernel path once (run under compute-sanitizer)")
    ap.add_argument("--big", action="store_true", help="add a set of > 4096 tiles (35M fp32 elements)")
    ap.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu runs the same calls on the CPU operator: a check of this driver itself",
    )
    args = ap.parse_args(argv)
    import fastclip
    from fastclip import _ops

    if not _ops.has_kernels(args.device) or (args.device == "cuda" and not torch.cuda.is_available()):
        print(
            f"no fused {args.device} kernels to check: backend {fastclip.backend()!r}, "
            f"CUDA kernels built: {_ops.CUDA_BUILT}, GPU: {torch.cuda.is_available()}, {_ops.LOAD_ERROR or ''}"
        )
        return 2
    check = Checker()
    sets = grad_sets(args.device, args.big)
    for name, grads in sets.items():
        t0 = time.perf_counter()
        exercise_set(name, grads, check)
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(
            f"set {name}: {len(grads)} tensors, {sum(g.numel() for g in grads):,} elements, "
            f"{time.perf_counter() - t0:.1f} s"
        )
    exercise_other_ops(sets, check)
    if args.device == "cuda":
        torch.cuda.synchronize()
    for note in check.notes:
        print("note:", note)
    for err in check.errors:
        print("MISMATCH:", err)
    print(f"sanitize driver: {check.calls} checked calls, {len(check.errors)} mismatches")
    return 3 if check.errors else 0


if __name__ == "__main__":
    sys.exit(main())
