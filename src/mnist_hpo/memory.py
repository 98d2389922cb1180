"""How much memory training takes, against what the machine has: a size that cannot fit, or
more workers than fit, is refused before any work starts.

A process that trains (train.py, or one tune worker) holds Python with torch, Lightning and
MLflow, and MNIST in memory: about 0.9 GB of its own, measured as the private resident memory
of a worker on an x86_64 machine (torch 2.14 on the CPU). On top of that come the network's
parameters five times over (weights, gradients, AdamW's two moments, the best epoch's copy)
and every layer's output and gradient for the largest batch it runs (training's, or
evaluation's 1,000 images). The network is built on PyTorch's meta device to count them, so
the estimate follows the model as it is, whatever its layers.
"""

from __future__ import annotations

import os

from mnist_hpo.config import TrainConfig

PROCESS_BYTES = 900 * 2**20
FLOAT_BYTES = 4
IMAGES_IN_THE_TRAINING_FILE = 60_000


def bytes_to_train(config: TrainConfig) -> tuple[int, int]:
    """(parameter bytes, activation bytes) of training ``config``, beyond a process's own."""
    import torch

    from mnist_hpo.data import EVAL_BATCH_SIZE
    from mnist_hpo.model import LitClassifier

    with torch.device("meta"):
        model = LitClassifier.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    batch = max(min(config.batch_size, IMAGES_IN_THE_TRAINING_FILE - config.val_size), EVAL_BATCH_SIZE)
    outputs: list[int] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, out: outputs.append(out.numel())) for m in leaves]
    model(torch.empty(batch, 1, 28, 28, device="meta"))
    for hook in hooks:
        hook.remove()
    return FLOAT_BYTES * 5 * parameters, FLOAT_BYTES * 2 * sum(outputs)


def available_bytes() -> int | None:
    """Memory the machine can still give (Linux's MemAvailable); None where it cannot say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gigabytes(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n < 2**40 else f"{n / 2**40:.1f} TB"
