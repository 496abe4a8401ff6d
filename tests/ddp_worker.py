"""Run by torchrun in tests: DDP-train LoRA + FLoRA + Coeff-Tuning (on nn.MultiheadAttention) on gloo;
rank 0 saves the adapter."""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import structpeft as sp
from tests.models import MHANet, _mha_inputs

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # same base and adapter init on every rank
configs = [sp.LoraConfig(target_modules=["embed"]), sp.FloraConfig(target_modules=["ff"]), sp.CoeffConfig()]
model = sp.get_peft_model(MHANet(), configs)
ddp = DistributedDataParallel(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
for step in range(5):
    ddp(**_mha_inputs(100 * rank + step)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if rank == 0:
    assert all(torch.equal(gathered[0], g) for g in gathered[1:]), "ranks diverged"
    assert flat.abs().sum() > 0
    alphas = [p for n, p in model.named_parameters() if "coeff_alpha" in n]
    assert alphas and all(a.abs().sum() > 0 for a in alphas), "Coeff-Tuning's α did not train"
    model.save_pretrained(sys.argv[1])
dist.barrier()
dist.destroy_process_group()
print(f"rank {rank} ok", flush=True)
os._exit(0)
