"""machinery.speed.SeveralPerStep: several minibatches per Lightning step make the same updates
as Lightning's own loop and as a plain PyTorch loop, to float precision, for any module of
Lightning's shape; it leaves the module as it was, and refuses what it cannot carry."""

from __future__ import annotations

import dataclasses

import pytest
import pytorch_lightning as pl
import torch

from experiment.model import LitClassifier
from experiment.networks import MLP
from experiment.search import build
from machinery.batches import InMemoryBatches
from machinery.options import Options
from machinery.speed import SeveralPerStep
from machinery.tracking import connect
from machinery.training import fit
from workbench.benchmark import train_plainly


def curves_of(settings, minibatches_per_step: int, tracking_uri: str) -> tuple[dict, pl.LightningModule]:
    tracker = connect(tracking_uri, "speed")
    options = Options(accelerator="cpu", minibatches_per_step=minibatches_per_step)
    with tracker.run(f"{minibatches_per_step} a step") as run_id:
        model, data = build(settings)
        result = fit(model, data, settings, options, tracker, run_id, evaluate_test=False, progress_bar=False)
    names = ("train_loss", "val_loss", "val_acc")
    return {name: tracker.metric_history(run_id, name) for name in names}, result.model


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_several_minibatches_a_step_train_as_lightnings_own_loop_and_a_plain_loop(tiny_settings, tracking_uri, model):
    # 25 minibatches an epoch: chunks of 16 and 9.
    settings = dataclasses.replace(tiny_settings, model=model, hidden_dim=32, batch_size=20, lr=3e-3, max_epochs=3)
    chunked, _ = curves_of(settings, 16, tracking_uri)
    lightning, _ = curves_of(settings, 1, tracking_uri)
    plain = train_plainly(settings)
    for name, values in plain.items():
        assert chunked[name] == pytest.approx(lightning[name], rel=1e-5), name
        assert chunked[name] == pytest.approx(values, rel=1e-5), name
    assert plain["val_loss"][-1] < plain["val_loss"][0]


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


class StepScheduled(LitClassifier):
    """Lightning's shape, with what the project's module does not use: a scheduler stepped per
    update, and a per-step log beside the epoch mean."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("logit_mean", self(batch[0]).mean(), on_step=True, on_epoch=True)
        return {"loss": loss}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Batches(pl.LightningDataModule):
    def __init__(self, x, y, batch_size: int):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def train_dataloader(self):
        return InMemoryBatches(self.x, self.y, self.batch_size)


def fit_directly(size: int, callbacks=()) -> tuple[pl.Trainer, LitClassifier]:
    torch.manual_seed(0)
    x, y = torch.rand(100, 1, 28, 28), torch.randint(0, 10, (100,))
    model = StepScheduled(MLP((1, 28, 28), 10, 16), lr=1e-2)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[SeveralPerStep(size), *callbacks],
    )  # fmt: skip
    trainer.fit(model, datamodule=Batches(x, y, batch_size=10))
    return trainer, model


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_any_module_of_that_shape_gets_its_hooks_schedulers_and_logs_as_from_lightning():
    listening = [Listening(), Listening()]
    (lightning, plain_module), (chunked, chunked_module) = (
        fit_directly(size, [cb]) for size, cb in zip((1, 4), listening, strict=True)
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


class ByHand(LitClassifier):
    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_what_it_cannot_carry_is_refused_in_one_line():
    x, y = torch.rand(20, 1, 28, 28), torch.randint(0, 10, (20,))
    for model, trainer_args, data, why in (
        (ByHand(MLP((1, 28, 28), 10, 8)), {}, {}, "the module optimizes by hand"),
        (LitClassifier(MLP((1, 28, 28), 10, 8)), {"accumulate_grad_batches": 2}, {}, "gradients are accumulated"),
        (
            LitClassifier(MLP((1, 28, 28), 10, 8)),
            {},
            {"train_dataloaders": InMemoryBatches(x, y, 5)},
            "its training data comes neither",
        ),
    ):
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, callbacks=[SeveralPerStep(4)], **trainer_args)  # fmt: skip
        with pytest.raises(ValueError, match=f"4 minibatches per step: {why}.*use 1"):
            trainer.fit(model, **(data or {"datamodule": Batches(x, y, 5)}))
        assert model.training_step.__func__ is type(model).training_step  # left as it was
