"""Shared plumbing for the fastclip RL examples (dqn.py, a2c.py, reinforce.py).

Only what the three trainers would otherwise copy verbatim lives here:

* ``parse_args``   - dataclass -> argparse, help text taken from the docstring under each field
* ``seed_everything``
* ``Clipper``      - the one place that calls ``fastclip.clip_grad_norm_`` / torch's clip, counts
                     the calls and times them
* ``UpdateLogger`` - per-update metrics kept on the device, read back to the host only every
                     ``log_every`` updates, written to CSV (always) and TensorBoard (when installed)
* ``evaluate``     - greedy evaluation episodes
* ``write_summary``- the end-of-run summary JSON (with small down-sampled curves for plot.py)

The training loops themselves stay inline in each trainer, CleanRL style.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import inspect
import json
import os
import random
import textwrap
import time
import types
import typing
from collections.abc import Callable, Iterable

import numpy as np
import torch

CLIP_CHOICES = ("none", "torch", "fastclip")


# --------------------------------------------------------------------------------------------
# argparse from a dataclass
# --------------------------------------------------------------------------------------------
def _field_docs(cls) -> dict[str, str]:
    """Map field name -> the string literal written right under it (CleanRL/tyro convention)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_args(cls, argv: list[str] | None = None):
    """Build an argparse parser from dataclass ``cls`` (``--snake-case`` flags) and parse ``argv``."""
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        description=(cls.__doc__ or "").strip(), formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        kw: dict = {"default": f.default, "help": docs.get(f.name, " ")}
        origin = typing.get_origin(tp)
        if origin is typing.Literal:
            kw.update(choices=typing.get_args(tp), type=type(typing.get_args(tp)[0]))
        elif tp is bool:
            kw.update(action=argparse.BooleanOptionalAction)
        elif origin in (typing.Union, types.UnionType):  # Optional[X], X | None
            kw.update(type=[a for a in typing.get_args(tp) if a is not type(None)][0])
        else:
            kw.update(type=tp)
        parser.add_argument(flag, **kw)
    return cls(**vars(parser.parse_args(argv)))


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic


def setup_torch(num_threads: int) -> None:
    """Small MLPs: one intra-op thread is fastest and keeps runs reproducible on a shared CPU."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


# --------------------------------------------------------------------------------------------
# gradient clipping
# --------------------------------------------------------------------------------------------
# What is clipped and by what threshold (--clip-mode): see Clipper. The adaptive thresholds are
# fastclip.AutoClip / ZClip, fastclip only.
ADAPTIVE_MODES = ("autoclip", "zclip")
CLIP_MODES = ("global", "per-layer", "agc", *ADAPTIVE_MODES)


def torch_per_layer_clip_(params, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Local clipping the plain-torch way: one clip_grad_norm_ per parameter. Returns the
    per-parameter pre-clip norms, stacked (the baseline of ``--clip torch --clip-mode per-layer``)."""
    return torch.stack([torch.nn.utils.clip_grad_norm_([p], max_norm, norm_type) for p in params])


def torch_adaptive_clip_grad_(params, clip_factor: float = 0.01, eps: float = 1e-3, norm_type: float = 2.0) -> None:
    """AGC (Brock et al. 2021) the plain-torch way, as timm's ``adaptive_clip_grad``: per
    parameter, unit (row) norms of weight and grad, then a masked rescale (the baseline of
    ``--clip torch --clip-mode agc``)."""
    for p in params:
        g = p.grad
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        w_norm = torch.linalg.vector_norm(p.detach(), norm_type, dim=dims, keepdim=g.dim() > 1)
        g_norm = torch.linalg.vector_norm(g, norm_type, dim=dims, keepdim=g.dim() > 1)
        max_norm = w_norm.clamp(min=eps).mul_(clip_factor)
        g.detach().copy_(torch.where(g_norm < max_norm, g, g * (max_norm / g_norm.clamp(min=1e-6))))


def _clip_fns(kind: str, mode: str, max_norm: float, norm_type: float, clip_factor: float):
    """The one place that maps (--clip, --clip-mode) to functions; new modes go here.

    Returns (clip, measure): clip(params) clips in place and returns the pre-clip *global* norm
    as a 0-dim device tensor (so every mode logs the same quantity); measure is None, or, for a
    clip function with no such norm (AGC), measure(params) gives it, called before (and not
    timed with) the clip. (None, measure) for --clip none: the norm only."""
    if kind == "fastclip":
        import fastclip  # imported lazily so --clip torch/none work without the extension

        measure = lambda ps: fastclip.get_total_norm([p.grad for p in ps], norm_type)  # noqa: E731
        clip = {
            "global": lambda ps: fastclip.clip_grad_norm_(ps, max_norm, norm_type=norm_type),
            "per-layer": lambda ps: torch.linalg.vector_norm(
                fastclip.clip_grad_norm_per_layer_(ps, max_norm, norm_type), norm_type
            ),
            "agc": lambda ps: fastclip.adaptive_clip_grad_(ps, clip_factor, norm_type=norm_type),
            # stateful clippers: called as clip(params), they return the norm and keep .threshold
            "autoclip": (lambda: fastclip.AutoClip(norm_type=norm_type)),
            "zclip": (lambda: fastclip.ZClip(norm_type=norm_type)),
        }
        if mode in ADAPTIVE_MODES:
            return clip[mode](), measure
    else:
        measure = lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps], norm_type)  # noqa: E731
        clip = {
            "global": lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm, norm_type=norm_type),
            "per-layer": lambda ps: torch.linalg.vector_norm(torch_per_layer_clip_(ps, max_norm, norm_type), norm_type),
            "agc": lambda ps: torch_adaptive_clip_grad_(ps, clip_factor, norm_type=norm_type),
        }
    if kind == "none":
        return None, measure
    return clip[mode], (measure if mode == "agc" else None)


class Clipper:
    """Clip the gradients and return the *pre-clip global* norm as a 0-dim device tensor.

    ``kind`` (``--clip``):
      * ``"fastclip"`` - fastclip's fused functions (no host sync)
      * ``"torch"``    - the plain-torch way of doing the same clip (the baseline)
      * ``"none"``     - no clipping; the norm is still measured (torch's ``get_total_norm``) so the
                         logs show what the gradients did, but that is not a clip call.

    ``mode`` (``--clip-mode``), the same for both kinds where both exist (see ``_clip_fns``):
      * ``"global"``    - one norm over all grads: ``clip_grad_norm_`` (fastclip's or torch's)
      * ``"per-layer"`` - each grad clipped by its own norm: ``fastclip.clip_grad_norm_per_layer_``,
                          or torch's ``clip_grad_norm_`` called once per parameter
      * ``"agc"``       - unit-wise adaptive clipping (``clip_factor``): ``fastclip.adaptive_clip_grad_``,
                          or the timm-style loop ``torch_adaptive_clip_grad_``; the global norm for
                          the logs is measured first (``get_total_norm``, not timed)
      * ``"autoclip"``  - ``fastclip.AutoClip()``: the 10th percentile of all norms so far (fastclip only)
      * ``"zclip"``     - ``fastclip.ZClip()``: clip z-score spikes against an EMA, 25 warm-up updates
                          (fastclip only)
    ``threshold`` is then the device tensor of the threshold the last call used (adaptive modes).

    Per-layer and AGC modes use the same ``max_norm`` / ``clip_factor`` for every trainer; the
    defaults were tuned for global clipping, so compare modes, not absolute returns.

    ``monitor``: a ``fastclip.GradMonitor`` (``--monitor``), recorded before every clip call.

    ``calls`` counts calls to the clip function and ``time_s`` is the host wall time spent inside
    them. On CUDA both clip functions only enqueue kernels, so ``time_s`` there is launch
    overhead, not kernel time (no synchronisation is added here on purpose).
    """

    def __init__(
        self,
        kind: str,
        max_norm: float,
        norm_type: float = 2.0,
        mode: str = "global",
        clip_factor: float = 0.01,
        monitor=None,
    ):
        if kind not in CLIP_CHOICES:
            raise ValueError(f"clip must be one of {CLIP_CHOICES}, got {kind!r}")
        if mode not in CLIP_MODES or (mode in ADAPTIVE_MODES and kind != "fastclip"):
            raise ValueError(
                f"clip mode must be one of {CLIP_MODES} ({'/'.join(ADAPTIVE_MODES)} with "
                f"--clip fastclip), got {mode!r} with --clip {kind}"
            )
        self.kind, self.mode, self.max_norm, self.norm_type = kind, mode, float(max_norm), float(norm_type)
        self.calls, self.time_s = 0, 0.0
        self.monitor = monitor
        self._fn, self._measure = _clip_fns(kind, mode, self.max_norm, self.norm_type, clip_factor)

    def clipped(self, norm: float, limit: float) -> int:
        """1 if the call with this pre-clip global norm and threshold scaled the grads, 0 if not;
        -1 where the global norm cannot tell (per-layer and AGC decide per tensor or per unit)."""
        if self.kind == "none":
            return 0
        return -1 if self.mode in ("per-layer", "agc") else int(norm > limit)

    @property
    def threshold(self) -> torch.Tensor | None:
        """The adaptive modes' threshold of the last call (a device tensor), else None."""
        return getattr(self._fn, "threshold", None)

    def __call__(self, parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
        params = [p for p in parameters if p.grad is not None]
        if self.monitor is not None:
            self.monitor.record()  # the raw per-layer norms, before any clipping
        if self._fn is None:
            return self._measure(params)
        pre_norm = None if self._measure is None else self._measure(params)  # not timed
        t0 = time.perf_counter()
        norm = self._fn(params)
        self.time_s += time.perf_counter() - t0
        self.calls += 1
        return norm if pre_norm is None else pre_norm


# --------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------
def _make_tb_writer(run_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
    except Exception:  # noqa: BLE001 - ImportError, or tensorboard missing underneath
        return None
    return SummaryWriter(run_dir)


class UpdateLogger:
    """Per-update metrics without per-update host syncs.

    ``log_update(step, grad_norm=..., loss=..., ...)`` stores 0-dim device tensors; every
    ``log_every`` updates they are stacked and copied to the host in one transfer, then written
    one CSV row per update to ``<run_dir>/metrics.csv`` (and TensorBoard if importable).
    ``clipped`` is derived from the pre-clip norm (``Clipper.clipped``): 1 when the clip call
    scaled the gradients (``norm > max_norm``; always 0 for ``--clip none``; -1 for the
    per-layer and AGC modes, where the global norm does not tell).

    Episode returns are host values already (they come from the env), so ``log_episode`` writes
    them straight to ``<run_dir>/episodes.csv``.
    """

    def __init__(self, run_dir: str, clipper: Clipper, log_every: int = 100, config: dict | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir, self.clipper, self.log_every = run_dir, clipper, log_every
        self.tb = _make_tb_writer(run_dir)
        if self.tb is not None and config:
            self.tb.add_text("config", "\n".join(f"|{k}|{v}|" for k, v in config.items()))
        self._pending: list[tuple[int, dict]] = []
        self._metrics_file = open(os.path.join(run_dir, "metrics.csv"), "w", newline="")
        self._metrics_csv = None
        self._episodes_file = open(os.path.join(run_dir, "episodes.csv"), "w", newline="")
        self._episodes_csv = csv.writer(self._episodes_file)
        self._episodes_csv.writerow(["global_step", "episodic_return", "episodic_length"])
        self.updates = 0
        self.grad_norms: list[float] = []  # every pre-clip norm, on the host (after flushes)
        self.clipped: list[int] = []  # per update: 1 when the clip call scaled the gradients
        self.norm_steps: list[int] = []
        self.entropy: list[float] = []  # policy entropy per update (A2C/REINFORCE), for the summary curve
        self.ep_steps: list[int] = []
        self.ep_returns: list[float] = []
        self.last: dict[str, float] = {}  # latest flushed values (for the progress bar)
        self.nonfinite = False  # became True if a flushed grad norm or loss was inf/nan

    def log_update(self, global_step: int, **metrics) -> None:
        """``metrics`` must include ``grad_norm``; values: 0-dim tensors (kept on device) or floats."""
        if self.clipper.threshold is not None:  # adaptive modes: this update's threshold (a device copy)
            metrics["clip_threshold"] = self.clipper.threshold.clone()
        self._pending.append((global_step, metrics))
        self.updates += 1
        if len(self._pending) >= self.log_every:
            self.flush()

    def log_episode(self, global_step: int, ep_return: float, ep_length: int) -> None:
        self.ep_steps.append(global_step)
        self.ep_returns.append(float(ep_return))
        self._episodes_csv.writerow([global_step, ep_return, ep_length])
        if self.tb is not None:
            self.tb.add_scalar("charts/episodic_return", ep_return, global_step)
            self.tb.add_scalar("charts/episodic_length", ep_length, global_step)

    def recent_return(self, n: int = 20) -> float:
        return float(np.mean(self.ep_returns[-n:])) if self.ep_returns else float("nan")

    def flush(self) -> None:
        if not self._pending:
            return
        keys = list(self._pending[0][1].keys())
        dev_keys = [k for k in keys if torch.is_tensor(self._pending[0][1][k])]
        host_keys = [k for k in keys if k not in dev_keys]
        # one device->host copy for the whole interval
        if dev_keys:
            table = (
                torch.stack(
                    [torch.stack([m[k].detach().float().reshape(()) for k in dev_keys]) for _, m in self._pending]
                )
                .cpu()
                .numpy()
            )
        else:
            table = np.zeros((len(self._pending), 0))
        if self._metrics_csv is None:
            self._metrics_csv = csv.writer(self._metrics_file)
            self._metrics_csv.writerow(["global_step", "update", *dev_keys, "clipped", *host_keys])
        first_update = self.updates - len(self._pending)
        gi = dev_keys.index("grad_norm")
        for i, (step, m) in enumerate(self._pending):
            norm = float(table[i, gi])
            limit = (
                float(table[i, dev_keys.index("clip_threshold")])
                if "clip_threshold" in dev_keys
                else self.clipper.max_norm
            )
            clipped = self.clipper.clipped(norm, limit)
            self.clipped.append(clipped)
            host_vals = [float(m[k]) for k in host_keys]
            self._metrics_csv.writerow([step, first_update + i + 1, *table[i].tolist(), clipped, *host_vals])
            self.grad_norms.append(norm)
            if "entropy" in dev_keys:
                self.entropy.append(float(table[i, dev_keys.index("entropy")]))
            self.norm_steps.append(step)
            if self.tb is not None:
                for k, v in zip(dev_keys, table[i].tolist()):
                    self.tb.add_scalar(f"train/{k}", v, step)
                self.tb.add_scalar("train/clipped", clipped, step)
                for k, v in zip(host_keys, host_vals):
                    self.tb.add_scalar(f"train/{k}", v, step)
        # (an adaptive threshold of inf is no divergence: ZClip reports inf when it did not clip)
        watched = [j for j, k in enumerate(dev_keys) if k != "clip_threshold"]
        if not np.isfinite(table[:, watched]).all():
            self.nonfinite = True
        self.last = {k: float(table[-1, j]) for j, k in enumerate(dev_keys)}
        self._pending.clear()
        self._metrics_file.flush()
        self._episodes_file.flush()

    def close(self) -> None:
        self.flush()
        self._metrics_file.close()
        self._episodes_file.close()
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------
# evaluation + summary
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    make_env: Callable, act: Callable[[torch.Tensor], int], episodes: int, seed: int, device: torch.device
) -> list[float]:
    """Run ``episodes`` greedy episodes; ``act`` maps a (1, obs_dim) tensor to an int action."""
    env = make_env()
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, total = False, 0.0
        while not done:
            action = act(torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0))
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def _binned(steps: list[int], values: list[float], bins: int = 100) -> dict:
    """Down-sample a curve to at most ``bins`` points (per-bin mean/median/max)."""
    if not steps:
        return {"step": [], "mean": [], "median": [], "max": []}
    s, v = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    edges = np.linspace(s.min(), s.max() + 1, bins + 1)
    idx = np.clip(np.digitize(s, edges) - 1, 0, bins - 1)
    out = {"step": [], "mean": [], "median": [], "max": []}
    for b in range(bins):
        sel = v[idx == b]
        if sel.size == 0:
            continue
        fin = sel[np.isfinite(sel)]
        out["step"].append(int(s[idx == b].max()))
        out["mean"].append(float(fin.mean()) if fin.size else None)
        out["median"].append(float(np.median(fin)) if fin.size else None)
        out["max"].append(float(fin.max()) if fin.size else None)
    return out


def _pct(x: np.ndarray, q: float):
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if x.size else None


def write_summary(
    algo: str,
    args,
    logger: UpdateLogger,
    clipper: Clipper,
    eval_returns: list[float],
    wall_s: float,
    global_step: int,
    extra: dict | None = None,
) -> dict:
    """Write ``<run_dir>/summary.json`` and, if ``args.summary_json`` is set, that path too."""
    norms = np.asarray(logger.grad_norms, dtype=np.float64)
    summary = {
        "algo": algo,
        "env_id": args.env_id,
        "seed": args.seed,
        "clip": args.clip,
        "clip_mode": clipper.mode,
        "max_grad_norm": args.max_grad_norm,
        "eval_episodes": len(eval_returns),
        "eval_return_mean": float(np.mean(eval_returns)),
        "eval_return_std": float(np.std(eval_returns)),
        "total_timesteps": int(global_step),
        "wall_s": round(wall_s, 3),  # training loop only (excludes the final evaluation)
        "updates": logger.updates,
        "clip_calls": clipper.calls,
        "clip_time_s": round(clipper.time_s, 6),
        # the share of updates whose global norm was clipped (-1: per-layer and AGC decide per
        # tensor or per unit, which the global norm does not tell)
        "clip_fraction": (
            -1.0 if clipper.clipped(0.0, 0.0) < 0 else float(np.mean(logger.clipped)) if logger.clipped else 0.0
        ),
        "grad_norm_p50": _pct(norms, 50),
        "grad_norm_p99": _pct(norms, 99),
        "grad_norm_max": _pct(norms, 100),
        "grad_norm_nonfinite": int((~np.isfinite(norms)).sum()),
        "train_return_last20": logger.recent_return(20) if logger.ep_returns else None,
        "episodes": len(logger.ep_returns),
        "device": str(args.device),
        "torch": torch.__version__,
        "run_dir": logger.run_dir,
        "args": dataclasses.asdict(args),
        "curves": {
            "return": _binned(logger.ep_steps, logger.ep_returns),
            "grad_norm": _binned(logger.norm_steps, logger.grad_norms),
        },
    }
    if logger.entropy:
        summary["curves"]["entropy"] = _binned(logger.norm_steps, logger.entropy)
    if extra:
        summary.update(extra)
    if clipper.monitor is not None:
        summary["monitor"] = finish_monitor(clipper.monitor, logger.run_dir)
    if args.clip == "fastclip":
        import fastclip  # already imported by the Clipper

        summary["fastclip_backend"] = fastclip.backend()
    text = json.dumps(summary, indent=1, allow_nan=False, default=lambda o: None)
    for path in {os.path.join(logger.run_dir, "summary.json"), args.summary_json} - {None, ""}:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    return summary


def finish_run(
    algo: str,
    args,
    logger: UpdateLogger,
    clipper: Clipper,
    act: Callable[[torch.Tensor], int],
    wall_s: float,
    global_step: int,
    diverged_at: int | None,
    device,
) -> dict:
    """The end of every trainer: greedy evaluation with ``act``, the summary JSON, the log files
    closed, one line printed. Returns the summary."""
    import gymnasium as gym  # here, not at the top: bench/ imports this module without gymnasium

    eval_returns = evaluate(
        lambda: gym.make(args.env_id), act, args.eval_episodes, seed=args.seed + 100_000, device=device
    )
    summary = write_summary(
        algo,
        args,
        logger,
        clipper,
        eval_returns,
        wall_s,
        global_step,
        extra={"diverged": diverged_at is not None, "diverged_at_step": diverged_at},
    )
    logger.close()
    print(
        f"{algo} {args.env_id} clip={args.clip} mode={args.clip_mode} seed={args.seed}: eval return "
        f"{summary['eval_return_mean']:.1f} +- {summary['eval_return_std']:.1f}, wall {wall_s:.1f}s, "
        f"clip calls {clipper.calls} ({clipper.time_s:.3f}s), grad norm p50 {summary['grad_norm_p50']}"
    )
    return summary


def make_monitor(enabled: bool, named_parameters, run_dir: str, every: int = 100):
    """``--monitor``: a fastclip.GradMonitor over ``named_parameters`` (a module or (name, param)
    pairs) writing grad_norms.csv / explosions.csv into the run folder, or None."""
    if not enabled:
        return None
    import fastclip

    return fastclip.GradMonitor(named_parameters, every=every, log_dir=run_dir)


def finish_monitor(monitor, run_dir: str) -> dict:
    """Flush, draw ``grad_norms.png`` in the run folder, and summarise the explosions found."""
    monitor.close()
    png = monitor.plot(os.path.join(run_dir, "grad_norms.png"))
    return {
        "png": png,
        "explosions": len(monitor.explosions),
        "first_explosions": [str(e) for e in monitor.explosions[:5]],
    }


def run_name(args, algo: str) -> str:
    mode = getattr(args, "clip_mode", "global")
    clip = args.clip if mode == "global" or args.clip == "none" else f"{args.clip}-{mode}"
    return args.run_name or f"{args.env_id}__{algo}__{clip}__s{args.seed}__{int(time.time())}"
