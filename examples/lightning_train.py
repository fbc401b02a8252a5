"""A LightningModule that connects its backbone in ``configure_model`` and is folded when fit ends.

``configure_model`` runs inside ``Trainer.fit`` before the optimizer is built (and before a
distributed strategy wraps the module), so that is where ``pathway.connect`` goes;
``configure_optimizers`` takes ``pathway.param_groups`` so lambda keeps its own group.
``pathway.train.lightning.PathwayCallback`` logs mean |lambda| and folds at the end of fit.

    python examples/lightning_train.py [--steps 20]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F

import pathway
from pathway.train.lightning import PathwayCallback


def quadrants(n: int = 128) -> torch.utils.data.TensorDataset:
    """Images of a bright square in one of four quadrants; the label is the quadrant."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g) * 0.3, torch.arange(n) % 4
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, 16 * r + 4: 16 * r + 12, 16 * c + 4: 16 * c + 12] += 2.0
    return torch.utils.data.TensorDataset(x, y)


def vit(classes: int) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=classes)


class Classifier(pl.LightningModule):
    def __init__(self, probe: torch.Tensor):
        super().__init__()
        self.model = vit(4)
        self.probe, self.connected_outputs = probe, None

    def configure_model(self) -> None:
        if not pathway.is_connected(self.model):
            pathway.connect(self.model, vit(0))        # aux: any model of another modality, here random

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(pathway.param_groups(self.model, lr=1e-3, weight_decay=0.05, lambda_lr=1e-2))

    def training_step(self, batch, batch_idx) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss)
        return loss

    def on_train_end(self) -> None:                     # runs before the callback folds (on_fit_end)
        with torch.no_grad():
            self.connected_outputs = self.model.eval()(self.probe)


def main(steps: int) -> None:
    torch.manual_seed(0)
    probe = quadrants(8).tensors[0]
    module = Classifier(probe)
    trainer = pl.Trainer(accelerator="auto", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[PathwayCallback(attribute="model")])
    trainer.fit(module, torch.utils.data.DataLoader(quadrants(), batch_size=16, shuffle=True))
    plain = vit(4)
    plain.load_state_dict(module.model.state_dict(), strict=True)      # the folded backbone is a plain timm ViT
    with torch.no_grad():
        difference = (plain.eval()(probe) - module.connected_outputs).abs().max().item()
    print(f"lightning: {trainer.global_step} steps; mean |lambda| logged "
          f"{trainer.callback_metrics['pathway/mean_abs_lambda'].item():.4f}; connected after fit: "
          f"{pathway.is_connected(module.model)}; max |folded - connected| = {difference:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
