"""A trial cut short goes on where it stopped: each epoch's end is kept among its MLflow run's
artifacts, where every machine of the study can read it, and a trial taken up again trains from
there to the same end as if nothing had happened.

What is kept is Lightning's whole checkpoint (weights, optimizer, schedules, loops, the callbacks'
and the data module's states) and the random number generators', so that the batches' order and
every random draw of the network's follow on as they would have. Each epoch is written to one of
two files in turn and only then named on the trial, so the one named is always whole.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from tunetrack.machinery.runtime import interrupts
from tunetrack.machinery.tracking.mlflow_runs import Tracker

# Where a run keeps its last epoch's state, among its artifacts: two files, written in turn.
KEPT_FOLDER = PurePosixPath("kept")
SLOTS = ("a.ckpt", "b.ckpt")


class KeptStateUnusable(RuntimeError):
    """A trial's kept state cannot be gone on from: it does not load, or does not fit the network
    as it is now (a layer changed between runs). The trial starts again from its first epoch."""


def check_kept(model: pl.LightningModule, path: str) -> None:
    """Raise KeptStateUnusable unless the checkpoint at ``path`` loads into ``model`` (whose
    weights it then holds, as Lightning's restore would make them)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]  # written by KeepEachEpoch
    except Exception as error:  # noqa: BLE001 - truncated, garbled, not a checkpoint
        raise KeptStateUnusable(f"its kept state cannot be read ({_first_line(error)})") from None
    try:
        model.load_state_dict(state)
    except Exception as error:  # noqa: BLE001 - missing or unexpected keys, other shapes
        raise KeptStateUnusable(f"its kept state does not fit the network ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0].rstrip(':')}" if text else type(error).__name__


class KeepEachEpoch(Callback):
    """Saves the training's state at the end of every epoch, and publishes it once the epoch's
    curves are in MLflow: uploaded to the run, then named by ``kept(epoch, artifact)``, after
    ``check()`` (which raises if the trial is no longer this process's). The upload and the
    naming are never cut in half by a request to stop (interrupts.held). ``after`` is the
    artifact that a trial taken up again went on from: the next epoch goes to the other file."""

    def __init__(
        self,
        tracker: Tracker,
        run_id: str,
        kept: Callable[[int, str], None],
        check: Callable[[], None],
        after: str | None = None,
    ):
        self.tracker, self.run_id, self.kept, self.check = tracker, run_id, kept, check
        self.slot = SLOTS[1] if after and after.endswith(SLOTS[0]) else SLOTS[0]  # never the one named now
        self._folder = tempfile.TemporaryDirectory(prefix="kept-")
        self._pending: tuple[int, Path] | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = Path(self._folder.name) / self.slot
        trainer.save_checkpoint(path, weights_only=False)  # the optimizer, loops and callbacks too
        self._pending = trainer.current_epoch, path

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(trainer)  # the last epoch's metrics are all logged by now

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):  # a stop between an epoch's end and the next one's start
            self._publish(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._folder.cleanup()

    def state_dict(self) -> dict:
        """The random number generators, as the epoch ends: taken with the rest of the checkpoint."""
        numpy = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "python": random.getstate(),
            "numpy": [numpy[0], torch.from_numpy(numpy[1].astype(np.int64)), *numpy[2:]],
        }

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))

    def _publish(self, trainer: pl.Trainer) -> None:
        if self._pending is None:
            return
        epoch, path = self._pending
        self._pending = None
        with interrupts.held():
            self.check()
            for logger in trainer.loggers:
                logger.save()  # the curves up to this epoch first: a trial taken up again logs from the next
            self.tracker.log_artifact(self.run_id, path, str(KEPT_FOLDER))
            self.kept(epoch, str(KEPT_FOLDER / self.slot))
        self.slot = SLOTS[1] if self.slot == SLOTS[0] else SLOTS[0]
