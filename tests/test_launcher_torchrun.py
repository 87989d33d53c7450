"""`torchrun --nproc-per-node 2 -m fastclip.run train.py`: real torchrun, two ranks,
gloo on loopback. train.py trains an FSDP2 model and clips as torchtitan does (the
norm, then the scale by it), with both functions bound at import; through the
launcher every rank runs fastclip's, and matches a plain torchrun of the same script."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

TRAIN = """
import json, os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)
)
for layer in (model[0], model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
norms = []
for step in range(STEPS):
    opt.zero_grad()
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(100 + step))  # the same batch on every rank
    model(x).pow(2).sum().backward()
    params = list(model.parameters())
    norm = get_total_norm([p.grad for p in params], 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    clip_grads_with_norm_(params, 0.1, norm)
    norms.append(norm.item())
    opt.step()
report = {
    "bound": [f.__module__ for f in (get_total_norm, clip_grads_with_norm_)],
    "norms": norms,
    "weights": [p.full_tensor().flatten().tolist() for p in model.parameters()],
}
with open(os.path.join(os.environ["REPORT_DIR"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(report, f)
dist.barrier()  # without it gloo sometimes aborts a rank that tears down while the other still sends
dist.destroy_process_group()
"""
STEPS = 3
TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


# torch's gloo backend now and then aborts a rank while the interpreter shuts down, after the
# script has finished and destroyed its process group: a gloo worker thread still alive at
# finalization (pytorch/pytorch#179291). Seen twice in about 30 runs here, both while other work
# loaded the 2 cores; earlier, before the script's barrier, a plain torchrun of it (no launcher)
# aborted about once in 12.
TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(tmp_path, name, args, attempts=2):
    """Run torchrun with `args` in tmp_path; (stderr, [report of rank 0, of rank 1]). A run that
    fails only by torch's teardown abort is run once more; any other failure fails the test."""
    for attempt in range(attempts):
        reports = tmp_path / f"reports-{name}-{attempt}"  # not a folder named fastclip: python -m would import it
        reports.mkdir()
        env = dict(os.environ, REPORT_DIR=str(reports), OMP_NUM_THREADS="1")
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", *args]
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
            out, _ = proc.communicate()
            pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{out[-3000:]}")
        if proc.returncode == 0:
            return out, [json.load(open(reports / f"rank{r}.json")) for r in range(2)]
        teardown_only = TEARDOWN_ABORT in out and all((reports / f"rank{r}.json").exists() for r in range(2))
        if not teardown_only or attempt == attempts - 1:
            pytest.fail(f"torchrun exited with {proc.returncode}:\n{out[-3000:]}")


def test_torchrun_runs_every_rank_through_the_launcher(tmp_path):
    (tmp_path / "train.py").write_text(textwrap.dedent(TRAIN).replace("STEPS", str(STEPS)))
    out, ours = torchrun(tmp_path, "fastclip", ["-m", "fastclip.run", "--summary", "train.py"])
    _, theirs = torchrun(tmp_path, "torch", ["train.py"])
    summaries = sorted(re.findall(r"fastclip\.run summary: .*", out))
    assert len(summaries) == 2, out[-3000:]
    for rank, line in enumerate(summaries):
        counts = dict(re.findall(r"(\w+)=(\S+)", line))
        assert counts["rank"] == str(rank)
        assert counts["get_total_norm"] == counts["clip_grads_with_norm_"] == str(STEPS)
    for r in range(2):
        assert ours[r]["bound"] == ["fastclip.clip", "fastclip.clip"]
        assert theirs[r]["bound"] == ["torch.nn.utils.clip_grad"] * 2  # the negative control
        assert ours[r]["norms"][0] > 0.5  # it really clipped
        torch.testing.assert_close(ours[r]["norms"], theirs[r]["norms"], rtol=1e-5, atol=0)
        for a, b in zip(ours[r]["weights"], theirs[r]["weights"]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    assert ours[0]["norms"] == ours[1]["norms"]  # one global norm on every rank
