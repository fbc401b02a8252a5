"""A connected model trained by the Hugging Face Trainer, then folded.

The Trainer takes any nn.Module whose forward returns a loss; pass pathway's parameter groups
through `optimizers=` so that lambda keeps its own group (no weight decay, its own lr).

    python examples/hf_trainer.py [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

import pathway


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.backbone(pixel_values)
        return {"logits": logits, **({"loss": F.cross_entropy(logits, labels)} if labels is not None else {})}


class Shapes(torch.utils.data.Dataset):
    """Images of a bright square in one of four quadrants; the label is the quadrant."""

    def __len__(self) -> int:
        return 256

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        label = i % 4
        image = torch.randn(3, 32, 32, generator=g) * 0.3
        r, c = divmod(label, 2)
        image[:, 16 * r + 4: 16 * r + 12, 16 * c + 4: 16 * c + 12] += 2.0
        return {"pixel_values": image, "labels": torch.tensor(label)}


def main(steps: int) -> None:
    torch.manual_seed(0)
    def make(classes: int) -> torch.nn.Module:
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=classes)

    target, aux = make(4), make(0)          # aux: any model trained on another modality, here random
    pathway.connect(target, aux)
    model = Classifier(target)
    optimizer = torch.optim.AdamW(pathway.param_groups(model, lr=1e-3, weight_decay=0.05, lambda_lr=1e-2))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=32, logging_steps=5,
                                 report_to=[], save_strategy="no", use_cpu=True)
        Trainer(model=model, args=args, train_dataset=Shapes(), optimizers=(optimizer, None)).train()
    lam = pathway.lambdas(target)["blocks.0.attn.qkv.weight"].item()
    pathway.fold(target)
    print(f"lambda of blocks.0.attn.qkv after training: {lam:+.4f}; folded: connected={pathway.is_connected(target)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
