"""Run by torchrun in tests: the same adapters trained under FSDP2 (``fully_shard``) and under DDP on
gloo must end equal; the sharded model saves, exports and merges whole tensors."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import structpeft as sp
from structpeft.core.distributed import full_tensor
from tests.models import MHANet, _mha_inputs


def build() -> sp.PeftModel:
    torch.manual_seed(0)  # same base and adapter init on every rank and for both models
    model = sp.get_peft_model(
        MHANet(),
        [
            sp.LoraConfig(target_modules=["embed"], modules_to_save=["head"]),
            sp.FloraConfig(target_modules=["ff"]),
        ],
    )
    model.add_adapter("attn", sp.CoeffConfig())
    model.set_adapter(["default", "attn"])
    return model


def train(model: torch.nn.Module, params: list[torch.nn.Parameter], rank: int) -> None:
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(5):
        model(**_mha_inputs(100 * rank + step)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()

reference = build()
train(DistributedDataParallel(reference), [p for p in reference.parameters() if p.requires_grad], rank)

sharded = build()
fully_shard(sharded.base_model.ff)  # a nested unit, as one would shard each block
fully_shard(sharded)
assert any(type(p).__name__ == "DTensor" for p in sharded.parameters())
train(sharded, [p for p in sharded.parameters() if p.requires_grad], rank)

# Training under FSDP2 matches DDP.
ours = {n: p for n, p in reference.named_parameters() if p.requires_grad}
theirs = {n: full_tensor(p.detach()) for n, p in sharded.named_parameters() if p.requires_grad}
assert ours.keys() == theirs.keys() and len(ours) > 0
for name in ours:
    assert torch.allclose(ours[name], theirs[name], atol=1e-5, rtol=1e-4), name
assert all(ours[n].abs().sum() > 0 for n in ours if "lora_B" in n or "coeff_alpha" in n), "adapters did not train"

# Every rank calls save and export (they gather); rank 0 alone writes (each rank names its own folder
# here, to see who wrote).
sharded.save_pretrained(out / f"sharded{rank}")
sharded.export_lora(out / f"sharded_lora{rank}", energy=1.0, adapter_name="default")
if rank == 0:
    reference.save_pretrained(out / "reference")
    reference.export_lora(out / "reference_lora", energy=1.0, adapter_name="default")

# Merging the sharded model in place gives the outputs it gave unmerged.
sharded.eval()
reference.eval()
x = _mha_inputs(7)
with torch.no_grad():
    before = sharded(**x)
    assert torch.allclose(before, reference(**x), atol=1e-5)
    kept = sharded.merge_adapter(keep_unmergeable=True)
    assert kept == {"attn"}, kept
    assert torch.allclose(sharded(**x), before, atol=1e-5), "merging the sharded model changed its outputs"
    sharded.unmerge_adapter()
    assert torch.allclose(sharded(**x), before, atol=1e-5), "unmerging the sharded model changed its outputs"

dist.barrier()
if rank == 0:
    assert not (out / "sharded1").exists() and not (out / "sharded_lora1").exists(), "rank 1 wrote files"
    for folder in ("", "attn"):
        a = load_file(out / "sharded0" / folder / "adapter_model.safetensors")
        b = load_file(out / "reference" / folder / "adapter_model.safetensors")
        assert a.keys() == b.keys(), folder
        for key in a:
            assert a[key].shape == b[key].shape, f"{key} is not whole: {a[key].shape} vs {b[key].shape}"
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    torch.manual_seed(0)
    fresh = sp.PeftModel.from_pretrained(MHANet(), out / "sharded0")
    fresh.load_adapter(out / "sharded0" / "attn", adapter_name="attn")
    fresh.set_adapter(["default", "attn"])
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(**x), reference(**x), atol=1e-5), "the saved adapter gives other outputs"
    a = load_file(out / "sharded_lora0" / "adapter_model.safetensors")
    b = load_file(out / "reference_lora" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # singular vectors are defined up to sign: compare the products B A
        if ".lora_A." in key:
            up = key.replace(".lora_A.", ".lora_B.")
            product = (a[up].flatten(1) @ a[key].flatten(1), b[up].flatten(1) @ b[key].flatten(1))
            assert torch.allclose(*product, atol=1e-5), key
dist.barrier()
dist.destroy_process_group()
print(f"rank {rank} ok", flush=True)
os._exit(0)
