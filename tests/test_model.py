"""LitClassifier on its own."""

import torch

from mnist_hpo.model import LitClassifier


def test_output_shape_and_architecture():
    model = LitClassifier(lr=1e-3, hidden_dim=32)
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(784, 32), (32, 10)]
    assert model.hparams == {"lr": 1e-3, "hidden_dim": 32}


def test_a_few_optimizer_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = LitClassifier(lr=1e-2, hidden_dim=64)
    optimizer = model.configure_optimizers()
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    losses = []
    for _ in range(20):
        loss = model.loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
