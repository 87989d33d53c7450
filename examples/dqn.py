"""DQN (Double DQN by default, n-step TD targets, Huber loss, replay buffer, target network,
linear epsilon schedule) on a discrete-action Gymnasium env, with the gradient norm clipped by
fastclip on every update.

CleanRL-style single file: settings in ``Args`` (the ones all three trainers share in
common.Args), the training loop inline in ``main``, the clip call in plain view in the update.

    python examples/dqn.py --env-id CartPole-v1 --total-timesteps 100000 --clip fastclip

Correctness notes (Gymnasium 1.x):
* a single non-vectorised env is reset by hand, and the n-step transitions are built from the
  current episode's steps only, so no stored transition spans two episodes;
* the TD target bootstraps unless the episode *terminated*; a *truncated* (time-limit) step stores
  the real last observation as ``next_obs`` and is bootstrapped from it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import common
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import fastclip


@dataclass
class Args(common.Args):
    """DQN with a clipped global gradient norm."""

    max_grad_norm: float = 10.0
    """max L2 norm of the gradients (global, or per parameter with --clip-mode per-layer)"""
    hidden: int = 128
    """width of the two hidden layers of the Q-network"""
    learning_rate: float = 5e-4
    """Adam learning rate"""
    fused_step: bool = False
    """clip inside the optimizer step: fastclip.optim.Adam(max_grad_norm=...) instead of a clip call and
    torch's Adam (needs --clip fastclip --clip-mode global; docs/optim.md)"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0 over training (steadies the final policy)"""
    buffer_size: int = 100_000
    """replay buffer capacity (transitions)"""
    gamma: float = 0.99
    """discount factor"""
    n_step: int = 3
    """n-step TD targets (1 = classic DQN); they never cross an episode boundary"""
    target_network_frequency: int = 500
    """update the target network every this many env steps"""
    tau: float = 1.0
    """target update rate: 1.0 copies the online net, <1 is a Polyak (soft) update"""
    batch_size: int = 128
    """transitions per gradient update"""
    start_e: float = 1.0
    """initial epsilon of the epsilon-greedy policy"""
    end_e: float = 0.05
    """final epsilon"""
    exploration_fraction: float = 0.2
    """fraction of total_timesteps over which epsilon decays linearly from start_e to end_e"""
    learning_starts: int = 1_000
    """env steps of random-ish play before learning starts"""
    train_frequency: int = 2
    """train every this many env steps"""
    gradient_steps: int = 1
    """gradient updates (each one clipped) every time we train"""
    double_dqn: bool = True
    """Double DQN target: the online net picks the next action, the target net evaluates it"""


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_actions),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ReplayBuffer:
    """Fixed-size ring buffer in numpy; a sampled batch is copied to the device in one go."""

    def __init__(self, capacity: int, obs_dim: int, device: torch.device, seed: int):
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)  # gamma ** (steps summed in `rewards`)
        self.capacity, self.pos, self.size, self.device = capacity, 0, 0, device
        self.rng = np.random.default_rng(seed)

    def add(self, obs, next_obs, action: int, reward: float, terminated: bool, discount: float) -> None:
        i = self.pos
        self.obs[i], self.next_obs[i] = obs, next_obs
        self.actions[i], self.rewards[i], self.terminated[i] = action, reward, float(terminated)
        self.discounts[i] = discount
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int):
        idx = self.rng.integers(0, self.size, size=batch_size)
        batch = (
            self.obs[idx],
            self.actions[idx],
            self.rewards[idx],
            self.next_obs[idx],
            self.terminated[idx],
            self.discounts[idx],
        )
        return tuple(torch.as_tensor(x, device=self.device) for x in batch)


def linear_schedule(start: float, end: float, duration: float, t: int) -> float:
    return max(end, start + (end - start) * t / max(duration, 1))


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv)
    device = common.seed_everything(args)
    run_dir = common.run_dir(args, "dqn")

    env = gym.make(args.env_id)
    assert isinstance(env.action_space, gym.spaces.Discrete), "DQN needs a discrete action space"
    env.action_space.seed(args.seed)
    obs_dim, n_actions = int(np.prod(env.observation_space.shape)), int(env.action_space.n)

    q_network = QNetwork(obs_dim, n_actions, args.hidden).to(device)
    target_network = QNetwork(obs_dim, n_actions, args.hidden).to(device)
    target_network.load_state_dict(q_network.state_dict())
    if args.fused_step:  # the clip inside the step (docs/optim.md)
        optimizer = fastclip.optim.Adam(q_network.parameters(), lr=args.learning_rate, max_grad_norm=args.max_grad_norm)
    else:
        optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    rb = ReplayBuffer(args.buffer_size, obs_dim, device, args.seed)
    clip_grad_norm_ = common.clip_function(args)  # fastclip.clip_grad_norm_ unless --clip / --clip-mode say otherwise
    monitor = fastclip.GradMonitor(q_network, every=args.log_every, log_dir=run_dir) if args.monitor else None
    logger = common.UpdateLogger(run_dir, args, clip_grad_norm_)
    action_rng = np.random.default_rng(args.seed)

    obs, _ = env.reset(seed=args.seed)
    ep_return, ep_len = 0.0, 0
    pending = deque()  # the last (up to n_step) steps of the current episode, not yet stored
    pbar = tqdm(total=args.total_timesteps, disable=not args.progress, mininterval=1.0, desc="dqn")
    start = time.perf_counter()
    global_step, diverged_at = 0, None
    for global_step in range(1, args.total_timesteps + 1):
        if logger.nonfinite:  # a flushed loss/grad norm was inf/nan: stop, evaluate, report it
            diverged_at = global_step - 1
            break
        # ---- act (epsilon-greedy) ----
        epsilon = linear_schedule(
            args.start_e, args.end_e, args.exploration_fraction * args.total_timesteps, global_step
        )
        if action_rng.random() < epsilon:
            action = int(action_rng.integers(n_actions))
        else:
            with torch.no_grad():
                q = q_network(torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0))
                action = int(q.argmax(dim=1).item())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        ep_return += float(reward)
        ep_len += 1

        # n-step transitions: (obs_t, a_t, r_t + g r_t+1 + ... + g^(k-1) r_t+k-1, obs_t+k, g^k), k <= n.
        # They are built from this episode's steps only; at an episode end every pending step is
        # flushed with a shorter k. next_obs is the true successor even on truncation, and only
        # `terminated` stops bootstrapping.
        pending.append((obs, action, float(reward) * args.reward_scale))
        episode_over = terminated or truncated
        while pending and (len(pending) == args.n_step or episode_over):
            k = len(pending)
            n_return = sum(args.gamma**i * r for i, (_, _, r) in enumerate(pending))
            first_obs, first_action, _ = pending.popleft()
            rb.add(first_obs, next_obs, first_action, n_return, terminated, args.gamma**k)
        obs = next_obs
        if terminated or truncated:
            logger.log_episode(global_step, ep_return, ep_len)
            pbar.set_postfix(ret=f"{logger.recent_return():.1f}", eps=f"{epsilon:.2f}", refresh=False)
            obs, _ = env.reset()
            ep_return, ep_len = 0.0, 0

        # ---- learn ----
        if global_step > args.learning_starts and global_step % args.train_frequency == 0:
            for _ in range(args.gradient_steps):
                if args.anneal_lr:
                    optimizer.param_groups[0]["lr"] = args.learning_rate * (
                        1.0 - (global_step - 1) / args.total_timesteps
                    )
                b_obs, b_actions, b_rewards, b_next_obs, b_terminated, b_discounts = rb.sample(args.batch_size)
                with torch.no_grad():
                    if args.double_dqn:
                        next_actions = q_network(b_next_obs).argmax(dim=1, keepdim=True)
                        next_q = target_network(b_next_obs).gather(1, next_actions).squeeze(1)
                    else:
                        next_q = target_network(b_next_obs).max(dim=1).values
                    td_target = b_rewards + b_discounts * next_q * (1.0 - b_terminated)
                q_pred = q_network(b_obs).gather(1, b_actions.unsqueeze(1)).squeeze(1)
                loss = F.smooth_l1_loss(q_pred, td_target)  # Huber loss

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if monitor is not None:
                    monitor.record()  # every layer's gradient norm, before the clip
                if args.fused_step:
                    optimizer.step()  # clips, then steps: one fused op
                    grad_norm = optimizer.grad_norm
                else:
                    grad_norm = clip_grad_norm_(q_network.parameters(), args.max_grad_norm)  # pre-clip, on the device
                    optimizer.step()
                logger.log_update(
                    global_step,
                    grad_norm=grad_norm,
                    loss=loss.detach(),
                    q_values=q_pred.detach().mean(),
                    epsilon=epsilon,
                    lr=optimizer.param_groups[0]["lr"],
                )

        if global_step % args.target_network_frequency == 0:
            with torch.no_grad():
                for p_target, p in zip(target_network.parameters(), q_network.parameters()):
                    p_target.lerp_(p, args.tau)
        pbar.update(1)
    logger.flush()
    wall_s = time.perf_counter() - start
    pbar.close()
    env.close()

    q_network.eval()
    act = lambda o: int(q_network(o).argmax(dim=1).item())  # greedy
    return common.finish_run("dqn", args, logger, act, wall_s, global_step, diverged_at, device, monitor)


if __name__ == "__main__":
    main()
