"""predict.py of the tests' own experiment (tests/tiny): scripts/predict.py's command, handed that experiment."""

import sys

from tiny.settings import TinySettings
from tunetrack.machinery.commands import predict
from tunetrack.machinery.runtime import collector

if __name__ == "__main__":
    collector.pause()
    sys.exit(predict.main(__doc__, TinySettings, "tiny.experiment:EXPERIMENT"))
