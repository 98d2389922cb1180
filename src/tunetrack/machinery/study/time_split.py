"""Where a study's time went: its process's start-up (imports, checks, the data, the stores),
the trials (their wall time on the workers, split into training, validation, tracking and set-up
from each trial run's own ``time_<phase>_s``, training.phases, and the time workers had no
trial), then the repeats, the parent run's summary (its plots and CSV), the baseline, the test
evaluation with the model's logging, the registration, and the rest (the console's summary,
closing the runs). Logged to the study's parent run as
``time_<part>_s``, with the machine's system metrics over the whole session, and printed in one
line at the end (scripts/benchmark.py prints it too).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

from tunetrack.machinery.tracking.mlflow_runs import Tracker
from tunetrack.machinery.tracking.system_metrics import Sampler

SESSION_TAG = "tunetrack.session"  # on every trial run: which tune.py session ran it
TRIAL_PHASES = ("training", "validation", "tracking", "set_up")
AFTER = {"repeats": "repeats", "summary": "summary, plots and CSV", "baseline": "baseline", "test": "test and model",
         "registration": "registration"}  # fmt: skip


class StudyClock:
    """The clocks of one tune.py session; ``session`` names its trial runs (SESSION_TAG)."""

    def __init__(self, began: float | None = None):
        self.began = time.time() if began is None else began  # tune.py's: its process's start
        self.session = uuid.uuid4().hex
        self.seconds: dict[str, float] = {}
        self.system = Sampler()

    @contextlib.contextmanager
    def timing(self, part: str) -> Iterator[None]:
        if not self.seconds:  # the first part timed ends the start-up
            self.seconds["start_up"] = time.time() - self.began
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - started

    def split(self, tracker: Tracker, workers: int) -> dict[str, float]:
        """Every part's seconds; the trials' from the runs this session's workers wrote."""
        split = dict(self.seconds)
        runs = [run for run in tracker.runs_tagged(SESSION_TAG, self.session) if run.info.end_time]
        if "trials" in split:
            ran = sum((run.info.end_time - run.info.start_time) / 1000 for run in runs)
            fits = {phase: sum(run.data.metrics.get(f"time_{phase}_s", 0.0) for run in runs) for phase in TRIAL_PHASES}
            # What a trial did outside its fit (building its model and data, its run) is set-up too.
            fits["set_up"] += max(0.0, ran - sum(fits.values()))
            split |= {f"trials_{phase}": seconds for phase, seconds in fits.items()}
            split["trials_idle"] = max(0.0, workers * split["trials"] - ran)  # workers waiting, starting, ending
        split["study"] = time.time() - self.began
        split["other"] = max(0.0, split["study"] - sum(split.get(part, 0.0) for part in ("start_up", "trials", *AFTER)))
        return split

    def log(self, tracker: Tracker, parent_run_id: str, split: dict[str, float]) -> None:
        metrics = {f"time_{part}_s": round(seconds, 3) for part, seconds in split.items()}
        tracker.log_metrics(parent_run_id, {**metrics, **self.system.sample()})


def line(split: dict[str, float], workers: int) -> str:
    """The split, said: ``time: start-up 9.8 s; trials 198.0 s on 2 workers (...); ...``."""
    parts = [f"start-up {split.get('start_up', 0.0):.1f} s"]
    if "trials" in split:
        inside = ", ".join(f"{phase.replace('_', '-')} {split[f'trials_{phase}']:.1f} s" for phase in TRIAL_PHASES)
        parts.append(f"trials {split['trials']:.1f} s on {workers} worker(s) ({inside}, idle "
                     f"{split['trials_idle']:.1f} s)")  # fmt: skip
    parts += [f"{said} {split[part]:.1f} s" for part, said in AFTER.items() if part in split]
    parts.append(f"the rest {split['other']:.1f} s")
    return f"time: {'; '.join(parts)}; in all {split['study']:.1f} s (the parent run's time_*_s)"
