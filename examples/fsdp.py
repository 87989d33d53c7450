"""Train an FSDP2-sharded model with fastclip clipping its sharded gradients.

    torchrun --nproc-per-node 2 examples/fsdp.py            # CPU, gloo
    torchrun --nproc-per-node 2 examples/fsdp.py --device cuda   # GPUs, NCCL

Every parameter is sharded over the ranks with `torch.distributed.fsdp.fully_shard`,
so its gradient is a DTensor holding one shard per rank. `fastclip.clip_grad_norm_`
takes `model.parameters()` exactly as `torch.nn.utils.clip_grad_norm_` does: it
computes the global norm of the full gradients (one fused pass over the local
shards, one all-reduce), clips every rank's shards in place, and returns the norm
as a DTensor, so `norm.full_tensor()` works as with torch's.

Each step also asks torch for the same norm (`torch.nn.utils.get_total_norm`,
before the clip) and prints both; the run fails if they ever differ by more
than rounding. Each rank trains on its own batches (data parallel).
"""

import argparse
import math
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fastclip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps")
    ap.add_argument("--max-norm", type=float, default=0.4, help="clip threshold on the global grad norm")
    ap.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    ap.add_argument("--no-reshard", action="store_true", help="fully_shard(reshard_after_forward=False)")
    ap.add_argument("--rtol", type=float, default=1e-5, help="largest relative norm difference accepted")
    return ap.parse_args(argv)


def build_model(width, device):
    torch.manual_seed(0)  # the same initial weights on every rank, before sharding
    model = torch.nn.Sequential(
        torch.nn.Linear(32, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, 1),
    ).to(device)
    return model


def batch(step, rank, device):
    """A synthetic regression batch, different on every rank and step."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(64, 32, generator=gen)
    y = torch.sin(3 * x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]
    return x.to(device), y.to(device)


def main(argv=None):
    args = parse_args(argv)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    model = build_model(args.width, device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, reshard_after_forward=not args.no_reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=not args.no_reshard)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    if rank == 0:
        print(
            f"fastclip {fastclip.__version__} ({fastclip.backend()}), torch {torch.__version__}, "
            f"{world} ranks, FSDP2 on {device.type}"
        )
        print(f"{'step':>4}  {'loss':>9}  {'fastclip norm':>14}  {'torch norm':>14}  {'rel diff':>9}  clipped")
    worst = 0.0
    for step in range(args.steps):
        x, y = batch(step, rank, device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        # torch's norm of the same sharded grads, for the comparison only (an extra all-reduce)
        torch_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).full_tensor()
        norm = fastclip.clip_grad_norm_(model.parameters(), args.max_norm)
        ours = norm.full_tensor()  # a DTensor, like torch's: full_tensor() is the plain value
        rel = abs(ours.item() - torch_norm.item()) / max(torch_norm.item(), 1e-30)
        worst = max(worst, rel)
        opt.step()
        loss_avg = loss.detach().clone()
        dist.all_reduce(loss_avg)
        if rank == 0:
            print(
                f"{step:>4}  {loss_avg.item() / world:>9.5f}  {ours.item():>14.7f}  {torch_norm.item():>14.7f}  {rel:>9.1e}  {'yes' if ours.item() > args.max_norm else 'no'}"
            )
    if rank == 0:
        print(f"max relative difference between fastclip's and torch's norm: {worst:.2e} (rtol {args.rtol:g})")
    dist.barrier()  # gloo may abort a rank that tears down while the other still sends
    dist.destroy_process_group()
    if not worst <= args.rtol or not math.isfinite(worst):
        raise SystemExit(f"rank {rank}: fastclip's norm differs from torch's by {worst:.2e}")


if __name__ == "__main__":
    main()
