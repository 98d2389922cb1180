"""A folder of one's own pictures, checked before anything trains: a network that cannot take
them, a size that cannot fit, an empty class, class folders beside the splits, a disk that
fills and a Ctrl-C while they are decoded, each one line, with nothing made or half-made; the
decoded pictures shared as the user's umask says."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, assert_flag_error, call_command, grow
from tunetrack.experiment.networks import NETWORKS
from tunetrack.experiment.settings import Settings
from tunetrack.machinery.data import image_folders


def pictures(root: Path, side: int = 8, per_class: int = 12, classes=("circle", "square")) -> Path:
    """Small grey pictures, a class a brightness of its own under noise."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.normal(60 + 120 * c, 20, (side, side)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def run(script: str, *args, cwd: Path):
    return call_command(ROOT / "scripts" / script, Settings, "tunetrack.experiment.search:EXPERIMENT", *args, cwd=cwd)


def made(folder: Path) -> list[str]:
    """What a command left in its working folder and in the pictures' cache."""
    return sorted(p.name for p in folder.iterdir() if p.name != "pictures") + [
        p.name for p in (folder / "pictures" / image_folders.CACHE_FOLDER).glob("*.pt")
    ]


def test_a_network_that_cannot_take_the_pictures_names_the_image_size_it_can_before_anything(tmp_path):
    folder = pictures(tmp_path / "pictures")
    common = ["--dataset", "folder", "--data-dir", folder, "--model", "cnn"]
    for script, more in (("tune.py", ["--n-trials", "2", "--workers", "1"]), ("train.py", [])):
        refused = run(script, *common, *more, cwd=tmp_path)
        assert_flag_error(refused, script, "--image-size")
        [line] = refused.stderr.strip().splitlines()
        assert "the network CNN (" in line and "networks.py:" in line and "cannot take inputs of 1x8x8" in line
        assert "its layer 3 (Conv2d(6, 16, kernel_size=(5, 5)" in line
        assert line.endswith("it takes them from 12x12: --image-size 12")
        assert made(tmp_path) == []  # no store, no study, no picture decoded
    works = run("train.py", *common, "--image-size", "12", "--max-epochs", "1", cwd=tmp_path)
    assert works.returncode == 0, works.stderr
    assert "data: 24 pictures, decoded: 18 to train, 3 to validate, 3 to test" in works.stdout


def test_a_network_of_ones_own_that_cannot_take_the_pictures_is_named_by_its_file_and_line(tmp_path, monkeypatch):
    folder = pictures(tmp_path / "pictures", side=16)
    # What --import registers, and the module it imports once a process, are taken out after the test.
    monkeypatch.setitem(NETWORKS, "broad", None)
    monkeypatch.delitem(sys.modules, "imported_broad_network", raising=False)
    mine = tmp_path / "broad_network.py"
    mine.write_text(
        "from torch import nn\n"
        "from tunetrack.experiment.networks import NETWORKS\n\n\n"
        "class Broad(nn.Sequential):  # a 32x32 kernel: pictures of 32x32 and larger\n"
        "    def __init__(self, input_shape, num_classes, hidden_dim):\n"
        "        super().__init__(nn.Conv2d(input_shape[0], 4, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(4, num_classes))\n\n\n"
        'NETWORKS["broad"] = Broad\n'
    )
    refused = run("train.py", "--import", mine, "--dataset", "folder", "--data-dir", folder, "--model", "broad",
                  cwd=tmp_path)  # fmt: skip
    assert_flag_error(refused, "train.py", "--image-size")
    said = "the network Broad (broad_network.py:5) cannot take inputs of 1x16x16 at its layer 0 (Conv2d(1, 4"
    assert said in refused.stderr
    assert refused.stderr.strip().endswith("it takes them from 32x32: --image-size 32")
    assert made(tmp_path) == ["broad_network.py"]


@pytest.mark.parametrize("script", ["train.py", "tune.py"])
def test_a_size_that_cannot_fit_in_memory_names_the_image_size(tmp_path, script):
    folder = pictures(tmp_path / "pictures")
    refused = run(script, "--dataset", "folder", "--data-dir", folder, "--image-size", "20000", cwd=tmp_path)
    assert_flag_error(refused, script, "--image-size")
    assert "20000 needs about" in refused.stderr and "of memory to train" in refused.stderr
    assert made(tmp_path) == []


@pytest.mark.parametrize(
    ("shape", "said"),
    [
        ("an empty class", "class folder zebra/ of {root} holds no pictures to learn from"),
        ("an empty class of train/", "class folder train/zebra/ of {root} holds no pictures to learn from"),
        ("classes beside the splits", "{root} has class folders (bird/) beside its test/, train/"),
    ],
)
def test_a_folders_odd_shape_is_refused_in_one_line_before_anything(tmp_path, shape, said):
    root = tmp_path / "pictures"
    if shape == "an empty class":
        pictures(root)
        (root / "zebra").mkdir()
    elif shape == "an empty class of train/":
        pictures(root / "train")
        pictures(root / "test", per_class=2)
        (root / "train" / "zebra").mkdir()
    else:
        pictures(root / "train")
        pictures(root / "test", per_class=2)
        pictures(root / "bird", per_class=2, classes=("bird",))
    refused = run("tune.py", "--dataset", "folder", "--data-dir", root, "--n-trials", "1", cwd=tmp_path)
    assert_flag_error(refused, "tune.py", "--data-dir")
    assert said.format(root=root) in refused.stderr
    assert made(tmp_path) == []


def test_a_ctrl_c_while_pictures_are_decoded_is_one_line_and_leaves_nothing_half_made(tmp_path, monkeypatch):
    folder = pictures(tmp_path / "pictures", per_class=30)
    decoded = []

    def pressed(*args):  # Ctrl-C at the tenth picture
        decoded.append(args)
        if len(decoded) == 10:
            raise KeyboardInterrupt
        return to_array(*args)

    to_array = image_folders.to_array
    monkeypatch.setattr(image_folders, "to_array", pressed)
    stopped = run("train.py", "--dataset", "folder", "--data-dir", folder, cwd=tmp_path)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    said = "train.py: error: interrupted while the data was read: nothing half-made was kept; run again"
    assert stopped.stderr.strip() == said
    cache = folder / image_folders.CACHE_FOLDER
    assert sorted(p.name for p in cache.iterdir()) == [image_folders.MANIFEST] and made(tmp_path) == []


def test_a_disk_that_fills_while_pictures_are_decoded_says_so_and_names_the_folder(small_disk, tmp_path):
    folder = small_disk / "pictures"
    for c, name in enumerate(("red", "blue")):  # small as files (a page each), large decoded: 80 x 48 x 48 x 3 bytes
        (folder / name).mkdir(parents=True)
        for i in range(40):
            Image.new("RGB", (48, 48), (200 * (1 - c), 0, 200 * c)).save(folder / name / f"{i}.png")
    full = run("train.py", "--dataset", "folder", "--data-dir", folder, "--max-epochs", "1", cwd=tmp_path)
    assert_flag_error(full, "train.py", "--data-dir")
    assert f"the disk of {folder / image_folders.CACHE_FOLDER} is full: free some space there" in full.stderr
    assert not [p for p in (folder / image_folders.CACHE_FOLDER).iterdir() if p.name != image_folders.MANIFEST]
    grow(small_disk, "50m")
    again = run("train.py", "--dataset", "folder", "--data-dir", folder, "--max-epochs", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_the_decoded_pictures_are_shared_as_the_users_umask_says(tmp_path):
    folder = pictures(tmp_path / "pictures")
    before = os.umask(0o022)
    try:
        listing = image_folders.scan(folder)
        image_folders.decode(listing, (8, 8), 1)
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in listing.cache.iterdir()}
    assert set(modes.values()) == {0o644} and len(modes) == 2, modes  # the manifest and the pictures
