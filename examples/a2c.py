"""A2C (synchronous advantage actor-critic) with n-step returns and entropy regularisation on
vectorised Gymnasium envs, with the gradient norm clipped by fastclip on every update.

CleanRL-style single file: settings in ``Args``, the training loop inline in ``main``.

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
    """A2C with n-step returns, entropy bonus and a clipped global gradient norm."""

    env_id: str = "CartPole-v1"
    """Gymnasium environment id (discrete actions, flat observations)"""
    total_timesteps: int = 300_000
    """environment steps to train for (summed over all envs)"""
    seed: int = 0
    """seed for torch, numpy, python and the environments (env i gets seed + i)"""
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
    max_grad_norm: float = 0.5
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
    log_every: int = 100
    """read per-update metrics back to the host every this many updates"""
    progress: bool = True
    """show a tqdm progress bar"""
    eval_episodes: int = 20
    """greedy evaluation episodes at the end"""

    num_envs: int = 8
    """parallel environments (gymnasium SyncVectorEnv)"""
    num_steps: int = 5
    """steps per env per update: the n of the n-step return"""
    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    """optimizer (rmsprop as in the original A2C; sgd makes the step size follow the raw gradient)"""
    learning_rate: float = 1e-3
    """learning rate"""
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
    hidden: int = 64
    """width of the two hidden layers of the actor and of the critic"""
    reward_scale: float = 1.0
    """multiply rewards by this before learning (returns are logged unscaled); >1 makes gradients large"""


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


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-5)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=1e-5)
    return torch.optim.SGD(params, lr=lr)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv)
    setup_torch(args.num_threads)
    seed_everything(args.seed)
    device = torch.device(args.device)
    run_dir = os.path.join("runs", run_name(args, "a2c"))

    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(args.env_id) for _ in range(args.num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "this A2C needs discrete actions"
    envs.action_space.seed(args.seed)
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    n_actions = int(envs.single_action_space.n)

    agent = Agent(obs_dim, n_actions, args.hidden).to(device)
    optimizer = make_optimizer(args.optimizer, agent.parameters(), args.learning_rate)
    clipper = Clipper(
        args.clip,
        args.max_grad_norm,
        mode=args.clip_mode,
        clip_factor=args.agc_clip_factor,
        monitor=make_monitor(args.monitor, agent, run_dir, args.log_every),
    )
    logger = UpdateLogger(run_dir, clipper, args.log_every, config=vars(args))

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
        # the clip: fastclip.clip_grad_norm_(params, args.max_grad_norm) with the default
        # --clip fastclip --clip-mode global; the other choices: examples/common.py, Clipper
        grad_norm = clipper(agent.parameters())  # pre-clip norm, stays on device
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
    return finish_run(
        "a2c",
        args,
        logger,
        clipper,
        lambda o: int(agent.actor(o).argmax(dim=1).item()),
        wall_s,
        global_step,
        diverged_at,
        device,
    )


if __name__ == "__main__":
    main()
