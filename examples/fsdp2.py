"""A connected model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``), trained, gathered, folded.

Connect first, then shard: the pathway tensors (each layer's ``original`` weight, ``aux_weight`` and
lambda) live in the parametrizations of the modules ``fully_shard`` wraps and are sharded with them.
After the steps the full state dict is gathered on rank 0, loaded into an unsharded connected copy and
folded; the same steps in one process must give the same folded weights.

FSDP2 refuses 0-d parameters ("fully_shard doesn't support scalar parameters"), and the paper's
lambda is one number per layer. Two ways work: ``lambda_shape="channel"`` (one lambda per output
channel, sharded like the rest), or keeping the scalar lambdas out of the sharding
(``ignored_params``) and averaging their gradients across ranks after ``backward``, as here.

    torchrun --nproc-per-node 2 examples/fsdp2.py [--steps 3]      (gloo on the CPU, NCCL on GPUs)
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

import pathway


class Encoder(nn.Module):
    """A small transformer over 8 tokens of 12 features (torch alone, so each process starts fast)."""

    def __init__(self, classes: int, dim: int = 32):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).layers
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def connected(options: dict) -> nn.Module:
    torch.manual_seed(0)
    target, aux = Encoder(4), Encoder(4)      # aux: any model of another modality, here random
    pathway.connect(target, aux, lambda_init=0.1, **options)
    return target


def scalar_lambdas(model: nn.Module) -> list[nn.Parameter]:
    return [lam for lam in pathway.lambdas(model).values() if lam.dim() == 0]


def shard(model: nn.Module) -> list[nn.Parameter]:
    """fully_shard each block, then the root; scalar lambdas stay whole (returned: their grads are averaged)."""
    kept = scalar_lambdas(model)
    for block in model.blocks:
        fully_shard(block, ignored_params=set(kept))
    fully_shard(model, ignored_params=set(kept))
    return kept


def train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], kept: list[nn.Parameter]) -> None:
    # SGD: Adam's first steps are near lr * sign(grad), which magnifies reduction-order rounding in tiny gradients
    optimizer = torch.optim.SGD(pathway.param_groups(model, lr=0.1, weight_decay=0.05, lambda_lr=0.1), momentum=0.9)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        for lam in kept:      # not sharded, so FSDP does not reduce them: average across ranks like DDP would
            dist.all_reduce(lam.grad)
            lam.grad /= dist.get_world_size()
        optimizer.step()
    if any(not p.requires_grad and p in optimizer.state for group in optimizer.param_groups for p in group["params"]):
        raise AssertionError("a frozen tensor got optimizer state")


def folded_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    pathway.fold(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(steps: int) -> None:
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4 * world, 8, 12, generator=g), torch.randint(0, 4, (4 * world,), generator=g))
               for _ in range(steps)]
    for options in ({"lambda_shape": "channel"}, {}, {"train_aux": False}):
        model = connected(options)
        kept = shard(model)
        train(model, [(x[4 * rank: 4 * rank + 4], y[4 * rank: 4 * rank + 4]) for x, y in batches], kept)
        aux_grads = [p.grad for name, p in model.named_parameters() if name.endswith(".aux_weight")]
        frozen_ok = options.get("train_aux", True) or all(grad is None for grad in aux_grads)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            gathered = connected(options)
            gathered.load_state_dict(full)
            alone = connected(options)          # the same steps in one process, on the whole batches
            train(alone, batches, [])
            a, b = folded_weights(gathered), folded_weights(alone)
            diff = max((a[k] - b[k]).abs().max().item() for k in b)
            print(f"fsdp2 {options or 'scalar lambda'}: {world} ranks, {steps} steps; "
                  f"max |sharded - one process| after fold = {diff:.2e}; frozen aux without grads: {frozen_ok}")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    main(parser.parse_args().steps)
