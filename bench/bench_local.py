#!/usr/bin/env python
"""CPU microbenchmark: local (per-layer) and adaptive (AGC) clipping, fused vs plain torch.

For each model-shaped set (bench_cpu's MLP, Nature DQN CNN, GPT-2-like and 3000-tiny sets) and
dtype it times, in one process, interleaved round-robin (the order rotates every repeat), median
of the repeats after a warm-up:

  per-layer   fastclip.clip_grad_norm_per_layer_(params, max_norm)
              against the per-parameter loop `for p in params: clip_grad_norm_([p], max_norm)`
  agc         fastclip.adaptive_clip_grad_(params, 0.01)
              against the timm-style loop (unit norms of weight and grad, masked rescale)

The torch loops are in bench/baselines.py. Every call really clips:
max_norm is 1e-3 of the smallest per-tensor norm, and the grads are 10x their weights (AGC's
clip_factor is 0.01), so every tensor / every unit is scaled. The grads are restored from a saved
copy before each timed call, outside the timed region.

Before timing, a guard checks fastclip's grads against the torch loop's on the case itself; a
mismatch is reported, not timed, and the exit status is 1.

    python -m bench.bench_local --quick
    python -m bench.bench_local --json bench/results/local-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

from bench.baselines import torch_adaptive_clip_grad_, torch_per_layer_clip_
from bench.bench_cpu import CASES as CPU_CASES
from bench.bench_cpu import DTYPES, _numel
from bench.common import (
    NOISY_CORES,
    OtherLoad,
    command_line,
    environment_info,
    fmt_us,
    import_fastclip,
    print_aligned,
    stats,
    time_interleaved,
    warn_backend,
)

# name -> the speed-up over the torch loop the project aims at, per function
CASES = {"mlp": 10.0, "cnn": 1.5, "gpt2": 1.5, "tiny": None}
FUNCTIONS = ("per-layer", "agc")
CLIP_FACTOR = 0.01


class ParamSet:
    """Parameters with random weights and grads 10x the weights' scale, plus a saved copy of the
    grads to restore from (one flat buffer; the grads themselves are separate allocations)."""

    def __init__(self, shapes, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.numel = sum(_numel(s) for s in shapes)
        self.params, self.saved = [], []
        for s in shapes:
            p = torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))
            saved = (torch.randn(s, generator=g) * 10).to(dtype)
            p.grad = saved.clone()
            self.params.append(p)
            self.saved.append(saved)
        self.grads = [p.grad for p in self.params]
        # every tensor clipped: 1e-3 of the smallest per-tensor norm
        self.max_norm = 1e-3 * min(float(torch.linalg.vector_norm(s.double())) for s in self.saved)

    def restore(self):
        torch._foreach_copy_(self.grads, self.saved)


def calls(fastclip, ps: ParamSet, fn):
    """(fastclip call, torch loop call) for one function."""
    params, mx = ps.params, ps.max_norm
    if fn == "per-layer":
        return (lambda: fastclip.clip_grad_norm_per_layer_(params, mx), lambda: torch_per_layer_clip_(params, mx))
    return (
        lambda: fastclip.adaptive_clip_grad_(params, CLIP_FACTOR),
        lambda: torch_adaptive_clip_grad_(params, CLIP_FACTOR),
    )


def check(ps: ParamSet, ours, theirs):
    """fastclip's grads against the torch loop's, within the loop's own rounding; and really clipped."""
    ps.restore()
    theirs()
    expected = [g.clone() for g in ps.grads]
    ps.restore()
    ours()
    rtol = 1e-4 if ps.grads[0].dtype == torch.float32 else 3e-2
    try:
        for i, (g, e, s) in enumerate(zip(ps.grads, expected, ps.saved)):
            torch.testing.assert_close(g.float(), e.float(), rtol=rtol, atol=rtol * float(e.float().abs().max()))
            if torch.equal(g, s):
                return f"grad {i} was not clipped: the timing would be of a no-op"
    except AssertionError as exc:
        return f"grad {i} differs from the torch loop: " + " | ".join(str(exc).strip().splitlines()[:3])
    finally:
        ps.restore()
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_local", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats")
    ap.add_argument("--json", metavar="PATH", default=None, help="results file (default: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--cases", default=",".join(CASES), help="subset of: " + ",".join(CASES))
    ap.add_argument("--dtypes", default="fp32,bf16", help="subset of: fp32,bf16")
    ap.add_argument("--functions", default=",".join(FUNCTIONS), help="subset of: " + ",".join(FUNCTIONS))
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warm_s, budget_s, rmin, rmax = (0.05, 0.4, 3, 300) if args.quick else (0.3, 4.0, 9, 3000)

    fastclip = import_fastclip()
    env = environment_info(fastclip)
    warn_backend(fastclip, "cpu")
    print(
        f"fastclip backend={env['fastclip']['backend']} | torch {env['torch']} | {env['cpu']['model']} "
        f"({env['cpu']['torch_cpu_capability']}) | threads={env['threads']}"
    )
    rows, failed = [], False
    for case in args.cases.split(","):
        desc, shapes_fn, _ = CPU_CASES[case]
        for d in args.dtypes.split(","):
            ps = ParamSet(shapes_fn(), DTYPES[d])
            for fn in args.functions.split(","):
                row = {
                    "case": case,
                    "description": desc,
                    "dtype": d,
                    "function": fn,
                    "tensors": len(ps.params),
                    "numel": ps.numel,
                    "target_speedup": CASES[case],
                }
                ours, theirs = calls(fastclip, ps, fn)
                err = check(ps, ours, theirs)
                if err:
                    failed = True
                    row["error"] = err
                    print(f"MISMATCH {case} {d} {fn}: {err}")
                    rows.append(row)
                    continue
                methods = {"fastclip": (ours, ps.restore), "torch_loop": (theirs, ps.restore)}
                with OtherLoad() as other:
                    samples, repeats, warm = time_interleaved(methods, warm_s, budget_s, rmin, rmax)
                times = {k: stats(v) for k, v in samples.items()}
                speedup = times["torch_loop"]["median_us"] / times["fastclip"]["median_us"]
                row.update(
                    {
                        "repeats": repeats,
                        "warmup_rounds": warm,
                        "other_processes_cores": other.cores,
                        "noisy": other.cores is not None and other.cores > NOISY_CORES,
                        "times": times,
                        "speedup": speedup,
                        "meets_target": None if CASES[case] is None else speedup >= CASES[case],
                    }
                )
                rows.append(row)
    hdr = ["case", "dtype", "function", "tensors", "elements", "fastclip us", "torch loop us", "speed-up", "target"]
    table = []
    for r in rows:
        if r.get("error"):
            table.append(
                [r["case"], r["dtype"], r["function"], str(r["tensors"]), f"{r['numel']:,}", "MISMATCH", "-", "-", "-"]
            )
            continue
        tgt = r["target_speedup"]
        table.append(
            [
                r["case"] + ("*" if r["noisy"] else ""),
                r["dtype"],
                r["function"],
                str(r["tensors"]),
                f"{r['numel']:,}",
                fmt_us(r["times"]["fastclip"]["median_us"]),
                fmt_us(r["times"]["torch_loop"]["median_us"]),
                f"{r['speedup']:.2f}x",
                "-" if tgt is None else f">={tgt:g}x " + ("ok" if r["meets_target"] else "MISS"),
            ]
        )
    print_aligned(hdr, table, left_cols=3, file=sys.stdout)
    noisy = [f"{r['case']} {r['dtype']} {r['function']}" for r in rows if r.get("noisy")]
    if noisy:
        print(
            f"NOT QUIET: other processes used > {NOISY_CORES} cores during (*): {', '.join(noisy)}; "
            "rerun on a quiet machine before quoting these",
            file=sys.stderr,
        )
    if args.json:
        out = {
            "benchmark": "bench_local",
            "command": command_line(__spec__),
            "environment": env,
            "date": _dt.date.today().isoformat(),
            "clip_factor": CLIP_FACTOR,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
