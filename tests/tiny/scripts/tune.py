"""tune.py of the tests' own experiment (tests/tiny): scripts/tune.py's command, handed that experiment."""

import time

STARTED = time.time()  # --timeout counts from here

import sys  # noqa: E402

from tiny.settings import TinySettings  # noqa: E402
from tunetrack.machinery.commands import tune  # noqa: E402
from tunetrack.machinery.runtime import collector  # noqa: E402

if __name__ == "__main__":
    collector.pause()
    sys.exit(tune.main(__doc__, TinySettings, "tiny.experiment:EXPERIMENT", started=STARTED))
