"""The experiment's pieces on their own: the networks, LitClassifier as Lightning runs it, and
build(), which puts them together from the settings."""

import dataclasses

import pytest
import pytorch_lightning as pl
import torch

from experiment.model import LitClassifier
from experiment.networks import CNN, MLP, NETWORKS, Standardize
from experiment.search import build
from experiment.settings import Settings
from machinery.batches import InMemoryBatches


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_network_maps_images_to_ten_scores_with_a_hidden_layer_of_hidden_dim(name):
    net = NETWORKS[name]((1, 28, 28), 10, hidden_dim=37)
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert linear[-2].out_features == 37 and linear[-1].in_features == 37 and linear[-1].out_features == 10


def test_the_mlp_is_the_students_and_the_cnn_lenets():
    mlp = MLP((1, 28, 28), 10, 32)
    assert [(m.in_features, m.out_features) for m in mlp if isinstance(m, torch.nn.Linear)] == [(784, 32), (32, 10)]
    convolutions = [m for m in CNN((1, 28, 28), 10, 120).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convolutions] == [(1, 6, (5, 5)), (6, 16, (5, 5))]


def test_build_puts_the_settings_together_and_draws_the_same_weights_from_the_same_seed():
    settings = Settings(model="cnn", hidden_dim=40, lr=3e-3, weight_decay=0.05, batch_size=32, val_size=200, seed=3)
    model, data = build(settings)
    assert isinstance(model, LitClassifier) and model.hparams == {"lr": 3e-3, "weight_decay": 0.05}
    standardize, cnn = model.net
    assert isinstance(standardize, Standardize) and isinstance(cnn, CNN)
    assert (standardize.mean, standardize.std) == (data.mean, data.std) == (0.1307, 0.3081)
    assert (data.batch_size, data.val_size, data.seed, data.data_dir) == (32, 200, 3, "data")
    assert model.example_input_array.shape == (1, 1, 28, 28)
    again, _ = build(settings)
    other, _ = build(dataclasses.replace(settings, seed=4))
    weights = [dict(m.state_dict()) for m in (model, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_the_network_takes_pixels_in_zero_to_one_and_standardizes_them_itself():
    torch.manual_seed(0)
    mlp = MLP((1, 28, 28), 10, 16)
    model = LitClassifier(torch.nn.Sequential(Standardize(0.1307, 0.3081), mlp))
    pixels = torch.rand(8, 1, 28, 28)
    assert torch.allclose(model(pixels), mlp((pixels - 0.1307) / 0.3081))


# Only the optimizer is under test here, so there is deliberately no validation data.
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_lightning_trains_it_as_its_docs_say_the_loss_falls_and_the_lr_decays():
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    model = LitClassifier(MLP((1, 28, 28), 10, 64), lr=1e-2)
    before = torch.nn.functional.cross_entropy(model(x), y).item()
    trainer = pl.Trainer(
        max_epochs=20, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=InMemoryBatches(x, y, batch_size=64))  # 20 epochs, two steps each
    assert trainer.global_step == 40
    assert torch.nn.functional.cross_entropy(model(x), y).item() < 0.5 * before
    assert trainer.optimizers[0].param_groups[0]["lr"] < 1e-2 * 1e-2  # cosine decay to ~0 at the end
    assert trainer.callback_metrics["train_loss"] > 0  # logged per epoch, from training_step
