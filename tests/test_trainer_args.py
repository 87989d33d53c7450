"""The trainers refuse bad settings at start-up with argparse's one-line error (exit 2),
before any environment or network is built, and their --help shows each default once."""

import pytest
import torch

pytest.importorskip("gymnasium")
from test_examples import load_trainer  # noqa: E402

BAD = [
    (["--max-grad-norm", "-1"], "argument --max-grad-norm: must be a number >= 0, got -1.0"),
    (["--max-grad-norm", "nan"], "argument --max-grad-norm: must be a number >= 0"),
    (["--clip", "torch", "--clip-mode", "autoclip"], "argument --clip-mode: autoclip needs --clip fastclip"),
    (["--clip", "none", "--clip-mode", "agc"], "argument --clip-mode: agc clips, so it needs --clip fastclip or"),
    (["--total-timesteps", "0"], "argument --total-timesteps: must be >= 1"),
    (["--device", "gpu0"], "argument --device:"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "argument --device: cuda is not available"))


@pytest.mark.parametrize("algo", ["dqn", "a2c", "reinforce"])
@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_settings_exit_with_one_argparse_line(algo, argv, message, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    trainer = load_trainer(algo, monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        trainer.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"{algo}.py: error: {message}" in err or f"error: {message}" in err.splitlines()[-1], err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_good_settings_parse(monkeypatch):
    """Control for the test above: the same parser takes sound settings."""
    trainer = load_trainer("a2c", monkeypatch)
    args = trainer.common.parse_args(
        trainer.Args, ["--clip", "fastclip", "--clip-mode", "zclip", "--max-grad-norm", "0"]
    )
    assert (args.clip_mode, args.max_grad_norm, args.total_timesteps) == ("zclip", 0.0, 300_000)


def test_help_shows_each_default_once_and_none_not_at_all(monkeypatch, capsys):
    trainer = load_trainer("dqn", monkeypatch)
    with pytest.raises(SystemExit):
        trainer.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: <env>__<algo>__<clip>__s<seed>__<unix time>)" in out
    assert "(default: None)" not in out
    assert "(default: 10.0)" in out  # DQN's own max-grad-norm, overriding common.Args
    assert out.count("(default: fastclip)") == 1
