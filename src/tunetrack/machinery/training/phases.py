"""Where a fit's time goes: training, validation, and writing to the tracking store, measured as
it runs, each second counted once (writing during an epoch is tracking, not training), and the
rest (the data and the Trainer made ready, the best epoch's weights measured and kept) as
set-up. A TrackedRun's Trainer logs them to its run as ``time_<phase>_s`` however it ends, a pruned trial's
included, and a study adds its trials' up in its parent run (study/time_split.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from pytorch_lightning.callbacks import Callback

PHASES = ("set_up", "training", "validation", "tracking")


class Phases(Callback):
    """A clock per phase; the one running is the phase the fit is in."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._phase, self._since = "set_up", time.perf_counter()
        self._after_validation = "set_up"  # the phase a validation interrupts: an epoch's training, or none

    def switch(self, phase: str) -> str:
        """Count the time since the last switch to the phase it was in; return that phase."""
        now = time.perf_counter()
        self.seconds[self._phase] += now - self._since
        before, self._phase, self._since = self._phase, phase, now
        return before

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        before = self.switch("tracking")
        try:
            yield
        finally:
            self.switch(before)

    def metrics(self) -> dict[str, float]:
        self.switch(self._phase)  # up to now
        return {f"time_{phase}_s": round(seconds, 3) for phase, seconds in self.seconds.items()}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.switch("training")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._after_validation = self.switch("validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        self.switch(self._after_validation)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.switch("set_up")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.switch("set_up")  # a pruned trial's last epoch ends here
