"""`python -m fastclip.run`: run an unchanged script or module with torch's clipping
functions replaced by fastclip's from its first line on, so that names it binds at
import (`from torch.nn.utils import clip_grad_norm_`) are fastclip's too.

    python -m fastclip.run [options] script.py [args...]
    python -m fastclip.run [options] -m module [args...]
    torchrun --nproc-per-node 2 -m fastclip.run [options] train.py [args...]

As `python script.py` / `python -m module` would: the script runs as __main__ with
sys.argv = [script.py, args...] and its own directory first on sys.path (a module:
sys.argv[0] its file, the current directory first on sys.path); its exit status,
exceptions and sys.exit pass through. Processes it starts itself (multiprocessing,
DataLoader workers) are not patched; torchrun's workers each run the launcher.
Usage and what each library needs: docs/unchanged_trainers.md.
"""

import functools
import importlib.util
import optparse
import os
import runpy
import sys

from . import backend
from .patch import REPLACEMENTS, TORCH_FUNCTIONS, patch_with, selection


def _parser():
    parser = optparse.OptionParser(
        prog="python -m fastclip.run",
        usage="%prog [options] script.py [args...]\n       %prog [options] -m module [args...]",
        description="Run a script or module with torch's gradient clipping functions replaced by fastclip's.",
    )
    parser.disable_interspersed_args()  # everything after the script (or -m module) is its own
    parser.add_option("-m", dest="module", action="store_true", help="run a library module as a script")
    parser.add_option(
        "--functions",
        metavar="NAMES",
        default=",".join(TORCH_FUNCTIONS),
        help="comma-separated torch.nn.utils functions to replace (default: %default)",
    )
    parser.add_option("--timm-agc", action="store_true", help="also route timm's adaptive_clip_grad to fastclip's")
    parser.add_option(
        "--rebind", action="store_true", help="also replace names bound before the script starts (found by identity)"
    )
    parser.add_option("--summary", action="store_true", help="print a one-line summary at exit: calls, backend")
    return parser


def _check_target(parser, target, is_module):
    """Refuse a missing script or module before it runs. Patch first: finding a module
    imports its parent packages, as `python -m` does, and they may bind torch's functions."""
    if not is_module:
        if not os.path.exists(target):
            parser.error(f"can't open file {os.path.abspath(target)!r}: no such file or directory")
        return
    try:
        spec = importlib.util.find_spec(target)
    except ImportError as exc:  # a parent package missing or failing, a relative name
        parser.error(f"-m {target}: error while finding the module ({type(exc).__name__}: {exc})")
    if spec is None:
        parser.error(f"-m {target}: no module named {target!r}")
    if spec.submodule_search_locations is not None and importlib.util.find_spec(target + ".__main__") is None:
        parser.error(f"-m {target}: {target!r} is a package with no __main__ module, so it cannot be run")


def _counting(names):
    """Replacements that count their calls: (replacements, counts)."""
    counts = dict.fromkeys(names, 0)

    def counted(name, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return call

    return {name: counted(name, fn) for name, fn in REPLACEMENTS.items() if name in counts}, counts


def _summary(counts):
    calls = " ".join(f"{name}={n}" for name, n in counts.items())
    rank = f" rank={os.environ['RANK']}" if "RANK" in os.environ else ""
    return f"fastclip.run summary: backend={backend()} {calls}{rank}"


def main(argv=None):
    parser = _parser()
    options, args = parser.parse_args(argv)
    if not args:
        parser.error("name a script (script.py [args...]) or a module (-m module [args...]) to run")
    functions = [f.strip() for f in options.functions.split(",") if f.strip()]
    try:
        names = selection(functions, options.timm_agc)
    except ValueError as exc:
        parser.error(str(exc))
    replacements, counts = _counting(names) if options.summary else (REPLACEMENTS, None)
    patch_with(names, options.rebind, replacements)
    target = args[0]
    _check_target(parser, target, options.module)
    sys.argv[:] = args
    try:
        if options.module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            # python script.py puts the script's directory first on sys.path (python -P: nothing)
            if not getattr(sys.flags, "safe_path", False):
                sys.path[0] = target if os.path.isdir(target) else os.path.dirname(os.path.realpath(target))
            runpy.run_path(target, run_name="__main__")
    finally:
        if counts is not None:
            # one write of the whole line: torchrun's ranks share stderr, and print() writes the
            # newline apart, so two ranks' lines could run together
            sys.stderr.write(_summary(counts) + "\n")
            sys.stderr.flush()


if __name__ == "__main__":
    main()
