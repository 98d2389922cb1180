"""Whether a network takes its data's inputs, found before anything trains: the model is built
on PyTorch's meta device, where layers have shapes and no values, and an example batch goes
through it in milliseconds. A network that refuses is named with the layer that refused; where
the data's inputs have a size setting, the smallest size that goes through is found the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from dataclasses import dataclass

# The sides tried when looking for the smallest input a network takes.
LARGEST_SIDE = 4096


@dataclass(frozen=True)
class Refusal:
    error: BaseException
    shape: tuple[int, ...]  # one input's
    network: str  # the innermost module of the user's own, with its file and line
    layer: str  # the innermost module that refused
    raised: str = ""  # the line of the network's own code that raised, where one did

    def __str__(self) -> str:
        text = str(self.error).strip()
        said = f"{type(self.error).__name__}: {text.splitlines()[0]}" if text else type(self.error).__name__
        shape = "x".join(map(str, self.shape))
        at = f" at {self.layer}" if self.layer else ""
        raised = f" ({self.raised})" if self.raised else ""
        return f"the network {self.network} cannot take inputs of {shape}{at}{raised}: {said}"


def refusal(experiment, settings) -> tuple[Refusal | None, object]:
    """Build ``settings``' model and data on the meta device and run two example inputs through
    it: why it refused (None where it did not), and the data module. An error of building them is
    raised as it is."""
    import torch

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # a layer of no size warns that it holds nothing: its error says more
        model, data = experiment.build(settings)
        example = model.example_input_array
        entered: list[tuple[str, torch.nn.Module]] = []  # the modules whose forward runs now, outermost first
        names = {module: name for name, module in model.named_modules()}

        def enter(module, args) -> None:
            entered.append((names[module], module))

        def leave(module, args, output) -> None:  # a hook that returned a value would replace the output
            entered.pop()

        hooks = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
        try:
            with torch.no_grad():
                model(example.expand(2, *example.shape[1:]))
            return None, data
        except Exception as error:  # noqa: BLE001 - whatever a layer raises of a shape it cannot take
            network, layer = _where(entered, model)
            return Refusal(error, tuple(example.shape[1:]), network, layer, _raised_in(error, network)), data
        finally:
            for hook in hooks:
                hook.remove()


def smallest_size(experiment, settings, setting: str) -> int | None:
    """The smallest square side that ``setting`` can give the inputs for the network to take them:
    doubling from the side now until one goes through, then halving the gap; None if no side up
    to LARGEST_SIDE does."""

    def takes(side: int) -> bool:
        return refusal(experiment, dataclasses.replace(settings, **{setting: side}))[0] is None

    low, high = 0, max(1, getattr(settings, setting) or 1)
    while not takes(high):
        low, high = high, high * 2
        if high > LARGEST_SIDE:
            return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if takes(middle) else (middle, high)
    return high


def _where(entered, model) -> tuple[str, str]:
    """The innermost module entered that is not PyTorch's or Lightning's own (the user's network),
    named with its file and line; and the innermost one, the layer that refused, named as the
    network names it."""
    own = [(n, m) for n, m in entered if not type(m).__module__.startswith(("torch.", "pytorch_lightning."))]
    name, network = own[-1] if own else ("", model)
    kind = type(network)
    try:
        where = f"{kind.__name__} ({os.path.relpath(inspect.getsourcefile(kind))}:{inspect.getsourcelines(kind)[1]})"
    except (OSError, TypeError):
        where = kind.__name__
    if not entered or entered[-1][1] is network:
        return where, ""
    layer, module = entered[-1]
    layer = layer.removeprefix(f"{name}.") if name else layer
    return where, f"its layer {layer} ({repr(module).splitlines()[0]})"


def _raised_in(error: BaseException, network: str) -> str:
    """``file:line`` of the innermost frame of ``error`` in the network's own file (its forward,
    say), or "" where none is (a layer of PyTorch's raised, in a network made of them)."""
    import traceback

    file = network.partition(" (")[2].rpartition(":")[0]
    frames = [f for f in traceback.extract_tb(error.__traceback__) if file and os.path.relpath(f.filename) == file]
    return f"raised at {file}:{frames[-1].lineno}" if frames else ""
