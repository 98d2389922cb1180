"""Train one configuration and track it in MLflow.

Builds the experiment's model and data (src/tunetrack/experiment: MNIST and the original pipeline's
network by default), fetches the data on first use, trains with Lightning (one point per epoch
for train_loss, val_loss and val_acc), tests the best epoch's weights, and logs it all, the
checkpoint and the model (for scripts/predict.py) included, to one MLflow run. Then `mlflow
ui`, in this folder, shows it.

    python scripts/train.py --lr 1e-3 --hidden-dim 128
    python scripts/train.py --model cnn --batch-size 256 --max-epochs 5 --experiment quick
    python scripts/train.py --dataset folder --data-dir ~/pictures/flowers --model cnn
    python scripts/train.py --from-trial mnist-mlp:32 --max-epochs 30 --register   # a study's best, longer
"""

from __future__ import annotations

import sys

from tunetrack.experiment.settings import Settings
from tunetrack.machinery.commands import train
from tunetrack.machinery.runtime import collector

if __name__ == "__main__":
    collector.pause()  # until the imports are done (machinery.runtime.collector)
    sys.exit(train.main(__doc__, Settings, "tunetrack.experiment.search:EXPERIMENT"))
