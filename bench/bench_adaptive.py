#!/usr/bin/env python
"""AutoClip / ZClip: fastclip's device-resident clippers against the papers' algorithms
as their public code runs them (bench/baselines.py: norm read back with .item(), state in
Python, torch's clip_grad_norm_ or a per-grad mul_), same process, interleaved.

CPU (default): one clip call per variant per round, round-robin with the order rotating,
grads restored from a saved copy before every call (untimed), median of the rounds after
warm-up (bench/common.py's loop). Before timing, every clipper has seen `--history` steps,
so AutoClip's history is full (both sides keep the last `--history` norms) and ZClip is past
its 25 warm-up steps. The grads are the same on every call, so ZClip finds no spike: its
reference then skips its mul_ (one pass instead of fastclip's norm + no-store scale_), while
AutoClip's percentile is the norm itself and both sides scale every call.

    python -m bench.bench_adaptive                  # mlp, cnn; fp32; bench/results/adaptive-cpu-<date>.json
    python -m bench.bench_adaptive --quick --no-json

CUDA (`--device cuda`, run by tests/test_cuda_adaptive.py on a GPU machine): per-step wall
time of N back-to-back steps ended by one synchronize (a reference's .item() stalls every
step, fastclip's never), each step = grads restore + clip call; and a whole training step
(forward, backward, clip, Adam(fused=True)) eager with the reference, eager with fastclip,
and fastclip's step captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench.baselines import ItemAutoClip, ItemZClip
from bench.bench_cpu import CASES, grad_set
from bench.common import (
    NOISY_CORES,
    OtherLoad,
    command_line,
    environment_info,
    fmt_us,
    import_fastclip,
    print_aligned,
    results_path,
    stats,
    time_interleaved,
    warn_backend,
)


def variants(fastclip, history):
    """name -> (make the clipper, call it on params)."""
    return {
        "autoclip": (lambda: fastclip.AutoClip(history=history), lambda c, ps: c(ps)),
        "autoclip_ref": (lambda: ItemAutoClip(history=history), lambda c, ps: c(ps)),
        "zclip": (lambda: fastclip.ZClip(), lambda c, ps: c(ps)),
        "zclip_ref": (lambda: ItemZClip(), lambda c, ps: c(ps)),
    }


PAIRS = (("autoclip", "autoclip_ref"), ("zclip", "zclip_ref"))


def bench_cpu_case(fastclip, case, dtype, history, warm_s, budget_s, rmin, rmax):
    gs = grad_set(case, dtype)
    methods = {}
    for name, (make, call) in variants(fastclip, history).items():
        clipper = make()
        for _ in range(history):  # history full, warm-up over
            gs.restore()
            call(clipper, gs.params)
        methods[name] = ((lambda c=clipper, f=call: f(c, gs.params)), gs.restore)
    with OtherLoad() as other:
        samples, repeats, warm = time_interleaved(methods, warm_s, budget_s, rmin, rmax)
    row = {
        "case": case,
        "description": CASES[case][0],
        "dtype": dtype,
        "tensors": len(gs.shapes),
        "elements": gs.numel,
        "repeats": repeats,
        "warmup_rounds": warm,
        "other_processes_cores": other.cores,
        "noisy": other.cores is not None and other.cores > NOISY_CORES,
        "times": {n: stats(v) for n, v in samples.items()},
    }
    for fast, ref in PAIRS:
        row[f"{fast}_speedup"] = row["times"][ref]["median_us"] / row["times"][fast]["median_us"]
    return row


# ---- CUDA ------------------------------------------------------------------------------------


def _per_step_us(step, n):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def bench_cuda_clip(fastclip, case, dtype, history, steps, repeats):
    gs = grad_set(case, dtype)
    saved = [v.cuda() for v in gs.saved_views]
    params = [torch.nn.Parameter(torch.empty_like(v)) for v in saved]
    for p, v in zip(params, saved):
        p.grad = v.clone()

    def restore():
        torch._foreach_copy_([p.grad for p in params], saved)

    steps_fns = {"restore_only": restore}
    for name, (make, call) in variants(fastclip, history).items():
        clipper = make()
        for _ in range(history):
            restore()
            call(clipper, params)
        steps_fns[name] = lambda c=clipper, f=call: (restore(), f(c, params))
    samples = {n: [] for n in steps_fns}
    for r in range(repeats):  # interleaved, rotating order
        names = list(steps_fns)
        for j in range(len(names)):
            n = names[(r + j) % len(names)]
            samples[n].append(_per_step_us(steps_fns[n], steps))
    row = {
        "case": case,
        "dtype": dtype,
        "tensors": len(params),
        "elements": gs.numel,
        "steps_per_sample": steps,
        "repeats": repeats,
        "times": {n: {"median_us": statistics.median(v), "min_us": min(v)} for n, v in samples.items()},
    }
    for fast, ref in PAIRS:
        row[f"{fast}_speedup"] = row["times"][ref]["median_us"] / row["times"][fast]["median_us"]
    return row


def _mlp_model():
    return torch.nn.Sequential(
        torch.nn.Linear(512, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


def bench_cuda_train_step(fastclip, kind, history, steps, repeats):
    """Eager step + reference clipper, eager step + fastclip clipper, and the fastclip step
    captured in a CUDA graph (Adam(fused=True, capturable=True), found_inf wired)."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 512, device="cuda"), torch.randint(0, 10, (256,), device="cuda")
    make_fast = {
        "autoclip": lambda: fastclip.AutoClip(history=history, nonfinite="skip"),
        "zclip": lambda: fastclip.ZClip(nonfinite="skip"),
    }[kind]
    make_ref = {"autoclip": lambda: ItemAutoClip(history=history), "zclip": lambda: ItemZClip()}[kind]

    def setup(clipper, call, capturable=False):
        model = _mlp_model().cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True, capturable=capturable)
        params = list(model.parameters())

        def step():
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            call(clipper, params)
            if getattr(clipper, "found_inf", None) is not None:
                opt.found_inf = clipper.found_inf
            opt.step()

        return step

    fast_step = setup(make_fast(), lambda c, ps: c(ps))
    ref_step = setup(make_ref(), lambda c, ps: c(ps))
    graph_clipper = make_fast()
    graphed = setup(graph_clipper, lambda c, ps: c(ps), capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: allocations, fused-Adam state, clipper state
        for _ in range(max(history, 30)):
            graphed()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed()
    for s in (fast_step, ref_step):
        for _ in range(max(history, 30)):
            s()
    fns = {f"{kind}_ref_eager": ref_step, f"{kind}_eager": fast_step, f"{kind}_cuda_graph": graph.replay}
    samples = {n: [] for n in fns}
    for r in range(repeats):
        names = list(fns)
        for j in range(len(names)):
            n = names[(r + j) % len(names)]
            samples[n].append(_per_step_us(fns[n], steps))
    return {
        "train_step": kind,
        "model": "MLP 512-1024-1024-10, batch 256, Adam(fused=True)",
        "steps_per_sample": steps,
        "repeats": repeats,
        "times": {n: {"median_us": statistics.median(v), "min_us": min(v)} for n, v in samples.items()},
    }


# ---- main ------------------------------------------------------------------------------------


def print_rows(rows, names):
    hdr = ["case", "dtype", "tensors", *[f"{n} us" for n in names], "autoclip x", "zclip x"]
    table = [
        [
            r["case"] + ("*" if r.get("noisy") else ""),
            r["dtype"],
            str(r["tensors"]),
            *[fmt_us(r["times"][n]["median_us"]) for n in names],
            f"{r['autoclip_speedup']:.2f}",
            f"{r['zclip_speedup']:.2f}",
        ]
        for r in rows
    ]
    print_aligned(hdr, table, 2, sys.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_adaptive", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="few repeats")
    ap.add_argument("--cases", default="mlp,cnn", help="comma-separated subset of: " + ",".join(CASES))
    ap.add_argument("--dtypes", default="fp32", help="comma-separated subset of: fp32,bf16")
    ap.add_argument("--history", type=int, default=1000, help="AutoClip's history (both sides)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="results file (default bench/results/adaptive-<device>-<date>[-quick].json)",
    )
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = [c for c in args.cases.split(",") if c]
    dtypes = [d for d in args.dtypes.split(",") if d]
    fastclip = import_fastclip()
    warn_backend(fastclip, args.device)
    env = environment_info(fastclip)
    t0 = time.perf_counter()
    out = {
        "benchmark": "bench_adaptive",
        "command": command_line(__spec__),
        "quick": args.quick,
        "device": args.device,
        "history": args.history,
        **env,
    }
    if args.device == "cpu":
        warm_s, budget_s, rmin, rmax = (0.05, 0.4, 3, 300) if args.quick else (0.3, 4.0, 9, 3000)
        rows = [
            bench_cpu_case(fastclip, c, d, args.history, warm_s, budget_s, rmin, rmax) for c in cases for d in dtypes
        ]
        print_rows(rows, ["autoclip", "autoclip_ref", "zclip", "zclip_ref"])
        out["settings"] = {
            "warmup_s": warm_s,
            "budget_s": budget_s,
            "min_repeats": rmin,
            "max_repeats": rmax,
            "restore": "grads restored from a saved copy before each call, untimed",
        }
    else:
        out["gpu"] = torch.cuda.get_device_name()
        steps, repeats = (20, 5) if args.quick else (200, 15)
        rows = [bench_cuda_clip(fastclip, c, d, args.history, steps, repeats) for c in cases for d in dtypes]
        print_rows(rows, ["restore_only", "autoclip", "autoclip_ref", "zclip", "zclip_ref"])
        out["train_steps"] = [
            bench_cuda_train_step(fastclip, k, min(args.history, 100), steps, repeats) for k in ("autoclip", "zclip")
        ]
        for t in out["train_steps"]:
            print(t["train_step"], {n: round(v["median_us"], 1) for n, v in t["times"].items()})
    out["wall_s"] = time.perf_counter() - t0
    out["cases"] = rows
    noisy = [r["case"] for r in rows if r.get("noisy")]
    if noisy:
        print(f"* NOT QUIET while these cases ran: {', '.join(noisy)}; rerun before quoting them.", file=sys.stderr)
    out["not_quiet_cases"] = noisy
    if not args.no_json:
        path = results_path(args.json, f"adaptive-{args.device}", args.quick)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
