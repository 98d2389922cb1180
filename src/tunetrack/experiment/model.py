"""LitClassifier: any network that maps images to class scores, trained with AdamW under Lightning."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F


class LitClassifier(pl.LightningModule):
    """Cross-entropy on ``net``'s class scores, minimized by AdamW whose learning rate decays to
    zero along a cosine over the run. Logs train_loss, val_loss and val_acc per epoch, and
    test_loss and test_acc: a study minimizes val_loss."""

    def __init__(self, net: nn.Module, lr: float = 1e-3, weight_decay: float = 1e-2):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        # The Trainer (trainer.py, and machinery/training/fit.py) may run several of these per
        # Lightning step (machinery/training/several_per_step.py; --minibatches-per-step 1 turns
        # that off): log per epoch.
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        # Averaged over the epoch weighted by each batch's size: per-image means.
        self.log(f"{stage}_loss", F.cross_entropy(logits, y))
        self.log(f"{stage}_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> dict:
        # fused: one kernel updates every parameter; the default loops over them in Python.
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True
        )
        # Decaying lr over the run's epochs lets the last epochs settle into a minimum that a
        # constant lr keeps stepping over (docs/changes.md compares the two).
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}
