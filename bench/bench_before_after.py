"""Did a change make the CPU clip slower? Times the fused op of two source trees
in ONE process, interleaved, so machine load and bandwidth drift hit both
alike (separate runs on a shared 2-core machine differ by more than a change).

    python -m bench.bench_before_after --before <git ref> [--after <git ref>|worktree]

Each tree's csrc/ is built with torch's JIT loader under its own op namespace
(fastclip_before / fastclip_after), with the same flags as setup.py's CPU build,
into ~/.cache/fastclip-ab. Every case of bench_cpu (every call really clips) is
timed round-robin, median of repeats; the table gives after / before.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

import torch
from torch.utils import cpp_extension

from .bench_cpu import CASES, grad_set
from .common import environment_info, fmt_us, print_aligned, stats, time_interleaved

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("FASTCLIP_AB_CACHE", pathlib.Path.home() / ".cache" / "fastclip-ab"))


def _export_csrc(ref, dest):
    """csrc/ of a git ref (or of the working tree for 'worktree') into dest."""
    if ref == "worktree":
        subprocess.run(["cp", "-r", str(ROOT / "csrc"), str(dest)], check=True)
        return
    with tempfile.TemporaryFile() as tar:
        subprocess.run(["git", "-C", str(ROOT), "archive", ref, "csrc"], stdout=tar, check=True)
        tar.seek(0)
        with tarfile.open(fileobj=tar) as t:
            t.extractall(dest.parent, filter="data")


def _rename_namespace(csrc, namespace):
    """The ops under `namespace` instead of fastclip, the module named by the JIT loader."""
    for path in [*csrc.rglob("*.cpp"), *csrc.rglob("*.h")]:  # schema names live in headers too
        text = path.read_text()
        text = re.sub(r"TORCH_LIBRARY(_IMPL)?\(fastclip,", rf"TORCH_LIBRARY\1({namespace},", text)
        text = text.replace('"fastclip::', f'"{namespace}::').replace(
            "PYBIND11_MODULE(_C,", "PYBIND11_MODULE(TORCH_EXTENSION_NAME,"
        )
        path.write_text(text)


def build(ref, namespace):
    """Builds ref's CPU operator as torch.ops.<namespace>; returns the op namespace."""
    sha = (
        "worktree"
        if ref == "worktree"
        else subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    tree = CACHE / f"{namespace}-{sha}"
    if ref == "worktree" and tree.exists():
        subprocess.run(["rm", "-rf", str(tree)], check=True)
    if not tree.exists():
        (tree / "csrc").parent.mkdir(parents=True, exist_ok=True)
        _export_csrc(ref, tree / "csrc")
        _rename_namespace(tree / "csrc", namespace)
    csrc = tree / "csrc"
    sources = [str(csrc / "ops.cpp"), str(csrc / "py_module.cpp")] + sorted(
        str(p) for p in (csrc / "cpu").glob("*.cpp")
    )
    # setup.py's CPU flags: -O3, OpenMP for at::parallel_for, AVX2 where torch's CPU has it.
    flags = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    print(f"[build] {ref} ({sha}) as torch.ops.{namespace} ...", file=sys.stderr, flush=True)
    cpp_extension.load(
        name=f"{namespace}_{sha}",
        sources=sources,
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(csrc)],
        build_directory=str(tree),
        verbose=False,
    )
    return getattr(torch.ops, namespace)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git ref of the baseline")
    ap.add_argument("--after", default="worktree", help="git ref, or 'worktree' (default)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {','.join(CASES)}")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, of fp32,bf16")
    ap.add_argument("--budget-s", type=float, default=4.0, help="timed seconds per case")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads (0: torch's default); "
        "1 compares the kernels' own cost, free of thread scheduling on a busy machine",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ops = {"before": build(args.before, "fastclip_before"), "after": build(args.after, "fastclip_after")}
    rows = []
    for case in args.cases.split(","):
        desc = CASES[case][0]
        for d in args.dtypes.split(","):
            gs = grad_set(case, d)
            methods = {
                name: (lambda op=op, gs=gs: op.clip_grad_norm_(gs.grads, gs.max_norm, 2.0), gs.restore)
                for name, op in ops.items()
            }
            samples, repeats, _ = time_interleaved(methods, warm_s=0.5, budget_s=args.budget_s, rmin=15, rmax=20000)
            st = {name: stats(xs) for name, xs in samples.items()}
            ratio = st["after"]["median_us"] / st["before"]["median_us"]
            rows.append(
                {
                    "case": case,
                    "description": desc,
                    "dtype": d,
                    "repeats": repeats,
                    "before": st["before"],
                    "after": st["after"],
                    "after_over_before": ratio,
                }
            )
            print(
                f"{desc:<22} {d:<5} before {fmt_us(st['before']['median_us']):>9} µs  "
                f"after {fmt_us(st['after']['median_us']):>9} µs  after/before {ratio:.3f}",
                file=sys.stderr,
            )
            del gs
    table = [
        [
            r["description"],
            r["dtype"],
            fmt_us(r["before"]["median_us"]),
            fmt_us(r["after"]["median_us"]),
            f"{r['after_over_before']:.3f}",
            str(r["repeats"]),
        ]
        for r in rows
    ]
    print_aligned(["case", "dtype", "before µs", "after µs", "after/before", "repeats"], table, 2, sys.stdout)
    if args.json:
        out = {
            "command": "python -m bench.bench_before_after " + " ".join(argv or sys.argv[1:]),
            "before": args.before,
            "after": args.after,
            "threads": torch.get_num_threads(),
            "env": environment_info(),
            "rows": rows,
        }
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
