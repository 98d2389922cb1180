"""A folder of labelled pictures in torchvision's ImageFolder layout, read once.

``root/<class>/<picture>``, or the same under ``root/train/``, ``root/val/`` and ``root/test/``
where the pictures come split: JPEG, PNG and the other formats Pillow reads, of any size and
mode, the classes named by their folders, sorted. :func:`scan` lists them and what their
headers say, with an MD5 of each file; :func:`decode` turns them into one uint8 tensor of a
single size and channel count. Both keep what they learn in a cache folder (a hidden one in
the root, or the user's cache folder where the root is read-only): a file whose size and
modification time did not change is not read again, and the decoded tensor is one file per
(pictures, size, channels), so that every run after the first reads one file instead of
decoding every picture. The MD5s make the folder's fingerprint: a copy of the folder is the
same data; a picture changed, added or removed is other data.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tunetrack.machinery.data.files import DataUnavailable, md5_of
from tunetrack.machinery.data.in_memory import digest
from tunetrack.machinery.data.pictures import to_array
from tunetrack.machinery.runtime import memory

# What torchvision's ImageFolder takes, and what Pillow reads of it.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# The names a split's folder goes by.
SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
# Pillow's modes of pictures without colour.
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
CACHE_FOLDER = ".decoded"
MANIFEST = "manifest.json"


class FolderUnreadable(DataUnavailable):
    """The folder holds no pictures in the layout, or a picture that cannot be read."""


@dataclass(frozen=True)
class Picture:
    path: str  # relative to the root, with forward slashes
    label: int
    split: str | None  # "train", "val", "test", or None where the folder is not split
    size: tuple[int, int]  # width, height
    mode: str  # Pillow's
    md5: str


@dataclass(frozen=True)
class Listing:
    """What a folder holds: its classes, and its pictures in a fixed order."""

    root: Path
    classes: tuple[str, ...]
    pictures: tuple[Picture, ...]
    cache: Path  # where its manifest and decoded tensors are kept

    @functools.cached_property
    def fingerprint(self) -> str:
        """The pictures' identity: their classes, places and contents."""
        return digest(self.classes, [(p.path, p.md5) for p in self.pictures])

    def usual_size(self) -> tuple[int, int]:
        """The most common (width, height), the first found on a tie."""
        return collections.Counter(p.size for p in self.pictures).most_common(1)[0][0]

    def usual_channels(self) -> int:
        """3 if any picture has colour, else 1."""
        return 1 if all(p.mode in GREY_MODES for p in self.pictures) else 3


def scan(root: str | os.PathLike) -> Listing:
    """List the pictures of ``root``; raise FolderUnreadable, in one line, where it holds none."""
    root = Path(root)
    if not root.is_dir():
        raise FolderUnreadable(f"{str(root)!r} is not a folder")
    splits = _split_folders(root)
    if splits:
        split_names = {folder.name for folder in splits.values()}
        if beside := sorted(name for name in _subfolders(root) if name not in split_names):
            raise FolderUnreadable(
                f"{root} has class folders ({', '.join(f'{name}/' for name in beside)}) beside its "
                f"{', '.join(f'{name}/' for name in sorted(split_names))}: move them into a split's folder, or the "
                "splits' classes out of theirs"
            )
        class_folders = {split: _subfolders(folder) for split, folder in splits.items()}
        if "train" not in class_folders:
            raise FolderUnreadable(f"{root} has {', '.join(f.name for f in splits.values())}/ but no train/ folder")
        classes = tuple(sorted(class_folders["train"]))
        for split, found in class_folders.items():
            if unknown := sorted(set(found) - set(classes)):
                raise FolderUnreadable(f"{splits[split]} has classes that train/ has not: {', '.join(unknown)}")
        places = [(split, name, folder) for split, found in class_folders.items() for name, folder in found.items()]
    else:
        found = _subfolders(root)
        classes = tuple(sorted(found))
        places = [(None, name, folder) for name, folder in found.items()]
    files = sorted(
        (path, classes.index(name), split)
        for split, name, folder in places
        for path in _pictures_in(folder)
    )  # fmt: skip
    if not files:
        raise FolderUnreadable(
            f"{root} holds no pictures in one subfolder per class ({root}/<class>/<picture>, or the same under "
            f"train/, val/ and test/)"
        )
    if len(classes) < 2:
        raise FolderUnreadable(f"{root} has one class ({classes[0]}): a classifier needs two or more subfolders")
    taught = {label for _, label, split in files if split in (None, "train")}
    if empty := [name for label, name in enumerate(classes) if label not in taught]:
        where = f"{splits['train'].name}/" if splits else ""
        raise FolderUnreadable(
            f"class folder {', '.join(f'{where}{name}/' for name in empty)} of {root} holds no pictures to learn "
            "from: a model would have a class it can never answer; add pictures, or remove the folder"
        )
    cache = _cache_folder(root)
    known = _read_manifest(cache)
    pictures, manifest = [], {}
    for path, label, split in files:
        relative = path.relative_to(root).as_posix()
        stat = path.stat()
        entry = known.get(relative)
        if entry is None or entry["bytes"] != stat.st_size or entry["mtime_ns"] != stat.st_mtime_ns:
            entry = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, **_header(path), "md5": md5_of(path)}
        manifest[relative] = entry
        pictures.append(Picture(relative, label, split, tuple(entry["size"]), entry["mode"], entry["md5"]))
    if manifest != known:
        _write_atomically(cache / MANIFEST, json.dumps(manifest).encode())
    return Listing(root, classes, tuple(pictures), cache)


def nbytes(listing: Listing, size: tuple[int, int], channels: int) -> int:
    """The decoded pictures' size in memory, as uint8."""
    return len(listing.pictures) * channels * size[0] * size[1]


def decode(listing: Listing, size: tuple[int, int], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every picture of ``listing``, in its order, as uint8 of shape (N, channels, height, width)
    (resized to ``size``, a (width, height), converted to grey or RGB as torchvision's loader
    does), and the labels as int64; decoded once, and read from the cache after that. A set of
    pictures that would not fit in this machine's memory is refused before any is decoded."""
    needed, available = nbytes(listing, size, channels), memory.available_bytes()
    if available is not None and needed > available - memory.PROCESS_BYTES:
        raise MemoryError(
            f"{len(listing.pictures):,} pictures of {channels}x{size[1]}x{size[0]} need {memory.gigabytes(needed)} "
            f"in memory; this machine has {memory.gigabytes(available)} available"
        )
    path = listing.cache / f"{listing.fingerprint}-{size[0]}x{size[1]}x{channels}.pt"
    labels = torch.tensor([p.label for p in listing.pictures], dtype=torch.int64)
    with contextlib.suppress(FileNotFoundError, RuntimeError, EOFError):  # absent or damaged: decoded again
        images = torch.load(path, weights_only=True)
        if images.shape == (len(listing.pictures), channels, size[1], size[0]) and images.dtype == torch.uint8:
            return images, labels
    images = torch.empty((len(listing.pictures), channels, size[1], size[0]), dtype=torch.uint8)
    for i, picture in enumerate(listing.pictures):
        try:
            images[i] = torch.from_numpy(to_array(listing.root / picture.path, size, channels))
        except OSError as error:
            raise FolderUnreadable(f"{listing.root / picture.path}: {error}") from None
    for stale in listing.cache.glob("*.pt"):  # decoded from pictures that are no longer there
        if not stale.name.startswith(listing.fingerprint):
            stale.unlink(missing_ok=True)
    buffer = io.BytesIO()
    torch.save(images, buffer)
    _write_atomically(path, buffer.getvalue())
    return images, labels


def _split_folders(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            if (root / name).is_dir():
                found[split] = root / name
                break
    return found


def _subfolders(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _pictures_in(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
                yield Path(dirpath) / name


def _header(path: Path) -> dict:
    """What the file's header says: its size and mode, without decoding the picture."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode
            orientation = image.getexif().get(0x0112, 1) if hasattr(image, "getexif") else 1
    except (UnidentifiedImageError, OSError) as error:
        why = f"{path} is not a picture that Pillow reads ({error}): move it out of the folder"
        raise FolderUnreadable(why) from None
    if orientation in (5, 6, 7, 8):  # turned a quarter by its EXIF orientation: upright, it is the other way
        size = size[::-1]
    return {"size": list(size), "mode": mode}


def _cache_folder(root: Path) -> Path:
    """A hidden folder in the root, or, where the root cannot be written, one of the user's
    own cache named after the root's place."""
    beside = root / CACHE_FOLDER
    with contextlib.suppress(OSError):
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK | os.X_OK):
            return beside
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    place = hashlib.md5(str(root.resolve()).encode()).hexdigest()[:16]
    folder = home / "image-folders" / place
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _read_manifest(cache: Path) -> dict:
    try:
        return json.loads((cache / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _write_atomically(path: Path, content: bytes) -> None:
    """Whole or not at all: a run killed while it writes leaves the old file, or none. The file
    is readable as the user's umask says (a temporary file is made for its owner alone), so that
    the others who share a data folder share its cache. A disk that fills is said in one line
    that names the folder."""
    try:
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    except OSError as error:
        raise _unwritable(path, error) from None
    try:
        with handle:
            handle.write(content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)
        os.replace(handle.name, path)
    except BaseException as error:
        Path(handle.name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _unwritable(path, error) from None
        raise


def _unwritable(path: Path, error: OSError) -> Exception:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return FolderUnreadable(f"the disk of {path.parent} is full: free some space there, and run again")
    return error
