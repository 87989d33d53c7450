"""What the benchmarks share (bench_cpu, bench_gpu, bench_update and the rest):
the model-shaped gradient sets, the measuring loop (warm up, size the run to a
time budget, then call one_round(k, samples) `repeats` times with the GC off),
interleaved CPU timing, the statistics, the environment record, other processes'
load, and the plain-text table."""

import datetime as _dt
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------
# Model-shaped gradient sets (parameter shapes)
# --------------------------------------------------------------------------------------------


def mlp_shapes():
    # CartPole MLP 4-64-64-2: weight (out, in) and bias per Linear -> 6 tensors, 4,610 elements.
    return [(64, 4), (64,), (64, 64), (64,), (2, 64), (2,)]


def nature_cnn_shapes():
    # Nature DQN (Mnih et al. 2015), 4x84x84 input, 6 actions -> 10 tensors, 1,687,206 elements.
    return [
        (32, 4, 8, 8),
        (32,),
        (64, 32, 4, 4),
        (64,),
        (64, 64, 3, 3),
        (64,),
        (512, 3136),
        (512,),
        (6, 512),
        (6,),
    ]


def gpt2_blocks_shapes():
    # Two GPT-2-small blocks (d=768): q, k, v, out projections 768x768, MLP 3072x768 and
    # 768x3072, each with its bias -> 24 tensors, 14,169,600 elements.
    block = [
        (768, 768),
        (768,),
        (768, 768),
        (768,),
        (768, 768),
        (768,),
        (768, 768),
        (768,),
        (3072, 768),
        (3072,),
        (768, 3072),
        (768,),
    ]
    return block * 2


def big_shapes():
    return [(8192, 8192)]  # one 64M-element tensor (67,108,864)


def tiny_shapes(n=3000, seed=0):
    # Thousands of tiny tensors (1..128 elements, some 2-D): per-tensor overhead dominates.
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 129, (n,), generator=g).tolist()
    return [(k,) if i % 3 else (1, k) for i, k in enumerate(lengths)]


def gpt2_small_shapes():  # HF GPT-2 small parameter shapes: 148 tensors, 124,439,808 elements
    layer = [
        (768,),
        (768,),
        (768, 2304),
        (2304,),
        (768, 768),
        (768,),  # ln_1, attn
        (768,),
        (768,),
        (768, 3072),
        (3072,),
        (3072, 768),
        (768,),
    ]  # ln_2, mlp
    return [(50257, 768), (1024, 768)] + layer * 12 + [(768,), (768,)]


def one_billion_shapes():  # 20 decoder layers of d=2048 (qkv, out, up, down, 2 norms): 1,006,714,880
    layer = [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (2048,), (2048,)]
    return layer * 20


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def run_rounds(one_round, samples, *, min_warm, warm_s, budget_s, rmin, rmax, repeats=None):
    """one_round(k, None) warms up (at least min_warm rounds and warm_s seconds,
    which also sizes the run); one_round(k, samples) records. `repeats` defaults
    to budget_s / (time of one round), clamped to [rmin, rmax].
    Returns (repeats, warm-up rounds)."""
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        t_start = time.perf_counter()
        warm = 0
        while warm < min_warm or time.perf_counter() - t_start < warm_s:
            one_round(warm, None)
            warm += 1
        round_s = (time.perf_counter() - t_start) / warm
        if repeats is None:
            repeats = int(max(rmin, min(rmax, budget_s / max(round_s, 1e-9))))
        for k in range(repeats):
            one_round(k, samples)
    finally:
        if gc_was_enabled:
            gc.enable()
    return repeats, warm


def fmt_us(x):
    """A time in µs for a table cell: '-', 4.2, 337, or 39.84ms from 10 ms up."""
    if x is None:
        return "-"
    return f"{x / 1e3:.2f}ms" if x >= 1e4 else (f"{x:.0f}" if x >= 100 else f"{x:.1f}")


def results_path(json_arg, name, quick=False):
    """Where a benchmark writes its JSON: --json if given, else bench/results/<name>-<date>.json
    (...-quick.json for --quick runs, so they never overwrite a full result). The folder is made."""
    stamp = _dt.date.today().isoformat() + ("-quick" if quick else "")
    path = Path(json_arg) if json_arg else Path(__file__).resolve().parent / "results" / f"{name}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def print_aligned(hdr, table, left_cols, file):
    """A plain-text table: the first `left_cols` columns left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(hdr)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left_cols else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(hdr), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in table:
        print(line(row), file=file)


def time_interleaved(methods, warm_s, budget_s, rmin, rmax, repeats=None):
    """methods: {name: (call, restore)}. Round-robin, rotating order; restore is not timed.

    Returns ({name: [µs, ...]}, repeats, warm-up rounds)."""
    names = list(methods)
    clock = time.perf_counter_ns

    def one_round(k, samples):
        for j in range(len(names)):
            name = names[(k + j) % len(names)]
            call, restore = methods[name]
            restore()
            t0 = clock()
            call()
            t1 = clock()
            if samples is not None:
                samples[name].append((t1 - t0) / 1e3)

    samples = {n: [] for n in names}
    repeats, warm = run_rounds(
        one_round, samples, min_warm=3, warm_s=warm_s, budget_s=budget_s, rmin=rmin, rmax=rmax, repeats=repeats
    )
    return samples, repeats, warm


class OtherLoad:
    """CPU time used by *other* processes while a block ran, in cores (Linux /proc/stat).

    On a 2-core machine one busy neighbour stalls torch's OpenMP-parallel ops far more than a
    serial kernel, so numbers taken on a busy machine are biased, not just noisy."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _system_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        busy, own = _system_busy_s(), _own_cpu_s()
        self.cores = (
            None
            if busy is None or self.busy0 is None or wall <= 0
            else max(0.0, (busy - self.busy0) - (own - self.own0)) / wall
        )
        return False


def _system_busy_s():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s():
    t = os.times()
    return t.user + t.system


NOISY_CORES = 0.15  # other processes' average use above which a case is flagged


def stats(xs):
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median_us": statistics.median(xs), "p25_us": q[0], "p75_us": q[2], "min_us": xs[0]}


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(fastclip=None):
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": {
            "model": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "threads": torch.get_num_threads(),
        "torch_parallel_info": torch.__config__.parallel_info(),
    }
    if torch.cuda.is_available():
        info["gpu"] = gpu_info()
    if fastclip is not None:
        info["fastclip"] = {
            "version": getattr(fastclip, "__version__", None),
            "backend": backend_of(fastclip),
            "file": getattr(fastclip, "__file__", None),
        }
    return info


def gpu_info():
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
        "memory_bytes": props.total_memory,
        "driver": driver,
    }


def backend_of(fastclip):
    try:
        return fastclip.backend()
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc})"


def command_line(spec):
    """The command that ran this, as `python -m pkg.mod ...` or `python path/to/script.py ...`."""
    if spec is not None and spec.name:
        head = ["python", "-m", spec.name]
    else:
        head = ["python", sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def import_fastclip():
    try:
        import fastclip
    except Exception as exc:  # noqa: BLE001
        sys.exit(
            f"cannot import fastclip ({type(exc).__name__}: {exc}); build it first: pip install --no-build-isolation ."
        )
    if not hasattr(fastclip, "clip_grad_norm_"):
        sys.exit(
            f"fastclip at {getattr(fastclip, '__file__', None) or list(fastclip.__path__)} "
            "has no clip_grad_norm_ (a source tree without the package?)"
        )
    return fastclip


def warn_backend(fastclip, want):
    b = backend_of(fastclip)
    if b != want:
        print(
            f"WARNING: fastclip.backend() is {b!r}, not {want!r} (fastclip from "
            f"{getattr(fastclip, '__file__', '?')}): these numbers do not measure the compiled "
            "extension.",
            file=sys.stderr,
        )
