"""fastclip installed into a fresh virtual environment that holds torch and
nothing else (no numpy, no test dependencies), then imported and used there.

The wheel is assembled from this checkout's package files and the extension the
set-up already built, with the metadata setup.py wrote for the editable install,
so nothing is recompiled. Cost: about a minute on the 2-core CI machine (66-78 s
measured while other jobs ran), almost all of it `pip install torch` (from the local wheel
cache) into the new venv; marked slow, so `pytest -m 'not slow'` leaves it out locally.
"""

import base64
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import fastclip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(fastclip.__file__)

# Runs in the fresh venv, from an empty folder: every public entry point once.
USE_IT = r"""
import importlib.util, math, os, sys, tempfile
assert importlib.util.find_spec("numpy") is None, "the venv is not clean: numpy is installed"
import torch, fastclip
assert os.path.dirname(fastclip.__file__).startswith(sys.prefix), fastclip.__file__
assert fastclip.backend() == "cpu", fastclip.backend()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
def backward(scale=1.0):
    model.zero_grad()
    (model(torch.randn(16, 4)).square().sum() * scale).backward()

backward(100.0)
before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
torch.testing.assert_close(fastclip.clip_grad_norm_(model.parameters(), 1.0), before)
torch.testing.assert_close(fastclip.get_total_norm([p.grad for p in model.parameters()]), torch.tensor(1.0))
fastclip.clip_grad_value_(model.parameters(), 0.1)
assert fastclip.per_tensor_norms([p.grad for p in model.parameters()]).shape == (4,)
fastclip.clip_grad_norm_per_layer_(model, 0.5, by="module")
fastclip.adaptive_clip_grad_(model.parameters(), 0.01)
with fastclip.patch():
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

clippers = [fastclip.AutoClip(history=8), fastclip.ZClip(warmup_steps=3)]
with tempfile.TemporaryDirectory() as log_dir:
    monitor = fastclip.GradMonitor(model, every=4, log_dir=log_dir)
    for step in range(12):
        backward(1e4 if step == 10 else 1.0)
        monitor.record()
        for clipper in clippers:
            clipper(model.parameters())
    monitor.close()
    assert {e.step for e in monitor.explosions} == {10}, monitor.explosions  # the 1e4x step only
    steps, norms = monitor.norms()
    assert steps.tolist() == list(range(12)) and norms.shape == (12, 4)
assert math.isfinite(float(clippers[0].threshold)) and float(clippers[1].found_inf) == 0.0
print("ok")
"""


def _record(files):
    """A wheel's RECORD: path, sha256 and size of each file."""
    lines = []
    for arcname, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{arcname},sha256={digest},{len(data)}")
    return "\n".join(lines) + "\n"


def build_wheel(out_dir):
    """fastclip's wheel from the files `make setup` built in place: the package's
    Python files and py.typed (setup.py's package and package_data), the compiled
    extension, and the editable install's METADATA (name, version, torch requirement)."""
    dist = importlib.metadata.distribution("fastclip")
    version = dist.version
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    info = f"fastclip-{version}.dist-info"
    files = {}
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith((".py", ".so")) or name == "py.typed":
            with open(os.path.join(PACKAGE, name), "rb") as f:
                files[f"fastclip/{name}"] = f.read()
    assert any(name.endswith(".so") for name in files), "the extension is not built: run make setup"
    files[f"{info}/METADATA"] = (dist.read_text("METADATA") or dist.read_text("PKG-INFO")).encode()
    files[f"{info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: tests/test_clean_venv.py\nRoot-Is-Purelib: false\nTag: {tag}-{tag}-linux_x86_64\n"
    ).encode()
    files[f"{info}/top_level.txt"] = b"fastclip\n"
    path = os.path.join(out_dir, f"fastclip-{version}-{tag}-{tag}-linux_x86_64.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        for arcname, data in files.items():
            whl.writestr(arcname, data)
        whl.writestr(f"{info}/RECORD", _record(files) + f"{info}/RECORD,,\n")
    return path


def run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel is tagged for linux_x86_64")
def test_fastclip_works_in_a_venv_that_holds_only_torch(tmp_path):
    if fastclip.backend() == "python":
        pytest.skip("the extension is not built here")
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    out = run([python, "-m", "pip", "install", "-q", torch_pin])
    if out.returncode != 0:
        pytest.skip(f"cannot install {torch_pin} into a new venv here: {out.stderr.strip()[-300:]}")
    # fastclip itself: offline and from the wheel alone, so any dependency but torch fails here.
    offline = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    offline.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    out = run([python, "-m", "pip", "install", wheel], env=offline)
    assert out.returncode == 0, out.stdout + out.stderr
    work = tmp_path / "elsewhere"  # not the checkout: its source folder must not shadow the install
    work.mkdir()
    out = run([python, "-c", USE_IT], cwd=work)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
    out = run([python, "-m", "fastclip.info"], cwd=work)
    assert out.returncode == 0 and "cpu" in out.stdout, out.stderr
