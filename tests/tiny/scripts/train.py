"""train.py of the tests' own experiment (tests/tiny): scripts/train.py's command, handed that experiment."""

import sys

from tiny.settings import TinySettings
from tunetrack.machinery.commands import train
from tunetrack.machinery.runtime import collector

if __name__ == "__main__":
    collector.pause()
    sys.exit(train.main(__doc__, TinySettings, "tiny.experiment:EXPERIMENT"))
