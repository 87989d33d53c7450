#!/usr/bin/env python
"""The dry run of gpu_check/run.sh: does every command a stage would run resolve, here, without
a GPU and without running it? Minutes on a lent GPU are scarce; a typo must not cost one.

For each planned command (gpu_check.sh --dry-run writes them, one per line: stage, step, then the
arguments, separated by the unit separator \\x1f) it checks, without importing torch:
  - leading `env NAME=value` words are skipped;
  - the executable is on PATH (compute-sanitizer and nvidia-smi exist only on the GPU machine:
    reported as not checked here when absent);
  - python -c CODE compiles; python -m MODULE is importable (found, not imported); a script exists;
  - every --flag given to a script or a bench module is one it defines (argparse's "--flag", or
    a dataclass field `flag:` as examples/common.py turns fields into flags);
  - pytest's path arguments, globs already expanded by the shell, and --ignore= paths exist.

    python gpu_check/dry_run.py PLAN_FILE --python PYTHON
Exit status 1 when any command does not resolve.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEP = "\x1f"
GPU_MACHINE_TOOLS = {"compute-sanitizer", "nvidia-smi", "ncu"}
PYTEST_OPTS_WITH_VALUE = {"-p", "-k", "-m", "-o", "-c", "-n", "--junitxml", "--rootdir", "--basetemp"}


def _defines_flag(source: str, flag: str) -> bool:
    name = flag.split("=", 1)[0]
    if f'"{name}"' in source or f"'{name}'" in source:
        return True
    field = name[2:].removeprefix("no-").replace("-", "_")  # --no-progress: BooleanOptionalAction
    return re.search(rf"^\s+{re.escape(field)}\s*:", source, re.M) is not None


def _check_flags(path: Path, args: list[str]) -> list[str]:
    source = path.read_text()
    if re.search(r"^import common$", source, re.M):  # the trainers' shared Args (examples/common.py)
        source += (path.parent / "common.py").read_text()
    return [
        f"{path.relative_to(REPO)} defines no {a.split('=', 1)[0]}"
        for a in args
        if a.startswith("--") and not _defines_flag(source, a)
    ]


def _check_pytest(args: list[str]) -> list[str]:
    problems, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in PYTEST_OPTS_WITH_VALUE:
            skip = True
        elif a.startswith("--ignore="):
            if not (REPO / a.split("=", 1)[1]).exists():
                problems.append(f"pytest --ignore path {a.split('=', 1)[1]} does not exist")
        elif not a.startswith("-") and not (REPO / a.split("::", 1)[0]).exists():
            problems.append(f"pytest path {a} does not exist (a glob that matched nothing?)")
    return problems


def _check_python(args: list[str]) -> list[str]:
    if not args:
        return ["python is given nothing to run"]
    if args[0] == "-c":
        try:
            compile(args[1], "<-c>", "exec")
        except (SyntaxError, IndexError) as exc:
            return [f"python -c code does not compile: {exc}"]
        return []
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        spec = importlib.util.find_spec(module)
        if spec is None:
            return [f"python module {module} is not installed"]
        if module == "pytest":
            return _check_pytest(rest)
        origin = Path(spec.origin) if spec.origin else None
        if origin and REPO in origin.parents:  # our own module: check its flags too
            return _check_flags(origin, rest)
        return []
    script = REPO / args[0]
    if not script.is_file():
        return [f"script {args[0]} does not exist"]
    return _check_flags(script, args[1:])


def check_command(argv: list[str], python: str) -> tuple[list[str], list[str]]:
    """(problems, notes) for one planned command."""
    i = 0
    if argv and argv[0] == "env":
        i = 1
        while i < len(argv) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[i]):
            i += 1
    argv = argv[i:]
    if not argv:
        return ["empty command"], []
    problems, notes = [], []
    exe = argv[0]
    if Path(exe).name in GPU_MACHINE_TOOLS and not shutil.which(exe):
        notes.append(f"{exe}: a GPU machine's tool, absent here, not checked")
    elif not shutil.which(exe) and not (REPO / exe).is_file():
        problems.append(f"executable {exe} not found")
    if python in argv:
        problems += _check_python(argv[argv.index(python) + 1 :])
    elif exe == "bash":
        if len(argv) < 2 or not (REPO / argv[1]).is_file():
            problems.append(f"bash script {argv[1:2]} not found")
    return problems, notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("--python", required=True, help="the interpreter gpu_check.sh runs ($PYTHON)")
    args = ap.parse_args(argv)
    if not shutil.which(args.python):
        print(f"UNRESOLVED  the python interpreter {args.python} is not found")
        return 1
    bad = 0
    for line in args.plan.read_text().splitlines():
        stage, step, *cmd = line.split(SEP)
        problems, notes = check_command(cmd, args.python)
        bad += bool(problems)
        state = "UNRESOLVED" if problems else "resolved  "
        print(f"{state}  {stage}/{step}: {' '.join(cmd)}")
        for p in problems:
            print(f"              problem: {p}")
        for n in notes:
            print(f"              note: {n}")
    print(f"dry run: {bad} of {len(args.plan.read_text().splitlines())} planned commands do not resolve")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
