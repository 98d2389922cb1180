"""Read pictures with the best model a study registered: which digit, which garment, which of
your own classes.

Each picture (a PNG or JPEG photo or scan of one thing, colour or grey, any size up to 200
million pixels; for digits, dark on light or light on dark, or drawn on a transparent
background) is prepared as the images of the data set the model learned were
(src/tunetrack/machinery/data/pictures.py), and the model, by default models:/mnist-classifier@champion from
MLflow's store in this folder, says what it shows and how sure it is. Every picture gets a
line of its own: a bad one is said on stderr and the others are read all the same (exit status
1 if any was bad). --as-request prints, instead, the body of a request to `mlflow models serve`
for the good ones.

    python scripts/predict.py digit.png more/*.jpg
    python scripts/predict.py --model models:/fashion-mnist-classifier@champion shoe.jpg
    python scripts/predict.py --model models:/flowers-classifier@champion rose.jpg  # --dataset folder
    python scripts/predict.py --as-request seven.jpg > seven.json
"""

from __future__ import annotations

import sys

from tunetrack.experiment.settings import Settings
from tunetrack.machinery.commands import predict
from tunetrack.machinery.runtime import collector

if __name__ == "__main__":
    collector.pause()  # until the imports are done (machinery.runtime.collector)
    sys.exit(predict.main(__doc__, Settings, "tunetrack.experiment.search:EXPERIMENT"))
