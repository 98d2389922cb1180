"""A data set's files: present, byte-exact, and never half-written.

:func:`ensure_files` checks each file against its MD5, and fetches the missing ones from the
sources it is given, in turn. A file that is present but wrong is reported and left alone,
never used and never overwritten. New files are written into a staging folder beside the target
and moved in only once verified, so an interrupted fetch leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple


class DataUnavailable(RuntimeError):
    """The data set could not be found, fetched or verified: the message says why, in one line."""


class FolderUnusable(DataUnavailable):
    """The folder the files belong in is a file, or cannot be written where files are missing."""


class Source(NamedTuple):
    """Where missing files can come from: ``fetch(staging)`` writes them into the folder ``staging``."""

    name: str  # as the messages say it: "torchvision's mirrors"
    fetch: Callable[[Path], None]


# Folders whose files this process has verified, with where they came from: an MD5 over tens of
# megabytes is not free, and every trial of a worker asks again.
_verified: dict[tuple, str] = {}


def verified() -> dict[tuple, str]:
    """What this process has verified, to hand to the processes it starts (see :func:`trust`)."""
    return dict(_verified)


def trust(folders: dict[tuple, str]) -> None:
    """Take another process's word (tune.py's, before it starts its workers) that these folders
    hold the verified files."""
    _verified.update(folders)


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_files(target: Path, expected: Mapping[str, str], sources: tuple[Source, ...], name: str) -> str:
    """Make the files named in ``expected`` (name: MD5) present and verified in ``target``; return
    where they came from ("existing files", or the source's name). ``name`` is the data set's,
    for the messages."""
    key = (Path(target).resolve(), tuple(expected.items()))
    if key not in _verified:
        _verified[key] = _ensure(Path(target), expected, sources, name)
    return _verified[key]


def _ensure(target: Path, expected: Mapping[str, str], sources: tuple[Source, ...], name: str) -> str:
    missing = []
    for file, md5 in expected.items():
        path = target / file
        if not path.exists():
            missing.append(file)
        elif md5_of(path) != md5:
            raise DataUnavailable(
                f"{path} is present but its MD5 is not the expected {md5}: the file is truncated "
                f"or corrupted. Delete it to fetch it again, or replace it with the original (a file made "
                f"anew on purpose needs its new MD5 in the data set's files)."
            )
    if not missing:
        print(f"{name}: using the files in {target} (MD5 verified)", flush=True)
        return "existing files"
    _check_writable(target)

    tried = []
    for source in sources:
        print(f"{name}: fetching {len(missing)} missing file(s) from {source.name} ...", flush=True)
        try:
            target.mkdir(parents=True, exist_ok=True)
            # Staged beside the target, so that moving a verified file in is an atomic rename.
            with tempfile.TemporaryDirectory(prefix=".staging-", dir=target.parent) as staging:
                source.fetch(Path(staging))
                _install_verified(Path(staging), target, {file: expected[file] for file in missing})
        except Exception as error:  # noqa: BLE001 - every failure means "try the next source"
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            print(f"{name}: {source.name} failed: {reason}", flush=True)
            tried.append(f"{source.name} ({reason})")
            continue
        print(f"{name}: wrote {', '.join(missing)} to {target} from {source.name} (MD5 verified)", flush=True)
        return source.name
    files = f"the files ({', '.join(expected)}) into {target}"
    if not tried:
        raise DataUnavailable(
            f"could not obtain {name}: it names no source to fetch it from; put {files} and run again."
        )
    raise DataUnavailable(
        f"could not obtain {name}: tried {'; '.join(tried)}. The first fetch needs the internet; or put {files} by "
        "hand and run again."
    )


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot be written, or created and written, by this process; None if it can:
    the nearest folder at or above it that exists must be a folder this process may write."""
    existing = folder if str(folder) else Path(".")
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{str(existing)!r} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"the folder {str(existing)!r} is not writable"
    return None


def _check_writable(target: Path) -> None:
    if why := unwritable(target):
        raise FolderUnusable(f"the files cannot be fetched into {str(target)!r}: {why}")


def _install_verified(staging: Path, target: Path, wanted: Mapping[str, str]) -> None:
    for file, md5 in wanted.items():
        actual = md5_of(staging / file)
        if actual != md5:
            raise DataUnavailable(f"{file} fetched with MD5 {actual}, expected {md5}")
    for file in wanted:
        os.replace(staging / file, target / file)


def torchvision_download(dataset_class: str) -> Source:
    """The source that torchvision's dataset class ``dataset_class`` downloads from (its mirrors,
    each file checked against torchvision's own MD5). It leaves both the compressed files and the
    uncompressed ones; the caller's list says which of them it wants."""

    def fetch(staging: Path) -> None:
        from torchvision import datasets

        kind = getattr(datasets, dataset_class)
        # torchvision prints a line per mirror and file; one line per step says enough.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            kind(str(staging), download=True)
        downloaded = staging / dataset_class / "raw"
        for path in downloaded.iterdir():
            os.replace(path, staging / path.name)

    return Source("torchvision's mirrors", fetch)
