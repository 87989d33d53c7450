"""A2C (synchronous advantage actor-critic) with n-step returns and entropy regularisation on
vectorised Gymnasium envs, with the gradient norm clipped by fastclip on every update.

CleanRL-style single file: settings in ``Args`` (the ones all three trainers share in
common.Args), the training loop inline in ``main``, the clip call in plain view in the update.

    python examples/a2c.py --env-id CartPole-v1 --total-timesteps 300000 --clip fastclip

Correctness notes (Gymnasium 1.x):
* the vector env uses ``AutoresetMode.SAME_STEP``: when a sub-env finishes, ``step`` returns the
  reset observation of the *next* episode and the real last observation in
  ``info["final_obs"]``. Every step is therefore a real transition, and ``dones`` cuts the n-step
  return at the boundary so no return crosses two episodes;
* only *termination* means "future value is 0". On a *truncation* (time limit) the lost future is
  bootstrapped: ``reward += gamma * V(final_obs)`` before the return is cut.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

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
    """A2C with n-step returns, entropy bonus and a clipped global gradient norm."""

    total_timesteps: int = 300_000
    """environment steps to train for (summed over all envs)"""
    num_envs: int = 8
    """parallel environments (gymnasium SyncVectorEnv; env i is seeded with seed + i)"""
    num_steps: int = 5
    """steps per env per update: the n of the n-step return"""
    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    """optimizer (rmsprop as in the original A2C; sgd makes the step size follow the raw gradient)"""
    learning_rate: float = 1e-3
    """learning rate"""
    fused_step: bool = False
    """clip inside the optimizer step: fastclip.optim.Adam(max_grad_norm=...) instead of a clip call and
    torch's Adam (needs --optimizer adam --clip fastclip --clip-mode global; docs/optim.md)"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0 over training"""
    gamma: float = 0.99
    """discount factor"""
    ent_coef: float = 0.01
    """entropy bonus coefficient (entropy regularisation keeps the policy exploring)"""
    vf_coef: float = 0.5
    """value-loss coefficient"""
    normalize_advantage: bool = False
    """standardise advantages within each batch"""


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """Separate actor and critic MLPs (tanh), orthogonal init as in CleanRL."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, n_actions), std=0.01),
        )

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x).squeeze(-1)

    def dist(self, x: torch.Tensor) -> Categorical:
        return Categorical(logits=self.actor(x))


def make_optimizer(name: str, params, lr: float, fused_step_max_norm: float | None = None) -> torch.optim.Optimizer:
    if fused_step_max_norm is not None:  # Adam that clips inside its step (docs/optim.md)
        return fastclip.optim.Adam(params, lr=lr, eps=1e-5, max_grad_norm=fused_step_max_norm)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-5)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=1e-5)
    return torch.optim.SGD(params, lr=lr)


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv)
    device = common.seed_everything(args)
    run_dir = common.run_dir(args, "a2c")

    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(args.env_id) for _ in range(args.num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "this A2C needs discrete actions"
    envs.action_space.seed(args.seed)
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    n_actions = int(envs.single_action_space.n)

    agent = Agent(obs_dim, n_actions, args.hidden).to(device)
    fused_step_max_norm = args.max_grad_norm if args.fused_step else None
    optimizer = make_optimizer(args.optimizer, agent.parameters(), args.learning_rate, fused_step_max_norm)
    clip_grad_norm_ = common.clip_function(args)  # fastclip.clip_grad_norm_ unless --clip / --clip-mode say otherwise
    monitor = fastclip.GradMonitor(agent, every=args.log_every, log_dir=run_dir) if args.monitor else None
    logger = common.UpdateLogger(run_dir, args, clip_grad_norm_)

    # rollout storage: (num_steps, num_envs, ...)
    T, N = args.num_steps, args.num_envs
    b_obs = torch.zeros((T, N, obs_dim), device=device)
    b_actions = torch.zeros((T, N), dtype=torch.long, device=device)
    b_rewards = torch.zeros((T, N), device=device)
    b_dones = torch.zeros((T, N), device=device)  # 1 if the episode ended (either way) after step t

    obs_np, _ = envs.reset(seed=args.seed)  # env i is seeded with seed + i
    obs = torch.as_tensor(obs_np, dtype=torch.float32, device=device)
    ep_returns, ep_lengths = np.zeros(N), np.zeros(N, dtype=np.int64)
    num_updates = args.total_timesteps // (T * N)
    pbar = tqdm(total=num_updates * T * N, disable=not args.progress, mininterval=1.0, desc="a2c")
    start = time.perf_counter()
    global_step, diverged_at = 0, None
    for update in range(num_updates):
        if logger.nonfinite:  # a flushed loss/grad norm was inf/nan: stop, evaluate, report it
            diverged_at = global_step
            break
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - update / num_updates)

        # ---- collect num_steps transitions from every env ----
        for t in range(T):
            b_obs[t] = obs
            with torch.no_grad():
                logits = agent.actor(obs)
            # the rollout syncs with the host every step anyway (actions go to the env), so this
            # check is free: non-finite logits mean the weights blew up (seen without clipping)
            if not torch.isfinite(logits).all():
                diverged_at = global_step
                break
            action = Categorical(logits=logits).sample()
            obs_np, env_reward, terminated, truncated, info = envs.step(action.cpu().numpy())
            global_step += N
            reward = env_reward.astype(np.float32) * args.reward_scale

            # time-limit truncation: bootstrap the cut-off future from the real final observation
            trunc_only = truncated & ~terminated
            if trunc_only.any():
                final_obs = torch.as_tensor(np.stack(info["final_obs"][trunc_only]), dtype=torch.float32, device=device)
                with torch.no_grad():
                    reward[trunc_only] += args.gamma * agent.value(final_obs).cpu().numpy()

            done = terminated | truncated
            b_actions[t] = action
            b_rewards[t] = torch.as_tensor(reward, device=device)
            b_dones[t] = torch.as_tensor(done, dtype=torch.float32, device=device)
            obs = torch.as_tensor(obs_np, dtype=torch.float32, device=device)  # already the reset obs where done

            ep_returns += env_reward
            ep_lengths += 1
            for i in np.flatnonzero(done):
                logger.log_episode(global_step, float(ep_returns[i]), int(ep_lengths[i]))
                ep_returns[i], ep_lengths[i] = 0.0, 0
            if done.any():
                pbar.set_postfix(ret=f"{logger.recent_return():.1f}", refresh=False)

        if diverged_at is not None:
            break
        # ---- n-step returns, cut at episode ends ----
        with torch.no_grad():
            ret = agent.value(obs)  # bootstrap from the state after the last step
            b_returns = torch.zeros_like(b_rewards)
            for t in reversed(range(T)):
                ret = b_rewards[t] + args.gamma * ret * (1.0 - b_dones[t])
                b_returns[t] = ret

        # ---- one gradient step on the whole (T * N) batch ----
        flat_obs = b_obs.reshape(T * N, obs_dim)
        values = agent.value(flat_obs)
        dist = agent.dist(flat_obs)
        logprob = dist.log_prob(b_actions.reshape(-1))
        entropy = dist.entropy().mean()
        returns = b_returns.reshape(-1)
        advantages = returns - values.detach()
        if args.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        pg_loss = -(advantages * logprob).mean()
        v_loss = 0.5 * (returns - values).pow(2).mean()
        loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if monitor is not None:
            monitor.record()  # every layer's gradient norm, before the clip
        if args.fused_step:
            optimizer.step()  # clips, then steps: one fused op
            grad_norm = optimizer.grad_norm
        else:
            grad_norm = clip_grad_norm_(agent.parameters(), args.max_grad_norm)  # the pre-clip norm, on the device
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
        pbar.update(T * N)
    logger.flush()
    wall_s = time.perf_counter() - start
    pbar.close()
    envs.close()

    agent.eval()
    act = lambda o: int(agent.actor(o).argmax(dim=1).item())  # greedy
    return common.finish_run("a2c", args, logger, act, wall_s, global_step, diverged_at, device, monitor)


if __name__ == "__main__":
    main()
