#!/usr/bin/env python
"""The full check of GradMonitor's explosion rule (docs/monitor.md); tests/test_monitor_rule.py
is its short version.

1. Healthy runs: each trainer (dqn, a2c, reinforce), seeds 0-2, default settings, --monitor.
   Reported: the share of updates the monitor flagged (the aim: at most 1%).
2. Injected spikes: each healthy run's recorded per-layer norms replayed through a fresh
   GradMonitor with one layer's norm multiplied by --factor every 50th update (the layer
   chosen in turn). The detector sees only norms, so this is exactly what it would have seen
   had that gradient been multiplied in the run. Reported: caught / injected, and the misses.
3. The explosion demo of examples/README.md (A2C, SGD lr 0.05, rewards x10, no clipping),
   seeds 0-2: the first update the monitor flags, against the update where the policy's
   entropy falls below 0.05 (the collapse).

    python scripts/monitor_check.py                 # ~15 min on 2 cores; runs go to runs/monitor_check/
    python scripts/monitor_check.py --reuse         # the report again from the runs already there
"""

import argparse
import csv
import math
import os
import subprocess
import sys

import torch

import fastclip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ["--optimizer", "sgd", "--learning-rate", "0.05", "--reward-scale", "10", "--total-timesteps", "150000"]


def train(algo, name, flags, out, reuse):
    folder = os.path.join(out, name)
    if not (reuse and os.path.exists(os.path.join(folder, "summary.json"))):
        cmd = [sys.executable, os.path.join(ROOT, "examples", f"{algo}.py"), "--monitor", "--no-progress"]
        subprocess.run([*cmd, *flags, "--run-name", os.path.relpath(folder, "runs")], check=True)
    return folder


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def recorded_norms(folder):
    """(layer names, [(step, [norm or nan per layer])]) from the monitor's grad_norms.csv."""
    rows = read_csv(os.path.join(folder, "grad_norms.csv"))
    names = [k for k in rows[0] if k != "step"]
    return names, [[float(r[n]) if r[n] else math.nan for n in names] for r in rows]


def replay(names, rows, inject):
    """The rows fed to a fresh GradMonitor, norms multiplied where inject[(step, layer index)] says."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in names]
    monitor = fastclip.GradMonitor(list(zip(names, params)), every=100)
    for step, row in enumerate(rows):
        for j, (p, norm) in enumerate(zip(params, row)):
            p.grad = None if math.isnan(norm) else torch.tensor([norm * inject.get((step, j), 1.0)])
        monitor.record()
    monitor.close()
    return monitor


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/monitor_check", help="where the runs go (default: %(default)s)")
    ap.add_argument("--reuse", action="store_true", help="use the runs already in --out")
    ap.add_argument("--factor", type=float, default=1000.0, help="injected spike factor (default: %(default)s)")
    args = ap.parse_args(argv)

    print("healthy runs (default settings): updates flagged")
    healthy = {}
    for algo in ("dqn", "a2c", "reinforce"):
        for seed in range(3):
            folder = train(algo, f"{algo}_s{seed}", ["--seed", str(seed)], args.out, args.reuse)
            updates = len(read_csv(os.path.join(folder, "metrics.csv")))
            flagged = len({r["step"] for r in read_csv(os.path.join(folder, "explosions.csv"))})
            healthy[algo, seed] = folder
            print(f"  {algo:9} seed {seed}: {flagged:3d} of {updates:6d} updates ({100 * flagged / updates:.2f}%)")

    print(f"\ninjected spikes (one layer x{args.factor:g}, every 50th update): caught / injected")
    for (algo, seed), folder in healthy.items():
        names, rows = recorded_norms(folder)
        inject = {(t, (t // 50) % len(names)): args.factor for t in range(50, len(rows), 50)}
        inject = {(t, j): f for (t, j), f in inject.items() if not math.isnan(rows[t][j])}
        caught = {(e.step, names.index(e.layer)) for e in replay(names, rows, inject).explosions}
        missed = [(t, names[j], rows[t][j]) for t, j in inject if (t, j) not in caught]
        print(f"  {algo:9} seed {seed}: {len(inject) - len(missed):4d} / {len(inject):4d}", end="")
        print("".join(f"; missed update {t} {name} (norm {norm:.3g})" for t, name, norm in missed))

    print("\nexplosion demo (A2C, SGD lr 0.05, rewards x10, no clipping): first flag vs collapse")
    for seed in range(3):
        folder = train(
            "a2c", f"explosion_s{seed}", [*DEMO, "--clip", "none", "--seed", str(seed)], args.out, args.reuse
        )
        entropy = [float(r["entropy"]) for r in read_csv(os.path.join(folder, "metrics.csv"))]
        collapse = next((i for i, e in enumerate(entropy) if e < 0.05), None)
        events = read_csv(os.path.join(folder, "explosions.csv"))
        first = min((int(e["step"]) for e in events), default=None)
        layers = sorted({e["layer"] for e in events if int(e["step"]) == first})
        print(f"  seed {seed}: entropy < 0.05 at update {collapse}; first flagged update {first} {layers}")


if __name__ == "__main__":
    main()
