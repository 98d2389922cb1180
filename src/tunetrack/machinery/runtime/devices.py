"""Which GPU each of tune.py's workers trains on, and how many workers the GPUs' memory holds.

Every worker sees one GPU only, its own ``CUDA_VISIBLE_DEVICES`` set before CUDA starts in it,
and Lightning's ``devices=1`` then trains on that one. Workers are dealt to the GPUs in turn: 4
workers over 2 GPUs train on 0, 1, 0 and 1. Where the user's ``CUDA_VISIBLE_DEVICES`` already
names GPUs ("2,3"), the workers are dealt those. The GPUs are asked about in tune.py's process
only, never in the server the workers are forked from: a fork of a process that started CUDA
cannot use CUDA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tunetrack.machinery.runtime.memory import gigabytes

# The accelerators that train on a CUDA GPU where there is one.
GPU_ACCELERATORS = ("auto", "gpu", "cuda")
GPU_PARAM = "gpu"


@dataclass(frozen=True)
class Gpu:
    """A GPU this process sees: its place among them (torch's ``cuda:index``), name and memory."""

    index: int
    name: str
    total_memory: int  # bytes


@dataclass(frozen=True)
class Assigned:
    """One worker's GPU: its ``id`` as ``CUDA_VISIBLE_DEVICES`` names it (a number, or a UUID)."""

    id: str
    name: str

    def __str__(self) -> str:
        return f"{self.id} ({self.name})"


_this_process: Assigned | None = None  # the GPU this process's trials train on, where it was given one


def visible_gpus() -> list[Gpu]:
    """The CUDA GPUs this process sees; none without CUDA. It starts CUDA here."""
    import torch

    if not torch.cuda.is_available():
        return []
    properties = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return [Gpu(i, p.name, p.total_memory) for i, p in enumerate(properties)]


def training_gpus(accelerator: str) -> list[Gpu]:
    """The GPUs that workers training with ``accelerator`` share: none on the CPU or Apple's MPS."""
    return visible_gpus() if accelerator in GPU_ACCELERATORS else []


def assign(workers: int, gpus: Sequence[Gpu]) -> list[Assigned | None]:
    """Each worker's GPU, dealt in turn (None for every worker where there is no GPU)."""
    if not gpus:
        return [None] * workers
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    # CUDA numbers the GPUs it shows from 0, in the order the variable lists them: a worker's own
    # variable must name its GPU as the user's does, not by that number.
    ids = [part.strip() for part in named.split(",")] if named else [str(gpu.index) for gpu in gpus]
    return [Assigned(ids[gpu.index], gpu.name) for gpu in (gpus[i % len(gpus)] for i in range(workers))]


def workers_that_fit(gpus: Sequence[Gpu], each: int) -> int:
    """How many workers of ``each`` bytes the GPUs hold, dealt in turn: the GPU in place ``j`` of
    ``n`` takes workers j, j + n, j + 2n, ..., so it holds its share while there are at most
    ``n * share + j`` workers."""
    return min(len(gpus) * (gpu.total_memory // each) + j for j, gpu in enumerate(gpus))


def too_many(gpus: Sequence[Gpu], workers: int, each: int) -> str:
    """Why ``workers`` workers of ``each`` bytes do not fit on ``gpus``, naming the first GPU that
    would hold too many, and its memory."""
    names = assign(len(gpus), gpus)
    for j, gpu in enumerate(gpus):
        count = len(range(j, max(workers, 1), len(gpus)))
        if count * each > gpu.total_memory:
            break
    has = f"the GPU has {gigabytes(gpu.total_memory)}"
    if (fit := workers_that_fit(gpus, each)) < 1:
        return f"not even one worker fits on GPU {names[j]}: it needs about {gigabytes(each)} and {has}"
    return (
        f"{workers} workers put {count} on GPU {names[j]}, which need about {gigabytes(count * each)} "
        f"({gigabytes(each)} each); {has}: use --workers {fit} or fewer"
    )


def see_only(gpu: Assigned | None) -> None:
    """In a worker, before anything starts CUDA there: ``gpu`` is the only GPU it sees, and the
    one its trials say they trained on. Nothing changes without one."""
    global _this_process
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu.id
    _this_process = gpu


@contextlib.contextmanager
def trained_on(gpu: Assigned | None) -> Iterator[None]:
    """The one worker that runs in tune.py's own process: its trials say they trained on ``gpu``.
    CUDA started there when the GPUs were asked about, so the variable is left as it is: ``gpu``
    is the first GPU this process sees, the one ``devices=1`` trains on."""
    global _this_process
    _this_process = gpu
    try:
        yield
    finally:
        _this_process = None


def this_process_id() -> str:
    """The id of the GPU this process's trials train on; "" where it was given none."""
    return _this_process.id if _this_process else ""


def params() -> dict[str, str]:
    """The run's parameter that says which GPU trained it: none where this process was given none."""
    return {GPU_PARAM: str(_this_process)} if _this_process else {}
