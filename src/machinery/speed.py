"""What keeps Lightning's cost per training step near zero for a network this small, without
changing the LightningModule: it stays as Lightning's docs write one.

A 784-hidden-10 step is a few hundred microseconds of arithmetic on a CPU, and Lightning's loop
around it (hooks, callbacks, logging, the automatic-optimization closure) costs as much again:
1.77 times a plain PyTorch loop's epoch at batch 32. :class:`SeveralPerStep` hands Lightning
several minibatches per step and makes, for each, the updates automatic optimization would
make: the same updates in the same order (tests/test_speed.py holds the curves to Lightning's
own loop and to a plain PyTorch loop), Lightning's cost paid once per several.
``python scripts/benchmark.py`` measures what is left (docs/performance.md).

Elsewhere, each where it belongs: the data set lives in memory on the training device and a
batch is one indexing operation, which the data module hands over without Lightning's generic
transfer (experiment/data.py); the best epoch's weights are copied in memory instead of a
ModelCheckpoint file (training.py); AdamW is fused (experiment/model.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

import pytorch_lightning as pl
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.profilers import PassThroughProfiler
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.utilities.data import extract_batch_size
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor

T = TypeVar("T")

# lightning_fabric sets this on import so that DataLoader workers may fork before CUDA starts.
# With it set, torch.cuda.is_available() loads NVML through ctypes on every call, and AdamW
# calls it on every step (0.15 ms a step). Nothing here forks after CUDA starts (no loader
# workers; tune's workers are spawned).
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)


class NoProfiler(PassThroughProfiler):
    """Lightning wraps each of the ~40 hook calls of a step in ``profiler.profile(name)``, and
    the default pass-through profiler builds a generator-based context manager every time."""

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return contextlib.nullcontext()


class Chunks:
    """A loader's minibatches, ``size`` at a time, as lists."""

    def __init__(self, minibatches: Iterable[T], size: int):
        self.minibatches, self.size = minibatches, size

    def __len__(self) -> int:
        return -(-len(self.minibatches) // self.size)

    def __iter__(self) -> Iterator[list[T]]:
        chunk = []
        for minibatch in self.minibatches:
            chunk.append(minibatch)
            if len(chunk) == self.size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


class SeveralPerStep(pl.Callback):
    """Runs any LightningModule whose ``training_step(batch, batch_idx)`` returns the loss with
    ``size`` minibatches per Lightning step, each its own optimizer step: the training loader
    is read ``size`` minibatches at a time, and for each the adapter makes the calls that
    automatic optimization makes (the step, zero_grad, backward, the optimizer's step), steps
    the learning-rate schedulers as their configuration says, and gathers what training_step
    logs as epoch means (``on_epoch=True, on_step=False``) on the device, to log them once at
    the epoch's end; any other log goes to Lightning as it is. The module is as it was after
    fit. One optimizer, no gradient accumulation or clipping, no ReduceLROnPlateau: for those,
    ``size`` 1 leaves Lightning's own loop in place.
    """

    def __init__(self, size: int):
        self.size = size
        self._undo: list = []

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.size == 1:
            return
        why = _unsupported(trainer, module)
        if why:
            raise ValueError(f"{self.size} minibatches per step: {why}; use 1 (Lightning's own loop)")
        source = trainer.datamodule if trainer.datamodule is not None else module
        loader, training_step, log = source.train_dataloader, module.training_step, module.log
        lean = _nobody_listens(trainer, module)
        schedulers = trainer.lr_scheduler_configs
        self._per_step = [c for c in schedulers if c.interval == "step"]
        self._per_epoch = [c for c in schedulers if c.interval == "epoch"]
        self._means: dict[str, list] = {}  # name: [sum of value * batch size, batch sizes, log kwargs]
        self._minibatch, self._updates = None, 0

        def chunked_loader():
            return Chunks(loader(), self.size)

        def step(chunk: list, batch_idx: int) -> None:
            optimizer = module.optimizers()
            for i, minibatch in enumerate(chunk):
                self._minibatch = minibatch
                output = training_step(minibatch, batch_idx * self.size + i)
                loss = output["loss"] if isinstance(output, dict) else output
                if loss is None:  # training_step skipped this one, as automatic optimization allows
                    continue
                optimizer.zero_grad()
                if lean:
                    # What manual_backward and optimizer.step come to when no hook is listening
                    # and nothing scales the loss, without the ~50 µs of hook dispatch: the
                    # backward pass, and the step counted as Lightning counts it (global_step).
                    loss.backward()
                    optimizer._on_before_step()
                    optimizer.optimizer.step()
                    optimizer._on_after_step()
                else:
                    module.manual_backward(loss)
                    optimizer.step()
                self._updates += 1
                for config in self._per_step:
                    if self._updates % config.frequency == 0:
                        config.scheduler.step()
            self._minibatch = None

        def gathering_log(name: str, value, *args, **kwargs) -> None:
            plain = not args and kwargs.get("on_epoch") is True and kwargs.get("on_step") is False
            plain = plain and isinstance(value, Tensor) and not kwargs.get("sync_dist", False)
            plain = plain and kwargs.get("reduce_fx", "mean") == "mean" and self._minibatch is not None
            if not plain:
                if self._minibatch is not None and "batch_size" not in kwargs:
                    kwargs["batch_size"] = extract_batch_size(self._minibatch)  # this one, not the chunk
                return log(name, value, *args, **kwargs)
            size = kwargs.get("batch_size") or extract_batch_size(self._minibatch)
            if name not in self._means:
                self._means[name] = [value.new_zeros(()), 0, {k: v for k, v in kwargs.items() if k != "batch_size"}]
            sums = self._means[name]
            sums[0].add_(value.detach(), alpha=size)
            sums[1] += size

        automatic = module.automatic_optimization
        module.automatic_optimization = False
        source.train_dataloader = chunked_loader
        module.training_step, module.log = step, gathering_log
        loop = trainer.fit_loop.epoch_loop
        self._undo = [
            lambda: setattr(module, "automatic_optimization", automatic),
            # trainer.global_step reads the count of whichever kind of optimization the module has
            # now: the steps made here are handed to the automatic count.
            lambda: vars(loop.automatic_optimization.optim_progress.optimizer.step.total).update(
                vars(loop.manual_optimization.optim_step_progress.total)
            ),
            lambda: delattr(source, "train_dataloader"),
            lambda: delattr(module, "training_step"),
            lambda: delattr(module, "log"),
        ]

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not self._undo:
            return
        for name, (total, size, kwargs) in self._means.items():
            type(module).log(module, name, total / size, **kwargs)
        self._means.clear()
        for config in self._per_epoch:
            if (trainer.current_epoch + 1) % config.frequency == 0:
                config.scheduler.step()

    def teardown(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()


# The hooks that Lightning calls around each backward pass and optimizer step.
_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def _nobody_listens(trainer: pl.Trainer, module: pl.LightningModule) -> bool:
    """Whether the backward pass and the optimizer step may skip Lightning's plumbing: one device,
    full precision, no backward of the module's own, and no callback or module hook around them."""
    if type(trainer.strategy) is not SingleDeviceStrategy or type(trainer.precision_plugin) is not Precision:
        return False
    if is_overridden("backward", module, pl.LightningModule):
        return False
    listeners = [(module, pl.LightningModule), *((callback, pl.Callback) for callback in trainer.callbacks)]
    return not any(is_overridden(hook, obj, parent) for obj, parent in listeners for hook in _STEP_HOOKS)


def _unsupported(trainer: pl.Trainer, module: pl.LightningModule) -> str | None:
    if not module.automatic_optimization:
        return "the module optimizes by hand"
    if len(trainer.optimizers) != 1:
        return f"the module has {len(trainer.optimizers)} optimizers"
    if trainer.accumulate_grad_batches != 1 or trainer.gradient_clip_val:
        return "gradients are accumulated or clipped"
    if any(config.reduce_on_plateau for config in trainer.lr_scheduler_configs):
        return "ReduceLROnPlateau steps on a metric"
    if trainer.datamodule is None and not is_overridden("train_dataloader", module, pl.LightningModule):
        return "its training data comes neither from a LightningDataModule nor from the module's train_dataloader"
    return None
