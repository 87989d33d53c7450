"""A real RL library's trainer, unchanged, through python -m fastclip.run: rl_games'
PPO on CartPole (tests/rl_games_cartpole.py starts it as rl_games' runner.py does).
rl_games binds torch's clip_grad_norm_ at import, so only the launcher reaches it.

rl_games is not a dependency of fastclip: if the venv lacks it, the pinned set of
tests/requirements-rl-games.txt is installed once, with --no-deps, into pytest's
cache folder (.pytest_cache), and only the trainer's processes see it."""

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "requirements-rl-games.txt")
TRAINER = os.path.join(HERE, "rl_games_cartpole.py")
EPOCHS, MINI_EPOCHS, MINIBATCHES = 3, 2, 2  # as rl_games_cartpole.py configures PPO: one clip per minibatch


@pytest.fixture(scope="module")
def rl_games_path(request, tmp_path_factory):
    """The folder to put on PYTHONPATH for rl_games (None: the venv has it)."""
    if importlib.util.find_spec("rl_games") is not None:
        return None
    with open(REQUIREMENTS, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    base = str(cache.mkdir("rl-games")) if cache else str(tmp_path_factory.mktemp("rl-games"))
    target = os.path.join(base, digest)
    if not os.path.isdir(target):
        partial = tempfile.mkdtemp(dir=base)  # renamed when complete: a half install is never used
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", partial]
        out = subprocess.run([*cmd, "-r", REQUIREMENTS], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            pytest.skip(f"could not install rl_games ({REQUIREMENTS}):\n{out.stderr[-2000:]}")
        try:
            os.rename(partial, target)
        except OSError:  # another process installed it first
            shutil.rmtree(partial, ignore_errors=True)
    return target


def train(cwd, rl_games_path, launcher=(), *args):
    """Run the trainer in `cwd`; (stderr, the final weights {name: tensor})."""
    os.makedirs(cwd)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if rl_games_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [rl_games_path, env.get("PYTHONPATH")]))
    cmd = [sys.executable, *launcher, TRAINER, "--epochs", str(EPOCHS), *args]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (checkpoint,) = glob.glob(os.path.join(cwd, "runs", "*", "nn", "last_*.pth"))
    return out.stderr, torch.load(checkpoint, weights_only=True)["model"]


def largest_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_rl_games_ppo_unchanged_through_the_launcher(tmp_path, rl_games_path):
    err, ours = train(tmp_path / "fastclip", rl_games_path, ("-m", "fastclip.run", "--summary"))
    _, theirs = train(tmp_path / "torch", rl_games_path)
    _, unclipped = train(tmp_path / "unclipped", rl_games_path, (), "--grad-norm", "0")
    summary = dict(re.findall(r"(\w+)=(\S+)", next(ln for ln in err.splitlines() if "fastclip.run summary" in ln)))
    assert summary["clip_grad_norm_"] == str(EPOCHS * MINI_EPOCHS * MINIBATCHES)  # every clip of the trainer
    assert ours.keys() == theirs.keys()
    # The same seed gives the same run: fastclip's weights differ from torch's by rounding
    # only, a thousandth of what the clip itself changes (which also shows the comparison
    # can fail: without the clip the weights are that far off).
    clip_effect = largest_difference(theirs, unclipped)
    assert clip_effect > 1e-5, clip_effect
    assert largest_difference(ours, theirs) <= 1e-3 * clip_effect, (largest_difference(ours, theirs), clip_effect)
