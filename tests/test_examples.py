"""Smoke tests for the RL examples: each trainer runs ~2k env steps with --clip fastclip and
--clip torch and must write a valid summary JSON. Runs in-process (import + main(argv)) to avoid
paying the torch import per run; each run writes under a temporary working directory.
tests/test_trainer_args.py and test_monitor_rule.py use the same harness."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gymnasium")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
REQUIRED = [
    "eval_return_mean",
    "eval_return_std",
    "total_timesteps",
    "wall_s",
    "clip",
    "clip_mode",
    "max_grad_norm",
    "updates",
    "clip_fraction",
    "grad_norm_p50",
    "grad_norm_p99",
]

# small settings so that real gradient updates happen within ~2k steps
SMOKE_ARGS = {
    "dqn": ["--total-timesteps", "2000", "--learning-starts", "500", "--train-frequency", "4"],
    "a2c": ["--total-timesteps", "2000"],
    "reinforce": ["--total-timesteps", "2000"],
}


def load_trainer(algo: str, monkeypatch):
    """examples/<algo>.py as a module; the trainers import examples/common.py as `common`."""
    monkeypatch.syspath_prepend(EXAMPLES)
    spec = importlib.util.spec_from_file_location(f"examples_{algo}", os.path.join(EXAMPLES, f"{algo}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def run_trainer(algo: str, clip: str, tmp_path, monkeypatch, extra=()):
    """A short run in tmp_path; returns its summary as written to disk."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / f"{algo}_{clip}.json"
    threads = torch.get_num_threads()
    try:
        ret = load_trainer(algo, monkeypatch).main(
            [
                *SMOKE_ARGS[algo],
                "--clip",
                clip,
                "--seed",
                "1",
                "--eval-episodes",
                "2",
                "--no-progress",
                "--run-name",
                f"{algo}_{clip}",
                "--summary-json",
                str(out),
                *extra,
            ]
        )
    finally:
        torch.set_num_threads(threads)
    with open(out) as f:
        summary = json.load(f)
    assert summary["eval_return_mean"] == ret["eval_return_mean"]
    return summary


_run = run_trainer  # the name tests/test_local.py imports


@pytest.mark.parametrize("clip", ["fastclip", "torch"])
@pytest.mark.parametrize("algo", ["dqn", "a2c", "reinforce"])
def test_trainer_writes_summary(algo, clip, tmp_path, monkeypatch):
    s = run_trainer(algo, clip, tmp_path, monkeypatch)
    for key in REQUIRED:
        assert key in s, key
    assert s["clip"] == clip
    assert s["total_timesteps"] >= 1900
    assert s["updates"] > 0
    assert s["eval_episodes"] == 2 and math.isfinite(s["eval_return_mean"])  # --eval-episodes honoured
    assert s["grad_norm_nonfinite"] == 0 and 0 < s["grad_norm_p50"] <= s["grad_norm_p99"]
    # per-update CSV: header + one row per update, and it agrees with the summary's clip fraction
    run_dir = tmp_path / "runs" / f"{algo}_{clip}"
    with open(run_dir / "metrics.csv") as f:
        rows = [line.split(",") for line in f.read().strip().splitlines()]
    assert ",".join(rows[0]).startswith("global_step,update,grad_norm")
    assert len(rows) == 1 + s["updates"]
    clipped = [int(r[rows[0].index("clipped")]) for r in rows[1:]]
    assert s["clip_fraction"] == pytest.approx(sum(clipped) / len(clipped))
    assert (run_dir / "episodes.csv").exists()


def test_no_clip_clips_nothing_and_is_reproducible(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = run_trainer("reinforce", "none", tmp_path / "a", monkeypatch)
    b = run_trainer("reinforce", "none", tmp_path / "b", monkeypatch)
    assert a["clip_fraction"] == 0
    assert a["grad_norm_p50"] > 0  # the norm is still measured and logged
    for key in ["eval_return_mean", "grad_norm_p50", "grad_norm_p99", "updates", "train_return_last20"]:
        assert a[key] == b[key], key
