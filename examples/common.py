"""What the three trainers (dqn.py, a2c.py, reinforce.py) share; each keeps its
own networks, loop and update, CleanRL style.

* ``Args`` and ``parse_args``: the settings every trainer has, and argparse built
  from a dataclass (the help of each flag is the string under its field), with
  bad combinations refused at start-up
* ``clip_function``: what ``--clip`` / ``--clip-mode`` call in each update
* ``UpdateLogger``: per-update metrics kept on the device, copied to the host every
  ``--log-every`` updates, written to CSV (and TensorBoard when installed)
* ``finish_run``: greedy evaluation, the summary JSON, the monitor's plot
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import inspect
import json
import math
import os
import random
import textwrap
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

import fastclip


# ---- settings -------------------------------------------------------------------------------
@dataclass
class Args:
    """The settings every trainer has; each trainer's Args adds its own and may change a default."""

    env_id: str = "CartPole-v1"
    """Gymnasium environment id (discrete actions, flat observations)"""
    total_timesteps: int = 100_000
    """environment steps to train for"""
    seed: int = 0
    """seed for python, numpy, torch and the environment(s)"""
    clip: Literal["fastclip", "torch", "none"] = "fastclip"
    """who clips the gradients: fastclip, torch.nn.utils.clip_grad_norm_, or nobody (the norm is still logged)"""
    clip_mode: Literal["global", "per-layer", "agc", "autoclip", "zclip"] = "global"
    """what is clipped: the global norm to max-grad-norm; each parameter to max-grad-norm (per-layer); each
    unit to agc-clip-factor of its weight norm (agc); or the global norm to an adaptive threshold (fastclip.AutoClip,
    fastclip.ZClip: autoclip and zclip need --clip fastclip)"""
    max_grad_norm: float = 0.5
    """max L2 norm of the gradients (global, or per parameter with --clip-mode per-layer)"""
    agc_clip_factor: float = 0.01
    """--clip-mode agc: a unit's gradient norm is held to this fraction of its weight norm"""
    reward_scale: float = 1.0
    """multiply rewards by this before learning (returns are logged unscaled); > 1 makes the gradients large"""
    hidden: int = 64
    """width of the hidden layers"""
    monitor: bool = False
    """record every update's per-layer gradient norms (fastclip.GradMonitor): grad_norms.csv, explosions.csv
    and grad_norms.png in the run folder"""
    device: str = "cpu"
    """torch device: cpu or cuda"""
    num_threads: int = 1
    """torch intra-op CPU threads (1 is fastest for these tiny networks); 0 keeps torch's default"""
    run_name: str | None = None
    """name of the run folder under runs/ (default: <env>__<algo>__<clip>__s<seed>__<unix time>)"""
    summary_json: str | None = None
    """also write the end-of-run summary JSON here (it always goes to runs/<run-name>/summary.json)"""
    log_every: int = 100
    """copy the per-update metrics to the host every this many updates"""
    progress: bool = True
    """show a tqdm progress bar"""
    eval_episodes: int = 20
    """greedy evaluation episodes at the end"""


def _field_docs(cls) -> dict[str, str]:
    """Field name -> the string literal written right under it, over the dataclass and its bases."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):  # bases first: a subclass's doc wins
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except None (the text then says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _problems(args) -> list[tuple[str, str]]:
    """(flag, why) for every setting that cannot work, found before anything starts."""
    out = []
    for name in ("max_grad_norm", "agc_clip_factor"):
        if not getattr(args, name) >= 0:  # also NaN
            out.append((name, f"must be a number >= 0, got {getattr(args, name)}"))
    for name in ("total_timesteps", "log_every", "hidden", "eval_episodes"):
        if getattr(args, name) < 1:
            out.append((name, f"must be >= 1, got {getattr(args, name)}"))
    if args.clip_mode in ("autoclip", "zclip") and args.clip != "fastclip":
        out.append(("clip_mode", f"{args.clip_mode} needs --clip fastclip (torch has no adaptive threshold)"))
    elif args.clip_mode != "global" and args.clip == "none":
        out.append(("clip_mode", f"{args.clip_mode} clips, so it needs --clip fastclip or --clip torch"))
    if getattr(args, "fused_step", False):
        if (args.clip, args.clip_mode) != ("fastclip", "global"):
            out.append(
                ("fused_step", "clips the global norm inside the step: it needs --clip fastclip --clip-mode global")
            )
        if getattr(args, "optimizer", "adam") != "adam":
            out.append(("fused_step", f"fastclip.optim has Adam, not {args.optimizer}: add --optimizer adam"))
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        out.append(("device", str(exc)))
    else:
        if device.type == "cuda" and not torch.cuda.is_available():
            why = "no GPU is visible" if torch.version.cuda else f"torch {torch.__version__} is a CPU-only build"
            out.append(("device", f"{args.device} is not available: {why}"))
    return out


def parse_args(cls, argv: list[str] | None = None):
    """Parse ``argv`` into dataclass ``cls`` (``--snake-case`` flags); bad settings exit as argparse does."""
    docs, hints = _field_docs(cls), typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(), formatter_class=_Help)
    for f in dataclasses.fields(cls):
        tp, kw = hints[f.name], {"default": f.default, "help": docs.get(f.name, " ")}
        if typing.get_origin(tp) is Literal:
            kw.update(choices=typing.get_args(tp), type=type(typing.get_args(tp)[0]))
        elif tp is bool:
            kw.update(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
            kw.update(type=next(a for a in typing.get_args(tp) if a is not type(None)))
        else:
            kw.update(type=tp)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    args = cls(**vars(parser.parse_args(argv)))
    for name, why in _problems(args):
        parser.error(f"argument --{name.replace('_', '-')}: {why}")
    return args


def seed_everything(args) -> torch.device:
    """Seeds python, numpy and torch, sets the thread count; returns the device."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    return torch.device(args.device)


def run_dir(args, algo: str) -> str:
    clip = args.clip if args.clip_mode == "global" else f"{args.clip}-{args.clip_mode}"
    return os.path.join("runs", args.run_name or f"{args.env_id}__{algo}__{clip}__s{args.seed}__{int(time.time())}")


# ---- the clip ---------------------------------------------------------------------------------
def clip_function(args) -> Callable:
    """What the trainers call after backward(): ``clip_grad_norm_(params, max_norm)``, which clips
    in place (or not, with --clip none) and returns the pre-clip *global* norm as a 0-dim device
    tensor, so every choice logs the same quantity. fastclip.clip_grad_norm_ by default."""
    fused = args.clip == "fastclip"
    if args.clip == "none":
        return lambda params, max_norm: torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if args.clip_mode == "global":
        return fastclip.clip_grad_norm_ if fused else torch.nn.utils.clip_grad_norm_
    if args.clip_mode == "per-layer":
        per_layer = fastclip.clip_grad_norm_per_layer_ if fused else torch_per_layer_clip_
        return lambda params, max_norm: torch.linalg.vector_norm(per_layer(list(params), max_norm))
    if args.clip_mode == "agc":
        agc_ = fastclip.adaptive_clip_grad_ if fused else torch_adaptive_clip_grad_

        def agc(params, max_norm):
            params = list(params)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # before AGC
            agc_(params, args.agc_clip_factor)
            return norm

        return agc
    clipper = fastclip.AutoClip() if args.clip_mode == "autoclip" else fastclip.ZClip()
    adaptive = lambda params, max_norm: clipper(params)  # its threshold, not max_norm
    adaptive.threshold = lambda: clipper.threshold  # for the logs: the threshold of the last call
    return adaptive


# --clip torch with --clip-mode per-layer or agc: the plain-torch way of the same clip.
def torch_per_layer_clip_(params, max_norm: float) -> torch.Tensor:
    """Each parameter's grad clipped by its own norm; returns the pre-clip norms, stacked."""
    return torch.stack([torch.nn.utils.clip_grad_norm_([p], max_norm) for p in params])


def torch_adaptive_clip_grad_(params, clip_factor: float, eps: float = 1e-3) -> None:
    """AGC as timm's adaptive_clip_grad writes it: unit norms of weight and grad, masked rescale."""
    for p in params:
        g = p.grad
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=g.dim() > 1)
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=g.dim() > 1)
        max_norm = w_norm.clamp(min=eps).mul_(clip_factor)
        g.detach().copy_(torch.where(g_norm < max_norm, g, g * (max_norm / g_norm.clamp(min=1e-6))))


# ---- logging ----------------------------------------------------------------------------------
class UpdateLogger:
    """Per-update metrics without per-update host syncs.

    ``log_update(step, grad_norm=..., loss=..., ...)`` keeps 0-dim device tensors; every
    ``log_every`` updates they are stacked and copied to the host in one transfer and written as
    one row per update to ``<run_dir>/metrics.csv`` (and TensorBoard when installed). ``clipped``
    is 1 when the update's pre-clip norm was above the threshold it was clipped to (max-grad-norm,
    or the adaptive one, logged as ``clip_threshold``), 0 otherwise and with --clip none, -1 in
    the per-layer and agc modes, where the global norm does not tell. Episode returns are host
    values already and go straight to ``episodes.csv``.
    """

    def __init__(self, run_dir: str, args, clip: Callable):
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir, self.args, self.log_every = run_dir, args, args.log_every
        self._threshold = getattr(clip, "threshold", None)
        self._pending: list[tuple[int, dict]] = []
        self._metrics = open(os.path.join(run_dir, "metrics.csv"), "w", newline="")
        self._metrics_csv = None
        self._episodes = open(os.path.join(run_dir, "episodes.csv"), "w", newline="")
        self._episodes_csv = csv.writer(self._episodes)
        self._episodes_csv.writerow(["global_step", "episodic_return", "episodic_length"])
        self.tb = _tensorboard(run_dir)
        self.updates, self.grad_norms, self.clipped, self.ep_returns = 0, [], [], []
        self.nonfinite = False  # a flushed metric was inf/NaN: the trainer stops

    def log_update(self, global_step: int, **metrics) -> None:
        if self._threshold is not None:
            metrics["clip_threshold"] = self._threshold().clone()
        self._pending.append((global_step, metrics))
        self.updates += 1
        if len(self._pending) >= self.log_every:
            self.flush()

    def log_episode(self, global_step: int, ep_return: float, ep_length: int) -> None:
        self.ep_returns.append(float(ep_return))
        self._episodes_csv.writerow([global_step, ep_return, ep_length])
        if self.tb is not None:
            self.tb.add_scalar("charts/episodic_return", ep_return, global_step)

    def recent_return(self, n: int = 20) -> float:
        return float(np.mean(self.ep_returns[-n:])) if self.ep_returns else math.nan

    def _clipped(self, norm: float, threshold: float) -> int:
        if self.args.clip == "none":
            return 0
        return -1 if self.args.clip_mode in ("per-layer", "agc") else int(norm > threshold)

    def flush(self) -> None:
        if not self._pending:
            return
        keys = list(self._pending[0][1])
        table = self._table(keys)
        if self._metrics_csv is None:
            self._metrics_csv = csv.writer(self._metrics)
            self._metrics_csv.writerow(["global_step", "update", *keys, "clipped"])
        first = self.updates - len(self._pending) + 1
        for i, (step, _) in enumerate(self._pending):
            row = dict(zip(keys, table[i]))
            clipped = self._clipped(row["grad_norm"], row.get("clip_threshold", self.args.max_grad_norm))
            self.grad_norms.append(row["grad_norm"])
            self.clipped.append(clipped)
            self._metrics_csv.writerow([step, first + i, *table[i], clipped])
            if self.tb is not None:
                for k, v in row.items():
                    self.tb.add_scalar(f"train/{k}", v, step)
        # ZClip's threshold is inf when it did not clip: not a divergence.
        self.nonfinite |= not all(math.isfinite(v) for r in table for k, v in zip(keys, r) if k != "clip_threshold")
        self._pending.clear()
        self._metrics.flush()
        self._episodes.flush()

    def _table(self, keys):
        """The pending metrics as host floats, one row per update: one device-to-host copy."""
        rows = [
            torch.stack([torch.as_tensor(m[k], dtype=torch.float32).reshape(()) for k in keys])
            for _, m in self._pending
        ]
        return torch.stack(rows).cpu().tolist()

    def close(self) -> None:
        self.flush()
        self._metrics.close()
        self._episodes.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(run_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
    except Exception:  # noqa: BLE001 - ImportError, or tensorboard missing underneath
        return None
    return SummaryWriter(run_dir)


# ---- the end of a run ---------------------------------------------------------------------------
@torch.no_grad()
def evaluate(args, act: Callable[[torch.Tensor], int], device: torch.device) -> list[float]:
    """``--eval-episodes`` greedy episodes; ``act`` maps a (1, obs_dim) tensor to an action."""
    import gymnasium as gym

    env, returns = gym.make(args.env_id), []
    for episode in range(args.eval_episodes):
        obs, _ = env.reset(seed=args.seed + 100_000 + episode)
        done, total = False, 0.0
        while not done:
            x = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
            obs, reward, terminated, truncated, _ = env.step(act(x))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def finish_run(algo, args, logger, act, wall_s, global_step, diverged_at, device, monitor=None) -> dict:
    """Greedy evaluation, ``<run_dir>/summary.json`` (and ``--summary-json``), the monitor's files
    and plot, one line printed. Returns the summary."""
    logger.close()
    returns = evaluate(args, act, device)
    norms = np.asarray(logger.grad_norms, dtype=np.float64)
    finite = norms[np.isfinite(norms)]
    clip_calls = args.clip != "none" and not getattr(args, "fused_step", False)  # --fused-step: the step clips
    summary = {
        "algo": algo,
        "env_id": args.env_id,
        "seed": args.seed,
        "clip": args.clip,
        "clip_mode": args.clip_mode,
        "max_grad_norm": args.max_grad_norm,
        "eval_episodes": len(returns),
        "eval_return_mean": float(np.mean(returns)),
        "eval_return_std": float(np.std(returns)),
        "total_timesteps": int(global_step),
        "wall_s": round(wall_s, 3),  # the training loop only
        "updates": logger.updates,
        "clip_calls": logger.updates if clip_calls else 0,  # one per update
        # the share of updates whose global norm was clipped (-1: per-layer and agc decide per tensor or unit)
        "clip_fraction": -1.0 if -1 in logger.clipped else float(np.mean(logger.clipped)) if logger.clipped else 0.0,
        "grad_norm_p50": float(np.percentile(finite, 50)) if finite.size else None,
        "grad_norm_p99": float(np.percentile(finite, 99)) if finite.size else None,
        "grad_norm_nonfinite": int(norms.size - finite.size),
        "train_return_last20": logger.recent_return() if logger.ep_returns else None,
        "diverged": diverged_at is not None,
        "diverged_at_step": diverged_at,
        "fastclip_backend": fastclip.backend(),
        "torch": torch.__version__,
        "run_dir": logger.run_dir,
        "args": dataclasses.asdict(args),
    }
    if monitor is not None:
        monitor.close()
        flagged = sorted({e.step for e in monitor.explosions})
        summary["monitor"] = {
            "png": monitor.plot(os.path.join(logger.run_dir, "grad_norms.png")),
            "explosions": len(monitor.explosions),
            "updates_flagged": len(flagged),
            "first_explosions": [str(e) for e in monitor.explosions[:5]],
        }
    text = json.dumps(summary, indent=1, allow_nan=False, default=lambda o: None)
    for path in {os.path.join(logger.run_dir, "summary.json"), args.summary_json} - {None, ""}:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    print(
        f"{algo} {args.env_id} clip={args.clip} mode={args.clip_mode} seed={args.seed}: eval return "
        f"{summary['eval_return_mean']:.1f} +- {summary['eval_return_std']:.1f}, wall {wall_s:.1f}s, "
        f"{logger.updates} updates, grad norm p50 {summary['grad_norm_p50']}"
        + (f", {len(flagged)} updates flagged by the monitor" if monitor is not None else "")
    )
    return summary
