"""rl_games' PPO (a2c_discrete) on CartPole, started as rl_games' own runner.py starts it
(a config, Runner().load(config), runner.run(args)); the trainer is rl_games' as
installed, unchanged. It binds torch's clip_grad_norm_ at import
(rl_games/common/a2c_common.py), so fastclip reaches it through the launcher:

    python -m fastclip.run --summary tests/rl_games_cartpole.py --seed 7

The config is rl_games/configs/ppo_cartpole.yaml for a short CPU run: 4 envs, no
torch.compile, a fixed env seed, and the envs stepped in this process (rl_games' own
CartPole entry steps them in Ray workers). The final weights are in the checkpoint
runs/<name>_<time>/nn/last_*.pth under the current directory.
"""

import argparse

import numpy as np
from rl_games.common import env_configurations, vecenv
from rl_games.common.ivecenv import IVecEnv
from rl_games.torch_runner import Runner


class InProcessVecEnv(IVecEnv):
    """rl_games' RayVecEnv without Ray: the same RayWorker per env, stepped in turn."""

    def __init__(self, config_name, num_actors, seed=None, **kwargs):
        self.workers = [vecenv.RayWorker(config_name, kwargs) for _ in range(num_actors)]
        self.seeds = [None if seed is None else seed + i for i in range(num_actors)]

    def step(self, actions):
        obs, rewards, dones, infos = zip(*(w.step(a) for w, a in zip(self.workers, actions)))
        return np.stack(obs), np.stack(rewards), np.stack(dones), list(infos)

    def reset(self):
        return np.stack([w.env.reset(seed=s) for w, s in zip(self.workers, self.seeds)])

    def get_env_info(self):
        return self.workers[0].get_env_info()


def config(seed, epochs, grad_norm):
    return {
        "params": {
            "seed": seed,
            "torch_threads": 1,
            "algo": {"name": "a2c_discrete"},
            "model": {"name": "discrete_a2c"},
            "load_checkpoint": False,
            "network": {
                "name": "actor_critic",
                "separate": True,
                "space": {"discrete": None},
                "mlp": {"units": [32, 32], "activation": "relu", "initializer": {"name": "default"}},
            },
            "config": {
                "name": "cartpole",
                "env_name": "CartPole-v1-in-process",
                "env_config": {"seed": seed},
                "device": "cpu",
                "torch_compile": False,
                "reward_shaper": {"scale_value": 0.1},
                "normalize_advantage": True,
                "gamma": 0.99,
                "tau": 0.9,
                "learning_rate": 2e-4,
                "score_to_win": 400,
                "grad_norm": grad_norm,
                "truncate_grads": grad_norm is not None,  # rl_games clips only with truncate_grads
                "entropy_coef": 0.01,
                "e_clip": 0.2,
                "clip_value": True,
                "num_actors": 4,
                "horizon_length": 32,
                "minibatch_size": 64,
                "mini_epochs": 2,
                "critic_coef": 1,
                "lr_schedule": None,
                "normalize_input": False,
                "save_best_after": 10,
                "max_epochs": epochs,
                "multi_gpu": False,
            },
        }
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--grad-norm", type=float, default=0.1, help="rl_games' grad_norm; 0: no clipping")
    args = ap.parse_args()
    vecenv.register("IN_PROCESS", lambda name, n, **kwargs: InProcessVecEnv(name, n, **kwargs))
    cartpole = env_configurations.configurations["CartPole-v1"]["env_creator"]
    env_configurations.register("CartPole-v1-in-process", {"vecenv_type": "IN_PROCESS", "env_creator": cartpole})
    runner = Runner()
    runner.load(config(args.seed, args.epochs, args.grad_norm or None))
    runner.run({"train": True, "play": False, "checkpoint": None, "sigma": None})


if __name__ == "__main__":
    main()
