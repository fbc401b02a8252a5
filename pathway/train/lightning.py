"""A Lightning callback for connected models: lambda in the logs during fit, fold at its end.

Imported by the user (``from pathway.train.lightning import PathwayCallback``), never by ``import pathway``
or the engine, so pathway itself needs no Lightning. Connect in ``LightningModule.configure_model`` (or ``setup``),
so the pathways exist before Lightning wraps the module (DDP, FSDP) and before
``configure_optimizers`` builds the optimizer from ``pathway.param_groups``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn as nn

import pathway


class PathwayCallback(pl.Callback):
    """Logs mean |lambda| every ``log_every`` training steps and folds the pathways when fit ends.

    Args:
        attribute: the connected sub-module of the LightningModule (``"model"`` for ``self.model``),
            or None for the whole LightningModule.
        fold_at_end: fold when ``fit`` ends, so ``trainer.save_checkpoint``/``state_dict`` give the plain model.
        log_every: steps between two logged values (``pathway/mean_abs_lambda``); 0 logs nothing.
    """

    def __init__(self, attribute: str | None = None, fold_at_end: bool = True, log_every: int = 1):
        self.attribute, self.fold_at_end, self.log_every = attribute, fold_at_end, log_every

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        return pl_module if self.attribute is None else pl_module.get_submodule(self.attribute)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.log_every or trainer.global_step % self.log_every:
            return
        values = [lam.detach().abs().mean() for lam in pathway.lambdas(self._model(pl_module)).values()]
        if values:
            pl_module.log("pathway/mean_abs_lambda", torch.stack(values).mean(), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._model(pl_module)
        if self.fold_at_end and pathway.is_connected(model):
            pathway.fold(model)
