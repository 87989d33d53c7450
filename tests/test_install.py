"""The install path: what pip and setup.py say when they cannot build, the
torch minimum (metadata, build, import), and the build stamp that lets a second
`make test` skip the build. Nothing here compiles: each test takes seconds."""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from fastclip import _version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HINT = "pip install --no-build-isolation ."


def run(args, env=None, **kwargs):
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, env=None if env is None else {**os.environ, **env}, **kwargs
    )


# Runs setup.py with `import torch` failing (as under pip's build isolation) or
# with torch reporting another version; prints setup.py's exit message.
SETUP_WITH = r"""
import runpy, sys
mode = sys.argv[1]
if mode == "no-torch":
    import importlib.abc
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, Hide())
else:
    import torch
    torch.__version__ = mode
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
"""


def test_setup_without_torch_exits_with_one_line_naming_the_command():
    out = run([sys.executable, "-c", SETUP_WITH, "no-torch"])
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "build isolation" in lines[0] and lines[0].endswith(HINT)


def test_setup_with_an_old_torch_exits_with_one_line():
    out = run([sys.executable, "-c", SETUP_WITH, "2.10.1+cu128"])
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: {_version.torch_too_old('2.10.1+cu128')}"], out.stderr


def test_setup_with_a_new_enough_torch_goes_on():
    # Control for the two tests above: the same harness, a good torch, no exit.
    out = run([sys.executable, "-c", SETUP_WITH, "2.11.0+cu130"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == _version.__version__


def test_plain_pip_install_fails_fast_with_the_hint(tmp_path):
    """What a newcomer types first. `pip wheel` takes the same isolated build
    path as `pip install .` without the risk of installing anything."""
    out = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), ROOT], timeout=300)
    if "Installing build dependencies: finished with status 'done'" not in out.stdout:
        pytest.skip(f"pip could not set up an isolated build environment here:\n{out.stdout[-500:]}")
    assert out.returncode != 0
    assert re.search(r"\[1 lines of output\]\s+error: .*build isolation.*" + re.escape(HINT), out.stdout + out.stderr)
    assert "Traceback" not in out.stdout + out.stderr
    assert not list(tmp_path.iterdir())


def test_torch_is_no_build_requirement_and_the_minimum_is_in_the_metadata():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    build_requires = re.search(r"^\[build-system\]\s*requires = \[([^\]]*)\]", pyproject, re.M).group(1)
    assert "torch" not in build_requires  # or pip would fetch a second torch to build against
    try:
        requires = importlib.metadata.requires("fastclip")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fastclip is built in place, not pip-installed (as gpu_check/run.sh builds it): no metadata")
    assert requires == [_version.TORCH_REQUIREMENT]
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"torch >= {_version.MIN_TORCH_STR}" in f.read()


@pytest.mark.parametrize(
    "version, too_old",
    [
        ("2.10.1+cu128", True),
        ("2.10.0a0+git5678", True),
        ("2.6.0", True),
        ("1.13.1", True),
        ("2.11.0+cu130", False),
        ("2.11.0a0+git1234abc", False),
        ("2.11.0.dev20260101+cu130", False),
        ("2.13.0+cpu", False),
        ("3.0.0", False),
    ],
)
def test_torch_minimum(version, too_old):
    assert (_version.torch_too_old(version) is not None) == too_old
    # pip judges an installed torch by the metadata's requirement: it must agree,
    # or pip would replace a torch that the build accepts.
    from packaging.requirements import Requirement

    specifier = Requirement(_version.TORCH_REQUIREMENT).specifier
    assert specifier.contains(version, prereleases=True) == (not too_old)


def test_import_with_an_old_torch_raises_a_clear_import_error():
    script = "import torch; torch.__version__ = '2.10.0'; import fastclip"
    out = run([sys.executable, "-c", script])
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f"ImportError: {_version.torch_too_old('2.10.0')}"


def test_build_stamp_is_current_and_follows_the_build_flags():
    """`make test` after `make test` with nothing changed skips the build: the
    stamp bootstrap.sh wrote matches. Changing a build switch makes it stale."""
    venv = sys.prefix
    if not os.path.exists(os.path.join(venv, ".fastclip-build.stamp")):
        pytest.skip(f"{venv} was not set up by scripts/bootstrap.sh")
    check = ["bash", "scripts/bootstrap.sh", "--check"]
    out = run(check, env={"FASTCLIP_VENV": venv})
    assert out.returncode == 0 and "up to date" in out.stdout, "stale build: run make setup\n" + out.stdout + out.stderr
    out = run(check, env={"FASTCLIP_VENV": venv, "DEBUG": "1"})
    assert out.returncode == 1 and "would be rebuilt" in out.stdout, out.stdout + out.stderr
