"""The trainers' --clip-mode autoclip|zclip and --monitor: each trainer runs ~2k steps
in-process (tests/test_examples.py's harness) and must clip with the adaptive
threshold it logged, and write the monitor's CSV and PNG into the run folder."""

import csv
import os

import pytest

pytest.importorskip("gymnasium")
from test_examples import run_trainer  # noqa: E402


@pytest.mark.parametrize(
    "algo, mode", [("a2c", "autoclip"), ("a2c", "zclip"), ("dqn", "zclip"), ("reinforce", "autoclip")]
)
def test_adaptive_mode_with_monitor(algo, mode, tmp_path, monkeypatch):
    s = run_trainer(
        algo, "fastclip", tmp_path, monkeypatch, extra=("--clip-mode", mode, "--monitor", "--log-every", "10")
    )
    assert s["clip_mode"] == mode and s["updates"] > 0
    assert not s.get("diverged")  # ZClip's threshold of inf (no clip) is not a divergence
    run_dir = tmp_path / s["run_dir"]
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == s["updates"]
    # "clipped" follows the logged adaptive threshold, not --max-grad-norm.
    for r in rows:
        assert int(r["clipped"]) == int(float(r["grad_norm"]) > float(r["clip_threshold"]))
    assert s["clip_fraction"] == sum(int(r["clipped"]) for r in rows) / len(rows)
    if mode == "autoclip":  # the 10th percentile of past norms clips most updates
        assert s["clip_fraction"] > 0.5
    with open(run_dir / "grad_norms.csv") as f:
        norms = list(csv.reader(f))
    assert len(norms) == s["updates"] + 1 and len(norms[0]) > 4  # header: step + one column per tensor
    assert os.path.getsize(run_dir / "grad_norms.png") > 1000
    assert s["monitor"]["updates_flagged"] <= s["monitor"]["explosions"]
