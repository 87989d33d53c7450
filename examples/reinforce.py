"""REINFORCE (Monte-Carlo policy gradient) with reward-to-go, a learned state-value baseline and
an entropy bonus, with the gradient norm clipped by fastclip on every update.

CleanRL-style single file: settings in ``Args``, the training loop inline in ``main``.

    python examples/reinforce.py --env-id CartPole-v1 --total-timesteps 200000 --clip fastclip

Correctness notes (Gymnasium 1.x):
* a single non-vectorised env is reset by hand, and every update uses whole episodes, so the
  reward-to-go never crosses an episode boundary;
* a *terminated* episode's return ends at 0; a *truncated* (time-limit) episode's reward-to-go
  is bootstrapped from the baseline's value of the real last observation.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Clipper, UpdateLogger, finish_run, make_monitor, parse_args, run_name, seed_everything, setup_torch  # noqa: E402


@dataclass
class Args:
    """REINFORCE with reward-to-go, value baseline, entropy bonus and a clipped gradient norm."""

    env_id: str = "CartPole-v1"
    """Gymnasium environment id (discrete actions, flat observations)"""
    total_timesteps: int = 200_000
    """environment steps to train for (the last batch of whole episodes may run slightly past it)"""
    seed: int = 0
    """seed for torch, numpy, python and the environment"""
    clip: Literal["none", "torch", "fastclip"] = "fastclip"
    """gradient clipping: fastclip's fused functions, the plain-torch way, or none"""
    clip_mode: Literal["global", "per-layer", "agc", "autoclip", "zclip"] = "global"
    """what is clipped, by what threshold: the global norm (max-grad-norm), each parameter's own norm
    (max-grad-norm), each unit adaptively (AGC, agc-clip-factor), or the global norm by an adaptive
    threshold: autoclip (fastclip.AutoClip: 10th percentile of all norms so far) or zclip
    (fastclip.ZClip: z-score spikes against an EMA), these two with --clip fastclip only;
    see examples/common.py's Clipper"""
    agc_clip_factor: float = 0.01
    """AGC: a unit's grad norm is held to this fraction of its weight norm (--clip-mode agc)"""
    max_grad_norm: float = 1.0
    """max global L2 norm of the gradients"""
    monitor: bool = False
    """record every update's per-layer gradient norms (fastclip.GradMonitor): grad_norms.csv,
    explosions.csv and grad_norms.png in the run folder"""
    summary_json: str | None = None
    """also write the end-of-run summary JSON here (it always goes to runs/<run-name>/summary.json)"""
    device: str = "cpu"
    """torch device: cpu or cuda"""
    num_threads: int = 1
    """torch intra-op CPU threads (1 is fastest for these tiny networks); 0 keeps torch's default"""
    run_name: str | None = None
    """name of the run directory under runs/ (default: env__algo__clip__seed__time)"""
    log_every: int = 20
    """read per-update metrics back to the host every this many updates"""
    progress: bool = True
    """show a tqdm progress bar"""
    eval_episodes: int = 20
    """greedy evaluation episodes at the end"""

    episodes_per_update: int = 4
    """complete episodes collected per gradient update"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0 over training"""
    gamma: float = 0.99
    """discount factor"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """baseline (value) loss coefficient"""
    normalize_advantage: bool = True
    """standardise the advantages (reward-to-go minus baseline) within each batch"""
    hidden: int = 64
    """width of the two hidden layers of the policy and of the baseline"""
    reward_scale: float = 1.0
    """multiply rewards by this before learning (returns are logged unscaled)"""


def mlp(inp: int, out: int, hidden: int, out_std: float) -> nn.Sequential:
    layers = [nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out)]
    for layer, std in zip(layers[::2], (np.sqrt(2), np.sqrt(2), out_std)):
        nn.init.orthogonal_(layer.weight, std)
        nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv)
    setup_torch(args.num_threads)
    seed_everything(args.seed)
    device = torch.device(args.device)
    run_dir = os.path.join("runs", run_name(args, "reinforce"))

    env = gym.make(args.env_id)
    assert isinstance(env.action_space, gym.spaces.Discrete), "this REINFORCE needs discrete actions"
    env.action_space.seed(args.seed)
    obs_dim, n_actions = int(np.prod(env.observation_space.shape)), int(env.action_space.n)

    policy = mlp(obs_dim, n_actions, args.hidden, out_std=0.01).to(device)
    baseline = mlp(obs_dim, 1, args.hidden, out_std=1.0).to(device)
    params = list(policy.parameters()) + list(baseline.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    named = [(f"policy.{n}", p) for n, p in policy.named_parameters()] + [
        (f"baseline.{n}", p) for n, p in baseline.named_parameters()
    ]
    clipper = Clipper(
        args.clip,
        args.max_grad_norm,
        mode=args.clip_mode,
        clip_factor=args.agc_clip_factor,
        monitor=make_monitor(args.monitor, named, run_dir, args.log_every),
    )
    logger = UpdateLogger(run_dir, clipper, args.log_every, config=vars(args))

    obs, _ = env.reset(seed=args.seed)
    pbar = tqdm(total=args.total_timesteps, disable=not args.progress, mininterval=1.0, desc="reinforce")
    start = time.perf_counter()
    global_step, diverged_at = 0, None
    while global_step < args.total_timesteps and diverged_at is None:
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * max(0.0, 1.0 - global_step / args.total_timesteps)

        # ---- collect whole episodes ----
        batch_obs, batch_actions, batch_returns = [], [], []
        for _ in range(args.episodes_per_update):
            ep_obs, ep_actions, ep_rewards = [], [], []
            while True:
                obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
                with torch.no_grad():
                    logits = policy(obs_t)
                # we sync every step anyway (.item() below), so this check is free: non-finite
                # logits mean the weights blew up (seen without clipping)
                if not torch.isfinite(logits).all():
                    diverged_at = global_step
                    break
                action = int(Categorical(logits=logits).sample().item())
                next_obs, reward, terminated, truncated, _ = env.step(action)
                ep_obs.append(obs_t)
                ep_actions.append(action)
                ep_rewards.append(float(reward))
                global_step += 1
                obs = next_obs
                if terminated or truncated:
                    break
            if diverged_at is not None:
                break
            logger.log_episode(global_step, sum(ep_rewards), len(ep_rewards))
            pbar.set_postfix(ret=f"{logger.recent_return():.1f}", refresh=False)
            pbar.update(len(ep_rewards))

            # reward-to-go; a truncated episode continues from V(last obs), a terminated one from 0
            if truncated and not terminated:
                with torch.no_grad():
                    future = float(baseline(torch.as_tensor(obs, dtype=torch.float32, device=device)))
            else:
                future = 0.0
            returns = np.zeros(len(ep_rewards), dtype=np.float32)
            for t in reversed(range(len(ep_rewards))):
                future = ep_rewards[t] * args.reward_scale + args.gamma * future
                returns[t] = future
            batch_obs += ep_obs
            batch_actions += ep_actions
            batch_returns.append(returns)
            obs, _ = env.reset()

        if diverged_at is not None or logger.nonfinite:  # inf/nan: stop, evaluate, report it
            diverged_at = diverged_at if diverged_at is not None else global_step
            break
        # ---- one gradient step on the batch of episodes ----
        b_obs = torch.stack(batch_obs)
        b_actions = torch.as_tensor(batch_actions, device=device)
        b_returns = torch.as_tensor(np.concatenate(batch_returns), device=device)
        dist = Categorical(logits=policy(b_obs))
        logprob = dist.log_prob(b_actions)
        entropy = dist.entropy().mean()
        values = baseline(b_obs).squeeze(-1)
        advantages = b_returns - values.detach()
        if args.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        pg_loss = -(advantages * logprob).mean()
        v_loss = 0.5 * (b_returns - values).pow(2).mean()
        loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the clip: fastclip.clip_grad_norm_(params, args.max_grad_norm) with the default
        # --clip fastclip --clip-mode global; the other choices: examples/common.py, Clipper
        grad_norm = clipper(params)  # pre-clip norm over policy + baseline, stays on device
        optimizer.step()
        logger.log_update(
            global_step,
            grad_norm=grad_norm,
            loss=loss.detach(),
            pg_loss=pg_loss.detach(),
            v_loss=v_loss.detach(),
            entropy=entropy.detach(),
            lr=optimizer.param_groups[0]["lr"],
        )
    logger.flush()
    wall_s = time.perf_counter() - start
    pbar.close()
    env.close()

    policy.eval()
    return finish_run(
        "reinforce",
        args,
        logger,
        clipper,
        lambda o: int(policy(o).argmax(dim=1).item()),
        wall_s,
        global_step,
        diverged_at,
        device,
    )


if __name__ == "__main__":
    main()
