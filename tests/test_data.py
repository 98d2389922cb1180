"""The data machinery: files obtained and verified, LeCun's IDX format, a data set kept in memory
and served in batches, and a folder of pictures read once (on the tiny experiment's data and
on pictures made here)."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TEST, TINY_TRAIN, TINY_VAL
from tiny import experiment as tiny
from tiny.settings import TinySettings
from tunetrack.machinery.contract import SettingError
from tunetrack.machinery.data import image_folders
from tunetrack.machinery.data.files import DataUnavailable, Source, ensure_files
from tunetrack.machinery.data.idx import read_idx, write_idx
from tunetrack.machinery.runtime import memory


@pytest.fixture(autouse=True)
def _verify_again(monkeypatch):
    """Each test verifies its files itself, whatever other tests verified before."""
    from tunetrack.machinery.data import files

    monkeypatch.setattr(files, "_verified", {})


def setup_datamodule(data_dir, dataset: str = "blocks", **settings) -> tiny.Blocks:
    data = tiny.DATASETS[dataset](TinySettings(data_dir=str(data_dir), dataset=dataset, **settings))
    data.prepare_data()
    data.setup("fit")
    return data


def test_split_sizes_and_same_split_every_time(tiny_data):
    first, second = setup_datamodule(tiny_data, seed=1), setup_datamodule(tiny_data, seed=2)
    (train_x, train_y), (val_x, val_y), (_, test_y) = (first.splits[s] for s in ("train", "val", "test"))
    assert (len(train_y), len(val_y), len(test_y)) == (TINY_TRAIN - TINY_VAL, TINY_VAL, TINY_TEST)
    # The split does not depend on the training seed.
    assert torch.equal(val_x, second.splits["val"][0]) and torch.equal(train_y, second.splits["train"][1])
    # Train and validation are disjoint and together are the whole training file.
    assert len(torch.unique(torch.cat([train_x, val_x]).flatten(1), dim=0)) == TINY_TRAIN


def test_pictures_are_kept_as_bytes_and_served_as_pixels_in_zero_to_one_in_the_files_order(tiny_data):
    images, labels = tiny.pictures(TINY_TEST, seed=1, pattern=tiny.PATTERNS["blocks"])
    data = setup_datamodule(tiny_data)
    kept, _ = data.splits["test"]
    assert kept.dtype == torch.uint8 and torch.equal(kept[:, 0], torch.from_numpy(images))  # a quarter of floats
    x, y = torch.cat([x for x, _ in data.test_dataloader()]), torch.cat([y for _, y in data.test_dataloader()])
    assert x.shape == (TINY_TEST, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.from_numpy(images).float() / 255) and torch.equal(y, torch.from_numpy(labels))


def test_batches_have_the_right_shapes_and_reshuffle_each_epoch(tiny_data):
    data = setup_datamodule(tiny_data, batch_size=64)
    loader = data.train_dataloader()
    epoch_one, epoch_two = list(loader), list(loader)
    assert len(epoch_one) == len(loader) == 7 and [len(y) for _, y in epoch_one] == [64] * 6 + [16]
    assert not torch.equal(epoch_one[0][1], epoch_two[0][1])
    # The same seed serves the same batches.
    again = list(setup_datamodule(tiny_data, batch_size=64).train_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_one, again, strict=True))
    # Validation is served whole, in order.
    assert torch.equal(torch.cat([y for _, y in data.val_dataloader()]), data.splits["val"][1])


def test_the_statistics_of_each_channel_are_the_training_pixels(tiny_data):
    data = setup_datamodule(tiny_data)
    pixels = data.splits["train"][0].double() / 255
    assert data.mean == pytest.approx((pixels.mean().item(),))
    assert data.std == pytest.approx((pixels.std().item(),), rel=1e-2)


def test_a_data_set_that_is_missing_says_in_one_line_that_its_first_fetch_needs_the_internet(tmp_path, monkeypatch):
    def offline(staging):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(tiny.Stripes, "sources", (Source("a mirror", offline),))
    with pytest.raises(DataUnavailable) as error:
        tiny.Stripes(TinySettings(data_dir=str(tmp_path))).prepare_data()
    [line] = str(error.value).splitlines()
    assert line.startswith("could not obtain stripes: tried a mirror (<urlopen error")
    assert "The first fetch needs the internet" in line and str(tmp_path / "stripes") in line

    # One with no source to fetch from says so, not that it tried none.
    monkeypatch.setattr(tiny.Stripes, "sources", ())
    with pytest.raises(DataUnavailable) as error:
        tiny.Stripes(TinySettings(data_dir=str(tmp_path))).prepare_data()
    assert str(error.value).startswith("could not obtain stripes: it names no source to fetch it from; put the files")


def test_idx_files_round_trip_plain_and_compressed(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        assert np.array_equal(read_idx(tmp_path / name), array)
    assert gzip.decompress((tmp_path / "a-idx3-ubyte.gz").read_bytes()) == (tmp_path / "a-idx3-ubyte").read_bytes()
    (tmp_path / "not-idx").write_bytes(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "not-idx")


def test_corrupted_file_is_reported_and_left_alone(tmp_path, tiny_data):
    shutil.copytree(tiny_data / "blocks", tmp_path / "blocks")
    victim = tmp_path / "blocks" / "train-images-idx3-ubyte"
    truncated = victim.read_bytes()[:-100]
    victim.write_bytes(truncated)
    with pytest.raises(DataUnavailable, match="train-images-idx3-ubyte is present but its MD5"):
        ensure_files(victim.parent, tiny.Blocks.files, (), "blocks")
    assert victim.read_bytes() == truncated


def test_every_source_failing_names_what_was_tried_and_writes_nothing(tmp_path, capsys):
    def half_written(staging):
        (staging / "train-images-idx3-ubyte").write_bytes(b"not the data")
        raise OSError("connection reset")

    def no_index(staging):
        raise OSError("no index")

    raw = tmp_path / "blocks"
    sources = (Source("a mirror", half_written), Source("a package index", no_index))
    with pytest.raises(DataUnavailable) as error:
        ensure_files(raw, tiny.Blocks.files, sources, "blocks")
    message = str(error.value)
    assert "a mirror (connection reset)" in message and "a package index (no index)" in message
    assert "by hand" in message
    assert list(raw.iterdir()) == []  # nothing half-written was moved in
    assert [p.name for p in raw.parent.iterdir()] == ["blocks"]  # staging removed
    assert capsys.readouterr().out.count("blocks:") == 4  # one line per step


def test_a_fetched_file_with_the_wrong_md5_is_not_installed(tmp_path):
    [generated] = tiny.Blocks.sources

    def fetch_one_bad(staging):
        generated.fetch(staging)
        (staging / "t10k-labels-idx1-ubyte").write_bytes(b"\x00" * 10)

    raw = tmp_path / "data" / "blocks"
    with pytest.raises(DataUnavailable, match="t10k-labels-idx1-ubyte fetched with MD5"):
        ensure_files(raw, tiny.Blocks.files, (Source("a mirror", fetch_one_bad),), "blocks")
    assert not any(raw.iterdir())


def test_a_data_folder_that_is_a_file_or_not_writable_is_a_setting_error(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(SettingError, match="is a file, not a folder") as error:
        tiny.Blocks(TinySettings(data_dir=str(a_file))).prepare_data()
    assert error.value.setting == "data_dir"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(SettingError, match="is not writable"):
            tiny.Blocks(TinySettings(data_dir=str(locked))).prepare_data()


# A folder of pictures in torchvision's ImageFolder layout.


def picture_folder(root, sizes=((24, 20),), modes=("RGB",), per_class: int = 6, classes=("cat", "dog"), fmt="png"):
    """``per_class`` pictures of each class, cycling through ``sizes`` and ``modes``: each class a
    colour of its own, so that what is read can be told apart."""
    colours = {"cat": (200, 30, 30), "dog": (30, 30, 200), "fox": (30, 200, 30)}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size, mode = sizes[i % len(sizes)], modes[i % len(modes)]
            Image.new("RGB", size, colours[name]).convert(mode).save(root / name / f"{c}-{i}.{fmt}")
    return root


def test_a_folder_lists_its_classes_and_pictures_and_what_their_headers_say(tmp_path):
    root = picture_folder(tmp_path / "pets", sizes=((24, 20), (24, 20), (30, 30)), modes=("RGB", "L"))
    (root / "cat" / "notes.txt").write_text("not a picture")
    (root / ".hidden").mkdir()
    listing = image_folders.scan(root)
    assert listing.classes == ("cat", "dog") and len(listing.pictures) == 12
    assert [p.label for p in listing.pictures] == [0] * 6 + [1] * 6
    assert listing.usual_size() == (24, 20) and listing.usual_channels() == 3
    assert image_folders.scan(root).fingerprint == listing.fingerprint  # read again: the same
    grey = picture_folder(tmp_path / "grey", modes=("L",), fmt="jpg")
    assert image_folders.scan(grey).usual_channels() == 1


def test_a_folder_split_in_train_val_and_test_says_which_picture_is_whose(tmp_path):
    for split, count in (("train", 5), ("val", 2), ("test", 3)):
        picture_folder(tmp_path / "split" / split, per_class=count)
    listing = image_folders.scan(tmp_path / "split")
    assert listing.classes == ("cat", "dog") and {p.split for p in listing.pictures} == {"train", "val", "test"}
    assert sorted(p.split for p in listing.pictures).count("val") == 4


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda root: root.mkdir(), "holds no pictures in one subfolder per class"),
        (lambda root: picture_folder(root, classes=("cat",)), "has one class (cat)"),
        (lambda root: picture_folder(root / "val"), "has val/ but no train/ folder"),
        (lambda root: (picture_folder(root / "train"), picture_folder(root / "test", classes=("fox",))),
         "has classes that train/ has not: fox"),
        (lambda root: (picture_folder(root), (root / "dog" / "x.png").write_text("oops")), "x.png is not a picture"),
    ],
)  # fmt: skip
def test_a_folder_that_cannot_be_read_says_why_in_one_line(tmp_path, make, said):
    make(tmp_path / "pets")
    with pytest.raises(image_folders.FolderUnreadable) as error:
        image_folders.scan(tmp_path / "pets")
    assert said in str(error.value) and len(str(error.value).splitlines()) == 1


def test_pictures_are_decoded_once_resized_converted_and_read_back_from_the_cache(tmp_path, monkeypatch):
    root = picture_folder(tmp_path / "pets", sizes=((24, 20), (50, 40)), modes=("RGB", "L", "P"))
    listing = image_folders.scan(root)
    images, labels = image_folders.decode(listing, (12, 10), 3)
    assert images.shape == (12, 3, 10, 12) and images.dtype == torch.uint8 and labels.tolist() == [0] * 6 + [1] * 6
    assert images[0, :, 5, 5].tolist() == [200, 30, 30] and images[6, :, 5, 5].tolist() == [30, 30, 200]
    grey, _ = image_folders.decode(listing, (12, 10), 1)
    assert grey.shape == (12, 1, 10, 12)
    cached = sorted(p.name for p in (root / ".decoded").iterdir())
    assert len([name for name in cached if name.endswith(".pt")]) == 2 and "manifest.json" in cached

    def never(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_folders, "to_array", never)
    again, _ = image_folders.decode(image_folders.scan(root), (12, 10), 3)
    assert torch.equal(again, images)


def test_a_changed_picture_is_other_data_and_a_copied_folder_the_same(tmp_path):
    root = picture_folder(tmp_path / "pets")
    before = image_folders.scan(root).fingerprint
    image_folders.decode(image_folders.scan(root), (24, 20), 3)
    copy = shutil.copytree(root, tmp_path / "copy", ignore=shutil.ignore_patterns(".decoded"))
    assert image_folders.scan(copy).fingerprint == before  # new times, the same pictures
    Image.new("RGB", (24, 20), (0, 0, 0)).save(root / "dog" / "1-0.png")
    after = image_folders.scan(root)
    assert after.fingerprint != before
    images, _ = image_folders.decode(after, (24, 20), 3)
    assert images[6].sum() == 0  # the picture as it is now
    assert len(list((root / ".decoded").glob("*.pt"))) == 1  # the stale one is gone


def test_a_read_only_folder_is_cached_in_the_users_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path / "pets")))
    root = picture_folder(tmp_path / "pets")
    listing = image_folders.scan(root)
    assert listing.cache.is_relative_to(tmp_path / "cache") and (listing.cache / "manifest.json").exists()


def test_pictures_that_would_not_fit_in_memory_are_refused_before_any_is_decoded(tmp_path, monkeypatch):
    root = picture_folder(tmp_path / "pets")
    monkeypatch.setattr(memory, "available_bytes", lambda: memory.PROCESS_BYTES + 1000)
    monkeypatch.setattr(image_folders, "to_array", lambda *args: pytest.fail("decoded"))
    with pytest.raises(MemoryError, match=r"12 pictures of 3x200x200 need 0.0 GB in memory; this machine has"):
        image_folders.decode(image_folders.scan(root), (200, 200), 3)
    assert not list((root / ".decoded").glob("*.pt"))
