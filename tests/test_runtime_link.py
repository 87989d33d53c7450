"""The extension shares torch's C++ runtime on every toolchain.

A compiler that links libstdc++ statically (some custom and conda GCC builds do by default) puts
a second C++ runtime into the extension beside torch's; the first TORCH_CHECK that formats a
number then crashes the process, or loses the number from its message. setup.py links the
shared runtime (RUNTIME_LINK_FLAGS) and refuses a build that lacks it (check_shared_runtime).
Here a small extension stands in for fastclip._C, built with such a toolchain's static default
(-static-libstdc++ -static-libgcc), so the tests take seconds rather than a full build.
"""

import os
import runpy
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="fastclip_setup")  # helpers only: builds nothing
STATIC_DEFAULT = ["-static-libstdc++", "-static-libgcc"]

pytestmark = pytest.mark.skipif(
    not (shutil.which("readelf") and shutil.which(os.environ.get("CXX", "c++"))), reason="needs a C++ toolchain"
)

# TORCH_CHECK formats numbers through the C++ runtime's streams, and the error crosses into Python.
SOURCE = r"""
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>

void must_be_negative(int64_t n) { TORCH_CHECK(n < 0, "n must be negative, got ", n, " and ", 1.5); }

PYBIND11_MODULE(%s, m) { m.def("must_be_negative", &must_be_negative); }
"""


def build(tmp_path, name, ldflags):
    from torch.utils.cpp_extension import load

    src = tmp_path / f"{name}.cpp"
    src.write_text(SOURCE % name)
    build_dir = tmp_path / name
    build_dir.mkdir()
    module = load(name, [str(src)], extra_ldflags=ldflags, build_directory=str(build_dir), verbose=False)
    return module.__file__


def call_in_a_fresh_process(path):
    """Imports the module at `path` beside torch and calls it with bad input."""
    script = textwrap.dedent(f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location({os.path.basename(path).split(".")[0]!r}, {path!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            module.must_be_negative(3)
        except RuntimeError as e:
            print("RuntimeError:", str(e).splitlines()[0])
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_the_link_flags_override_a_static_runtime_default(tmp_path):
    so = build(tmp_path, "shared_runtime", STATIC_DEFAULT + SETUP["RUNTIME_LINK_FLAGS"])
    assert SETUP["check_shared_runtime"](so) is None
    out = call_in_a_fresh_process(so)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "RuntimeError: n must be negative, got 3 and 1.5"


def test_the_guard_catches_a_statically_linked_runtime(tmp_path):
    # The control: the same extension with the toolchain's static default alone.
    so = build(tmp_path, "static_runtime", STATIC_DEFAULT)
    problem = SETUP["check_shared_runtime"](so)
    assert problem is not None and "libstdc++.so.6" in problem and "statically" in problem


def test_the_built_extension_needs_the_shared_runtime():
    import fastclip._ops as ops

    if not ops.LOADED:
        pytest.skip(f"the extension is not built: {ops.LOAD_ERROR}")
    assert SETUP["check_shared_runtime"](ops._C.__file__) is None
