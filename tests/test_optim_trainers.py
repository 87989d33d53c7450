"""The trainers' --fused-step (fastclip.optim.Adam: the clip inside the step): a short run of
dqn and a2c writes a valid summary with the norms logged and no separate clip call, and a
combination it cannot honour is refused at start-up."""

import math

import pytest

pytest.importorskip("gymnasium")

from test_examples import load_trainer, run_trainer  # noqa: E402


@pytest.mark.parametrize("algo, extra", [("dqn", []), ("a2c", ["--optimizer", "adam"])])
def test_fused_step_run(algo, extra, tmp_path, monkeypatch):
    summary = run_trainer(algo, "fastclip", tmp_path, monkeypatch, extra=["--fused-step", *extra])
    assert summary["clip_calls"] == 0 and summary["updates"] > 0  # the clip happened inside the step
    assert math.isfinite(summary["grad_norm_p50"]) and summary["grad_norm_p50"] > 0


@pytest.mark.parametrize(
    "algo, argv, message",
    [
        ("a2c", ["--fused-step"], "fastclip.optim has Adam, not rmsprop"),
        ("dqn", ["--fused-step", "--clip", "torch"], "it needs --clip fastclip --clip-mode global"),
        ("dqn", ["--fused-step", "--clip-mode", "agc"], "it needs --clip fastclip --clip-mode global"),
    ],
)
def test_fused_step_refuses_what_it_cannot_do(algo, argv, message, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_trainer(algo, monkeypatch).main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --fused-step: " in err and message in err
