"""machinery.training.several_per_step.SeveralPerStep: several minibatches per Lightning step make the same updates
as Lightning's own loop, to float precision, for any module of Lightning's shape, gradient
clipping and early stopping included; it leaves the module as it was, and steps aside, in one
line, for what it cannot carry."""

from __future__ import annotations

import dataclasses

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from conftest import TINY
from tiny import experiment as tiny
from tunetrack.machinery.data.batches import InMemoryBatches
from tunetrack.machinery.options import Options
from tunetrack.machinery.tracking.mlflow_runs import connect
from tunetrack.machinery.training import several_per_step as speed
from tunetrack.machinery.training.fit import TrackedRun, fit
from tunetrack.machinery.training.several_per_step import Chunks, SeveralPerStep


def curves_of(settings, minibatches_per_step: int, tracking_uri: str) -> tuple[dict, int]:
    tracker = connect(tracking_uri, "speed")
    options = Options(accelerator="cpu", minibatches_per_step=minibatches_per_step)
    with tracker.run(f"{minibatches_per_step} a step") as run_id:
        model, data = tiny.build(settings)
        run = TrackedRun(tracker, run_id, options, TINY.trainer, progress_bar=False)
        result = fit(model, data, settings, run, test=False)
    names = ("train_loss", "val_loss", "val_acc")
    return {name: tracker.metric_history(run_id, name) for name in names}, result.epochs


@pytest.mark.parametrize(
    ("model", "changes"),
    [("dense", {}), ("conv", {}), ("dense", {"clip": 0.05}), ("dense", {"patience": 1, "lr": 1.0, "max_epochs": 20})],
    ids=["dense", "conv", "clipped", "stopped-early"],
)
def test_several_minibatches_a_step_train_as_lightnings_own_loop(tiny_settings, tracking_uri, model, changes, capsys):
    # 20 minibatches an epoch: chunks of 16 and 4.
    settings = dataclasses.replace(tiny_settings, model=model, batch_size=20, **{"max_epochs": 3, **changes})
    chunked, epochs = curves_of(settings, 16, tracking_uri)
    lightning, lightning_epochs = curves_of(settings, 1, tracking_uri)
    assert epochs == lightning_epochs and (epochs < 20 if "patience" in changes else epochs == 3)
    for name, values in lightning.items():
        assert chunked[name] == pytest.approx(values, rel=1e-5), name
    assert "speed:" not in capsys.readouterr().out  # it carried them all itself
    if "clip" in changes:  # and the clipping did clip: unclipped, the curves differ
        unclipped, _ = curves_of(dataclasses.replace(settings, clip=None), 16, tracking_uri)
        assert unclipped["train_loss"] != pytest.approx(chunked["train_loss"], rel=1e-3)


class Listening(pl.Callback):
    """A callback on the hooks around each update: the adapter must call them as Lightning does."""

    def __init__(self):
        self.calls = {"on_before_backward": 0, "on_after_backward": 0, "on_before_optimizer_step": 0}

    def on_before_backward(self, trainer, pl_module, loss):
        self.calls["on_before_backward"] += 1

    def on_after_backward(self, trainer, pl_module):
        self.calls["on_after_backward"] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls["on_before_optimizer_step"] += 1


class StepScheduled(pl.LightningModule):
    """Lightning's shape, with a scheduler stepped per update and a per-step log beside the epoch
    mean."""

    def __init__(self, lr: float = 1e-2):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("logit_mean", self(x).mean(), on_step=True, on_epoch=True)
        return {"loss": loss}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ByHand(StepScheduled):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


class Batches(pl.LightningDataModule):
    def __init__(self, x, y, batch_size: int):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def train_dataloader(self):
        return InMemoryBatches(self.x, self.y, self.batch_size)


def fit_directly(size: int, model=None, callbacks=(), **trainer_args) -> tuple[pl.Trainer, pl.LightningModule]:
    torch.manual_seed(0)
    x, y = torch.rand(100, 1, 8, 8), torch.randint(0, 4, (100,))
    model = model or StepScheduled()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[SeveralPerStep(size), *callbacks], **trainer_args,
    )  # fmt: skip
    trainer.fit(model, datamodule=Batches(x, y, batch_size=10))
    return trainer, model


def test_any_module_of_that_shape_gets_its_hooks_schedulers_and_logs_as_from_lightning():
    listening = [Listening(), Listening()]
    (lightning, plain_module), (chunked, chunked_module) = (
        fit_directly(size, callbacks=[cb]) for size, cb in zip((1, 4), listening, strict=True)
    )
    assert chunked.global_step == lightning.global_step == 20  # one per minibatch, 10 an epoch
    assert listening[1].calls == listening[0].calls == dict.fromkeys(listening[0].calls, 20)
    lrs = [t.optimizers[0].param_groups[0]["lr"] for t in (lightning, chunked)]
    assert lrs[0] == lrs[1] == pytest.approx(1e-2 * 0.5 ** (20 // 3))
    for name in ("train_loss", "logit_mean_epoch"):
        assert float(chunked.callback_metrics[name]) == pytest.approx(float(lightning.callback_metrics[name]), rel=1e-5)
    for a, b in zip(plain_module.parameters(), chunked_module.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # After fit, the module is as it was: Lightning's shape, automatic optimization.
    assert chunked_module.automatic_optimization and "training_step" not in vars(chunked_module)
    assert "log" not in vars(chunked_module)


def test_what_it_cannot_carry_it_leaves_to_lightnings_own_loop_and_says_so_once(capsys, monkeypatch):
    monkeypatch.setattr(speed, "_said", set())
    cases = [
        ({"model": ByHand()}, "the module optimizes by hand"),
        ({"accumulate_grad_batches": 2}, "gradients are accumulated"),
        ({"gradient_clip_val": 0.5, "callbacks": [Listening()]}, "gradients are clipped where hooks"),
    ]
    for args, why in cases:
        for _ in range(2):  # a study's every trial: said once
            trainer, model = fit_directly(4, **args)
            assert trainer.global_step > 0 and model.training_step.__func__ is type(model).training_step
        out = capsys.readouterr().out
        assert out.count("speed: ") == 1 and f"speed: {why}" in out, out
        assert "Lightning's own loop trains instead" in out


def test_minibatches_go_to_lightning_in_chunks():
    chunks = Chunks(list(range(35)), 16)
    assert len(chunks) == 3 and [len(chunk) for chunk in chunks] == [16, 16, 3]
    assert [item for chunk in chunks for item in chunk] == list(range(35))
