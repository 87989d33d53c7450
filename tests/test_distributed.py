"""Distributed clipping on real torch.distributed process groups (docs/distributed.md).

One group of processes per world size (2 and 4, gloo on loopback) runs every
case of tests/distributed_cases.py in turn, so the torch import and the
process-group start-up are paid once per world size, not once per case; each
case then reports here as its own test. The group runs under a hard timeout
and is killed on failure. The NCCL check (world size 1) needs a GPU.
"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import fastclip

HERE = os.path.dirname(os.path.abspath(__file__))
if torch.distributed.is_available():
    from distributed_cases import CASES  # the case names; nothing runs at import
else:
    CASES = []

TIMEOUT_S = 300  # the whole group; a desynchronised case times out in its collective after 60 s

needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def run_group(world, tmp_dir, backend="gloo"):
    """Spawn `world` ranks, wait for all (or kill them all), return {case: [result per rank]}."""
    store = os.path.join(tmp_dir, "store")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):  # loopback, whatever the host name resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs, logs = [], []
    try:
        for rank in range(world):
            log = open(os.path.join(tmp_dir, f"rank{rank}.log"), "w")
            logs.append(log)
            cmd = [
                sys.executable,
                os.path.join(HERE, "distributed_cases.py"),
                str(rank),
                str(world),
                store,
                os.path.join(tmp_dir, f"rank{rank}.json"),
                backend,
            ]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass  # reported below as missing cases, with the logs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    results = {}
    for rank in range(world):
        path = os.path.join(tmp_dir, f"rank{rank}.json")
        per_rank = json.load(open(path)) if os.path.exists(path) else {}
        for name, outcome in per_rank.items():
            results.setdefault(name, {})[rank] = outcome
    tails = {r: open(os.path.join(tmp_dir, f"rank{r}.log")).read()[-3000:] for r in range(world)}
    return results, tails, [p.returncode for p in procs]


@functools.cache
def group_results(world, tmp_root, backend="gloo"):
    tmp_dir = os.path.join(tmp_root, f"{backend}-world{world}")
    os.makedirs(tmp_dir, exist_ok=True)
    return run_group(world, tmp_dir, backend)


def check_case(name, world, tmp_root, backend="gloo"):
    results, tails, returncodes = group_results(world, tmp_root, backend)
    per_rank = results.get(name)
    if per_rank is None or len(per_rank) != world:
        logs = "\n".join(f"--- rank {r} (exit {rc}) ---\n{tails[r]}" for r, rc in enumerate(returncodes))
        pytest.fail(f"case {name} did not report on every rank (timeout or crash)\n{logs}")
    failures = {r: out for r, out in per_rank.items() if out != "ok"}
    assert not failures, "\n".join(f"--- rank {r} ---\n{out}" for r, out in failures.items())


@pytest.fixture(scope="session")
def dist_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dist"))


def cases_for(world):
    return [name for name, _, lo, hi in CASES if lo <= world <= hi]


@needs_dist
@pytest.mark.parametrize("name", cases_for(2))
def test_world_2(name, dist_tmp):
    check_case(name, 2, dist_tmp)


@needs_dist
@pytest.mark.parametrize("name", cases_for(4))
def test_world_4(name, dist_tmp):
    check_case(name, 4, dist_tmp)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.distributed.is_available() and torch.distributed.is_nccl_available()),
    reason="needs a GPU and NCCL (the DTensor path on NCCL, world size 1)",
)
@pytest.mark.parametrize(
    "name",
    [
        "fsdp2_matches_torch",
        "fsdp2_companions_match_torch",
        "nonfinite_on_one_rank",
        "tensor_parallel_matches_torch",
        "patched_unchanged_fsdp2_loop",
    ],
)
def test_nccl_world_1(name, dist_tmp):
    check_case(name, 1, dist_tmp, backend="nccl")


# ---- in this process, no process group ---------------------------------------------


def test_group_needs_an_initialized_process_group():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="initialized"):
            fastclip.clip_grad_norm_([p], 0.1, group=object())
    assert torch.equal(p.grad, torch.ones(3))  # untouched


def test_group_is_keyword_only():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(TypeError):
        fastclip.clip_grad_norm_([p], 0.1, 2.0, False, None, None)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_dist
def test_fsdp_example_runs_and_matches_torch(tmp_path):
    """examples/fsdp.py as torchrun would start it (2 ranks, env://); it exits
    non-zero itself if fastclip's norm ever differs from torch's."""
    script = os.path.join(os.path.dirname(HERE), "examples", "fsdp.py")
    port = str(free_port())
    procs = []
    try:
        for rank in range(2):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                OMP_NUM_THREADS="1",
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, script, "--steps", "4", "--width", "64"],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "max relative difference between fastclip's and torch's norm" in outs[0]
    assert "yes" in outs[0]  # some step really clipped
