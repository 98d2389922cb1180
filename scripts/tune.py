"""Tune the experiment with Optuna, every trial tracked in MLflow.

Searches the space of src/tunetrack/experiment/search.py and of the network (batch size, learning rate
and the MLP's hidden dim by default; TPE sampler, median pruning) with N worker processes; each
trial runs the experiment's objective, which trains as scripts/train.py does and logs its
curves to an MLflow run nested under the study's parent run. The study is kept in optuna.db:
the same command again continues it. At the end, the best trial's weights are tested once,
logged as an MLflow model and registered as TASK-classifier (mnist-classifier by default),
whose alias @champion is always the best so far (scripts/predict.py uses it). Then `mlflow
ui`, in this folder, shows it all.

    python scripts/tune.py --n-trials 50
    python scripts/tune.py --model cnn --n-trials 20 --max-epochs 5
    python scripts/tune.py --dataset folder --data-dir ~/pictures/flowers --n-trials 20
    python scripts/tune.py --storage postgresql://user:pw@db/optuna --tracking-uri http://mlflow:5000
"""

from __future__ import annotations

import time

STARTED = time.time()  # --timeout counts from here: start-up is part of the study's wall time

import sys  # noqa: E402

from tunetrack.experiment.settings import Settings  # noqa: E402
from tunetrack.machinery.commands import tune  # noqa: E402
from tunetrack.machinery.runtime import collector  # noqa: E402

if __name__ == "__main__":
    collector.pause()  # until the imports are done (machinery.runtime.collector)
    sys.exit(tune.main(__doc__, Settings, "tunetrack.experiment.search:EXPERIMENT", started=STARTED))
