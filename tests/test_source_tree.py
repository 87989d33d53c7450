"""Importing fastclip from a checkout that was never built: one warning that says
which fastclip was imported, from where, that it has no compiled extension, and
the fix; everything still works through the reference path."""

import os
import shutil
import subprocess
import sys

import fastclip

PACKAGE = os.path.dirname(fastclip.__file__)


def unbuilt_checkout(root):
    """The package's Python files in root/fastclip, beside a setup.py and a csrc/, as in a fresh clone."""
    shutil.copytree(PACKAGE, root / "fastclip", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    (root / "setup.py").write_text("")
    (root / "csrc").mkdir()
    return root


# `python -m fastclip.info` run in `cwd`, as after a non-editable install: the editable
# install's finder (which maps `fastclip` to this checkout wherever one runs) is removed.
RUN_INFO = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path.insert(0, "")
runpy.run_module("fastclip.info", run_name="__main__")
"""


def run_info(cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", RUN_INFO], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_unbuilt_checkout_says_where_and_how_to_fix(tmp_path):
    root = unbuilt_checkout(tmp_path)
    out = run_info(root)
    assert out.returncode == 0, out.stderr
    assert "backend" in out.stdout and "python" in out.stdout
    warning = out.stderr
    assert str(root / "fastclip") in warning  # which fastclip, from where
    assert "source folder of a checkout" in warning and "no compiled" in warning
    assert "make setup" in warning and "another folder" in warning
    assert "circular import" not in warning


def test_the_same_files_outside_a_checkout_say_reinstall(tmp_path):
    """Control: without setup.py and csrc/ beside it, the advice is to reinstall, not `make setup`."""
    root = unbuilt_checkout(tmp_path)
    (root / "setup.py").unlink()
    out = run_info(root)
    assert out.returncode == 0, out.stderr
    assert "pip install --no-build-isolation ." in out.stderr and "make setup" not in out.stderr
