"""`python -m fastclip.info`: versions, the backend, and what was built."""

import platform

import torch

import fastclip
from fastclip import _ops


def main():
    rows = [
        ("fastclip", fastclip.__version__),
        ("backend", fastclip.backend()),
        ("extension loaded", _ops.LOADED if _ops.LOADED else f"no ({_ops.LOAD_ERROR})"),
        ("CUDA kernels built", _ops.CUDA_BUILT),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("CPU threads", torch.get_num_threads()),
        ("CPU capability", torch.backends.cpu.get_cpu_capability()),
        ("python", platform.python_version()),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
