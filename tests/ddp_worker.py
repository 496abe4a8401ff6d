"""Run by torchrun in tests: DDP-train a LoRA+FLoRA model on gloo; rank 0 saves the adapter."""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import structpeft as sp
from tests.models import MLP

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # same base and adapter init on every rank
model = sp.get_peft_model(MLP(), [sp.LoraConfig(target_modules=["lin0"]), sp.FloraConfig(target_modules=["lin1"])])
ddp = DistributedDataParallel(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
torch.manual_seed(100 + rank)  # different data per rank
for _ in range(5):
    x = torch.randn(8, 10)
    ddp(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if rank == 0:
    assert all(torch.equal(gathered[0], g) for g in gathered[1:]), "ranks diverged"
    assert flat.abs().sum() > 0
    model.save_pretrained(sys.argv[1])
dist.barrier()
dist.destroy_process_group()
print(f"rank {rank} ok", flush=True)
os._exit(0)
