"""LitClassifier on its own."""

import pytest
import pytorch_lightning as pl
import torch

from mnist_hpo.data import InMemoryBatches, normalize
from mnist_hpo.model import LitClassifier, pixel_classifier
from mnist_hpo.speed import Chunks


def test_output_shape_and_architecture():
    model = LitClassifier(lr=1e-3, hidden_dim=32)
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(784, 32), (32, 10)]
    assert model.hparams == {"lr": 1e-3, "hidden_dim": 32, "weight_decay": 1e-2}


def test_the_pixel_classifier_gives_the_trained_networks_scores_from_raw_pixels():
    torch.manual_seed(0)
    model = LitClassifier(hidden_dim=16)
    pixels = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    classifier = pixel_classifier(model)
    assert torch.allclose(classifier(pixels.float().unsqueeze(1) / 255), model(normalize(pixels)), atol=1e-5)
    model.model[1].weight.data.zero_()  # a copy: later training does not change it
    assert not torch.allclose(classifier(pixels.float().unsqueeze(1) / 255), model(normalize(pixels)))


# Only the optimizer is under test here, so there is deliberately no validation data.
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_a_few_optimizer_steps_reduce_the_loss_and_the_lr_decays():
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    model = LitClassifier(lr=1e-2, hidden_dim=64)
    before = model.loss_fn(model(x), y).item()
    trainer = pl.Trainer(
        max_epochs=20, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=Chunks(InMemoryBatches(x, y, batch_size=128)))  # 20 epochs, a step each
    assert trainer.global_step == 20
    assert model.loss_fn(model(x), y).item() < 0.5 * before
    assert trainer.optimizers[0].param_groups[0]["lr"] < 1e-2 * 1e-3  # cosine decay to ~0 at the end
