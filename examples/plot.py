"""Learning curves (episodic return vs env steps) and pre-clip gradient-norm curves from the
run folders the trainers write (runs/<run-name>/: summary.json, episodes.csv, metrics.csv),
clip variants side by side.

    python examples/plot.py runs/cartpole_* --out examples/results/cartpole.png --table

One column per algorithm; row 1: training return (mean over seeds, shaded min..max across
seeds), row 2: pre-clip global grad norm (per-bin median, log scale; dotted: per-bin max; the
dashed line is max_grad_norm); row 3, when the runs logged it (A2C, REINFORCE): policy entropy,
which falls to 0 when the policy collapses onto one action. The commands that made the committed
PNGs are in examples/README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ORDER = [
    "none",
    "torch",
    "fastclip",
    "torch per-layer",
    "fastclip per-layer",
    "torch agc",
    "fastclip agc",
    "autoclip",
    "zclip",
]
COLORS = dict(
    zip(
        ORDER,
        [
            "tab:red",
            "tab:blue",
            "tab:green",
            "tab:pink",
            "tab:brown",
            "tab:olive",
            "tab:cyan",
            "tab:purple",
            "tab:orange",
        ],
    )
)

# Trainer arguments that differ between the runs of one experiment without changing it: the
# seed (the curves average over it) and where or how a run is written, shown or executed.
PER_RUN_ARGS = {"seed", "run_name", "summary_json", "progress", "log_every", "num_threads", "device"}


def variant(summary: dict) -> str:
    """The curve a run belongs to: its --clip, and its --clip-mode unless global."""
    mode = summary.get("clip_mode", "global")
    if mode == "global":
        return summary["clip"]
    return mode if mode in ("autoclip", "zclip") else f"{summary['clip']} {mode}"


def load_run(folder: str) -> dict:
    """summary.json of a run folder, with its CSV columns as arrays."""
    with open(os.path.join(folder, "summary.json")) as f:
        run = json.load(f)
    run["_file"] = folder
    for name in ("episodes", "metrics"):
        with open(os.path.join(folder, f"{name}.csv")) as f:
            rows = list(csv.DictReader(f))
        run[name] = {k: np.array([float(r[k]) for r in rows]) for k in (rows[0] if rows else {})}
    return run


def binned(steps, values, grid, how):
    """`how` (np.nanmedian, np.nanmax, ...) of the values in each bin of `grid`; nan where empty."""
    out = np.full(len(grid) - 1, np.nan)
    idx = np.digitize(steps, grid) - 1
    for b in range(len(out)):
        sel = values[(idx == b) & np.isfinite(values)]
        if sel.size:
            out[b] = how(sel)
    return out


def mixed_settings(group: list[dict]) -> dict[str, dict[str, list[str]]]:
    """The settings on which the runs of one curve disagree: {arg: {value: [folder, ...]}}.
    One curve is the mean over its runs, so they must differ only in PER_RUN_ARGS."""
    mixed = {}
    for name in sorted({k for s in group for k in s["args"]} - PER_RUN_ARGS):
        by_value: dict[str, list[str]] = defaultdict(list)
        for s in group:
            by_value[json.dumps(s["args"].get(name, "<missing>"))].append(s["_file"])
        if len(by_value) > 1:
            mixed[name] = dict(by_value)
    return mixed


def warn_mixed(algo: str, clip: str, group: list[dict]) -> bool:
    """One warning per curve whose runs have different settings; True if there was one."""
    mixed = mixed_settings(group)
    if mixed:
        what = "; ".join(
            f"{name} " + ", ".join(f"{value} ({', '.join(files)})" for value, files in values.items())
            for name, values in mixed.items()
        )
        print(
            f"plot.py: warning: the {len(group)} runs averaged into the {algo}/{clip} curve have "
            f"different settings: {what}. Pass runs of one setting to compare like with like.",
            file=sys.stderr,
        )
    return bool(mixed)


def markdown_table(runs: dict) -> str:
    lines = [
        "| algo | clip | seeds | eval return per seed | eval mean | updates | grad-norm p50 / p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for algo in sorted(runs):
        for clip in sorted(runs[algo], key=ORDER.index):
            g = sorted(runs[algo][clip], key=lambda s: s["seed"])
            per_seed = " / ".join(f"{s['eval_return_mean']:.1f}" for s in g)
            mean = np.mean([s["eval_return_mean"] for s in g])
            p50, p99 = (np.mean([s[k] for s in g]) for k in ("grad_norm_p50", "grad_norm_p99"))
            seeds = ",".join(str(s["seed"]) for s in g)
            updates = int(np.mean([s["updates"] for s in g]))
            lines.append(f"| {algo} | {clip} | {seeds} | {per_seed} | {mean:.1f} | {updates} | {p50:.3g} / {p99:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by dqn.py / a2c.py / reinforce.py")
    p.add_argument("--out", default="curves.png", help="output PNG path (default: %(default)s)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--table", action="store_true", help="also print a markdown results table")
    p.add_argument("--dpi", type=int, default=80, help="PNG resolution")
    args = p.parse_args(argv)

    runs: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for folder in args.runs:
        run = load_run(folder)
        runs[run["algo"]][variant(run)].append(run)
    mixed = {(a, c) for a in runs for c in runs[a] if warn_mixed(a, c, runs[a][c])}
    if args.table:
        print(markdown_table(runs))

    algos = sorted(runs)
    with_entropy = any("entropy" in s["metrics"] for a in runs.values() for g in a.values() for s in g)
    nrows = 3 if with_entropy else 2
    fig, axes = plt.subplots(nrows, len(algos), figsize=(max(5.2 * len(algos), 8.0), 3.5 * nrows), squeeze=False)
    for col, algo in enumerate(algos):
        ax_r, ax_g = axes[0, col], axes[1, col]
        ax_e = axes[2, col] if with_entropy else None
        for clip in sorted(runs[algo], key=ORDER.index):
            group = runs[algo][clip]
            grid = np.linspace(0, max(s["total_timesteps"] for s in group) + 1, 101)
            x = (grid[1:] + grid[:-1]) / 2
            color = COLORS[clip]
            evals = ", ".join(f"{s['eval_return_mean']:.0f}" for s in sorted(group, key=lambda s: s["seed"]))
            label = f"{clip} (n={len(group)}{', MIXED SETTINGS' if (algo, clip) in mixed else ''}; eval {evals})"
            with warnings.catch_warnings():  # all-NaN bins (before the first episode) are fine
                warnings.simplefilter("ignore", RuntimeWarning)
                ep = [
                    binned(s["episodes"]["global_step"], s["episodes"]["episodic_return"], grid, np.mean) for s in group
                ]
                ax_r.plot(x, np.nanmean(ep, 0), color=color, label=label)
                if len(group) > 1:
                    ax_r.fill_between(x, np.nanmin(ep, 0), np.nanmax(ep, 0), color=color, alpha=0.15)
                m = [s["metrics"] for s in group]
                med = [binned(r["global_step"], r["grad_norm"], grid, np.median) for r in m]
                top = [binned(r["global_step"], r["grad_norm"], grid, np.max) for r in m]
                ax_g.plot(x, np.nanmean(med, 0), color=color, label=f"{clip} median")
                ax_g.plot(x, np.nanmax(top, 0), color=color, linestyle=":", alpha=0.7, label=f"{clip} max")
                if ax_e is not None and all("entropy" in r for r in m):
                    ent = [binned(r["global_step"], r["entropy"], grid, np.mean) for r in m]
                    ax_e.plot(x, np.nanmean(ent, 0), color=color, label=clip)
        max_norm = next(iter(runs[algo].values()))[0]["max_grad_norm"]
        ax_g.axhline(max_norm, color="k", linestyle="--", linewidth=1, label=f"max_grad_norm={max_norm:g}")
        ax_r.set_title(f"{algo} on {next(iter(runs[algo].values()))[0]['env_id']}")
        ax_r.set(xlabel="env steps", ylabel="training episodic return")
        ax_r.legend(fontsize=8, loc="upper left")
        ax_g.set(yscale="log", xlabel="env steps", ylabel="pre-clip global grad norm")
        ax_g.legend(fontsize=7, loc="best")
        for ax in (ax_r, ax_g):
            ax.grid(alpha=0.3, which="both")
        if ax_e is not None and not ax_e.lines:
            ax_e.axis("off")  # value-based (DQN): no policy entropy
        elif ax_e is not None:
            ax_e.set(xlabel="env steps", ylabel="policy entropy (nats)")
            ax_e.legend(fontsize=8, loc="best")
            ax_e.grid(alpha=0.3)
    if args.title:
        fig.suptitle(args.title, fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
