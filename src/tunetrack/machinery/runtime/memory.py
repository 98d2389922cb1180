"""How much memory training takes, against what the machine has: settings that cannot fit, or
more workers than fit, are refused before any work starts.

A process that trains (train.py, or one tune worker) holds Python with torch, Lightning and
MLflow, and its data set in memory: PROCESS_BYTES of its own (docs/performance.md says where
that allowance comes from and how to check it on a machine of yours). On top of that come the
network's parameters five times over (weights, gradients, an Adam-like optimizer's two moments,
the best epoch's copy) and every layer's output and gradient for the largest batch it runs.
The experiment's model is built on PyTorch's meta device to count them, so the estimate follows
the network as it is, whatever its layers.
"""

from __future__ import annotations

import dataclasses
import os
import typing

from optuna.distributions import CategoricalDistribution

PROCESS_BYTES = 900 * 2**20
FLOAT_BYTES = 4


def bytes_to_train(experiment, settings) -> int:
    """What a process that trains ``settings`` needs, all told."""
    import torch

    with torch.device("meta"):
        model, data = experiment.build(settings)
    parameters = sum(p.numel() for p in model.parameters())
    example = model.example_input_array
    batch = example.expand(data.largest_batch, *example.shape[1:])
    outputs: list[int] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, out: outputs.append(out.numel())) for m in leaves]
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    data_bytes = getattr(data, "in_memory_bytes", 0)  # beyond the process's own: a folder's decoded pictures
    return PROCESS_BYTES + data_bytes + FLOAT_BYTES * 5 * parameters + FLOAT_BYTES * 2 * sum(outputs)


def to_blame(experiment, settings, available: int) -> dataclasses.Field:
    """The whole-number setting whose smallest value alone would make ``settings`` fit: one the
    user changed from its default if there is one, else the first."""
    hints = typing.get_type_hints(type(settings))
    whole = [f for f in dataclasses.fields(settings) if int in (typing.get_args(hints[f.name]) or (hints[f.name],))]
    whole = [f for f in whole if "choices" not in f.metadata and f.metadata.get("compared", True)]
    candidates = [
        field
        for field in whole
        if _fits(experiment, dataclasses.replace(settings, **{field.name: _smallest(field)}), available)
    ]
    changed = [field for field in candidates if getattr(settings, field.name) != field.default]
    fields = changed or candidates or whole
    return fields[0]


def _fits(experiment, settings, available: int) -> bool:
    """Whether ``settings`` train within ``available`` bytes; settings that cannot be built (a
    size too small for the network) do not."""
    try:
        return bytes_to_train(experiment, settings) <= available
    except Exception:  # noqa: BLE001 - a network that refuses so small an input
        return False


def _smallest(field: dataclasses.Field) -> int:
    return field.metadata.get("minimum", 1)


def most_demanding(experiment, settings, fixed: tuple[str, ...] = ()):
    """``settings`` at the point of the search space that needs the most memory: every number at
    its highest, and each choice the one that needs most; ``fixed`` settings stay as they are."""
    space = {name: d for name, d in experiment.search_space(settings).items() if name not in fixed}
    point = dataclasses.replace(
        settings,
        **{name: d.choices[0] if isinstance(d, CategoricalDistribution) else d.high for name, d in space.items()},
    )
    for name, d in space.items():
        if isinstance(d, CategoricalDistribution):
            options = [dataclasses.replace(point, **{name: choice}) for choice in d.choices]
            point = max(options, key=lambda option: bytes_to_train(experiment, option))
    return point


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
