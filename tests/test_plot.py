"""examples/plot.py draws run folders, warns when the runs it averages into one curve have
different settings (a 100k- and a 5k-step run of one seed are not one result), and stays
quiet for seeds of one experiment."""

import csv
import importlib.util
import json
import os

import pytest

pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_plot():
    spec = importlib.util.spec_from_file_location("examples_plot", os.path.join(ROOT, "examples", "plot.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_run(root, name, seed, total_timesteps=10_000):
    """A run folder as a2c.py writes it: summary.json, episodes.csv, metrics.csv."""
    folder = root / name
    folder.mkdir()
    args = {"seed": seed, "total_timesteps": total_timesteps, "run_name": name, "gamma": 0.99}
    summary = dict(algo="a2c", env_id="CartPole-v1", seed=seed, clip="fastclip", clip_mode="global")
    summary.update(max_grad_norm=0.5, eval_return_mean=100.0 + seed, total_timesteps=total_timesteps, updates=50)
    summary.update(grad_norm_p50=0.1, grad_norm_p99=5.0, args=args)
    (folder / "summary.json").write_text(json.dumps(summary))
    with open(folder / "episodes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["global_step", "episodic_return", "episodic_length"])
        w.writerows([[step, step / 100, 20] for step in range(100, total_timesteps, 100)])
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["global_step", "update", "grad_norm", "entropy", "clipped"])
        w.writerows(
            [[step, i + 1, 0.1 * (1 + i % 7), 0.69, 0] for i, step in enumerate(range(200, total_timesteps, 200))]
        )
    return str(folder)


def test_runs_with_different_settings_are_named_in_a_warning(tmp_path, capsys):
    long, short = fake_run(tmp_path, "long", 0), fake_run(tmp_path, "short", 1, total_timesteps=5000)
    out = tmp_path / "curves.png"
    load_plot().main([long, short, "--out", str(out), "--table"])
    captured = capsys.readouterr()
    assert "the 2 runs averaged into the a2c/fastclip curve have different settings" in captured.err
    assert f"total_timesteps 10000 ({long}), 5000 ({short})" in captured.err
    assert "seed" not in captured.err.split("settings:")[1]  # seeds are what a curve averages over
    assert "| a2c | fastclip | 0,1 | 100.0 / 101.0 | 100.5 |" in captured.out
    assert out.stat().st_size > 0


def test_seeds_of_one_experiment_give_no_warning(tmp_path, capsys):
    runs = [fake_run(tmp_path, f"s{seed}", seed) for seed in range(3)]
    load_plot().main(runs + ["--out", str(tmp_path / "curves.png")])
    assert "warning" not in capsys.readouterr().err


def test_help_shows_the_default_output_path(capsys):
    with pytest.raises(SystemExit):
        load_plot().main(["--help"])
    assert "(default: curves.png)" in capsys.readouterr().out
