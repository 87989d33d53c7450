"""Build fastclip: one extension, fastclip._C, holding the ops for every backend.

CUDA sources are compiled when the installed torch is a CUDA build and a CUDA
toolkit is found (no GPU is needed at build time). Environment overrides:
  FASTCLIP_FORCE_CPU=1   never build the CUDA backend
  FASTCLIP_FORCE_CUDA=1  build it even if detection says no (fails loudly if it can't)
  FASTCLIP_CPU_ISA=default  build the CPU operator for baseline x86-64 instead of
                         AVX2 (used by default when this machine's CPU has it)
  DEBUG=1                -O0 -g, for gdb / compute-sanitizer line numbers
Install with `pip install --no-build-isolation .` so the build uses the torch
that is already installed instead of pulling a second one.
"""
import glob
import os
import re

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _version():
    with open(os.path.join(ROOT, "fastclip", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _cpu_isa_flags(torch):
    """at::vec picks its SIMD width from CPU_CAPABILITY macros at compile time.
    We build from source on the machine that runs the code, so use AVX2 when
    its CPU (as torch sees it) has it; otherwise the generic, slower path."""
    if os.environ.get("FASTCLIP_CPU_ISA", "auto").lower() == "default":
        return []
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _extension():
    # Imported here so that `setup.py --version` and metadata queries work without torch.
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    want_cuda = bool(torch.version.cuda) and CUDA_HOME is not None
    if _flag("FASTCLIP_FORCE_CPU"):
        want_cuda = False
    elif _flag("FASTCLIP_FORCE_CUDA"):
        want_cuda = True

    debug = _flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = [os.path.join(CSRC, "ops.cpp"), os.path.join(CSRC, "py_module.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    # at::parallel_for is inline OpenMP: without -fopenmp it silently runs on one
    # thread. Linking with -fopenmp resolves to the libgomp torch already loads.
    cxx = opt + ["-Wall", "-Wno-unknown-pragmas", "-fopenmp"] + _cpu_isa_flags(torch)
    kwargs = dict(include_dirs=[CSRC], extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

    if not want_cuda:
        return CppExtension("fastclip._C", sources, **kwargs)

    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    cxx.append("-DFASTCLIP_WITH_CUDA")
    nvcc = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + ["-DFASTCLIP_WITH_CUDA"]
    kwargs["extra_compile_args"]["nvcc"] = nvcc
    return CUDAExtension("fastclip._C", sources, **kwargs)


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="fastclip",
    version=_version(),
    description="Fused global-norm gradient clipping for PyTorch: one kernel launch on CUDA, one fused pass on CPU",
    packages=find_packages(include=["fastclip", "fastclip.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _build_ext()},
    python_requires=">=3.9",
    # Any torch >= 2.4 works; the installed one (CPU or CUDA build) is used as is.
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
