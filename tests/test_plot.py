"""examples/plot.py warns when the runs it averages into one curve have different
settings (a 100k- and a 5k-step run of one seed are not one result), and stays
quiet for seeds of one experiment. Uses the committed CartPole summaries."""

import importlib.util
import json
import os
import shutil

import pytest

pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "examples", "results", "cartpole")


def load_plot():
    spec = importlib.util.spec_from_file_location("examples_plot", os.path.join(ROOT, "examples", "plot.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def copy_summary(name, dst, **args):
    """A committed summary copied to dst, with some of its trainer args changed."""
    with open(os.path.join(RESULTS, name)) as f:
        summary = json.load(f)
    summary["args"].update(args)
    path = os.path.join(dst, name)
    with open(path, "w") as f:
        json.dump(summary, f)
    return path


def test_runs_with_different_settings_are_named_in_a_warning(tmp_path, capsys):
    plot = load_plot()
    long = shutil.copy(os.path.join(RESULTS, "dqn_fastclip_s0.json"), tmp_path)
    short = copy_summary("dqn_fastclip_s1.json", tmp_path, total_timesteps=5000, seed=0)
    out = tmp_path / "curves.png"
    plot.main([long, short, "--out", str(out)])
    err = capsys.readouterr().err
    assert "the 2 runs averaged into the dqn/fastclip curve have different settings" in err
    assert f"total_timesteps 100000 ({long}), 5000 ({short})" in err
    assert "seed" not in err.split("settings:")[1]  # seeds are what a curve averages over
    assert out.stat().st_size > 0


def test_seeds_of_one_experiment_give_no_warning(tmp_path, capsys):
    plot = load_plot()
    runs = [os.path.join(RESULTS, f"dqn_fastclip_s{seed}.json") for seed in range(3)]
    plot.main(runs + ["--out", str(tmp_path / "curves.png")])
    assert "warning" not in capsys.readouterr().err


def test_help_shows_the_default_output_path(capsys):
    with pytest.raises(SystemExit):
        load_plot().main(["--help"])
    assert "(default: curves.png)" in capsys.readouterr().out
