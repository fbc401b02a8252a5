"""A connected model trained through Hugging Face accelerate, unwrapped and folded.

``Accelerator().prepare`` wraps the model (DDP across processes, mixed precision, device placement) the
same way with or without pathways: connect before ``prepare`` so the pathway tensors are part of the
model it wraps and of the optimizer it is given. After training, ``unwrap_model`` gives your own
connected model back; fold it into the plain one.

    python examples/accelerate_train.py [--steps 20]
    accelerate launch --num-processes 2 examples/accelerate_train.py
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator

import pathway


def quadrants(n: int = 128) -> torch.utils.data.TensorDataset:
    """Images of a bright square in one of four quadrants; the label is the quadrant."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g) * 0.3, torch.arange(n) % 4
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, 16 * r + 4: 16 * r + 12, 16 * c + 4: 16 * c + 12] += 2.0
    return torch.utils.data.TensorDataset(x, y)


def main(steps: int) -> None:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())

    def vit(classes: int) -> torch.nn.Module:
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=classes)

    target = vit(4)
    pathway.connect(target, vit(0), lambda_init=0.0)      # aux: any model of another modality, here random
    optimizer = torch.optim.AdamW(pathway.param_groups(target, lr=1e-3, weight_decay=0.05, lambda_lr=1e-2))
    loader = torch.utils.data.DataLoader(quadrants(), batch_size=16, shuffle=True)
    model, optimizer, loader = accelerator.prepare(target, optimizer, loader)

    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            with pathway.cached():
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            step += 1
            if step == steps:
                break

    mine = accelerator.unwrap_model(model)                 # your connected timm ViT, unwrapped
    x = quadrants(8).tensors[0].to(accelerator.device)
    mine.eval()
    with torch.no_grad():
        connected = mine(x)
        lam = pathway.lambdas(mine)["blocks.0.attn.qkv.weight"].item()
        pathway.fold(mine)
        folded = mine(x)
    if accelerator.is_main_process:
        print(f"accelerate: {steps} steps on {accelerator.num_processes} process(es), lambda of blocks.0.attn.qkv "
              f"{lam:+.4f}; connected after fold: {pathway.is_connected(mine)}; "
              f"max |folded - connected| = {(folded - connected).abs().max().item():.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
