"""GradMonitor's explosion rule on real training (docs/monitor.md): on healthy runs of the
three trainers (default settings, shortened) it flags at most 1% of the updates, and it
catches every spike injected into one layer's gradient. The full check (3 seeds each, the
whole default runs) is scripts/monitor_check.py."""

import pytest

import fastclip

pytest.importorskip("gymnasium")
from test_examples import run_trainer  # noqa: E402

# Shortened default runs: (steps, the updates they make) ~ 500 A2C, ~2500 DQN, ~100 REINFORCE updates.
RUNS = {
    "a2c": ["--total-timesteps", "20000"],
    "dqn": ["--total-timesteps", "6000"],
    "reinforce": ["--total-timesteps", "20000"],
}
FACTOR = 1e4  # the injected spike: one layer's gradient multiplied by this


class InjectingMonitor(fastclip.GradMonitor):
    """Multiplies one layer's gradient by FACTOR every 50th record() from the 30th on (the
    layer chosen in turn) before recording it, and remembers where."""

    k_override = None

    def __init__(self, *args, **kwargs):
        if self.k_override is not None:
            kwargs["k"] = self.k_override
        super().__init__(*args, **kwargs)
        self.calls, self.injected = 0, []

    def record(self):
        if self.calls % 50 == 30 and len(self.injected) < 10:
            j = (self.calls // 50) % len(self.names)
            if self._params[j].grad is not None:  # the monitored parameters, in the order of self.names
                self._params[j].grad.mul_(FACTOR)
                self.injected.append((self.calls, self.names[j]))
        self.calls += 1
        super().record()


def run_with(algo, tmp_path, monkeypatch, monitor_cls=fastclip.GradMonitor):
    made = []

    class Recorded(monitor_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(fastclip, "GradMonitor", Recorded)
    summary = run_trainer(algo, "fastclip", tmp_path, monkeypatch, extra=(*RUNS[algo], "--monitor"))
    (monitor,) = made
    return summary, monitor


@pytest.mark.parametrize("algo", sorted(RUNS))
def test_healthy_runs_flag_at_most_one_percent_of_updates(algo, tmp_path, monkeypatch):
    summary, monitor = run_with(algo, tmp_path, monkeypatch)
    assert summary["updates"] >= 50 and not summary["diverged"]
    flagged = {e.step for e in monitor.explosions}
    assert len(flagged) == summary["monitor"]["updates_flagged"]
    assert len(flagged) <= 0.01 * summary["updates"], [str(e) for e in monitor.explosions]


@pytest.mark.parametrize("algo", sorted(RUNS))
def test_injected_spikes_are_all_caught(algo, tmp_path, monkeypatch):
    _, monitor = run_with(algo, tmp_path, monkeypatch, InjectingMonitor)
    assert len(monitor.injected) >= 2
    caught = {(e.step, e.layer) for e in monitor.explosions if e.kind == "spike"}
    assert [spike for spike in monitor.injected if spike not in caught] == []


def test_injected_spikes_below_the_threshold_are_missed(tmp_path, monkeypatch):
    """Control for the test above: with k far above the injected factor the same spikes pass unflagged."""
    monkeypatch.setattr(InjectingMonitor, "k_override", 1e3 * FACTOR)
    _, monitor = run_with("a2c", tmp_path, monkeypatch, InjectingMonitor)
    caught = {(e.step, e.layer) for e in monitor.explosions}
    assert monitor.injected and not any(spike in caught for spike in monitor.injected)
