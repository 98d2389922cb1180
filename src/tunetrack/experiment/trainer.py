"""What the Trainer does around the model: its callbacks and arguments, yours to change.

``trainer(settings)`` returns keyword arguments of ``pytorch_lightning.Trainer``: callbacks
(Lightning's own, such as EarlyStopping or LearningRateMonitor, or yours), gradient clipping,
precision, gradient accumulation. Every run of train.py and every trial of tune.py trains with
them. The machinery adds its own beside yours and sets what it owns: the accelerator and
device, the epochs (--max-epochs), MLflow's logger, the best epoch's weights, a study's
pruning, and several minibatches per Lightning step (machinery/training/several_per_step.py), which does what
clipping and early stopping need, and steps aside, in one printed line, for what it cannot do
as Lightning does (accumulation, mixed precision with clipping, ...).
"""

from __future__ import annotations

from pytorch_lightning.callbacks import EarlyStopping

from tunetrack.experiment.settings import Settings


def trainer(settings: Settings) -> dict:
    callbacks = []
    if settings.patience:  # a run that stops early says so, with its epochs and its best one
        callbacks.append(EarlyStopping(monitor="val_loss", patience=settings.patience))
    return {"callbacks": callbacks, "gradient_clip_val": settings.gradient_clip}
