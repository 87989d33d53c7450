"""Build fastclip: one extension, fastclip._C, holding the ops for every backend.

The project's metadata is in pyproject.toml; this file adds what needs code:
the version and the torch requirement (from fastclip/_version.py) and the
extension, compiled against the torch that is already installed.

Install with `pip install --no-build-isolation .`: torch is deliberately not a
build requirement (pip would fetch a second, multi-GB torch into a throwaway
build environment, and the extension must match the torch it runs with), so an
isolated build cannot see torch and stops here with one line saying so.

CUDA sources are compiled when the installed torch is a CUDA build and a CUDA
toolkit is found (no GPU is needed at build time). Environment overrides:
  FASTCLIP_FORCE_CPU=1   never build the CUDA backend
  FASTCLIP_FORCE_CUDA=1  build it even if detection says no (fails loudly if it can't)
  FASTCLIP_CPU_ISA=default  build the CPU operator for baseline x86-64 instead of
                         AVX512 or AVX2 (by default the widest of the two that
                         torch's own kernels use on this machine); =avx2: at most AVX2
  DEBUG=1                -O0 -g, for gdb / compute-sanitizer line numbers

The extension always links the shared C++ runtime (RUNTIME_LINK_FLAGS), and every
build is checked for it (check_shared_runtime). Importing this file builds nothing:
the tests use those two.
"""

import glob
import os
import runpy
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
# Plain file read, not an import: the package's __init__ imports torch.
VERSION = runpy.run_path(os.path.join(ROOT, "fastclip", "_version.py"))

INSTALL_HINT = "pip install --no-build-isolation ."


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _import_torch():
    """The installed torch, or exit with one line: a traceback from deep inside
    pip's build hooks does not tell a newcomer what to type instead."""
    try:
        import torch
    except ImportError:
        sys.exit(
            "error: fastclip builds against the installed torch, which this build cannot import "
            "(pip's build isolation hides it, or torch is not installed): install torch, then "
            f"run: {INSTALL_HINT}"
        )
    too_old = VERSION["torch_too_old"](torch.__version__)
    if too_old:
        sys.exit(f"error: {too_old}")
    return torch


def _sources(subdir, pattern):
    """csrc/<subdir>/<pattern>, sorted, as paths relative to this file: setuptools
    refuses absolute source paths when it writes the package manifest."""
    found = glob.glob(os.path.join(CSRC, subdir, pattern))
    return sorted(os.path.relpath(path, ROOT).replace(os.sep, "/") for path in found)


def _cpu_isa_flags(torch):
    """at::vec picks its SIMD width from CPU_CAPABILITY macros at compile time.
    We build from source on the machine that runs the code, so use the widest ISA
    torch's own kernels use on its CPU (AVX512 or AVX2, with torch's flags for it);
    otherwise the generic, slower path. FASTCLIP_CPU_ISA=avx2 caps it at AVX2."""
    isa = os.environ.get("FASTCLIP_CPU_ISA", "auto").lower()
    if isa == "default":
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512" and isa != "avx2":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]  # fmt: skip
    if capability in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


# The C++ runtime and unwinder torch itself uses, as shared libraries. Some toolchains (custom
# or conda GCC builds) link libstdc++ and libgcc statically by default: the extension would then
# carry a private copy of the runtime beside torch's, and the first TORCH_CHECK that formats a
# number into its message crashes the process (or loses the number) instead of raising. Named
# before the defaults the compiler appends, these libraries supply every symbol first, so a
# static default pulls nothing in.
RUNTIME_LINK_FLAGS = ["-l:libstdc++.so.6", "-l:libgcc_s.so.1"]


def check_shared_runtime(path):
    """None if the shared object at `path` depends on the shared libstdc++ (readelf -d lists
    libstdc++.so.6 as NEEDED), else the reason it cannot be loaded safely beside torch."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None  # binutils links every build: only a stripped-down system lacks it; nothing to check with
    dynamic = subprocess.run([readelf, "-d", path], capture_output=True, text=True).stdout
    if "Shared library: [libstdc++.so.6]" in dynamic:
        return None
    return (
        f"{os.path.basename(path)} does not load the shared C++ runtime (readelf -d lists no libstdc++.so.6 "
        "as NEEDED): the compiler linked libstdc++ statically, and a second copy of the C++ runtime beside "
        "torch's crashes the process on the first error it reports. Build with a compiler that links "
        "libstdc++.so.6 (CXX=...), or report this toolchain: fastclip asks for it with " + " ".join(RUNTIME_LINK_FLAGS)
    )


def _extension(torch):
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    want_cuda = bool(torch.version.cuda) and CUDA_HOME is not None
    if _flag("FASTCLIP_FORCE_CPU"):
        want_cuda = False
    elif _flag("FASTCLIP_FORCE_CUDA"):
        want_cuda = True

    debug = _flag("DEBUG")
    # -g0: Python's own CFLAGS add -g, and debug info for torch's headers costs
    # about a third of the compile time; DEBUG=1 builds keep it.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/py_module.cpp"] + _sources("cpu", "*.cpp")
    # at::parallel_for is inline OpenMP: without -fopenmp it silently runs on one
    # thread. Linking with -fopenmp resolves to the libgomp torch already loads.
    cxx = opt + ["-Wall", "-Wno-unknown-pragmas", "-fopenmp"] + _cpu_isa_flags(torch)
    link = ["-fopenmp"] + RUNTIME_LINK_FLAGS
    kwargs = dict(include_dirs=[CSRC], extra_compile_args={"cxx": cxx}, extra_link_args=link)

    if not want_cuda:
        return CppExtension("fastclip._C", sources, **kwargs)

    sources += _sources("cuda", "*.cpp") + _sources("cuda", "*.cu")
    cxx.append("-DFASTCLIP_WITH_CUDA")
    nvcc = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + ["-DFASTCLIP_WITH_CUDA"]
    kwargs["extra_compile_args"]["nvcc"] = nvcc
    return CUDAExtension("fastclip._C", sources, **kwargs)


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """Objects go to build/temp (kept between builds), not to the throwaway
        directory pip's editable installs use: ninja then recompiles only the
        sources (or headers, or flags) that changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp")

        def build_extension(self, ext):
            super().build_extension(ext)
            path = self.get_ext_fullpath(ext.name)
            problem = check_shared_runtime(path)
            if problem:
                os.remove(path)  # never leave an extension that would crash its importer
                sys.exit(f"error: {problem}")

    return BuildExt


if __name__ == "__main__":  # pip and setuptools run it so; the tests import the helpers above
    torch = _import_torch()
    setup(
        version=VERSION["__version__"],
        install_requires=[VERSION["TORCH_REQUIREMENT"]],
        packages=find_packages(include=["fastclip", "fastclip.*"]),
        package_data={"fastclip": ["py.typed"]},  # the public API is typed (PEP 561)
        ext_modules=[_extension(torch)],
        cmdclass={"build_ext": _build_ext()},
        zip_safe=False,
    )
