"""Plot learning curves (episodic return vs env steps) and pre-clip gradient-norm curves from the
summary JSONs the trainers write, clip variants side by side.

    python examples/plot.py examples/results/cartpole/*.json --out examples/results/cartpole.png

Each summary carries down-sampled curves (``curves.return`` / ``curves.grad_norm``), so the
committed JSONs are enough to redraw the plots. One column per algorithm; row 1: training return
(mean over seeds, shaded min..max across seeds), row 2: pre-clip global grad norm (per-bin median,
log scale; dotted: per-bin max; the dashed line is ``max_grad_norm``); row 3, when the runs logged
it (A2C, REINFORCE): policy entropy - it falls to 0 when the policy collapses onto one action.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {
    "none": "tab:red",
    "torch": "tab:blue",
    "fastclip": "tab:green",
    "autoclip": "tab:purple",
    "fastclip per-layer": "tab:brown",
    "torch per-layer": "tab:pink",
    "fastclip agc": "tab:cyan",
    "torch agc": "tab:olive",
    "zclip": "tab:orange",
}
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


def variant(summary: dict) -> str:
    """The row / curve a run belongs to: its --clip, and its --clip-mode unless global (autoclip and
    zclip exist for --clip fastclip only, so the mode alone names them)."""
    mode = summary.get("clip_mode", "global")
    if mode == "global":
        return summary["clip"]
    return mode if mode in ("autoclip", "zclip") else f"{summary['clip']} {mode}"


def _interp(curve: dict, key: str, grid: np.ndarray) -> np.ndarray:
    steps = np.asarray(curve["step"], dtype=float)
    vals = np.asarray([np.nan if v is None else v for v in curve[key]], dtype=float)
    ok = np.isfinite(vals)
    if ok.sum() < 2:
        return np.full_like(grid, np.nan)
    out = np.interp(grid, steps[ok], vals[ok])
    out[(grid < steps[ok].min()) | (grid > steps[ok].max())] = np.nan
    return out


# Trainer arguments that differ between the runs of one experiment without
# changing it: the seed (the curves average over it) and where or how a run is
# written, shown or executed.
PER_RUN_ARGS = {"seed", "run_name", "summary_json", "progress", "log_every", "num_threads", "device"}


def mixed_settings(group: list[dict]) -> dict[str, dict[str, list[str]]]:
    """The settings on which the runs of one curve disagree: {arg: {value: [file, ...]}}.

    One curve is the mean over its runs, so they must differ only in PER_RUN_ARGS;
    a 100k-step and a 5k-step run of one seed averaged together are not a result."""
    names = sorted({k for s in group for k in s.get("args", {})} - PER_RUN_ARGS)
    mixed = {}
    for name in names:
        by_value: dict[str, list[str]] = defaultdict(list)
        for s in group:
            value = s.get("args", {}).get(name, "<missing>")
            by_value[json.dumps(value)].append(s["_file"])
        if len(by_value) > 1:
            mixed[name] = dict(by_value)
    return mixed


def warn_mixed(algo: str, clip: str, group: list[dict], file=sys.stderr) -> bool:
    """Print one warning per curve whose runs have different settings; True if it did."""
    mixed = mixed_settings(group)
    if mixed:
        what = "; ".join(
            f"{name} " + ", ".join(f"{value} ({', '.join(files)})" for value, files in values.items())
            for name, values in mixed.items()
        )
        print(
            f"plot.py: warning: the {len(group)} runs averaged into the {algo}/{clip} curve have "
            f"different settings: {what}. Pass runs of one setting to compare like with like.",
            file=file,
        )
    return bool(mixed)


def markdown_table(runs: dict) -> str:
    """One row per (algo, clip): eval return per seed, mean, train wall time, clip-call time."""
    lines = [
        "| algo | clip | seeds | eval return per seed | eval mean | train wall s (mean) | clip calls | clip time s (mean) | grad-norm p50 / p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for algo in sorted(runs):
        for clip in sorted(runs[algo], key=lambda c: ORDER.index(c) if c in ORDER else 99):
            g = sorted(runs[algo][clip], key=lambda s: s["seed"])
            per_seed = " / ".join(f"{s['eval_return_mean']:.1f}" for s in g)
            mean = np.mean([s["eval_return_mean"] for s in g])
            wall = np.mean([s["wall_s"] for s in g])
            calls = int(np.mean([s["clip_calls"] for s in g]))
            ctime = np.mean([s["clip_time_s"] for s in g])
            p50 = np.mean([s["grad_norm_p50"] for s in g if s["grad_norm_p50"] is not None])
            p99 = np.mean([s["grad_norm_p99"] for s in g if s["grad_norm_p99"] is not None])
            seeds = ",".join(str(s["seed"]) for s in g)
            lines.append(
                f"| {algo} | {clip} | {seeds} | {per_seed} | {mean:.1f} | {wall:.1f} | {calls} | {ctime:.3f} | {p50:.3g} / {p99:.3g} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summaries", nargs="+", help="summary JSON files written by dqn.py / a2c.py / reinforce.py")
    p.add_argument("--out", default="curves.png", help="output PNG path (default: %(default)s)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--table", action="store_true", help="also print a markdown results table")
    p.add_argument("--dpi", type=int, default=80, help="PNG resolution")
    args = p.parse_args(argv)

    runs: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in args.summaries:
        with open(path) as f:
            s = json.load(f)
        s["_file"] = path
        runs[s["algo"]][variant(s)].append(s)
    mixed = {(a, c) for a in runs for c in runs[a] if warn_mixed(a, c, runs[a][c])}

    algos = sorted(runs)
    if args.table:
        print(markdown_table(runs))
    with_entropy = any("entropy" in s["curves"] for a in runs.values() for g in a.values() for s in g)
    nrows = 3 if with_entropy else 2
    fig, axes = plt.subplots(nrows, len(algos), figsize=(max(5.2 * len(algos), 8.0), 3.5 * nrows), squeeze=False)
    for col, algo in enumerate(algos):
        ax_r, ax_g = axes[0, col], axes[1, col]
        ax_e = axes[2, col] if with_entropy else None
        max_norm = None
        for clip in sorted(runs[algo], key=lambda c: ORDER.index(c) if c in ORDER else 99):
            group = runs[algo][clip]
            max_norm = group[0]["max_grad_norm"]
            total = max(s["total_timesteps"] for s in group)
            grid = np.linspace(0, total, 200)
            color = COLORS.get(clip)
            evals = ", ".join(f"{s['eval_return_mean']:.0f}" for s in sorted(group, key=lambda s: s["seed"]))
            label = f"{clip} (n={len(group)}{', MIXED SETTINGS' if (algo, clip) in mixed else ''}; eval {evals})"

            rets = np.stack([_interp(s["curves"]["return"], "mean", grid) for s in group])
            with warnings.catch_warnings():  # all-NaN columns (before the first episode) are fine
                warnings.simplefilter("ignore", RuntimeWarning)
                ax_r.plot(grid, np.nanmean(rets, 0), color=color, label=label)
                if len(group) > 1:
                    ax_r.fill_between(grid, np.nanmin(rets, 0), np.nanmax(rets, 0), color=color, alpha=0.15)

                med = np.stack([_interp(s["curves"]["grad_norm"], "median", grid) for s in group])
                mx = np.stack([_interp(s["curves"]["grad_norm"], "max", grid) for s in group])
                ax_g.plot(grid, np.nanmean(med, 0), color=color, label=f"{clip} median")
                ax_g.plot(grid, np.nanmax(mx, 0), color=color, linestyle=":", alpha=0.7, label=f"{clip} max")
                if ax_e is not None and all("entropy" in s["curves"] for s in group):
                    ent = np.stack([_interp(s["curves"]["entropy"], "mean", grid) for s in group])
                    ax_e.plot(grid, np.nanmean(ent, 0), color=color, label=clip)
        if max_norm is not None:
            ax_g.axhline(max_norm, color="k", linestyle="--", linewidth=1, label=f"max_grad_norm={max_norm:g}")
        env = next(iter(runs[algo].values()))[0]["env_id"]
        ax_r.set_title(f"{algo} on {env}")
        ax_r.set_xlabel("env steps")
        ax_r.set_ylabel("training episodic return")
        ax_r.legend(fontsize=8, loc="upper left")
        ax_r.grid(alpha=0.3)
        ax_g.set_yscale("log")
        ax_g.set_xlabel("env steps")
        ax_g.set_ylabel("pre-clip global grad norm")
        ax_g.legend(fontsize=7, loc="best")
        ax_g.grid(alpha=0.3, which="both")
        if ax_e is not None and not ax_e.lines:
            ax_e.axis("off")  # value-based (DQN): no policy entropy
        elif ax_e is not None:
            ax_e.set_xlabel("env steps")
            ax_e.set_ylabel("policy entropy (nats)")
            ax_e.legend(fontsize=8, loc="best")
            ax_e.grid(alpha=0.3)
    if args.title:
        fig.suptitle(args.title, fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
