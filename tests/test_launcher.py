"""python -m fastclip.run, as a user runs it: real processes on scripts and modules
written to a temporary folder. The script runs as `python script.py` would run it,
with names it binds at import (`from torch.nn.utils import clip_grad_norm_`) already
fastclip's; exit status, exceptions and errors pass through."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

# A library that binds torch's functions at import, as rl_games' a2c_common does.
LIBRARY = """
from torch.nn.utils import clip_grad_norm_, clip_grad_value_, get_total_norm
from torch.nn.utils import clip_grads_with_norm_ as scale_by_norm
"""
# The script: reports how it was run and what the library holds, then clips once with
# each function through the library's names.
PROBE = """
import json, os, pickle, sys

import torch

import fastclip
import binds_at_import as lib


class Point:  # defined in __main__: pickling it needs sys.modules["__main__"] to be this module
    x = 1


import __main__

p = torch.nn.Parameter(torch.ones(4))
p.grad = torch.full((4,), 3.0)
norm = lib.get_total_norm([p.grad])
lib.scale_by_norm([p], 1.0, norm)
lib.clip_grad_norm_([p], 1.0)
lib.clip_grad_value_([p], 0.1)
report = {
    "name": __name__,
    "argv": sys.argv,
    "path0": sys.path[0],
    "main_is_me": __main__.__dict__ is globals(),
    "pickles": type(pickle.loads(pickle.dumps(Point()))) is Point,
    "fastclip": {
        name: getattr(getattr(lib, attr), "__wrapped__", getattr(lib, attr)) is getattr(fastclip, name)
        for name, attr in [
            ("clip_grad_norm_", "clip_grad_norm_"),
            ("clip_grad_value_", "clip_grad_value_"),
            ("get_total_norm", "get_total_norm"),
            ("clip_grads_with_norm_", "scale_by_norm"),
        ]
    },
}
with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump(report, f)
if "--exit" in sys.argv:
    sys.exit(int(sys.argv[sys.argv.index("--exit") + 1]))
if "--raise" in sys.argv:
    raise ValueError("raised by the script")
"""
ALL = dict.fromkeys(["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"], True)
NONE = dict.fromkeys(ALL, False)


def write(folder, files):
    for rel, source in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


@pytest.fixture
def probe(tmp_path):
    """A script (scripts/probe.py) and the same as a module (pkg/probe.py) in tmp_path."""
    write(
        tmp_path,
        {
            "scripts/probe.py": PROBE,
            "scripts/binds_at_import.py": LIBRARY,
            "pkg/__init__.py": "",
            "pkg/probe.py": PROBE,
            "binds_at_import.py": LIBRARY,  # for the module, found on sys.path[0] = the current directory
        },
    )
    return tmp_path


def run(args, cwd, env=(), timeout=120):
    """(returncode, stdout, stderr, the probe's report or None); env: variables to add."""
    out = os.path.join(cwd, "report.json")
    if os.path.exists(out):
        os.remove(out)
    env = dict(os.environ, PROBE_OUT=out, **dict(env))
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    report = json.load(open(out)) if os.path.exists(out) else None
    return proc.returncode, proc.stdout, proc.stderr, report


def summary_of(stderr):
    """{key: value} of the launcher's summary line, or None."""
    line = next((ln for ln in stderr.splitlines() if ln.startswith("fastclip.run summary:")), None)
    return None if line is None else dict(re.findall(r"(\w+)=(\S+)", line))


def test_script_runs_as_python_would_run_it_with_names_bound_at_import_patched(probe):
    rc, _, err, report = run(["-m", "fastclip.run", "scripts/probe.py", "a", "--b"], cwd=probe)
    assert rc == 0, err
    assert report["fastclip"] == ALL
    assert report["name"] == "__main__" and report["argv"] == ["scripts/probe.py", "a", "--b"]
    assert report["path0"] == str(probe / "scripts")
    assert report["main_is_me"] and report["pickles"]
    assert summary_of(err) is None  # off by default
    # the negative control: the same script run by python itself keeps torch's functions
    rc, _, err, report = run(["scripts/probe.py", "a", "--b"], cwd=probe)
    assert rc == 0, err
    assert report["fastclip"] == NONE
    assert report["argv"] == ["scripts/probe.py", "a", "--b"] and report["path0"] == str(probe / "scripts")


def test_module_runs_as_python_m_would_run_it(probe):
    rc, _, err, report = run(["-m", "fastclip.run", "--summary", "-m", "pkg.probe", "--summary"], cwd=probe)
    assert rc == 0, err
    assert report["fastclip"] == ALL
    assert report["name"] == "__main__" and report["main_is_me"] and report["pickles"]
    assert report["argv"] == [str(probe / "pkg" / "probe.py"), "--summary"]  # its own --summary
    assert report["path0"] == str(probe)
    summary = summary_of(err)
    assert summary["backend"] in ("cpu", "cuda")
    assert [summary[f] for f in ALL] == ["1", "1", "1", "1"]


def test_options_select_what_is_patched(probe):
    rc, _, err, report = run(
        ["-m", "fastclip.run", "--functions", "clip_grad_value_,get_total_norm", "--summary", "scripts/probe.py"],
        cwd=probe,
    )
    assert rc == 0, err
    assert report["fastclip"] == NONE | {"clip_grad_value_": True, "get_total_norm": True}
    summary = summary_of(err)
    # torch's clip_grad_norm_, not replaced, calls the replaced get_total_norm: twice in all
    assert (summary["clip_grad_value_"], summary["get_total_norm"]) == ("1", "2")
    assert "clip_grad_norm_" not in summary


def test_exit_status_and_exceptions_pass_through(probe):
    rc, _, err, _ = run(["-m", "fastclip.run", "--summary", "scripts/probe.py", "--exit", "3"], cwd=probe)
    assert rc == 3 and summary_of(err) is not None  # the summary is printed on sys.exit too
    rc, _, err, _ = run(["-m", "fastclip.run", "scripts/probe.py", "--raise"], cwd=probe)
    assert rc == 1
    assert err.rstrip().endswith("ValueError: raised by the script")
    assert 'probe.py", line' in err  # the traceback reaches into the script


@pytest.mark.parametrize(
    "args, message",
    [
        (["nosuch.py"], r"can't open file '.*nosuch\.py': no such file or directory"),
        (["-m", "nosuch_module"], r"-m nosuch_module: no module named 'nosuch_module'"),
        (["-m", "pkg"], r"'pkg' is a package with no __main__ module"),
        (["--functions", "clip_grad_nrm_", "x.py"], r"unknown function\(s\) \['clip_grad_nrm_'\]"),
        ([], r"name a script"),
    ],
)
def test_clear_errors(probe, args, message):
    rc, out, err, report = run(["-m", "fastclip.run", *args], cwd=probe)
    assert rc == 2 and report is None
    assert re.search(message, err), err
    assert "Traceback" not in err


BLOCK_EXTENSION = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fastclip._C":
            raise ImportError("blocked by the test")

sys.meta_path.insert(0, Block())
"""


def test_without_the_extension_one_warning_and_the_reference_path(probe):
    """fastclip._C blocked at start-up (a sitecustomize): one warning says why, the summary
    says backend=python, and the script's names are still fastclip's."""
    write(probe, {"site/sitecustomize.py": BLOCK_EXTENSION})
    rc, _, err, report = run(
        ["-m", "fastclip.run", "--summary", "scripts/probe.py"], cwd=probe, env={"PYTHONPATH": str(probe / "site")}
    )
    assert rc == 0, err
    assert len([line for line in err.splitlines() if "blocked by the test" in line]) == 1, err
    assert summary_of(err)["backend"] == "python"
    assert report["fastclip"] == ALL
