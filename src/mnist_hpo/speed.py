"""The measured speed-ups: what keeps Lightning's cost per training step near zero for a model
this small, gathered here so that the model and the training function read as plain Lightning.

A 784-hidden-10 step is a few hundred microseconds of arithmetic on a CPU; Lightning's loop
around it (hooks, callbacks, profiler, logging) costs as much again. cProfile found each cost
below; the figures are per training step at batch 64 on 2 CPU cores, before the fix (README,
Performance, and ``python -m cProfile -s tottime scripts/benchmark.py --batch-sizes 64
--skip-study`` shows what is left):

=================================================  ========  ==============================
what it costs without the fix                       per step  the fix
=================================================  ========  ==============================
Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK, so    0.15 ms   unset here, at import
AdamW's every step loads NVML through ctypes
``nn.Module.__setattr__`` on the ~40 hook calls     0.3 ms    :class:`LeanLightningModule`
of a step (``_current_fx_name``)
``training_step``'s signature inspected every step  0.06 ms   :class:`LeanLightningModule`
the pass-through profiler's generator around        0.1 ms    :class:`NoProfiler`
every hook
=================================================  ========  ==============================

The largest remaining cost was Lightning's loop itself, about 0.3 ms a step: 1.77 times a
plain PyTorch loop's epoch at batch 32. :class:`Chunks` hands Lightning 16 minibatches per
step, and ``LitClassifier.training_step`` makes an AdamW update for each: the same updates in
the same order, a sixteenth of Lightning's cost. Measured in one benchmark run on 2 cores,
the project's epoch went from 1.77, 1.33 and 1.38 times the plain loop's at batch 32, 64 and
256 to 1.14, 1.17 and 1.18 (README, Performance).

Elsewhere, each where it belongs: the data set lives in memory on the training device and a
batch is one indexing operation (``data.py``; the write-up's per-image transforms were most of
an epoch); Lightning's generic batch transfer is skipped for batches already there (0.09 ms,
``MNISTDataModule.transfer_batch_to_device``); the best epoch's weights are copied in memory
instead of a ModelCheckpoint file (0.1 ms, ``training._BestEpoch``); the three calls of
automatic optimization are made by hand (0.07 ms) and the loss is summed on the device and
logged once per epoch (0.1 ms) (``LitClassifier.training_step``); AdamW is fused.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

import pytorch_lightning as pl
from pytorch_lightning.profilers import PassThroughProfiler

T = TypeVar("T")

# Minibatches per Lightning training step: Lightning's ~0.3 ms a step is then paid once per 16
# optimizer steps. An epoch's batches, their order and each AdamW update stay as they were.
MINIBATCHES_PER_STEP = 16

# lightning_fabric sets this on import so that DataLoader workers may fork before CUDA starts.
# With it set, torch.cuda.is_available() loads NVML through ctypes on every call, and AdamW
# calls it on every step. Nothing here forks after CUDA starts (no loader workers; tune's
# workers are spawned).
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)


class LeanLightningModule(pl.LightningModule):
    """A LightningModule without two costs Lightning pays on every training step."""

    def __setattr__(self, name: str, value) -> None:
        # Lightning records the running hook in _current_fx_name around every hook call;
        # nn.Module.__setattr__'s parameter and buffer checks are for tensors and modules, and
        # a string needs none of them.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # Lightning reads training_step's signature on every step, to see whether it takes
        # batch_idx; stored on the function, that is a lookup instead of an inspection.
        if "training_step" in vars(cls):
            cls.training_step.__signature__ = inspect.signature(cls.training_step)


class NoProfiler(PassThroughProfiler):
    """Lightning wraps each of the ~40 hook calls of a step in ``profiler.profile(name)``, and
    the default pass-through profiler builds a generator-based context manager every time."""

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return contextlib.nullcontext()


class Chunks:
    """A training loader's minibatches handed to Lightning ``size`` at a time, as lists: one
    Lightning step (and its hooks, callbacks and loop bookkeeping) for several optimizer steps,
    which the LightningModule's ``training_step`` makes one minibatch after another."""

    def __init__(self, minibatches: Iterable[T], size: int = MINIBATCHES_PER_STEP):
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
