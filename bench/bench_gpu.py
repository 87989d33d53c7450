#!/usr/bin/env python
"""GPU microbenchmark: fastclip.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_.

For each model-shaped gradient set and dtype (fp32, bf16) it times, interleaved round-robin in
one process (the order rotates every repeat), one call per repeat of:

  fastclip        fastclip.clip_grad_norm_(params, max_norm)          (eager)
  torch           torch.nn.utils.clip_grad_norm_(..., foreach=True)   (eager)
  torch-graph     the torch call captured once in a CUDA graph, replayed
  fastclip-graph  the fastclip call captured once in a CUDA graph, replayed
  compile         torch.compile of the torch call (default mode)      (--compile-cases)
  compile-ro      the same with mode="reduce-overhead" (CUDA graphs)  (--compile-cases)
  copy            dst.copy_(src) of the set's bytes (the per-size bandwidth probe)

Every timed call starts from the same state: the grads are restored from a saved copy and L2 is
flushed (a write of twice its size), then the device is synchronised, so the CUDA-event interval
covers the whole call including its CPU-side launch overhead, from cold L2 (the HBM claim). max_norm
is 1e-3 of the true norm, so every call scales every gradient. Medians over the repeats.

Bandwidth: a clip reads every element for the norm and reads and writes it again for the scale,
3 x the set's bytes ("GB/s" counts those bytes; fastclip moves only 2 x when the set fits in
registers, which the figure does not credit). "% floor" compares that with the device's copy
bandwidth measured in this run (dst.copy_(src) of 1 GiB: 2 x bytes / time): the time of the three
passes at copy bandwidth over the time taken.
Launches: kernels (and memcpy/memset) per call, counted with torch.profiler.

Host time per call: a steady stream of eager calls, no synchronisation between them (as in a
training loop that never reads the norm back), timed on the host: what the call costs the CPU
thread that launches the update's kernels. max_norm is huge there (the host's work does not
depend on whether the grads are scaled, and nothing has to be restored between calls).

Before a case is timed fastclip is checked against an fp64 reference and torch; a mismatch is
reported as MISMATCH, not timed, and the exit status is 1.

    python -m bench.bench_gpu --quick
    python -m bench.bench_gpu --json bench/results/gpu.json --cases mlp,gpt2 --dtypes fp32
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch

from bench.common import (
    command_line,
    environment_info,
    fmt_us,
    gpt2_small_shapes,
    mlp_shapes,
    nature_cnn_shapes,
    one_billion_shapes,
    results_path,
    stats,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# name -> (description, shapes, repeats full, repeats quick, target speed-up vs torch)
CASES = {
    "mlp": ("RL MLP 4-64-64-2", mlp_shapes, 300, 60, 5.0),
    "cnn": ("Nature DQN CNN", nature_cnn_shapes, 200, 40, None),
    "gpt2": ("GPT-2 small", gpt2_small_shapes, 40, 10, None),
    "1b": ("~1B elements", one_billion_shapes, 12, 5, None),
}
CLIPS = ["fastclip", "torch", "torch-graph", "fastclip-graph", "compile", "compile-ro"]
HOST_STREAM_CALLS = 200


class GradSet:
    """Parameters with .grad on the GPU, plus a saved copy to restore them from."""

    def __init__(self, shapes, dtype, seed=0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.params, self.saved = [], []
        for s in shapes:
            p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device="cuda"))
            self.saved.append(torch.randn(s, generator=gen, device="cuda").to(dtype))
            p.grad = torch.empty_like(self.saved[-1])
            self.params.append(p)
        self.grads = [p.grad for p in self.params]
        self.numel = sum(t.numel() for t in self.saved)
        self.nbytes = self.numel * self.saved[0].element_size()
        sq = sum(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2 for t in self.saved)
        self.norm64 = math.sqrt(float(sq))
        self.max_norm = 1e-3 * self.norm64
        self.restore()

    def restore(self):
        torch._foreach_copy_(self.grads, self.saved)


def check(fastclip, gs):
    """None if fastclip's norm and grads match the fp64 reference (and torch), else why not."""
    gs.restore()
    torch_norm = torch.nn.utils.clip_grad_norm_(gs.params, gs.max_norm, foreach=True)
    torch_grads = [g.clone() for g in gs.grads]
    gs.restore()
    norm = fastclip.clip_grad_norm_(gs.params, gs.max_norm)
    bf16 = gs.saved[0].dtype == torch.bfloat16
    rel = abs(float(norm) - gs.norm64) / gs.norm64
    try:
        if norm.dtype != torch_norm.dtype:
            return f"norm dtype {norm.dtype}, torch {torch_norm.dtype}"
        if rel > (4e-3 if bf16 else 1e-5):
            return f"norm {float(norm):.9g} vs fp64 {gs.norm64:.9g} (rel err {rel:.2e})"
        coef = gs.max_norm / (gs.norm64 + 1e-6)
        for i, (g, s, t) in enumerate(zip(gs.grads, gs.saved, torch_grads)):
            want = s.double() * coef
            fc_err = float((g.double() - want).abs().max())
            torch_err = float((t.double() - want).abs().max())
            ulps = 1 if torch.finfo(g.dtype).bits == 16 else 4  # 16-bit: rounding dominates
            floor = ulps * torch.finfo(g.dtype).eps * float(want.abs().max())
            if fc_err > 2 * torch_err + floor:
                return f"grad {i} {tuple(g.shape)}: error {fc_err:.3g} > 2 x torch's {torch_err:.3g}"
        return None
    finally:
        del torch_grads
        gs.restore()


def capture(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first, as torch requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def launches_per_call(fn):
    """(kernels, memcpy + memset) the device ran for one call of fn, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = sum(n.startswith(("Memcpy", "Memset")) for n in names)
    return len(names) - copies, copies


def time_case(calls, restore, flush, repeats):
    """{name: [µs, ...]}: CUDA-event time of one call per repeat, from a synchronised start."""
    samples = {name: [] for name in calls}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    names = list(calls)
    for k in range(repeats + 3):  # the first 3 rounds are warm-up
        for j in range(len(names)):
            name = names[(k + j) % len(names)]
            restore()
            flush()
            torch.cuda.synchronize()
            start.record()
            calls[name]()
            end.record()
            end.synchronize()
            if k >= 3:
                samples[name].append(start.elapsed_time(end) * 1e3)
    return samples


def host_us_per_call(fn, calls=HOST_STREAM_CALLS):
    """Host µs per call of fn in a steady stream (no synchronisation between calls), median of 5."""
    import time

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(runs)


def compiled(fn, mode):
    """fn compiled by torch.compile and warmed up (compiled, its graphs recorded), or the error
    that stopped torch.compile. Dynamo's caches are reset first: each case compiles the same
    code for other tensors, which would otherwise recompile it with dynamic shapes."""
    torch._dynamo.reset()
    c = torch.compile(fn, mode=mode)
    try:
        for _ in range(3):
            c()
    except Exception as e:  # a peer that does not compile is reported, not fatal
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    torch.cuda.synchronize()
    return c


def copy_bandwidth(flush, repeats=20):
    """Device copy bandwidth in GB/s: 1 GiB copied (read + write), median of repeats."""
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    us = statistics.median(time_case({"copy": lambda: dst.copy_(src)}, lambda: None, flush, repeats)["copy"])
    return 2 * n / (us * 1e-6) / 1e9


def run_case(fastclip, name, dtype_name, quick, flush, copy_gbps, compile_peers):
    desc, shapes, reps_full, reps_quick, target = CASES[name]
    gs = GradSet(shapes(), DTYPES[dtype_name])
    row = {
        "case": name,
        "what": desc,
        "dtype": dtype_name,
        "tensors": len(shapes()),
        "numel": gs.numel,
        "bytes": gs.nbytes,
    }
    error = check(fastclip, gs)
    if error:
        row["error"] = error
        return row
    src, dst = (
        torch.empty(gs.nbytes, dtype=torch.uint8, device="cuda"),
        torch.empty(gs.nbytes, dtype=torch.uint8, device="cuda"),
    )
    eager = {
        "fastclip": lambda: fastclip.clip_grad_norm_(gs.params, gs.max_norm),
        "torch": lambda: torch.nn.utils.clip_grad_norm_(gs.params, gs.max_norm, foreach=True),
    }
    graphs = {f"{k}-graph": capture(fn) for k, fn in eager.items()}
    calls = {**eager, **{k: g.replay for k, g in graphs.items()}}
    failed = {}
    if compile_peers:
        for name, mode in (("compile", "default"), ("compile-ro", "reduce-overhead")):
            c = compiled(eager["torch"], mode)
            if isinstance(c, str):
                failed[name] = c
            else:
                calls[name] = c
        gs.restore()
    clips = [k for k in CLIPS if k in calls]
    calls["copy"] = lambda: dst.copy_(src)
    samples = time_case(calls, gs.restore, flush, reps_quick if quick else reps_full)
    times = {k: stats(v) for k, v in samples.items()}
    med = {k: t["median_us"] for k, t in times.items()}
    gbps = {k: 3 * gs.nbytes / (med[k] * 1e-6) / 1e9 for k in clips}
    huge = 1e30  # never clips: nothing to restore between calls of the stream
    host = {
        "fastclip": host_us_per_call(lambda: fastclip.clip_grad_norm_(gs.params, huge)),
        "torch": host_us_per_call(lambda: torch.nn.utils.clip_grad_norm_(gs.params, huge, foreach=True)),
    }
    gs.restore()
    row.update(
        times=times,
        peers_that_failed=failed,
        host_us_per_call=host,
        speedup_vs_torch=med["torch"] / med["fastclip"],
        speedup_vs_torch_graph=med["torch-graph"] / med["fastclip"],
        target_speedup_vs_torch=target,
        clip_GBps=gbps,
        fraction_of_copy_bandwidth={k: v / copy_gbps for k, v in gbps.items()},
        launches={k: dict(zip(("kernels", "memcpy_memset"), launches_per_call(calls[k]))) for k in clips[:4]},
    )
    return row


def targets(rows):
    """The goals, each with whether this run met it."""
    out = []
    for r in rows:
        if "error" in r:
            continue
        tag = f"{r['case']} {r['dtype']}"
        if r["target_speedup_vs_torch"]:
            out.append(
                (
                    f"{tag}: >= {r['target_speedup_vs_torch']:g}x torch",
                    r["speedup_vs_torch"] >= r["target_speedup_vs_torch"],
                )
            )
        if r["numel"] >= 100_000_000:
            out.append((f"{tag}: >= 92% of the 3-pass floor", r["fraction_of_copy_bandwidth"]["fastclip"] >= 0.92))
        if r["case"] == "mlp":
            out.append((f"{tag}: <= 12 us from an idle GPU", r["times"]["fastclip"]["median_us"] <= 12))
            out.append((f"{tag}: <= 6 us replayed in a CUDA graph", r["times"]["fastclip-graph"]["median_us"] <= 6))
            out.append((f"{tag}: <= 5 us of host time per call", r["host_us_per_call"]["fastclip"] <= 5))
        out.append((f"{tag}: not slower than torch", r["speedup_vs_torch"] >= 1.0))
    return [{"goal": g, "met": met} for g, met in out]


def print_table(rows, copy_gbps):
    print(f"device copy bandwidth: {copy_gbps:.0f} GB/s")
    hdr = [
        "case",
        "dtype",
        "tensors",
        "elements",
        "fastclip us",
        "torch us",
        "torch-graph us",
        "fc-graph us",
        "compile us",
        "compile-ro us",
        "x torch",
        "x torch-graph",
        "fc GB/s",
        "% floor",
        "host us fc/torch",
        "launches fc/torch",
    ]
    table = []
    for r in rows:
        head = [r["case"], r["dtype"], str(r["tensors"]), f"{r['numel']:,}"]
        if "error" in r:
            table.append(head + ["MISMATCH: " + r["error"]] + [""] * (len(hdr) - 5))
            continue
        m = {k: v["median_us"] for k, v in r["times"].items()}
        lc, host = r["launches"], r["host_us_per_call"]
        table.append(
            head
            + [
                fmt_us(m["fastclip"]),
                fmt_us(m["torch"]),
                fmt_us(m["torch-graph"]),
                fmt_us(m["fastclip-graph"]),
                fmt_us(m["compile"]) if "compile" in m else "-",
                fmt_us(m["compile-ro"]) if "compile-ro" in m else "-",
                f"{r['speedup_vs_torch']:.1f}x",
                f"{r['speedup_vs_torch_graph']:.1f}x",
                f"{r['clip_GBps']['fastclip']:.0f}",
                f"{100 * r['fraction_of_copy_bandwidth']['fastclip']:.0f}%",
                f"{host['fastclip']:.1f}/{host['torch']:.1f}",
                f"{lc['fastclip']['kernels']}/{lc['torch']['kernels']}",
            ]
        )
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(hdr)]
    for cells in [hdr, ["-" * w for w in widths]] + table:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))


def main(argv=None):
    ap = argparse.ArgumentParser(description="fastclip vs torch clip_grad_norm_ on a GPU")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--json", metavar="PATH", help="results file (default bench/results/gpu-<date>[-quick].json)")
    ap.add_argument("--no-json", action="store_true", help="write no results file")
    ap.add_argument("--cases", default=",".join(CASES), help="subset of " + ",".join(CASES))
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="subset of " + ",".join(DTYPES))
    ap.add_argument(
        "--compile-cases",
        help="cases (fp32) timed against torch.compile too; compiling costs seconds a case "
        "(default: mlp,gpt2 with --quick, else every case)",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device")
    import fastclip

    if fastclip.backend() != "cuda":
        print(f"WARNING: fastclip.backend() is {fastclip.backend()!r}: not timing the CUDA kernels", file=sys.stderr)
    env = environment_info(fastclip)
    env["command"] = command_line(__spec__)
    scratch = torch.empty(2 * env["gpu"]["l2_bytes"], dtype=torch.uint8, device="cuda")
    flush = scratch.zero_
    copy_gbps = copy_bandwidth(flush)
    compile_cases = (args.compile_cases or ("mlp,gpt2" if args.quick else ",".join(CASES))).split(",")
    rows = []
    for name in args.cases.split(","):
        for dt in args.dtypes.split(","):
            peers = name in compile_cases and dt == "fp32"
            rows.append(run_case(fastclip, name, dt, args.quick, flush, copy_gbps, peers))
            torch.cuda.empty_cache()
            print(f"done: {name} {dt}", file=sys.stderr)
    print_table(rows, copy_gbps)
    goals = targets(rows)
    for t in goals:
        print(f"{'met ' if t['met'] else 'MISS'}  {t['goal']}")
    if not args.no_json:
        path = results_path(args.json, "gpu", args.quick)
        path.write_text(
            json.dumps({"environment": env, "copy_GBps": copy_gbps, "cases": rows, "targets": goals}, indent=2) + "\n"
        )
        print(f"wrote {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
