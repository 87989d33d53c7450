#!/usr/bin/env python
"""CPU microbenchmark: fastclip.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_.

For each model-shaped set of gradients (and each dtype) it times, in one process and
interleaved round-robin (the order rotates every repeat):

  fastclip     fastclip.clip_grad_norm_(params, max_norm)
  torch        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
  torch-loop   torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
  mul_         x.mul_(0.5) on one contiguous fp32 buffer of as many bytes (the bandwidth probe)
  sum          x.sum() on that buffer (a read-only pass)

max_norm is 1e-3 of the true norm, so every call really scales every gradient. Before each timed
call the gradients (or the probe buffer) are restored from a saved copy, outside the timed region,
so the clip coefficient is the same ~1e-3 on every repeat; in the `mlp-bw` case they are instead
new tensors from a real backward() of the MLP, as a trainer clips them (the same values every
time). Times are medians over the repeats after a warm-up.

Bandwidth floor: clipping must read every element twice (norm pass, scale pass) and write it once,
12 bytes per fp32 element (6 per bf16). The in-place mul_ on an fp32 buffer of the same byte size
reads and writes every byte once, so with its measured bandwidth the floor is 1.5 x t(mul_).
Where reading is what limits (on the 2-core development VM a read-only sum() of 256 MB takes as
long as the mul_ that reads and writes them), the reachable floor is the "read floor": two
read-only passes, 2 x t(sum).
"% floor" = floor / time: 100% means the call runs at the memory bandwidth this machine shows for
a plain in-place multiply of the same size. (The probe is fp32 even for bf16 grads: torch's bf16
mul_ converts to fp32 and back and runs at about half the bandwidth of the fp32 one here, which
would make a bf16 floor twice too lenient.)

Before timing, a correctness guard checks fastclip against torch (and an fp64 reference) on the
case itself; a case that fails is reported as MISMATCH, is not timed, and the exit status is 1.

    python -m bench.bench_cpu --quick
    python -m bench.bench_cpu                     # writes bench/results/cpu-<date>.json
    python -m bench.bench_cpu --threads 1 --cases mlp,cnn --dtypes fp32
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time

import torch

from bench.common import (
    NOISY_CORES,
    OtherLoad,
    big_shapes,
    command_line,
    environment_info,
    fmt_us,
    gpt2_blocks_shapes,
    import_fastclip,
    mlp_shapes,
    nature_cnn_shapes,
    print_aligned,
    results_path,
    stats,
    time_interleaved,
    tiny_shapes,
    warn_backend,
)

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is optional
    tqdm = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# --------------------------------------------------------------------------------------------
# Model-shaped gradient sets
# --------------------------------------------------------------------------------------------


# name -> (description, shapes fn, target speed-up over the best torch variant)
CASES = {
    "mlp": ("MLP 4-64-64-2", mlp_shapes, 10.0),
    "mlp-bw": ("MLP 4-64-64-2, grads fresh from backward()", mlp_shapes, 10.0),
    "cnn": ("Nature DQN CNN", nature_cnn_shapes, 1.5),
    "gpt2": ("GPT-2-like x2 blocks", gpt2_blocks_shapes, 1.5),
    "big": ("one 64M tensor", big_shapes, 1.5),
    "tiny": ("3000 tiny tensors", tiny_shapes, None),
}


def _numel(shape):
    return math.prod(shape)


# The fp64 reference and the comparisons run over pieces of this many elements:
# done on a whole 64M-element tensor, their float64 temporaries (512 MB each,
# several at once inside assert_close) made the benchmark's peak memory 4.2 GB.
CHECK_CHUNK = 1 << 22


def _chunks(t):
    return t.reshape(-1).split(CHECK_CHUNK)


class GradSet:
    """Parameters with .grad set, a flat saved copy to restore from, and a same-size probe buffer."""

    def __init__(self, shapes, dtype, seed=0):
        self.shapes = shapes
        self.dtype = dtype
        self.numel = sum(_numel(s) for s in shapes)
        g = torch.Generator().manual_seed(seed)
        # Saved values: one flat buffer; the grads themselves are separate allocations, as in a model.
        self.saved = torch.randn(self.numel, generator=g, dtype=torch.float32).to(dtype)
        self.saved_views = []
        off = 0
        for s in shapes:
            n = _numel(s)
            self.saved_views.append(self.saved[off : off + n].view(s))
            off += n
        self.grads = [torch.empty(s, dtype=dtype) for s in shapes]
        self.params = []
        for s, gr in zip(shapes, self.grads):
            p = torch.nn.Parameter(torch.empty(s, dtype=dtype))  # never touched: pages stay lazy
            p.grad = gr
            self.params.append(p)
        # Bandwidth probe: fp32, same number of bytes as the grads (see the module docstring).
        n_probe = -(-self.numel * self.saved.element_size() // 4)
        self.probe = torch.empty(n_probe, dtype=torch.float32)
        self.probe_saved = (
            self.saved if dtype == torch.float32 else torch.randn(n_probe, generator=g, dtype=torch.float32)
        )
        self.restore()
        self.restore_probe()
        # The true norm, in fp64, and a max_norm 1e-3 of it: every call clips, coefficient ~1e-3.
        self.norm64 = math.sqrt(
            sum(float(torch.linalg.vector_norm(c, dtype=torch.float64)) ** 2 for c in _chunks(self.saved))
        )
        self.max_norm = 1e-3 * self.norm64

    def restore(self):
        torch._foreach_copy_(self.grads, self.saved_views)

    def restore_probe(self):
        self.probe.copy_(self.probe_saved)

    @property
    def nbytes(self):
        return self.numel * self.saved.element_size()


class AfterBackward(GradSet):
    """The MLP's grads as a trainer holds them when it clips: new tensors from a real backward()
    after zero_grad(set_to_none=True) before every call. Right after a backward pass the first
    op of any kind runs with cold caches (torch.empty(()) costs ~4x its steady-stream time
    there); the other cases re-clip grads that a copy has just warmed."""

    def __init__(self, shapes, dtype, seed=0):
        torch.manual_seed(seed)
        sizes = [shapes[0][1]] + [w[0] for w in shapes[::2]]  # 4, 64, 64, 2
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            layers += [torch.nn.Linear(n_in, n_out)] + ([torch.nn.Tanh()] if i < len(sizes) - 2 else [])
        self.model = torch.nn.Sequential(*layers).to(dtype)
        self.x = torch.randn(128, sizes[0], dtype=dtype)
        super().__init__(shapes, dtype, seed)  # its restore() is the backward below
        self.saved.copy_(torch.cat([g.reshape(-1) for g in self.grads]))  # what every backward gives
        self.norm64 = float(torch.linalg.vector_norm(self.saved, dtype=torch.float64))
        self.max_norm = 1e-3 * self.norm64

    def restore(self):
        self.model.zero_grad(set_to_none=True)
        self.model(self.x).pow(2).mean().backward()
        self.params = list(self.model.parameters())
        self.grads = [p.grad for p in self.params]


def grad_set(case, dtype):
    """The GradSet of a case of CASES, for a dtype name of DTYPES."""
    return (AfterBackward if case == "mlp-bw" else GradSet)(CASES[case][1](), DTYPES[dtype])


# --------------------------------------------------------------------------------------------
# Correctness guard
# --------------------------------------------------------------------------------------------


def check_case(fastclip, gs: GradSet):
    """Check fastclip on this very case, before timing it. Returns (error or None, info).

    fastclip must match the fp64 reference (norm, and grads = saved * max_norm/(norm + 1e-6))
    tightly, and torch's foreach result within torch's own error: torch's fp32 norm of a large
    tensor is itself off (0.5% for 64M elements here, fp32 accumulation), so the tolerance
    against torch is widened by twice torch's measured error against the fp64 reference.
    """
    fp32 = gs.dtype == torch.float32
    # bf16: the returned norm and the scaled grads are rounded to 8 mantissa bits (2^-8 = 3.9e-3).
    ref_norm_rtol = 1e-5 if fp32 else 4e-3
    ref_grad_rtol = 2e-5 if fp32 else 1e-2
    torch_norm_rtol = 1e-4 if fp32 else 8e-3
    torch_grad_rtol = 1e-4 if fp32 else 3e-2  # torch takes its coefficient from a bf16 norm
    coef_ref = min(1.0, gs.max_norm / (gs.norm64 + 1e-6))

    gs.restore()
    n_torch = torch.nn.utils.clip_grad_norm_(gs.params, gs.max_norm, foreach=True)
    expected = [g.clone() for g in gs.grads]
    gs.restore()
    n_fc = fastclip.clip_grad_norm_(gs.params, gs.max_norm)
    info = {"norm_fp64": gs.norm64, "norm_torch": float(n_torch), "coef_fp64": coef_ref}
    try:
        if not isinstance(n_fc, torch.Tensor) or n_fc.dim() != 0:
            return f"returned {type(n_fc).__name__} {getattr(n_fc, 'shape', '')}, not a 0-dim tensor", info
        info["norm_fastclip"] = float(n_fc)
        torch_err = abs(float(n_torch) - gs.norm64) / gs.norm64
        info["torch_norm_rel_err"] = torch_err
        info["fastclip_norm_rel_err"] = abs(float(n_fc) - gs.norm64) / gs.norm64
        if n_fc.dtype != n_torch.dtype:
            return f"norm dtype {n_fc.dtype}, torch returns {n_torch.dtype}", info
        if info["fastclip_norm_rel_err"] > ref_norm_rtol:
            return (
                f"norm {float(n_fc):.9g} vs fp64 reference {gs.norm64:.9g} "
                f"(rel err {info['fastclip_norm_rel_err']:.2e} > {ref_norm_rtol})"
            ), info
        tol = torch_norm_rtol + 2 * torch_err
        if abs(float(n_fc) - float(n_torch)) > tol * abs(float(n_torch)):
            return f"norm {float(n_fc):.9g} vs torch {float(n_torch):.9g} (rtol {tol:.2e})", info
        grad_tol = torch_grad_rtol + 2 * torch_err
        for i, (g, e, v, p) in enumerate(zip(gs.grads, expected, gs.saved_views, gs.params)):
            if p.grad is not g:
                return f"grad {i}: .grad is a new tensor object (must be scaled in place)", info
            scale = float(e.abs().max()) if e.numel() else 0.0
            atol = 1e-6 * scale + 1e-30
            for k, (g_part, e_part, v_part) in enumerate(zip(_chunks(g), _chunks(e), _chunks(v))):
                for what, want, rtol in (
                    ("fp64 reference", v_part.double() * coef_ref, ref_grad_rtol),
                    ("torch", e_part, grad_tol),
                ):
                    try:
                        torch.testing.assert_close(g_part.to(want.dtype), want, rtol=rtol, atol=atol)
                    except AssertionError as exc:
                        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
                        return (
                            f"grad {i} {tuple(g.shape)} (flat elements from {k * CHECK_CHUNK}) "
                            f"differs from {what}: " + " | ".join(lines[:4])
                        ), info
                    finally:
                        del want
        # Clipping must really have happened (coefficient ~1e-3), or the timing is of a no-op.
        ratio = float(gs.grads[0].float().abs().max()) / max(float(gs.saved_views[0].float().abs().max()), 1e-30)
        if not (0.5e-3 < ratio < 2e-3):
            return f"grads scaled by {ratio:.3g}, expected ~1e-3", info
    finally:
        del expected
        gs.restore()
    return None, info


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def print_table(rows, file=sys.stdout):
    hdr = [
        "case",
        "dtype",
        "tensors",
        "elements",
        "fastclip us",
        "torch us",
        "torch-loop us",
        "speed-up",
        "target",
        "mul_ GB/s",
        "floor us",
        "fc %floor",
        "torch %floor",
        "fc %read floor",
    ]
    table = []
    for r in rows:
        if r.get("error"):
            table.append(
                [
                    r["case"],
                    r["dtype"],
                    str(r["tensors"]),
                    f"{r['numel']:,}",
                    "MISMATCH",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                ]
            )
            continue
        t = r["times"]
        tgt = r["target_speedup"]
        table.append(
            [
                r["case"] + ("*" if r.get("noisy") else ""),
                r["dtype"],
                str(r["tensors"]),
                f"{r['numel']:,}",
                fmt_us(t["fastclip"]["median_us"]),
                fmt_us(t["torch_foreach"]["median_us"]),
                fmt_us(t["torch_loop"]["median_us"]),
                f"{r['speedup_vs_best_torch']:.2f}x",
                "-" if tgt is None else (f">={tgt:g}x " + ("ok" if r["meets_target"] else "MISS")),
                f"{r['mul_bandwidth_GBps']:.1f}",
                fmt_us(r["floor_us"]),
                f"{100 * r['floor_fraction']['fastclip']:.0f}%",
                f"{100 * r['floor_fraction']['torch_best']:.0f}%",
                f"{100 * r['read_floor_us'] / t['fastclip']['median_us']:.0f}%",
            ]
        )
    print_aligned(hdr, table, left_cols=2, file=file)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_cpu",
        description="fastclip vs torch.nn.utils.clip_grad_norm_ on CPU (see bench/README.md).",
    )
    ap.add_argument("--quick", action="store_true", help="few repeats; whole run well under 60 s")
    ap.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="results file (default bench/results/cpu-<date>.json, or cpu-<date>-quick.json with --quick)",
    )
    ap.add_argument("--no-json", action="store_true", help="do not write a results file")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch.set_num_threads (default: torch's default, {torch.get_num_threads()} here)",
    )
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ",".join(CASES))
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of: fp32,bf16")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="fixed number of measured rounds per case (default: sized by time budget)",
    )
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds of measured rounds per case (default 0.4 quick, 6 full)"
    )
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = ap.parse_args(argv)

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; choose from {','.join(CASES)}")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; choose from {','.join(DTYPES)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.quick:
        warm_s, budget_s, rmin, rmax = 0.05, 0.4, 3, 300
    else:
        warm_s, budget_s, rmin, rmax = 0.3, 6.0, 9, 3000
    if args.budget is not None:
        budget_s = args.budget

    fastclip = import_fastclip()
    env = environment_info(fastclip)
    warn_backend(fastclip, "cpu")
    print(
        f"fastclip {env['fastclip']['version'] or ''} backend={env['fastclip']['backend']} | "
        f"torch {env['torch']} | python {env['python']} | {env['cpu']['model']} "
        f"({env['cpu']['torch_cpu_capability']}) | threads={env['threads']}"
    )

    jobs = [(c, d) for c in cases for d in dtypes]
    bar = None
    if tqdm is not None and not args.no_progress:
        bar = tqdm(total=len(jobs), desc="bench_cpu", unit="case", leave=False, file=sys.stderr)
    rows = []
    failed = False
    t_all = time.perf_counter()
    for c, d in jobs:
        desc, shapes_fn, target = CASES[c]
        if bar is not None:
            bar.set_postfix_str(f"{c} {d}")
        shapes = shapes_fn()
        gs = grad_set(c, d)
        row = {
            "case": c,
            "description": desc,
            "dtype": d,
            "tensors": len(shapes),
            "numel": gs.numel,
            "bytes": gs.nbytes,
            "max_norm": gs.max_norm,
            "norm_fp64": gs.norm64,
            "target_speedup": target,
        }
        err, check = check_case(fastclip, gs)
        row["check"] = check
        if err is not None:
            failed = True
            row["error"] = err
            msg = f"MISMATCH {c} {d}: {err}"
            (bar.write if bar is not None else print)(msg)
            rows.append(row)
            del gs
            if bar is not None:
                bar.update(1)
            continue

        params, mx = gs.params, gs.max_norm
        clip_torch = torch.nn.utils.clip_grad_norm_
        clip_fc = fastclip.clip_grad_norm_
        probe = gs.probe
        methods = {
            # arguments bound as defaults: the `del` at the end of the case frees them, not the lambdas
            "fastclip": (lambda ps=params: clip_fc(ps, mx), gs.restore),
            "torch_foreach": (lambda ps=params: clip_torch(ps, mx, foreach=True), gs.restore),
            "torch_loop": (lambda ps=params: clip_torch(ps, mx, foreach=False), gs.restore),
            "mul_": (lambda pr=probe: pr.mul_(0.5), gs.restore_probe),
            "sum": (lambda pr=probe: pr.sum(), lambda: None),
        }
        with OtherLoad() as other:
            samples, repeats, warm = time_interleaved(methods, warm_s, budget_s, rmin, rmax, args.repeats)
        times = {k: stats(v) for k, v in samples.items()}
        med = {k: v["median_us"] for k, v in times.items()}
        best_torch = min(med["torch_foreach"], med["torch_loop"])
        elem = gs.saved.element_size()
        probe_bytes_moved = 2 * gs.probe.numel() * 4  # read + write, fp32
        bw = probe_bytes_moved / (med["mul_"] * 1e-6)  # bytes/s
        floor_us = 3 * elem * gs.numel / bw * 1e6  # = 1.5 x t(mul_)
        row.update(
            {
                "repeats": repeats,
                "warmup_rounds": warm,
                "other_processes_cores": other.cores,
                "noisy": other.cores is not None and other.cores > NOISY_CORES,
                "times": times,
                "speedup_vs_best_torch": best_torch / med["fastclip"],
                "speedup_vs_torch_foreach": med["torch_foreach"] / med["fastclip"],
                "speedup_vs_torch_loop": med["torch_loop"] / med["fastclip"],
                "mul_bandwidth_GBps": bw / 1e9,
                "clip_bytes": 3 * elem * gs.numel,
                "floor_us": floor_us,
                # The grads must be read twice, whatever the writes cost: 2 x a read-only pass.
                "read_floor_us": 2 * med["sum"],
                "floor_fraction": {
                    "fastclip": floor_us / med["fastclip"],
                    "torch_foreach": floor_us / med["torch_foreach"],
                    "torch_loop": floor_us / med["torch_loop"],
                    "torch_best": floor_us / best_torch,
                },
            }
        )
        row["meets_target"] = None if target is None else row["speedup_vs_best_torch"] >= target
        rows.append(row)
        del methods, samples, gs, params, probe
        gc.collect()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_all

    print()
    print_table(rows)
    print(
        f"\nmedian of interleaved repeats; speed-up = best of torch foreach/loop over fastclip; "
        f"floor = 1.5 x in-place mul_ time (12 B/elem fp32, 6 B/elem bf16); read floor = 2 x sum() "
        f"of the probe (the two read passes alone); {wall:.1f} s"
    )
    noisy = [f"{r['case']} {r['dtype']} ({r['other_processes_cores']:.2f})" for r in rows if r.get("noisy")]
    if noisy:
        print(
            f"* NOT QUIET: other processes used CPU while these cases ran (average cores): "
            f"{', '.join(noisy)}. On a busy machine torch's multi-threaded ops stall far more "
            f"than a serial kernel; rerun on a quiet machine before quoting these numbers.",
            file=sys.stderr,
        )
    if failed:
        print(
            "MISMATCH: fastclip disagreed with torch on the cases marked above; they were not timed.", file=sys.stderr
        )

    if not args.no_json:
        path = results_path(args.json, "cpu", args.quick)
        out = {
            "benchmark": "bench_cpu",
            "command": command_line(__spec__),
            "quick": args.quick,
            **env,
            "settings": {
                "warmup_s": warm_s,
                "budget_s": budget_s,
                "min_repeats": rmin,
                "max_repeats": rmax,
                "repeats": args.repeats,
                "max_norm": "1e-3 x fp64 norm (every call clips)",
                "restore": "grads restored from a saved copy before each call, untimed",
                "floor": "3 x bytes of the grads / bandwidth of x.mul_(0.5) on an fp32 "
                "buffer of the same bytes (= 1.5 x its time)",
            },
            "wall_s": wall,
            "not_quiet_cases": noisy,
            "cases": rows,
        }
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
