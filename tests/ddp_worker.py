"""One rank of test_multi_gpu.py's DDP step, started by torchrun (one GPU a rank; not a test file).

A small attention block (GQA, causal, bf16) takes one training step under DistributedDataParallel with
flashjit's flash_attn_func. The same step is taken again on a copy of the block with the reference
backend and its gradients averaged over the ranks by hand; every gradient of the DDP step must match
those (DDP averaged flashjit's gradients computed on each rank's own GPU). The ranks' parameters must
be equal after the step. Exit status 0 and a line "rank R ok" on success.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import flashjit

HIDDEN, HEADS, KV_HEADS, D_HEAD = 256, 4, 2, 64


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * D_HEAD)
        self.out = torch.nn.Linear(HEADS * D_HEAD, HIDDEN)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([HEADS * D_HEAD, KV_HEADS * D_HEAD, KV_HEADS * D_HEAD], dim=-1)
        o = flashjit.flash_attn_func(q.view(b, s, HEADS, D_HEAD), k.view(b, s, KV_HEADS, D_HEAD),
                                     v.view(b, s, KV_HEADS, D_HEAD), causal=True)
        return self.out(o.reshape(b, s, HEADS * D_HEAD))


def loss_of(model, x):
    return model(x).float().square().mean()


def main() -> None:
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Block().to(device="cuda", dtype=torch.bfloat16)
    reference = copy.deepcopy(model)
    torch.manual_seed(1 + rank)  # each rank its own batch, odd length
    x = torch.randn(2, 333, HIDDEN, device="cuda", dtype=torch.bfloat16)

    os.environ["FLASHJIT_BACKEND"] = "jit"
    ddp = DistributedDataParallel(model, device_ids=[rank])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-2)
    loss_of(ddp, x).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()

    os.environ["FLASHJIT_BACKEND"] = "reference"
    loss_of(reference, x).backward()
    for name, p in reference.named_parameters():
        g = p.grad.float()
        dist.all_reduce(g)
        g /= world
        err = (grads[name].float() - g).norm() / g.norm().clamp_min(1e-30)
        assert err < 2e-2, f"rank {rank}: {name}'s gradient is {err:.2e} (relative) off the reference step's"

    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), f"rank {rank}: parameters differ between ranks"
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    main()
