"""GradMonitor: every update's per-layer gradient norms, kept on the device,
looked at on the host every `every` steps.

    monitor = fastclip.GradMonitor(model, every=100, log_dir="runs/x")
    for batch in data:
        loss.backward()
        monitor.record()                 # before clipping: the raw norms
        clipper(model.parameters()); optimizer.step(); optimizer.zero_grad()
    monitor.close()
    monitor.plot("grads.png")

record() is one fused per-tensor norms call (fastclip.per_tensor_norms) and one
row written into a device ring buffer of `every` rows: no host sync, so it can
run inside torch.compile(fullgraph=True) or a captured CUDA graph. In eager
mode every `every`-th record() flushes: the buffer comes to the host in one
transfer, is written to CSV (and TensorBoard when installed), and is scanned
for explosions. Inside a compiled or captured step record() cannot count on the
host: call flush() yourself, at least every `every` steps (older rows are
overwritten and flush() warns how many were lost).

The explosion rule (docs/monitor.md). A layer's norm is an explosion when it is
non-finite, or when, with at least `min_history` finite norms of that layer in
the last `window` steps, it is more than `k` times

  - the largest of those norms (the layer's gradient beats its recent record), or
  - the layer's norm over the norm of all other layers' grads beats the largest
    such ratio in the window by k (the layer jumped away from the rest).

Why records and not the median: healthy RL gradients are heavy-tailed (an A2C
run on CartPole has norms of ~0.03 with spikes of ~100 whenever an episode
ends), so "k times the median" flags several percent of healthy updates, while
a new record by a factor k is rare in them (0-0.5% of updates with the
defaults). The ratio to the other layers keeps a spike in one layer visible
when the layer's own norm swings widely, because healthy swings move all
layers together.
"""

import csv
import math
import os
import statistics
import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from ._grads import check_norm_type
from .per_layer import per_tensor_norms

_NO_GRAD = -1.0  # recorded for a parameter whose .grad is None (a norm is never negative)


class Explosion(NamedTuple):
    step: int  # 0-based count of record() calls
    layer: str  # the parameter's name, e.g. "actor.0.weight"
    norm: float
    median: float  # that layer's median over the window before this step (nan: no history)
    kind: str  # "spike" (the rule above) or "nonfinite"

    def __str__(self):
        if self.kind == "nonfinite":
            return f"step {self.step}: {self.layer} has a non-finite gradient norm ({self.norm})"
        return (
            f"step {self.step}: {self.layer} gradient norm {self.norm:.4g} is "
            f"{self.norm / self.median:.1f}x its running median {self.median:.4g}"
        )


def _named_parameters(model):
    if isinstance(model, torch.nn.Module):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        items = list(model)
    except TypeError:
        raise TypeError(
            f"fastclip.GradMonitor: model must be an nn.Module or an iterable of parameters "
            f"or (name, parameter) pairs, got {type(model).__name__}"
        ) from None
    named = [item if isinstance(item, tuple) else (f"param{i}", item) for i, item in enumerate(items)]
    for i, (name, p) in enumerate(named):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"fastclip.GradMonitor: parameter {i} ({name!r}) is a {type(p).__name__}, not a Tensor")
    return named


def _tensorboard_writer(log_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
    except Exception:  # noqa: BLE001 - ImportError, or tensorboard missing underneath
        return None
    return SummaryWriter(log_dir)


class GradMonitor:
    """Per-parameter gradient norms every step, explosions named by layer and step.

    Args:
        model (nn.Module or Iterable): an nn.Module (its trainable named parameters),
            or an iterable of parameters or of (name, parameter) pairs
        every (int, optional): rows in the device ring buffer, and the flush
            interval in eager mode. Default: 100
        k (float, keyword-only): a norm is a spike when it beats the layer's record
            over the window (or its ratio to the other layers beats that ratio's
            record) by more than this factor; see the module's doc. Default: 5.0
        window (int, keyword-only): the steps the records are taken over. Default: 100
        min_history (int, keyword-only): the finite norms a layer needs in the window
            before it can spike. Default: 10
        norm_type (float, keyword-only): type of the p-norm. Default: 2.0
        log_dir (str, keyword-only): where grad_norms.csv, explosions.csv and
            TensorBoard events (when tensorboard is installed) go; None keeps
            everything in memory. Default: None
        on_explosion (callable, keyword-only): called with each Explosion as found.
            Default: None
    """

    def __init__(
        self,
        model: "torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]]",
        every: int = 100,
        *,
        k: float = 5.0,
        window: int = 100,
        min_history: int = 10,
        norm_type: float = 2.0,
        log_dir: str | None = None,
        on_explosion: "Callable[[Explosion], None] | None" = None,
    ):
        fn = "GradMonitor"
        for name, value, minimum in (("every", every, 1), ("window", window, 1), ("min_history", min_history, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"fastclip.{fn}: {name} must be an integer >= {minimum}, got {value!r}")
        if not float(k) > 1.0:
            raise ValueError(f"fastclip.{fn}: k must be a number > 1, got {k!r}")
        named = _named_parameters(model)
        if not named:
            raise ValueError(f"fastclip.{fn}: no parameters to monitor")
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.every, self.k, self.window, self.min_history = every, float(k), window, min_history
        self.norm_type = check_norm_type(norm_type, fn)
        self.on_explosion = on_explosion
        device = self._params[0].device
        n = len(self._params)
        # The device side: a ring of `every` rows and the count of record() calls.
        self._norms = torch.zeros(every, n, dtype=torch.float32, device=device)
        self._steps = torch.zeros(every, dtype=torch.int64, device=device)
        self._count = torch.zeros(1, dtype=torch.int64, device=device)
        self._unflushed = 0  # host count of eager record() calls since the last flush
        # The host side, filled at each flush.
        self._flushed = 0
        self.steps = []  # every flushed step
        self.history = []  # and its row of norms (a float32 CPU tensor; nan: no grad)
        self.explosions = []
        # The rule's window, per layer: the last `window` norms and ratios to the other
        # layers (-inf where there was none), and how many finite norms have been seen.
        self._recent = torch.full((window, n), -math.inf, dtype=torch.float64)
        self._recent_ratio = torch.full((window, n), -math.inf, dtype=torch.float64)
        self._seen = torch.zeros(n, dtype=torch.int64)
        self._recent_pos = 0
        self.log_dir = log_dir
        self._csv = self._events_csv = self._tb = None
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            self._csv_file = open(os.path.join(log_dir, "grad_norms.csv"), "w", newline="")
            self._csv = csv.writer(self._csv_file)
            self._csv.writerow(["step", *self.names])
            self._events_file = open(os.path.join(log_dir, "explosions.csv"), "w", newline="")
            self._events_csv = csv.writer(self._events_file)
            self._events_csv.writerow(["step", "layer", "kind", "norm", "median"])
            self._tb = _tensorboard_writer(log_dir)

    # -- every step: device only -------------------------------------------------------
    def record(self) -> None:
        """Record this step's per-parameter gradient norms (call after backward(), before
        clipping). No host sync; flushes every `every` calls in eager mode."""
        grads = [p.grad for p in self._params]
        present = [i for i, g in enumerate(grads) if g is not None]
        with torch.no_grad():
            row = torch.full((len(grads),), _NO_GRAD, dtype=torch.float32, device=self._norms.device)
            if present:
                norms = per_tensor_norms([grads[i] for i in present], self.norm_type)
                norms = norms.to(self._norms.device, torch.float32)
                if len(present) == len(grads):
                    row = norms
                else:
                    row.index_copy_(0, torch.tensor(present, device=row.device), norms)
            slot = torch.remainder(self._count, self.every)
            self._norms.index_copy_(0, slot, row.reshape(1, -1))
            self._steps.index_copy_(0, slot, self._count)
            self._count.add_(1)
        if not torch.compiler.is_compiling():
            self._unflushed += 1
            if self._unflushed >= self.every:
                self.flush()

    # -- every `every` steps: the host ---------------------------------------------------
    def flush(self) -> list["Explosion"]:
        """Bring the unflushed rows to the host (one sync), write them out, scan them for
        explosions. Returns the explosions found in them."""
        self._unflushed = 0
        # One transfer: count, step numbers and norms packed in float64 (exact for all three).
        packed = torch.cat([self._count.double(), self._steps.double(), self._norms.double().flatten()]).cpu()
        count, steps = int(packed[0]), packed[1 : 1 + self.every].long().tolist()
        norms = packed[1 + self.every :].reshape(self.every, -1)
        new = count - self._flushed
        if new > self.every:
            warnings.warn(
                f"fastclip.GradMonitor: {new - self.every} steps were overwritten before a flush "
                f"(flush at least every {self.every} steps)",
                RuntimeWarning,
                stacklevel=2,
            )
            new = self.every
        found = []
        for step in range(count - new, count):
            slot = step % self.every
            assert steps[slot] == step
            found.extend(self._take_row(step, norms[slot]))
        self._flushed = count
        for f in (getattr(self, "_csv_file", None), getattr(self, "_events_file", None)):
            if f is not None:
                f.flush()
        return found

    def _take_row(self, step, row):
        """Scan one step's norms (a float64 CPU tensor) for explosions, then add them to the window."""
        missing = row == _NO_GRAD
        row = row.masked_fill(missing, math.nan)
        finite = torch.isfinite(row)
        squares = torch.where(finite, row * row, 0.0)
        rest = (squares.sum() - squares).clamp(min=0.0).sqrt()  # the norm of the other layers' grads
        ratio = torch.where(finite & (rest > 0), row / rest, math.nan)
        ready = torch.minimum(self._seen, torch.tensor(self.window)) >= self.min_history
        beats_record = row > self.k * self._recent.amax(dim=0)
        beats_ratio_record = ratio > self.k * self._recent_ratio.amax(dim=0)
        spike = finite & ready & (beats_record | beats_ratio_record)
        nonfinite = ~missing & ~finite
        events = [
            Explosion(step, self.names[j], float(row[j]), self._median(j), "nonfinite" if nonfinite[j] else "spike")
            for j in torch.nonzero(nonfinite | spike).flatten().tolist()
        ]
        # Spikes enter the window too, so a lasting change of scale stops being flagged.
        slot = self._recent_pos % self.window
        self._recent[slot] = torch.where(finite, row, -math.inf)
        self._recent_ratio[slot] = torch.nan_to_num(ratio, nan=-math.inf)
        self._recent_pos += 1
        self._seen += finite
        self.steps.append(step)
        self.history.append(row.float())
        self.explosions.extend(events)
        self._write(step, row, missing, events)
        if self.on_explosion is not None:
            for e in events:
                self.on_explosion(e)
        return events

    def _median(self, j):
        """Layer j's median over the window (nan: no finite norm yet), for the report."""
        values = [v for v in self._recent[:, j].tolist() if v > -math.inf]
        return statistics.median(values) if values else math.nan

    def _write(self, step, row, missing, events):
        if self._csv is not None:
            self._csv.writerow([step, *("" if m else repr(v) for v, m in zip(row.tolist(), missing.tolist()))])
            for e in events:
                self._events_csv.writerow([e.step, e.layer, e.kind, e.norm, e.median])
        if self._tb is not None:
            for name, v in zip(self.names, row.tolist()):
                if math.isfinite(v):
                    self._tb.add_scalar(f"grad_norm/{name}", v, step)
            for e in events:
                self._tb.add_text("grad_explosions", str(e), step)

    def close(self) -> None:
        """Flush what is left and close the files."""
        self.flush()
        if self._csv is not None:
            self._csv_file.close()
            self._events_file.close()
            self._csv = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(steps, norms): every flushed step (int64) and its per-parameter norms (float32,
        nan where a parameter had no grad), as CPU tensors."""
        if not self.history:
            return torch.zeros(0, dtype=torch.int64), torch.zeros((0, len(self.names)), dtype=torch.float32)
        return torch.tensor(self.steps, dtype=torch.int64), torch.stack(self.history)

    # -- the picture ---------------------------------------------------------------------
    def plot(self, path: str, max_legend: int = 12) -> str:
        """Per-layer gradient-norm curves over steps on a log axis, explosions marked
        (spikes with a red x at the norm, non-finite norms with a red line); saved to
        `path`, which is returned. Needs matplotlib."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        steps, norms = self.norms()
        fig = Figure(figsize=(10, 5.5), layout="constrained")
        ax = fig.add_subplot()
        labelled = len(self.names) <= max_legend
        for j, name in enumerate(self.names):
            y = torch.where(norms[:, j] > 0, norms[:, j], math.nan)  # log axis: no zeros
            ax.plot(steps.tolist(), y.tolist(), lw=0.8, label=name if labelled else None)
        spikes = [e for e in self.explosions if e.kind == "spike"]
        if spikes:
            ax.scatter(
                [e.step for e in spikes],
                [e.norm for e in spikes],
                marker="x",
                color="red",
                s=40,
                zorder=5,
                label=f"spike (> {self.k:g}x the layer's record over {self.window} steps)",
            )
        for i, e in enumerate(e for e in self.explosions if e.kind == "nonfinite"):
            ax.axvline(e.step, color="red", lw=0.8, ls="--", label="non-finite norm" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"gradient norm (p={self.norm_type:g})")
        first = self.explosions[0] if self.explosions else None
        ax.set_title(
            f"per-layer gradient norms; {len(self.explosions)} explosion(s)"
            + (f", first: {first.layer} at step {first.step}" if first else "")
        )
        if labelled or self.explosions:
            ax.legend(fontsize=7, ncol=2)
        fig.savefig(path, dpi=110)
        return path
