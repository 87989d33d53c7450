#!/usr/bin/env python
"""Clip time under FSDP2: fastclip against torch.nn.utils.clip_grad_norm_ on sharded grads.

    python -m bench.bench_distributed            # 2 ranks, gloo, CPU; writes bench/results/distributed-cpu-<date>.json
    python -m bench.bench_distributed --quick    # few repeats, writes ...-quick.json

The script starts WORLD ranks itself (gloo on loopback, one thread each). Every
rank holds the CNN and GPT-2-like gradient sets of bench/bench_cpu.py as a
module sharded with `fully_shard`, so each grad is a DTensor with one Shard(0)
piece per rank, as after an FSDP2 backward. Per repeat, in one process group and
interleaved (the order rotates every repeat), it times one call each of

  fastclip   fastclip.clip_grad_norm_(params, max_norm)        (fused local pass + one all-reduce)
  torch      torch.nn.utils.clip_grad_norm_(params, max_norm)  (foreach; DTensor dispatch + collectives)
  (local)    fastclip on the local shards as plain tensors: the fused pass alone, no all-reduce
  (probe)    dist.all_reduce of one fp64 number: the collective's latency floor

with the grads restored from a saved copy and all ranks lined up by a barrier
before each call (both untimed). A call lasts until its slowest rank returns, so
a repeat's time is the max over the ranks; the table gives the median of those
over the repeats after a warm-up. max_norm is 1e-3 of the norm, so every call
really scales every grad. A correctness guard compares fastclip's norm and
clipped grads with torch's on the case before timing it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_cpu import CASES, DTYPES
from bench.common import (
    NOISY_CORES,
    OtherLoad,
    command_line,
    environment_info,
    fmt_us,
    import_fastclip,
    print_aligned,
    results_path,
    run_rounds,
    stats,
    warn_backend,
)

BENCH_CASES = ("cnn", "gpt2")


def sharded_grads(shapes, dtype, mesh, seed):
    """A module holding `shapes` sharded by fully_shard, grads set: (params, saved local grads)."""
    from torch.distributed.fsdp import fully_shard

    module = torch.nn.Module()
    module.params = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(s, dtype=dtype)) for s in shapes)
    fully_shard(module, mesh=mesh)
    gen = torch.Generator().manual_seed(seed)
    params = list(module.parameters())
    saved = []
    for p in params:
        p.grad = p.detach().clone()  # a DTensor with the parameter's placements
        local = p.grad.to_local()
        saved.append(torch.randn(local.shape, generator=gen).to(dtype))
        local.copy_(saved[-1])
    return params, saved


def restore(params, saved):
    if params:
        torch._foreach_copy_([p.grad.to_local() for p in params], saved)


def fp64_norm(saved):
    """The global norm from every rank's saved shards, summed in fp64 (the reference)."""
    import torch.distributed as dist

    total = torch.tensor([sum(float(s.double().pow(2).sum()) for s in saved)], dtype=torch.float64)
    dist.all_reduce(total)
    return math.sqrt(total.item())


def check(fastclip, ours, theirs, saved_ours, saved_theirs, max_norm, exact, dtype):
    """fastclip's norm against the fp64 reference and torch's, its clipped grads against
    torch's (tolerances as bench_cpu.check_case: widened by torch's own measured error)."""
    restore(ours, saved_ours)
    restore(theirs, saved_theirs)
    n_ours = fastclip.clip_grad_norm_(ours, max_norm).full_tensor().item()
    n_torch = torch.nn.utils.clip_grad_norm_(theirs, max_norm).full_tensor().item()
    fp32 = dtype == torch.float32
    torch_err = abs(n_torch - exact) / exact
    err = None
    if abs(n_ours - exact) > (1e-5 if fp32 else 4e-3) * exact:
        err = f"norm {n_ours:.9g} vs fp64 reference {exact:.9g}"
    elif abs(n_ours - n_torch) > ((1e-4 if fp32 else 8e-3) + 2 * torch_err) * n_torch:
        err = f"norm {n_ours:.9g} vs torch {n_torch:.9g}"
    for a, b in zip(ours, theirs):
        a, b = a.grad.to_local(), b.grad.to_local()
        try:
            torch.testing.assert_close(
                a,
                b,
                rtol=(1e-4 if fp32 else 3e-2) + 2 * torch_err,
                atol=1e-6 * float(b.abs().max()) if b.numel() else 0.0,
            )
        except AssertionError as exc:
            err = err or f"grads differ: {str(exc).splitlines()[0]}"
    restore(ours, saved_ours)
    restore(theirs, saved_theirs)
    return err


def time_case(fastclip, params, saved, max_norm, repeats, warm):
    """{method: [µs per repeat on this rank]}; every rank runs the same calls in the same order."""
    import torch.distributed as dist

    local = [torch.nn.Parameter(torch.empty_like(p.grad.to_local())) for p in params["fastclip"]]
    for q, p in zip(local, params["fastclip"]):
        q.grad = p.grad.to_local()  # the same storage: restored with the fastclip set
    methods = {
        "fastclip": lambda: fastclip.clip_grad_norm_(params["fastclip"], max_norm),
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params["torch"], max_norm, foreach=True),
        # The local shards as plain tensors: the fused pass alone, no collective (a wrong
        # norm, timed only to show what the all-reduce and the DTensor handling add).
        "fastclip_local": lambda: fastclip.clip_grad_norm_(local, max_norm),
        # One all-reduce of one fp64 number: the latency floor of any distributed clip here.
        "all_reduce": lambda: dist.all_reduce(scalar),
    }
    scalar = torch.zeros(1, dtype=torch.float64)
    params = dict(params, fastclip_local=params["fastclip"], all_reduce=[])
    saved = dict(saved, fastclip_local=saved["fastclip"], all_reduce=[])
    names = list(methods)
    clock = time.perf_counter_ns

    def one_round(k, samples):
        for j in range(len(names)):
            name = names[(k + j) % len(names)]
            restore(params[name], saved[name])
            dist.barrier()
            t0 = clock()
            methods[name]()
            t1 = clock()
            if samples is not None:
                samples[name].append((t1 - t0) / 1e3)

    samples = {n: [] for n in names}
    # Fixed warm-up and repeat counts (not sized from a clock): every rank must make the same calls.
    run_rounds(one_round, samples, min_warm=warm, warm_s=0.0, budget_s=0.0, rmin=repeats, rmax=repeats, repeats=repeats)
    return samples


def worker(rank, world, store, args):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=_dt.timedelta(seconds=120)
    )
    fastclip = import_fastclip()
    mesh = init_device_mesh("cpu", (world,))
    rows, failed = [], False
    for case in args.cases.split(","):
        desc, shapes_fn, _ = CASES[case]
        shapes = shapes_fn()
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            params, saved = {}, {}
            for name in ("fastclip", "torch"):  # identical values: the same seed per rank
                params[name], saved[name] = sharded_grads(shapes, dtype, mesh, seed=rank)
            exact = fp64_norm(saved["torch"])
            max_norm = 1e-3 * exact
            err = check(
                fastclip, params["fastclip"], params["torch"], saved["fastclip"], saved["torch"], max_norm, exact, dtype
            )
            errs = [None] * world
            dist.all_gather_object(errs, err)
            row = {
                "case": case,
                "what": desc,
                "dtype": dname,
                "tensors": len(shapes),
                "numel": sum(math.prod(s) for s in shapes),
                "world_size": world,
                "max_norm": max_norm,
                "norm_fp64": exact,
            }
            if any(errs):
                row["error"] = [e for e in errs if e][0]
                failed = True
                rows.append(row)
                continue
            with OtherLoad() as load:
                samples = time_case(fastclip, params, saved, max_norm, args.repeats, args.warm)
            gathered = [None] * world
            dist.all_gather_object(gathered, samples)
            slowest = {name: [max(g[name][i] for g in gathered) for i in range(args.repeats)] for name in samples}
            row["times"] = {name: stats(xs) for name, xs in slowest.items()}
            row["per_rank_median_us"] = {name: [statistics.median(g[name]) for g in gathered] for name in samples}
            row["speedup"] = row["times"]["torch"]["median_us"] / row["times"]["fastclip"]["median_us"]
            loads = [None] * world
            dist.all_gather_object(loads, load.cores)
            row["other_load_cores"] = loads
            # Our own ranks are the "other processes" of each other: flag only load beyond them.
            row["noisy"] = any(c is not None and c > (world - 1) + NOISY_CORES for c in loads)
            rows.append(row)
            if rank == 0:
                print(
                    f"  {case} {dname}: fastclip {fmt_us(row['times']['fastclip']['median_us'])} µs, "
                    f"torch {fmt_us(row['times']['torch']['median_us'])} µs",
                    flush=True,
                )
    if rank == 0:
        report(rows, world, args, fastclip)
    dist.destroy_process_group()
    return 1 if failed else 0


def report(rows, world, args, fastclip):
    hdr = [
        "case",
        "dtype",
        "tensors",
        "elements",
        "fastclip us",
        "torch us",
        "speed-up",
        "local pass us",
        "all_reduce us",
    ]
    table = []
    for r in rows:
        if r.get("error"):
            table.append([r["case"], r["dtype"], str(r["tensors"]), f"{r['numel']:,}", "MISMATCH", "-", "-", "-", "-"])
            continue
        t = r["times"]
        table.append(
            [
                r["case"] + ("*" if r["noisy"] else ""),
                r["dtype"],
                str(r["tensors"]),
                f"{r['numel']:,}",
                fmt_us(t["fastclip"]["median_us"]),
                fmt_us(t["torch"]["median_us"]),
                f"{r['speedup']:.2f}x",
                fmt_us(t["fastclip_local"]["median_us"]),
                fmt_us(t["all_reduce"]["median_us"]),
            ]
        )
    print(
        f"\nFSDP2, {world} ranks, gloo, CPU, 1 thread per rank; median over {args.repeats} repeats "
        "of the slowest rank's time per call;\n'local pass' = fastclip on the local shards alone, "
        "no all-reduce (not a valid clip: what the collective and the DTensor handling add);\n"
        "'all_reduce' = one all-reduce of one fp64 number, the latency floor of the collective"
    )
    print_aligned(hdr, table, left_cols=2, file=sys.stdout)
    for r in rows:
        if r.get("error"):
            print(f"MISMATCH {r['case']} {r['dtype']}: {r['error']}")
    if any(r.get("noisy") for r in rows):
        print("NOT QUIET: * marks cases during which other processes used the CPU; rerun before quoting them.")
    if args.no_json:
        return
    path = results_path(args.json, "distributed-cpu", args.quick)
    out = {
        "command": args.command,
        "environment": environment_info(fastclip),
        "world_size": world,
        "backend": "gloo",
        "threads_per_rank": 1,
        "repeats": args.repeats,
        "warmup": args.warm,
        "method": "interleaved per repeat, barrier before each call, time = slowest rank; median over repeats",
        "cases": rows,
    }
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_distributed", description="fastclip vs torch clip under FSDP2 (gloo, CPU)."
    )
    ap.add_argument("--world-size", type=int, default=2, help="ranks (processes), one CPU thread each (default: 2)")
    ap.add_argument("--quick", action="store_true", help="few repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 60, 10 with --quick)")
    ap.add_argument("--warm", type=int, default=5, help="untimed warm-up rounds per case")
    ap.add_argument("--cases", default=",".join(BENCH_CASES), help="comma-separated subset of: cnn,gpt2")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of: fp32,bf16")
    ap.add_argument("--json", metavar="PATH", default=None, help="results file")
    ap.add_argument("--no-json", action="store_true")
    ap.add_argument("--worker", nargs=2, type=str, metavar=("RANK", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 10 if args.quick else 60
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        args.command = os.environ.get("FASTCLIP_BENCH_COMMAND", "")
        return worker(int(args.worker[0]), args.world_size, args.worker[1], args)
    fastclip = import_fastclip()
    warn_backend(fastclip, "cpu")
    command = command_line(__spec__)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", FASTCLIP_BENCH_COMMAND=command)
        worker_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.bench_distributed",
                    *worker_argv,
                    "--worker",
                    str(r),
                    os.path.join(tmp, "store"),
                ],
                cwd=Path(__file__).resolve().parent.parent,  # where `-m bench...` resolves
                env=env,
            )
            for r in range(args.world_size)
        ]
        try:
            codes = [p.wait() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
