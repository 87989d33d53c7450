#!/usr/bin/env python
"""The build stage of gpu_check/run.sh: build the extension with its CUDA kernels only when needed.

A remote GPU call starts from a fresh copy of the working tree, where the extension is not built
(fastclip/_C*.so is git-ignored, so it never travels). Building costs a minute or two of scarce
device time, so the build is keyed by everything it depends on (the sources, setup.py, torch's and
nvcc's versions, the C++ compiler (its path and version: a build made by one compiler is never
reused under another), the Python version, the target architectures and the build switches) and:

  1. the extension already in the tree was built from this key (a warm machine)  -> nothing to do;
  2. build/gpu-cache/fastclip-cuda-<key>.tar.gz is there (carried from an earlier call)
                                                                                 -> unpacked;
  3. otherwise it is built (FASTCLIP_FORCE_CUDA=1 python setup.py build_ext --inplace) and packed
     into build/gpu-cache/, and, with --export DIR, copied to DIR so that it comes back and can be
     carried into the next call (gpu_check/README.md says how).

    python gpu_check/build_cache.py ensure [--export DIR]
    python gpu_check/build_cache.py key        print the key (no build)
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path("build") / "gpu-cache"  # in the repository; build/ is git-ignored
INSTALLED = "installed.key"  # in CACHE: the key of the extension now in fastclip/
# Switches setup.py reads; a change of any of them changes what is built.
BUILD_ENV = ("FASTCLIP_FORCE_CPU", "FASTCLIP_FORCE_CUDA", "FASTCLIP_CPU_ISA", "DEBUG", "TORCH_CUDA_ARCH_LIST")
# The compilers torch's build uses: $CXX (else c++) for the C++ sources and the link, $CC as
# nvcc's host compiler when set; LDFLAGS and friends reach the link.
COMPILER_ENV = ("CXX", "CC", "CFLAGS", "CXXFLAGS", "LDFLAGS")


def _tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "absent"


def build_env() -> dict:
    """The environment of the build: CUDA kernels forced on, and, on a GPU machine, compiled for
    the architecture of its GPU only (a fat binary for every arch would take several minutes)."""
    env = dict(os.environ, FASTCLIP_FORCE_CUDA="1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    if not env.get("TORCH_CUDA_ARCH_LIST"):
        caps = _tool_version(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]).split()
        if caps and all(c.replace(".", "").isdigit() for c in caps):
            env["TORCH_CUDA_ARCH_LIST"] = ";".join(sorted(set(caps)))
    return env


def compiler_identity(env: dict) -> str:
    """Which C++ compiler a build would use, and its version: its resolved path and --version."""
    parts = [f"{name}={env.get(name, '')}" for name in COMPILER_ENV]
    for tool in (env.get("CXX") or "c++", env.get("CC") or "cc"):
        found = shutil.which(tool, path=env.get("PATH"))
        resolved = os.path.realpath(found) if found else "absent"
        parts.append(f"{tool} -> {resolved}: {_tool_version([found, '--version']) if found else ''}")
    return "\n".join(parts)


def key(env: dict, repo: Path = REPO) -> str:
    """A hash of everything the built extension depends on."""
    h = hashlib.sha256()
    inputs = sorted(p for p in (repo / "csrc").rglob("*") if p.is_file())
    inputs.append(repo / "setup.py")
    for path in inputs:
        h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    spec = importlib.util.find_spec("torch")  # its version.py, without importing torch (seconds)
    torch_version = Path(spec.origin).with_name("version.py") if spec and spec.origin else None
    h.update(torch_version.read_bytes() if torch_version and torch_version.is_file() else b"no torch")
    h.update(sys.version.encode())
    h.update(_tool_version(["nvcc", "--version"]).encode())
    h.update(compiler_identity(env).encode())
    for name in BUILD_ENV:
        h.update(f"{name}={env.get(name, '')}\0".encode())
    return h.hexdigest()[:16]


def _built_extension(repo: Path) -> list[Path]:
    return [Path(p) for p in glob.glob(str(repo / "fastclip" / "_C*.so"))]


def ensure(export: Path | None, repo: Path = REPO) -> int:
    env = build_env()
    k = key(env, repo)
    cache = repo / CACHE
    archive, installed = cache / f"fastclip-cuda-{k}.tar.gz", cache / INSTALLED
    print(f"build key {k} (TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST', '')!r})")
    if _built_extension(repo) and installed.is_file() and installed.read_text().strip() == k:
        print("up to date: the extension in fastclip/ was built from this key; not rebuilt")
        return 0
    if archive.is_file():
        for so in _built_extension(repo):
            so.unlink()
        with tarfile.open(archive) as tar:
            tar.extractall(repo, filter="data")
        installed.write_text(k + "\n")
        print(f"restored from {archive.relative_to(repo)}; not rebuilt")
        return 0
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    print("building:", " ".join(cmd), f"(FASTCLIP_FORCE_CUDA=1 MAX_JOBS={env['MAX_JOBS']})", flush=True)
    rc = subprocess.run(cmd, cwd=repo, env=env).returncode
    built = _built_extension(repo)
    if rc != 0 or not built:
        print(f"build failed (exit {rc}, {len(built)} extension files)")
        return rc or 1
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for so in built:
            tar.add(so, arcname=str(so.relative_to(repo)))
    installed.write_text(k + "\n")
    print(f"built; cached as {archive.relative_to(repo)} ({archive.stat().st_size / 2**20:.1f} MiB)")
    if archive.stat().st_size > 16 * 2**20:  # the device tool returns files of at most 16 MiB
        print("too large to come back from the device machine: later calls will build again")
    elif export:
        export.mkdir(parents=True, exist_ok=True)
        shutil.copy2(archive, export / archive.name)
        print(f"exported to {export / archive.name}: carry it in build/gpu-cache/ next time")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=("ensure", "key"))
    ap.add_argument("--export", type=Path, help="also copy a newly built archive to this folder")
    args = ap.parse_args(argv)
    if args.cmd == "key":
        print(key(build_env()))
        return 0
    return ensure(args.export)


if __name__ == "__main__":
    sys.exit(main())
