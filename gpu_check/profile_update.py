#!/usr/bin/env python
"""Where a clip's time goes where users call it: between loss.backward() and opt.step() of a real
DQN update on the GPU (bench/bench_update.py's network), grads fresh from
zero_grad(set_to_none=True) every update.

1. Host time of the clip, layer by layer, in the update and re-clipping the same grads in a loop:
   fastclip.clip_grad_norm_ (the public call), fastclip._C.clip_params (its C++ eager entry) and
   torch.ops.fastclip.clip_grad_norm_ (the op through the dispatcher). Differences between the
   layers are what each costs; differences between "in the update" and "hot loop" are the price of
   fresh grads and cold caches.
2. The same clip timed with CUDA events as bench_update does (host gap + kernel).
3. torch.profiler (CPU and CUDA activities) over 20 updates: the CPU-side calls inside the clip,
   by self time, and the kernels it ran. The trace is written to OUT/trace.json.
4. Probes that are not the clip, timed the same way (right after backward, and hot): fixed pure
   Python work, a 0-dim CUDA allocation, a one-element CUDA op. If they slow down after backward
   as much as the clip does, the thread itself is slow there (a CPU that slept while backward or
   the synchronize waited), not fastclip's path. And the public clip in updates synchronised only
   every 10th time (the thread sleeps less).

    python gpu_check/profile_update.py --out DIR [--net dqn]
    python gpu_check/profile_update.py --kernel-only    the large set alone, for ncu (run.sh)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import fastclip
from bench.bench_update import NETS
from fastclip import _ops

UPDATES = 300


def update_parts(net):
    """(params, one update up to the clip, the step after it)."""
    gen = torch.Generator().manual_seed(0)
    _, _, factory, max_norm = NETS[net]
    model, make_opt, batches, loss_fn = factory(torch.device("cuda"), gen)
    params = list(model.parameters())
    opt = make_opt(params)
    k = [0]

    def forward_backward():
        loss = loss_fn(model, batches[k[0] % len(batches)])
        k[0] += 1
        opt.zero_grad(set_to_none=True)
        loss.backward()

    return params, forward_backward, opt.step, max_norm


def python_work():
    return sum(i * i for i in range(100))


def probes():
    x = torch.zeros(1, device="cuda")
    return {
        "probe: pure Python (100-term sum)": python_work,
        "probe: torch.empty((), device=cuda)": lambda: torch.empty((), device="cuda"),
        "probe: x.add_(1), one element": lambda: x.add_(1),
    }


def clip_layers(params, max_norm):
    grads = lambda: [p.grad for p in params]
    return {
        "fastclip.clip_grad_norm_": lambda: fastclip.clip_grad_norm_(params, max_norm),
        "_C.clip_params": lambda: _ops.clip_params(params, max_norm, 2.0),
        "torch.ops op": lambda: _ops.clip_grad_norm_(grads(), max_norm, 2.0, torch.float32),
        "torch.nn.utils (foreach)": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True),
    }


def host_times(params, forward_backward, step, max_norm):
    """{layer: {"update": median host µs after backward, "hot": median host µs re-clipping}}."""
    layers = {**clip_layers(params, max_norm), **probes()}
    names = list(layers)
    in_update = {n: [] for n in names}
    for i in range(UPDATES * 2):
        name = names[i % len(names)]
        forward_backward()
        t0 = time.perf_counter_ns()
        layers[name]()
        in_update[name].append((time.perf_counter_ns() - t0) / 1e3)
        step()
        torch.cuda.synchronize()
    rare_sync = []
    for i in range(UPDATES):
        forward_backward()
        t0 = time.perf_counter_ns()
        fastclip.clip_grad_norm_(params, max_norm)
        rare_sync.append((time.perf_counter_ns() - t0) / 1e3)
        step()
        if i % 10 == 9:
            torch.cuda.synchronize()
    in_update["fastclip, synchronised every 10th update"] = rare_sync
    hot = {"fastclip, synchronised every 10th update": float("nan")}
    forward_backward()
    for name in names:
        fn = layers[name]
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(200):
            t0 = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - t0) / 1e3)
        torch.cuda.synchronize()
        hot[name] = statistics.median(samples)
    return {n: {"update": statistics.median(in_update[n][5:]), "hot": hot[n]} for n in in_update}


def event_times(params, forward_backward, step, max_norm):
    """Median CUDA-event time of the clip in the update, as bench_update measures it."""
    out = {}
    for name, fn in clip_layers(params, max_norm).items():
        samples = []
        for _ in range(60):
            forward_backward()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            step()
            torch.cuda.synchronize()
            samples.append(e0.elapsed_time(e1) * 1e3)
        out[name] = statistics.median(samples[5:])
    return out


def profile(params, forward_backward, step, max_norm, out_dir):
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(10):
        forward_backward()
        fastclip.clip_grad_norm_(params, max_norm)
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            forward_backward()
            with record_function("CLIP"):
                fastclip.clip_grad_norm_(params, max_norm)
            step()
        torch.cuda.synchronize()
    if out_dir:
        prof.export_chrome_trace(str(out_dir / "trace.json"))
    events = prof.events()
    clips = [e for e in events if e.name == "CLIP" and e.device_type == torch.autograd.DeviceType.CPU]
    inside, kernels = {}, {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and e.name != "CLIP":
            for c in clips:
                if c.time_range.start <= e.time_range.start and e.time_range.end <= c.time_range.end:
                    t = inside.setdefault(e.name, [0.0, 0])
                    t[0] += e.self_cpu_time_total / len(clips)
                    t[1] += 1
                    break
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA and "fastclip" in e.name:
            k = kernels.setdefault(e.name, [])
            k.append(e.time_range.end - e.time_range.start)
    total = statistics.median(c.time_range.end - c.time_range.start for c in clips)
    return {
        "clip_cpu_us_median": total,
        "inside_clip_self_us_per_call": {k: round(v[0], 2) for k, v in sorted(inside.items(), key=lambda x: -x[1][0])},
        "calls_per_clip": {k: v[1] / len(clips) for k, v in inside.items()},
        "fastclip_kernels_us": {k: statistics.median(v) for k, v in kernels.items()},
    }


def kernel_only():
    """A GPT-2-sized fp32 set clipped a few times: ncu looks at one of those launches."""
    from bench.common import gpt2_small_shapes

    grads = [torch.randn(s, device="cuda") for s in gpt2_small_shapes()]
    for _ in range(4):
        torch.ops.fastclip.clip_grad_norm_(grads, 1e-3, 2.0)
    torch.cuda.synchronize()
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for profile.json and trace.json")
    ap.add_argument("--net", default="dqn", choices=sorted(NETS))
    ap.add_argument("--kernel-only", action="store_true", help="only the large set, for ncu")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or fastclip.backend() != "cuda":
        print(f"profile_update: needs a GPU and the CUDA kernels (backend {fastclip.backend()!r})")
        return 2
    if args.kernel_only:
        return kernel_only()
    torch.set_num_threads(1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    params, forward_backward, step, max_norm = update_parts(args.net)
    for _ in range(20):
        forward_backward()
        fastclip.clip_grad_norm_(params, max_norm)
        step()
    torch.cuda.synchronize()
    result = {
        "net": args.net,
        "host_us": host_times(params, forward_backward, step, max_norm),
        "event_us": event_times(params, forward_backward, step, max_norm),
        "profile": profile(params, forward_backward, step, max_norm, args.out),
    }
    print(f"{args.net}: host µs per clip call (median)   in the update   hot loop   CUDA events in the update")
    for name, t in result["host_us"].items():
        events = result["event_us"].get(name, float("nan"))
        print(f"  {name:<42} {t['update']:>12.1f} {t['hot']:>10.1f} {events:>14.1f}")
    prof = result["profile"]
    print(f"profiler: clip range {prof['clip_cpu_us_median']:.1f} µs on the CPU; inside it, self µs per call:")
    for name, us in list(prof["inside_clip_self_us_per_call"].items())[:14]:
        print(f"  {us:>7.2f}  x{prof['calls_per_clip'][name]:.0f}  {name}")
    print("kernels:", {k[:60]: round(v, 2) for k, v in prof["fastclip_kernels_us"].items()})
    if args.out:
        (args.out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
