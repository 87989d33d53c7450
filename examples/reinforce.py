"""REINFORCE (Monte-Carlo policy gradient) with reward-to-go, a learned state-value baseline and
an entropy bonus, with the gradient norm clipped by fastclip on every update.

CleanRL-style single file: settings in ``Args`` (the ones all three trainers share in
common.Args), the training loop inline in ``main``, the clip call in plain view in the update.

    python examples/reinforce.py --env-id CartPole-v1 --total-timesteps 200000 --clip fastclip

Correctness notes (Gymnasium 1.x):
* a single non-vectorised env is reset by hand, and every update uses whole episodes, so the
  reward-to-go never crosses an episode boundary;
* a *terminated* episode's return ends at 0; a *truncated* (time-limit) episode's reward-to-go
  is bootstrapped from the baseline's value of the real last observation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import common
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical
from tqdm import tqdm

import fastclip


@dataclass
class Args(common.Args):
    """REINFORCE with reward-to-go, value baseline, entropy bonus and a clipped gradient norm."""

    total_timesteps: int = 200_000
    """environment steps to train for (the last batch of whole episodes may run slightly past it)"""
    max_grad_norm: float = 1.0
    """max L2 norm of the gradients (global, or per parameter with --clip-mode per-layer)"""
    log_every: int = 20
    """copy the per-update metrics to the host every this many updates"""
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


def mlp(inp: int, out: int, hidden: int, out_std: float) -> nn.Sequential:
    layers = [nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out)]
    for layer, std in zip(layers[::2], (np.sqrt(2), np.sqrt(2), out_std)):
        nn.init.orthogonal_(layer.weight, std)
        nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv)
    device = common.seed_everything(args)
    run_dir = common.run_dir(args, "reinforce")

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
    clip_grad_norm_ = common.clip_function(args)  # fastclip.clip_grad_norm_ unless --clip / --clip-mode say otherwise
    monitor = fastclip.GradMonitor(named, every=args.log_every, log_dir=run_dir) if args.monitor else None
    logger = common.UpdateLogger(run_dir, args, clip_grad_norm_)

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
        if monitor is not None:
            monitor.record()  # every layer's gradient norm, before the clip
        grad_norm = clip_grad_norm_(params, args.max_grad_norm)  # the pre-clip norm over policy + baseline
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
    act = lambda o: int(policy(o).argmax(dim=1).item())  # greedy
    return common.finish_run("reinforce", args, logger, act, wall_s, global_step, diverged_at, device, monitor)


if __name__ == "__main__":
    main()
