"""LitClassifier: any network that maps images to class scores, trained with AdamW under Lightning."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassF1Score

# What LitClassifier logs per validation epoch, and which way each is better: --objective
# chooses among them (docs/objectives.md); OBJECTIVE is what a study optimizes by default.
METRICS = {"val_loss": "minimize", "val_acc": "maximize", "val_f1": "maximize"}
OBJECTIVE = "val_loss"


class LitClassifier(pl.LightningModule):
    """Cross-entropy on ``net``'s class scores, minimized by AdamW whose learning rate decays to
    zero along a cosine over the run. Logs train_loss per epoch, and per validation (and test)
    epoch the loss, the accuracy and the macro-averaged F1 score (each class's F1, averaged:
    what a rare class gets right counts as much as a common one's)."""

    def __init__(self, net: nn.Module, num_classes: int, lr: float = 1e-3, weight_decay: float = 1e-2):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        # torchmetrics adds up each epoch's counts and computes F1 once, at its end: the mean of
        # per-batch F1 scores would not be the epoch's.
        self.f1 = nn.ModuleDict({stage: MulticlassF1Score(num_classes, average="macro") for stage in ("val", "test")})

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
        self.f1[stage].update(logits, y)
        self.log(f"{stage}_f1", self.f1[stage])

    def configure_optimizers(self) -> dict:
        # fused: one kernel updates every parameter; the default loops over them in Python.
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True
        )
        # Decaying lr over the run's epochs lets the last epochs settle into a minimum that a
        # constant lr keeps stepping over (docs/changes.md compares the two).
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}
