"""fastclip's version and the oldest torch it builds and runs with.

No imports beyond the standard library: setup.py reads this file before torch is
importable (and must not import the package, whose __init__ imports torch).

MIN_TORCH is 2.11 because the CUDA glue (csrc/cuda/clip_cuda.cpp) gets the
current stream as at::accelerator::getCurrentStream(i).native_handle():
at::accelerator::getCurrentStream first shipped in torch 2.7 and
c10::Stream::native_handle() in torch 2.11 (checked against the headers of the
2.6, 2.7, 2.10 and 2.11 wheels: the glue fails to compile with 2.10). The CPU
sources compile against older headers, but one minimum for every build keeps
the promise simple, and 2.11 (GPU machines) and 2.13 (CI) are what we run.
"""

import re

__version__ = "0.1.0"

MIN_TORCH = (2, 11)
MIN_TORCH_STR = ".".join(map(str, MIN_TORCH))
# The requirement in the package metadata. ".0.dev0" admits the nightly and
# vendor builds of 2.11 ("2.11.0a0+...", which PEP 440 ranks below 2.11): with a
# plain "torch>=2.11" pip would not count such an installed torch and would
# download a second one, exactly what installing without build isolation avoids.
TORCH_REQUIREMENT = f"torch>={MIN_TORCH_STR}.0.dev0"


def torch_release(version):
    """(major, minor) of a torch version string: "2.11.0+cu130" -> (2, 11).

    Only the release numbers count, so nightlies and vendor builds of a release
    ("2.11.0a0+git1234", "2.11.0.dev20260101") pass; packaging.version would
    rank them below 2.11 although they carry its APIs."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(match.group(1)), int(match.group(2))


def torch_too_old(version):
    """None if this torch is new enough, else the one-line reason it is not."""
    if torch_release(version) >= MIN_TORCH:
        return None
    return (
        f"fastclip {__version__} needs torch >= {MIN_TORCH_STR}, but torch {version} is installed "
        f"(its C++ API lacks c10::Stream::native_handle, used by the CUDA backend); "
        f"upgrade torch first, e.g. pip install 'torch>={MIN_TORCH_STR}'"
    )
