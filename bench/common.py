"""What both CPU benchmarks share: the measuring loop (warm up, size the run to
a time budget, then call one_round(k, samples) `repeats` times with the GC off)
and the plain-text table."""
import gc
import time


def run_rounds(one_round, samples, *, min_warm, warm_s, budget_s, rmin, rmax, repeats=None):
    """one_round(k, None) warms up (at least min_warm rounds and warm_s seconds,
    which also sizes the run); one_round(k, samples) records. `repeats` defaults
    to budget_s / (time of one round), clamped to [rmin, rmax].
    Returns (repeats, warm-up rounds)."""
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        t_start = time.perf_counter()
        warm = 0
        while warm < min_warm or time.perf_counter() - t_start < warm_s:
            one_round(warm, None)
            warm += 1
        round_s = (time.perf_counter() - t_start) / warm
        if repeats is None:
            repeats = int(max(rmin, min(rmax, budget_s / max(round_s, 1e-9))))
        for k in range(repeats):
            one_round(k, samples)
    finally:
        if gc_was_enabled:
            gc.enable()
    return repeats, warm


def fmt_us(x):
    """A time in µs for a table cell: '-', 4.2, 337, or 39.84ms from 10 ms up."""
    if x is None:
        return "-"
    return f"{x / 1e3:.2f}ms" if x >= 1e4 else (f"{x:.0f}" if x >= 100 else f"{x:.1f}")


def print_aligned(hdr, table, left_cols, file):
    """A plain-text table: the first `left_cols` columns left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h)
              for i, h in enumerate(hdr)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left_cols else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(hdr), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in table:
        print(line(row), file=file)
