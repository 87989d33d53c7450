#!/usr/bin/env python
"""Update-step benchmark: forward + backward + clip + optimizer step of the trainers' networks.

What fastclip changes in a real RL update, not just in the clip call. For each network one
update is timed end to end, with five variants in the same process, interleaved round-robin
(the order rotates every repeat), each variant training its own identical copy of the network
on the same pre-generated batches:

  none           no clipping, the plain step
  torch          torch.nn.utils.clip_grad_norm_(params, max_norm) + step   (torch's default foreach=None)
  fastclip       fastclip.clip_grad_norm_(params, max_norm) + step
  clip_and_step  fastclip.clip_and_step_(optimizer, max_norm): the clip handed to torch's fused step
  optim          fastclip.optim.Adam(..., max_grad_norm=max_norm).step(): the clip inside the update

Adam steps with fused=True in every variant (torch's fastest step, the one clip_and_step_ drives);
the last two variants need Adam, so a network stepping with RMSprop (a2c) runs only the first three
unless --adam makes every network step with Adam (same lr).

Networks (mirroring examples/dqn.py and examples/a2c.py defaults):

  dqn   CartPole Q-network 4-128-128-2 (ReLU), batch 128, Huber TD loss against a target net
        (no grad), Adam, max_grad_norm 10.
  a2c   CartPole actor-critic, separate 4-64-64 tanh MLPs (actor -> 2 logits, critic -> 1),
        batch 8 envs x 5 steps = 40, policy + 0.5 value - 0.01 entropy loss, RMSprop,
        max_grad_norm 0.5.
  cnn   Nature DQN CNN on 4x84x84 uint8 frames, 6 actions, batch 32, Huber TD loss, Adam,
        max_grad_norm 10 (where the clip is a small part of the update).

Reported per network, first what the clip adds to an update (the variant's median update time
minus the no-clip one: what a user's training loop pays for the clip, cold caches and fresh grads
included), then the median update time per variant (µs), the update speed-up torch/variant, the
median time of clip plus step inside the update per variant, the median time of the clip call
alone (torch and fastclip), and how often clipping actually happened.
On CUDA the update is timed to a torch.cuda.synchronize() after the optimizer step, and the
clip and clip-plus-step calls with CUDA events.

    python -m bench.bench_update --quick
    python -m bench.bench_update --nets dqn,a2c --threads 2 --json /tmp/update.json
    python -m bench.bench_update --nets a2c --adam
    python -m bench.bench_update --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Categorical

from bench.common import (
    NOISY_CORES,
    OtherLoad,
    backend_of,
    command_line,
    environment_info,
    fmt_us,
    import_fastclip,
    print_aligned,
    results_path,
    run_rounds,
    warn_backend,
)

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

VARIANTS = ("none", "torch", "fastclip", "clip_and_step", "optim")
ADAM_ONLY = ("clip_and_step", "optim")  # the variants that need (fused) Adam

# --------------------------------------------------------------------------------------------
# Networks and their updates
# --------------------------------------------------------------------------------------------


class QNetwork(nn.Module):
    def __init__(self, obs_dim=4, n_actions=2, hidden=128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_actions)
        )

    def forward(self, x):
        return self.net(x)


class ActorCritic(nn.Module):
    def __init__(self, obs_dim=4, n_actions=2, hidden=64):
        super().__init__()
        self.critic = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )
        self.actor = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, n_actions)
        )


class NatureCNN(nn.Module):
    def __init__(self, n_actions=6):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3136, 512),
            nn.ReLU(),
            nn.Linear(512, n_actions),
        )

    def forward(self, x):
        return self.net(x.float() / 255.0)


def _dqn_batches(n, batch, obs_shape, n_actions, device, gen, uint8=False):
    out = []
    for _ in range(n):
        if uint8:
            obs = torch.randint(0, 256, (batch, *obs_shape), generator=gen, dtype=torch.uint8)
            nxt = torch.randint(0, 256, (batch, *obs_shape), generator=gen, dtype=torch.uint8)
        else:
            obs = torch.randn(batch, *obs_shape, generator=gen)
            nxt = torch.randn(batch, *obs_shape, generator=gen)
        out.append(
            tuple(
                t.to(device)
                for t in (
                    obs,
                    torch.randint(0, n_actions, (batch,), generator=gen),
                    torch.randn(batch, generator=gen).sign(),  # rewards +-1
                    nxt,
                    (torch.rand(batch, generator=gen) < 0.05).float(),
                )
            )
        )  # terminated
    return out


def make_dqn(device, gen, hidden=128, batch=128, cnn=False):
    if cnn:
        net, obs_shape, n_actions, lr = NatureCNN(6), (4, 84, 84), 6, 1e-4
    else:
        net, obs_shape, n_actions, lr = QNetwork(4, 2, hidden), (4,), 2, 5e-4
    net = net.to(device)
    target = copy.deepcopy(net).requires_grad_(False)
    batches = _dqn_batches(4 if cnn else 16, batch, obs_shape, n_actions, device, gen, uint8=cnn)
    gamma = 0.99

    def loss_fn(model, b):
        obs, act, rew, nxt, term = b
        with torch.no_grad():
            td_target = rew + gamma * target(nxt).max(dim=1).values * (1.0 - term)
        q = model(obs).gather(1, act.unsqueeze(1)).squeeze(1)
        return F.smooth_l1_loss(q, td_target)

    return net, (lambda p: torch.optim.Adam(p, lr=lr)), batches, loss_fn


def make_a2c(device, gen, hidden=64, num_envs=8, num_steps=5):
    net = ActorCritic(4, 2, hidden).to(device)
    batch = num_envs * num_steps
    batches = []
    for _ in range(16):
        batches.append(
            tuple(
                t.to(device)
                for t in (
                    torch.randn(batch, 4, generator=gen),
                    torch.randint(0, 2, (batch,), generator=gen),
                    torch.randn(batch, generator=gen) * 10.0,
                )
            )
        )  # n-step returns
    vf_coef, ent_coef = 0.5, 0.01

    def loss_fn(model, b):
        obs, act, returns = b
        values = model.critic(obs).squeeze(-1)
        dist = Categorical(logits=model.actor(obs))
        logprob = dist.log_prob(act)
        entropy = dist.entropy().mean()
        adv = returns - values.detach()
        pg_loss = -(adv * logprob).mean()
        v_loss = 0.5 * (returns - values).pow(2).mean()
        return pg_loss + vf_coef * v_loss - ent_coef * entropy

    return net, (lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.99, eps=1e-5)), batches, loss_fn


# name -> (description, batch, factory(device, gen), max_grad_norm)
NETS = {
    "dqn": ("DQN MLP 4-128-128-2", 128, lambda d, g: make_dqn(d, g), 10.0),
    "a2c": ("A2C actor-critic 2x(4-64-64)", 40, lambda d, g: make_a2c(d, g), 0.5),
    "cnn": ("Nature-CNN DQN 4x84x84", 32, lambda d, g: make_dqn(d, g, batch=32, cnn=True), 10.0),
}

# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def variant_optimizer(variant, fastclip, make_opt, params, max_norm, adam):
    """The variant's optimizer, from the net's (make_opt): Adam with fused=True, or
    fastclip.optim.Adam for "optim"; another optimizer as it is, or None where the variant
    needs Adam. adam=True: Adam with the net's lr whatever the net steps with."""
    opt = make_opt(params)
    if not isinstance(opt, torch.optim.Adam) and not adam:
        return None if variant in ADAM_ONLY else opt
    keys = ("lr", "betas", "eps", "weight_decay", "amsgrad") if isinstance(opt, torch.optim.Adam) else ("lr",)
    hyper = {k: opt.defaults[k] for k in keys}
    if variant == "optim":
        return fastclip.optim.Adam(params, max_grad_norm=max_norm, **hyper)
    return torch.optim.Adam(params, fused=True, **hyper)


def clip_and_step_of(variant, fastclip, opt, max_norm):
    """The step of the variants that have no separate clip call: a function returning the
    pre-clip norm (None for none)."""
    if variant == "none":
        return lambda: opt.step()
    if variant == "clip_and_step":
        return lambda: fastclip.clip_and_step_(opt, max_norm)

    def optim_step():
        opt.step()
        return opt.grad_norm

    return optim_step


def bench_net(name, fastclip, device, warm_s, budget_s, rmin, rmax, repeats=None, seed=0, max_norm=None, adam=False):
    desc, batch, factory, default_max_norm = NETS[name]
    max_norm = default_max_norm if max_norm is None else max_norm
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base, make_opt, batches, loss_fn = factory(device, gen)
    cuda = device.type == "cuda"
    state = {}
    for v in VARIANTS:
        model = copy.deepcopy(base)
        params = list(model.parameters())
        opt = variant_optimizer(v, fastclip, make_opt, params, max_norm, adam)
        if opt is None:
            continue
        state[v] = {"model": model, "params": params, "opt": opt, "k": 0}
        state[v]["clip_step"] = clip_and_step_of(v, fastclip, opt, max_norm)
    variants = list(state)
    n_params = sum(p.numel() for p in base.parameters())
    n_tensors = len(list(base.parameters()))

    def timed(fn):
        """fn() and its time in µs (CUDA events on the GPU)."""
        if cuda:
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            out = fn()
            e1.record()
            return out, lambda: e0.elapsed_time(e1) * 1e3
        c0 = time.perf_counter_ns()
        out = fn()
        us = (time.perf_counter_ns() - c0) / 1e3
        return out, lambda: us

    def update(v, record):
        s = state[v]
        b = batches[s["k"] % len(batches)]
        s["k"] += 1
        model, params = s["model"], s["params"]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        loss = loss_fn(model, b)
        s["opt"].zero_grad(set_to_none=True)
        loss.backward()
        clip_us = None
        if v in ("torch", "fastclip"):  # clip + step, and the clip call alone within it
            clip = torch.nn.utils.clip_grad_norm_ if v == "torch" else fastclip.clip_grad_norm_

            def clip_then_step():
                clipped = timed(lambda: clip(params, max_norm))
                s["opt"].step()
                return clipped

            (norm, clip_us), step_us = timed(clip_then_step)
        else:
            norm, step_us = timed(s["clip_step"])
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter_ns()
        if record is not None:
            record["update"].append((t1 - t0) / 1e3)
            record["clip_step"].append(step_us())
            if clip_us is not None:
                record["clip"].append(clip_us())
            if norm is not None:
                record["norms"].append(norm.detach())

    def one_round(k, records):
        for j in range(len(variants)):
            v = variants[(k + j) % len(variants)]
            update(v, None if records is None else records[v])

    records = {v: {"update": [], "clip": [], "clip_step": [], "norms": []} for v in variants}
    repeats, warm = run_rounds(
        one_round, records, min_warm=5, warm_s=warm_s, budget_s=budget_s, rmin=rmin, rmax=rmax, repeats=repeats
    )

    res = {
        "net": name,
        "description": desc,
        "batch": batch,
        "params": n_params,
        "tensors": n_tensors,
        "max_grad_norm": max_norm,
        "optimizer": type(state["torch"]["opt"]).__name__,
        "repeats": repeats,
        "warmup_rounds": warm,
        "variants": {},
    }
    for v in variants:
        r = records[v]
        d = {
            "update_median_us": statistics.median(r["update"]),
            "update_p25_us": statistics.quantiles(r["update"], n=4)[0],
            "update_p75_us": statistics.quantiles(r["update"], n=4)[2],
        }
        if r["clip_step"]:
            d["clip_step_median_us"] = statistics.median(r["clip_step"])
        if r["clip"]:
            d["clip_median_us"] = statistics.median(r["clip"])
        if r["norms"]:
            norms = torch.stack(r["norms"]).float().cpu()
            d["clipped_fraction"] = float((norms > max_norm).float().mean())
            d["grad_norm_median"] = float(norms.median())
        res["variants"][v] = d
    # Parity of the clipped variants is not expected (they train separate copies with
    # different rounding); check the clip itself on the same grads instead.
    res["parity_max_rel_err"] = _parity(state["torch"], batches[0], loss_fn, fastclip, max_norm)
    med = {v: res["variants"][v]["update_median_us"] for v in variants}
    res["update_speedup_torch_over"] = {v: med["torch"] / med[v] for v in variants if v != "torch"}
    res["clip_overhead_us"] = {v: med[v] - med["none"] for v in variants if v != "none"}
    res["clip_call_speedup"] = (
        res["variants"]["torch"]["clip_median_us"] / res["variants"]["fastclip"]["clip_median_us"]
    )
    return res


def _parity(s, batch, loss_fn, fastclip, max_norm):
    """Clip the same grads with torch and fastclip; return the max relative error (norm, grads)."""
    model, params = s["model"], s["params"]
    loss = loss_fn(model, batch)
    for p in params:
        p.grad = None
    loss.backward()
    saved = [p.grad.clone() for p in params]
    # max_norm well below the norm so both really scale
    n0 = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in saved])))
    mx = min(max_norm, 0.1 * n0)
    nt = torch.nn.utils.clip_grad_norm_(params, mx)
    gt = [p.grad.clone() for p in params]
    for p, g in zip(params, saved):
        p.grad.copy_(g)
    nf = fastclip.clip_grad_norm_(params, mx)
    err = abs(float(nf) - float(nt)) / max(abs(float(nt)), 1e-30)
    for p, g in zip(params, gt):
        err = max(err, float((p.grad - g).abs().max()) / max(float(g.abs().max()), 1e-30))
    for p in params:
        p.grad = None
    return err


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


SHORT = {"none": "none", "torch": "torch", "fastclip": "fastclip", "clip_and_step": "c&s", "optim": "optim"}


def print_table(rows, file=sys.stdout):
    """Two tables: whole updates (and what the clip adds to them), then clip plus step."""
    hdr = ["net", "batch", "params", "tensors", "opt"]
    hdr += [f"adds: {SHORT[v]} us" for v in VARIANTS[1:]]
    hdr += [f"{SHORT[v]} us" for v in VARIANTS]
    hdr += [f"speed-up {SHORT[v]}" for v in VARIANTS if v not in ("none", "torch")]
    table = []
    for r in rows:
        v = r["variants"]
        row = [r["net"] + ("*" if r.get("noisy") else ""), str(r["batch"]), f"{r['params']:,}", str(r["tensors"])]
        row.append(r["optimizer"])
        row += [fmt_us(r["clip_overhead_us"].get(k)) for k in VARIANTS[1:]]
        row += [fmt_us(v[k]["update_median_us"]) if k in v else "-" for k in VARIANTS]
        speedups = r["update_speedup_torch_over"]
        row += [f"{speedups[k]:.3f}x" if k in speedups else "-" for k in VARIANTS if k not in ("none", "torch")]
        table.append(row)
    print_aligned(hdr, table, left_cols=1, file=file)
    print(file=file)
    hdr = ["net"] + [f"clip+step {SHORT[k]} us" for k in VARIANTS]
    hdr += ["clip torch us", "clip fastclip us", "clip speed-up", "clipped %"]
    table = []
    for r in rows:
        v = r["variants"]
        row = [r["net"] + ("*" if r.get("noisy") else "")]
        row += [fmt_us(v[k].get("clip_step_median_us")) if k in v else "-" for k in VARIANTS]
        row += [
            fmt_us(v["torch"]["clip_median_us"]),
            fmt_us(v["fastclip"]["clip_median_us"]),
            f"{r['clip_call_speedup']:.2f}x",
            f"{100 * v['fastclip']['clipped_fraction']:.0f}%",
        ]
        table.append(row)
    print_aligned(hdr, table, left_cols=1, file=file)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_update",
        description="Per-update time (forward+backward+clip+step) with torch vs fastclip clipping.",
    )
    ap.add_argument("--quick", action="store_true", help="few repeats; well under 60 s")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--nets", default=",".join(NETS), help="comma-separated subset of: " + ",".join(NETS))
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1, as the trainers in examples/ use; 0 keeps torch's default)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="fixed rounds per network")
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds of measured rounds per network (default 1.5 quick, 10 full)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="override every network's max_grad_norm (e.g. 1e-3 to clip on every update)",
    )
    ap.add_argument(
        "--adam",
        action="store_true",
        help="every network steps with Adam(fused=True) at its own lr (a2c steps with RMSprop otherwise, "
        "which has no fused step: clip_and_step and optim then do not run for it)",
    )
    ap.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="results file (default bench/results/update-<device>-<date>[-quick].json)",
    )
    ap.add_argument("--no-json", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    for n in nets:
        if n not in NETS:
            ap.error(f"unknown net {n!r}; choose from {','.join(NETS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        warm_s, budget_s, rmin, rmax = 0.2, 1.5, 5, 400
    else:
        warm_s, budget_s, rmin, rmax = 1.0, 10.0, 20, 5000
    if args.budget is not None:
        budget_s = args.budget

    fastclip = import_fastclip()
    warn_backend(fastclip, "cuda" if device.type == "cuda" else "cpu")
    env = environment_info(fastclip)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    print(
        f"fastclip {env['fastclip']['version'] or ''} backend={backend_of(fastclip)} | "
        f"torch {env['torch']} | device={device}"
        f"{' (' + env['gpu'] + ')' if 'gpu' in env else ''} | {env['cpu']['model']} | "
        f"threads={torch.get_num_threads()}"
    )

    rows = []
    it = nets
    bar = None
    if tqdm is not None and not args.no_progress:
        bar = tqdm(nets, desc="bench_update", unit="net", leave=False, file=sys.stderr)
        it = bar
    t_all = time.perf_counter()
    for n in it:
        if bar is not None:
            bar.set_postfix_str(n)
        with OtherLoad() as other:
            row = bench_net(
                n,
                fastclip,
                device,
                warm_s,
                budget_s,
                rmin,
                rmax,
                args.repeats,
                args.seed,
                args.max_grad_norm,
                args.adam,
            )
        row["other_processes_cores"] = other.cores
        row["noisy"] = other.cores is not None and other.cores > NOISY_CORES
        rows.append(row)
    wall = time.perf_counter() - t_all
    print()
    print_table(rows)
    print(
        f"\nmedian per update (forward + backward + clip + optimizer step), variants interleaved; "
        f"c&s = fastclip.clip_and_step_ with torch's fused Adam, optim = fastclip.optim.Adam; "
        f"speed-up = torch update / variant update; {wall:.1f} s"
    )
    noisy = [f"{r['net']} ({r['other_processes_cores']:.2f})" for r in rows if r.get("noisy")]
    if noisy:
        print(
            f"* NOT QUIET: other processes used CPU while these ran (average cores): "
            f"{', '.join(noisy)}; rerun on a quiet machine before quoting these numbers.",
            file=sys.stderr,
        )
    bad = [r["net"] for r in rows if not r["parity_max_rel_err"] < 1e-3]
    if bad:
        print(
            f"MISMATCH: fastclip and torch clip differ on {bad} "
            f"({[r['parity_max_rel_err'] for r in rows if r['net'] in bad]})",
            file=sys.stderr,
        )

    if not args.no_json:
        path = results_path(args.json, f"update-{device.type}", args.quick)
        out = {
            "benchmark": "bench_update",
            "command": command_line(__spec__),
            "quick": args.quick,
            "device": str(device),
            **env,
            "threads": torch.get_num_threads(),
            "wall_s": wall,
            "nets": rows,
        }
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
