#!/usr/bin/env python
"""Summaries of gpu_check/run.sh runs: classify every step, summarise a stage, aggregate them.

gpu_check.sh records each step in RESULTS/<stage>/<step>.step.tsv, one line of tab-separated
fields (see FIELDS): the exit status of its command, or "not-run" with the reason it did not run
(no compute-sanitizer, no gymnasium, the call's time budget, a failed build). A step's log,
RESULTS/<stage>/<step>.log, may also declare parts it could not cover, one line each:

    NOT RUN: <what>: <why>

The rules (the point of this module):
  ok       the command exited 0
  failed   it exited non-zero: a test or sanitizer failure, a crash, or a time-out (124; 137 when
           it had to be killed) -- only these are failures
  not run  it never ran, or a part of it was declared NOT RUN; listed with the reason, never
           counted as a failure nor as a pass

One file per step (not one per stage) so that results from several remote calls, each on a fresh
machine, merge by extracting their archives into one folder: a step run again in a later call
replaces its earlier row. Stage summaries and the aggregate are recomputed from the step files.

    python gpu_check/summary.py stage RESULTS/<stage>      -> RESULTS/<stage>/summary.json
    python gpu_check/summary.py aggregate RESULTS [--expect build,cuda-tests,...]
                                                           -> RESULTS/summary.{json,txt}, exit 1 on failures
    python gpu_check/summary.py statuses RESULTS/<stage>   "step status" lines (the dry run's self-check)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

FIELDS = ("step", "result", "seconds", "limit", "cap", "started", "reason", "command")
NOT_RUN = "not-run"
# The stages of gpu_check.sh, in the order it runs them; the aggregate lists them in this order
# and, by default, reports every one of them that has no results as not run.
STAGES = ("build", "tests", "sanitize", "bench", "profile", "trainers")
NOT_RUN_MARK = "NOT RUN:"
PYTEST_SKIP = re.compile(r"^SKIPPED \[(?P<n>\d+)\] (?P<where>\S+?): (?P<why>.*)$")


def classify(result: str, limit: str = "", cap: str = "", reason: str = "") -> tuple[str, str]:
    """(status, why) of one step: status is "ok", "failed" or "not_run"."""
    if result == NOT_RUN:
        return "not_run", reason or "no reason recorded"
    try:
        rc = int(result)
    except ValueError:
        return "failed", f"unreadable result {result!r}"
    if rc == 0:
        return "ok", ""
    if rc == 124:
        why = f"timed out after {limit} s"
        if limit and cap and limit != cap:
            why += f" (cut from its {cap} s cap by the call's time budget: rerun the step in a call of its own)"
        return "failed", why
    if rc == 137:
        return "failed", "killed: still running 10 s after its time-out (or out of memory)"
    if rc > 128:
        return "failed", f"killed by signal {rc - 128}"
    return "failed", f"exit status {rc}"


def _last_line(log: Path) -> str:
    """The log's last non-empty line (pytest's tally, the sanitizer's ERROR SUMMARY), shortened."""
    if not log.is_file():
        return ""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:160] if lines else ""


def _declared_not_run(log: Path) -> list[tuple[str, str]]:
    """(what, why) of every 'NOT RUN: what: why' line in a step's log, and of every test that
    pytest -rs reports as skipped ('SKIPPED [n] file.py:line: reason')."""
    out = []
    if log.is_file():
        for ln in log.read_text(errors="replace").splitlines():
            if ln.startswith(NOT_RUN_MARK):
                what, _, why = ln[len(NOT_RUN_MARK) :].strip().partition(": ")
                out.append((what.strip(), why.strip() or "no reason given"))
            elif m := PYTEST_SKIP.match(ln):
                count = f" ({m['n']} tests)" if m["n"] != "1" else ""
                out.append((m["where"], f"test skipped{count}: {m['why']}"))
    return out


def read_step(path: Path, stage: str) -> list[dict]:
    """The rows of one <step>.step.tsv: the step itself, then any parts its log declared NOT RUN."""
    values = path.read_text().rstrip("\n").split("\t")
    rec = dict(zip(FIELDS, values + [""] * (len(FIELDS) - len(values))))
    status, why = classify(rec["result"], rec["limit"], rec["cap"], rec["reason"])
    log = path.with_name(path.name[: -len(".step.tsv")] + ".log")
    try:
        exit_status = int(rec["result"])
    except ValueError:
        exit_status = None
    rows = [
        {
            "stage": stage,
            "step": rec["step"],
            "status": status,
            "exit": exit_status,
            "why": why,
            "seconds": float(rec["seconds"] or 0),
            "started": rec["started"],
            "command": rec["command"],
            "detail": _last_line(log) if status != "not_run" else "",
            "log": log.name if log.is_file() else None,
        }
    ]
    for what, reason in _declared_not_run(log):
        rows.append(
            {
                "stage": stage,
                "step": f"{rec['step']}: {what}",
                "status": "not_run",
                "exit": None,
                "why": reason,
                "seconds": 0.0,
                "started": rec["started"],
                "command": "",
                "detail": "",
                "log": log.name,
            }
        )
    return rows


def _step_order(stage_dir: Path) -> list[Path]:
    """Step files in the order they ran (their start time; name breaks ties)."""
    files = list(stage_dir.glob("*.step.tsv"))
    started = {f: (f.read_text().split("\t") + [""] * 6)[5] for f in files}
    return sorted(files, key=lambda f: (started[f], f.name))


def stage_summary(stage_dir: Path) -> dict:
    """Recompute RESULTS/<stage>/summary.json from the stage's step files."""
    stage = stage_dir.name
    rows = [row for f in _step_order(stage_dir) for row in read_step(f, stage)]
    summary = {"stage": stage, "counts": _counts(rows), "rows": rows}
    (stage_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _counts(rows: list[dict]) -> dict:
    return {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "not_run")}


def aggregate(results: Path, expect=STAGES) -> dict:
    """Every stage's rows, plus a not-run row for each expected stage that has no results."""
    dirs = {d.name: d for d in results.iterdir() if d.is_dir() and any(d.glob("*.step.tsv"))}
    order = [s for s in STAGES if s in dirs] + sorted(set(dirs) - set(STAGES))
    rows = [row for name in order for row in stage_summary(dirs[name])["rows"]]
    for stage in expect:
        if stage not in dirs:
            rows.append(
                {
                    "stage": stage,
                    "step": "(whole stage)",
                    "status": "not_run",
                    "exit": None,
                    "why": f"no results: run `gpu_check/run.sh {stage}`",
                    "seconds": 0.0,
                    "started": "",
                    "command": "",
                    "detail": "",
                    "log": None,
                }
            )
    envs = [p.read_text(errors="replace").splitlines()[:8] for p in sorted(results.glob("env-*.txt"))]
    counts = _counts(rows)
    return {
        "results": str(results),
        "ok": counts["failed"] == 0,
        "counts": counts,
        "verdict": verdict(counts),
        "environments": envs,
        "rows": rows,
    }


def verdict(counts: dict) -> str:
    if counts["failed"]:
        return f"FAILURES: {counts['failed']} failed, {counts['ok']} ok, {counts['not_run']} not run"
    if counts["not_run"]:
        return f"NO FAILURES, INCOMPLETE: {counts['ok']} ok, {counts['not_run']} not run (listed above)"
    return f"ALL PASSED: {counts['ok']} ok"


def render(summary: dict) -> str:
    out = [f"fastclip GPU check: {summary['results']}", ""]
    for env in summary["environments"]:
        out += env + [""]
    rows = summary["rows"]
    w_stage = max([5] + [len(r["stage"]) for r in rows])
    w_step = max([4] + [len(r["step"]) for r in rows if r["status"] != "not_run"])
    out.append(f"{'stage':<{w_stage}}  {'step':<{w_step}}  {'result':<7} {'secs':>6}  detail")
    for r in rows:
        if r["status"] == "not_run":
            continue
        result = "ok" if r["status"] == "ok" else "FAILED"
        out.append(f"{r['stage']:<{w_stage}}  {r['step']:<{w_step}}  {result:<7} {r['seconds']:>6.0f}  {r['detail']}")
    failed = [r for r in rows if r["status"] == "failed"]
    not_run = [r for r in rows if r["status"] == "not_run"]
    if failed:
        out += ["", f"FAILED ({len(failed)}): see each step's log, RESULTS/<stage>/<step>.log"]
        out += [f"  {r['stage']}/{r['step']}: {r['why']}; command: {r['command']}" for r in failed]
    if not_run:
        out += ["", f"NOT RUN ({len(not_run)}): not failures, not passes"]
        out += [f"  {r['stage']}/{r['step']}: {r['why']}" for r in not_run]
    out += ["", summary["verdict"]]
    return "\n".join(out) + "\n"


def write_aggregate(results: Path, expect=STAGES) -> dict:
    summary = aggregate(results, expect)
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / "summary.txt").write_text(render(summary))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stage", help="recompute RESULTS/<stage>/summary.json")
    p.add_argument("stage_dir", type=Path)
    p = sub.add_parser("aggregate", help="RESULTS/summary.{json,txt} over every stage; exit 1 on failures")
    p.add_argument("results", type=Path)
    p.add_argument(
        "--expect", default=",".join(STAGES), help="stages to report as not run when they have no results ('' for none)"
    )
    p = sub.add_parser("statuses", help="'step status' per row of a stage")
    p.add_argument("stage_dir", type=Path)
    args = ap.parse_args(argv)

    if args.cmd == "stage":
        stage_summary(args.stage_dir)
        return 0
    if args.cmd == "statuses":
        for r in stage_summary(args.stage_dir)["rows"]:
            print(r["step"], r["status"])
        return 0
    summary = write_aggregate(args.results, [s for s in args.expect.split(",") if s])
    print(render(summary), end="")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
