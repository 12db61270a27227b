"""Run under ``torchrun --nproc_per_node 2`` by test_train_ddp.py (not collected by pytest itself).

Each rank trains one step of a small model with synchronized BatchNorm on its half of a batch;
rank 0 also runs the plain model on the whole batch in one process and checks that outputs,
parameter gradients (averaged over ranks, as DDP does) and running statistics agree.
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

from r2unet_fast import R2AttUNet
from r2unet_fast.nn.sync_norm import convert_sync_batchnorm


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = R2AttUNet(base_channels=2, depth=2, t=1, attention_norm=True, backend="reference").double().train()
    batch = torch.randn(4 * world, 3, 8, 8, dtype=torch.float64) * 3 + 1
    synced = convert_sync_batchnorm(copy.deepcopy(model))
    for _ in range(2):  # two steps: running statistics and num_batches_tracked advance twice
        local = batch[rank * 4:(rank + 1) * 4]
        synced.zero_grad()
        out = synced(local)
        out.square().mean().backward()
        for p in synced.parameters():  # what DDP does with the gradients
            dist.all_reduce(p.grad)
            p.grad /= world
        gathered = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(gathered, out.detach())
        model.zero_grad()
        full = model(batch)
        full.square().mean().backward()
        torch.testing.assert_close(torch.cat(gathered), full.detach(), rtol=1e-10, atol=1e-12)
        for (name, a), b in zip(synced.named_parameters(), model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for (name, a), b in zip(synced.named_buffers(), model.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    if rank == 0:
        print("synchronized BatchNorm matches one process on the whole batch")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
