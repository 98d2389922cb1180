"""What keeps Lightning's cost per training step near zero for a small network, without
changing the LightningModule: it stays as Lightning's docs write one.

A small network's step is a few hundred microseconds of arithmetic on a CPU, and Lightning's
loop around it (hooks, callbacks, logging, the automatic-optimization closure) can cost as
much again. :class:`SeveralPerStep` hands Lightning several minibatches per step and makes,
for each, the updates automatic optimization would make: the same updates in the same order
(tests/test_speed.py holds the curves to Lightning's own loop and to a plain PyTorch loop),
Lightning's cost paid once per several. ``python scripts/benchmark.py`` measures what is left
(docs/performance.md).
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
# With it set, torch.cuda.is_available() loads NVML through ctypes on every call, and PyTorch's
# optimizers call it on every step. tune's workers are forked from a server that never starts
# CUDA (machinery/study/fork_server.py), and no DataLoader here has workers.
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
    the learning-rate schedulers when Lightning would, and gathers what training_step logs as
    epoch means (``on_epoch=True, on_step=False``) on the device, to log them once at the
    epoch's end; any other log goes to Lightning as it is. Gradient clipping (the Trainer's
    ``gradient_clip_val``) is made between the backward pass and the optimizer's step, as
    automatic optimization makes it; callbacks that stop a run (EarlyStopping) stop it as
    ever. The module is as it was after fit.

    What it would not do as Lightning does (several optimizers, gradient accumulation,
    ReduceLROnPlateau, a module's own optimizer_step, clipping where hooks or a precision
    plugin wrap the step) it leaves to Lightning's own loop, and says so once, in one line.
    """

    def __init__(self, size: int):
        self.size = size
        self._undo: list = []
        self._means: dict[str, list] = {}  # name: [sum of value * batch size, batch sizes, log kwargs]

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.size == 1:
            return
        lean = _nobody_listens(trainer, module)
        why = _unsupported(trainer, module, lean)
        if why:
            _step_aside(why)
            return
        source = trainer.datamodule if trainer.datamodule is not None else module
        loader, training_step, log = source.train_dataloader, module.training_step, module.log
        clip = {"gradient_clip_val": trainer.gradient_clip_val,
                "gradient_clip_algorithm": trainer.gradient_clip_algorithm}  # fmt: skip
        schedulers = trainer.lr_scheduler_configs
        per_step = [c for c in schedulers if c.interval == "step"]
        per_epoch = [c for c in schedulers if c.interval == "epoch"]
        self._minibatch = None

        def chunked_loader():
            return Chunks(loader(), self.size)

        def step(chunk: list, batch_idx: int) -> None:
            optimizer = module.optimizers()
            for i, minibatch in enumerate(chunk):
                index = batch_idx * self.size + i  # the minibatch's index in the epoch, as Lightning counts
                self._minibatch = minibatch
                output = training_step(minibatch, index)
                loss = output["loss"] if isinstance(output, dict) else output
                if loss is not None:  # None: training_step skipped this one, as automatic optimization allows
                    optimizer.zero_grad()
                    if lean:
                        # What manual_backward and optimizer.step come to when no hook listens and
                        # nothing scales the loss, without Lightning's hook dispatch: the backward
                        # pass, the clipping automatic optimization would make, and the step
                        # counted as Lightning counts it (global_step).
                        loss.backward()
                        if clip["gradient_clip_val"]:
                            module.clip_gradients(optimizer, **clip)
                        optimizer._on_before_step()
                        optimizer.optimizer.step()
                        optimizer._on_after_step()
                    else:
                        module.manual_backward(loss)
                        optimizer.step()
                _step_schedulers(per_step, index)
            self._minibatch = None
            if batch_idx == trainer.num_training_batches - 1:  # the epoch's last: before validation
                _step_schedulers(per_epoch, trainer.current_epoch)

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

        self._undo = [
            _replace(module, "automatic_optimization", False, instance=False),
            _replace(source, "train_dataloader", chunked_loader),
            _replace(module, "training_step", step),
            _replace(module, "log", gathering_log),
        ]
        self._loop = trainer.fit_loop.epoch_loop

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self._undo:  # global_step goes on from the count of automatic optimization (a resumed fit's)
            vars(self._loop.manual_optimization.optim_step_progress.total).update(self._automatic_steps())

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        for name, (total, size, kwargs) in self._means.items():
            type(module).log(module, name, total / size, **kwargs)
        self._means.clear()

    def teardown(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _automatic_steps(self) -> dict:
        return vars(self._loop.automatic_optimization.optim_progress.optimizer.step.total)

    def _restore(self) -> None:
        if not self._undo:
            return
        while self._undo:
            self._undo.pop()()
        # trainer.global_step reads the count of whichever kind of optimization the module has
        # now: the steps made here are handed back to the automatic count.
        self._automatic_steps().update(vars(self._loop.manual_optimization.optim_step_progress.total))


def _replace(obj, name: str, value, instance: bool = True):
    """Set ``obj.name`` to ``value``; return what puts back what was there: an attribute of the
    instance's own, or (deleting ours) the class's."""
    own = vars(obj).get(name, _MISSING) if instance else getattr(obj, name)
    setattr(obj, name, value)
    if not instance:
        return lambda: setattr(obj, name, own)
    return lambda: delattr(obj, name) if own is _MISSING else setattr(obj, name, own)


_MISSING = object()


def _step_schedulers(configs, index: int) -> None:
    for config in configs:
        if (index + 1) % config.frequency == 0:
            config.scheduler.step()


# The hooks that Lightning calls around each backward pass and optimizer step.
_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
# The module's hooks that automatic optimization calls, which these steps would not.
_OPTIMIZATION_HOOKS = ("optimizer_step", "optimizer_zero_grad", "on_before_zero_grad", "configure_gradient_clipping",
                       "lr_scheduler_step")  # fmt: skip


def _nobody_listens(trainer: pl.Trainer, module: pl.LightningModule) -> bool:
    """Whether the backward pass and the optimizer step may skip Lightning's plumbing: one device,
    full precision, no backward of the module's own, and no callback or module hook around them."""
    if type(trainer.strategy) is not SingleDeviceStrategy or type(trainer.precision_plugin) is not Precision:
        return False
    if is_overridden("backward", module, pl.LightningModule):
        return False
    listeners = [(module, pl.LightningModule), *((callback, pl.Callback) for callback in trainer.callbacks)]
    return not any(is_overridden(hook, obj, parent) for obj, parent in listeners for hook in _STEP_HOOKS)


# The reasons this process has stepped aside for, each said once: a study's every trial would
# say it again.
_said: set[str] = set()


def _step_aside(why: str) -> None:
    if why not in _said:
        _said.add(why)
        print(
            f"speed: {why}, which several minibatches per step would not do as Lightning does: Lightning's own "
            "loop trains instead (an epoch of a small network takes about twice as long; docs/performance.md)",
            flush=True,
        )


def _unsupported(trainer: pl.Trainer, module: pl.LightningModule, lean: bool) -> str | None:
    if not module.automatic_optimization:
        return "the module optimizes by hand"
    if len(trainer.optimizers) != 1:
        return f"the module has {len(trainer.optimizers)} optimizers"
    if trainer.accumulate_grad_batches != 1:
        return "gradients are accumulated"
    if trainer.gradient_clip_val and not lean:
        return "gradients are clipped where hooks or a precision plugin wrap the optimizer's step"
    if any(config.reduce_on_plateau for config in trainer.lr_scheduler_configs):
        return "ReduceLROnPlateau steps on a metric"
    if overridden := [hook for hook in _OPTIMIZATION_HOOKS if is_overridden(hook, module, pl.LightningModule)]:
        return f"the module has its own {overridden[0]}"
    if any(is_overridden("on_before_zero_grad", callback, pl.Callback) for callback in trainer.callbacks):
        return "a callback listens to on_before_zero_grad"
    if trainer.datamodule is None and not is_overridden("train_dataloader", module, pl.LightningModule):
        return "its training data comes neither from a LightningDataModule nor from the module's train_dataloader"
    return None
