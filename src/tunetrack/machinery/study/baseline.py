"""A reference beside a study's best: scikit-learn's models of the pixels as they are, which need
no tuning and train in seconds, scored on the same validation and test data under the same
names as the trials. A study whose best does not beat them has learned little that a linear
model had not.

- linear: LogisticRegression on the standardized pixels of (at most LINEAR_EXAMPLES of) the
  training split;
- svc: an RBF support-vector classifier on the same, where the training split holds at most
  SVC_EXAMPLES examples (its cost grows with the square of them), its probabilities calibrated
  as scikit-learn advises (CalibratedClassifierCV).

Each is logged as an MLflow run of the study's, tagged ``baseline``, so that ``mlflow ui`` shows it
beside the trials; a study continued on the same data reuses it.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from tunetrack.machinery.tracking.mlflow_runs import Tracker
from tunetrack.machinery.tracking.system_metrics import Sampler

LINEAR_EXAMPLES = 5_000  # about a second of LogisticRegression on 28x28 pixels, on one core
SVC_EXAMPLES = 5_000
TAG = "baseline"
LATENCY_RUNS = 20


@dataclass(frozen=True)
class Baseline:
    kind: str  # "linear" or "svc"
    metrics: dict[str, float]  # val_* and test_* (loss, acc, f1), params, latency_ms
    examples: int  # training examples it learned from
    of: int  # in the training split
    seconds: float  # to learn and score
    run_id: str

    def line(self, names: Iterable[str]) -> str:
        """``linear baseline: val_acc 0.9514, val_loss ...; test_acc 0.9583, ...``: the metrics ``names``
        (those it has) and their test twins."""
        from tunetrack.machinery.objectives import shown

        names = [name for name in names if name in self.metrics]
        tests = [name.replace("val_", "test_", 1) for name in names if name.startswith("val_")]
        parts = [shown({n: self.metrics[n] for n in names}, names, ", "),
                 shown({n: self.metrics[n] for n in tests if n in self.metrics}, tests, ", ")]  # fmt: skip
        sample = f"{self.examples:,} of the {self.of:,} training examples, " if self.examples < self.of else ""
        scores = "; ".join(filter(None, parts)) or "none of those metrics"
        return f"{self.kind} baseline ({sample}{self.seconds:.2g} s): {scores}"


def run_baselines(kinds: Iterable[str], data, tracker: Tracker, parent_run_id: str, tags: dict[str, str]):
    """Train, score and log each of ``kinds`` on ``data`` (a LightningDataModule of the study's
    settings), or take the run a session of the same study logged on the same data; return
    them, and a line for each that could not be (an SVC of too many examples)."""
    kinds = list(kinds)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    splits = {split.context: split for split in data.describe()}
    identity = {f"{context}_data": f"{split.name} {split.digest}" for context, split in splits.items()}
    done, notes, arrays = [], [], None
    for kind in kinds:
        earlier = _logged(tracker, parent_run_id, kind, identity)
        if earlier is not None:
            done.append(earlier)
            continue
        if arrays is None:
            arrays = _arrays(data)
        train_x, train_y = arrays["train"]
        limit = LINEAR_EXAMPLES if kind == "linear" else SVC_EXAMPLES
        if kind == "svc" and len(train_y) > limit:
            notes.append(f"svc baseline left out: {len(train_y):,} training examples, more than the {limit:,} an RBF "
                         "SVC learns from in seconds")  # fmt: skip
            continue
        used = min(limit, len(train_y))
        started, system = time.perf_counter(), Sampler()  # the machine while it learns
        model = _trained(kind, train_x[:used], train_y[:used])
        classes = len(data.classes)
        metrics = {**_scores(model, *arrays["val"], "val", classes), **_scores(model, *arrays["test"], "test", classes)}
        metrics |= {"params": float(_params(model)), "latency_ms": _latency(model, arrays["val"][0][:1])}
        seconds = time.perf_counter() - started
        with tracker.run(
            f"{kind} baseline", parent_run_id=parent_run_id, tags={**tags, TAG: kind, **identity}
        ) as run_id:
            tracker.log_datasets(run_id, list(splits.values()))
            params = {"kind": kind, "examples": used, "of": len(train_y), "seconds": round(seconds, 3)}
            tracker.log_params(run_id, {**params, "model": repr(model)})
            tracker.log_metrics(run_id, {**metrics, **system.sample()})
        done.append(Baseline(kind, metrics, used, len(train_y), seconds, run_id))
    return done, notes


def _logged(tracker: Tracker, parent_run_id: str, kind: str, identity: dict[str, str]) -> Baseline | None:
    """The baseline ``kind`` that an earlier session of this study logged on the same data."""
    for run in tracker.runs_tagged(TAG, kind):
        tags = run.data.tags
        if tags.get("mlflow.parentRunId") == parent_run_id and all(tags.get(k) == v for k, v in identity.items()):
            if run.info.status == "FINISHED":
                params = run.data.params
                return Baseline(kind, dict(run.data.metrics), int(params["examples"]), int(params["of"]),
                                float(params["seconds"]), run.info.run_id)  # fmt: skip
    return None


def _arrays(data) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split's inputs, flattened to rows of float64, and their targets: the training split as
    its loader serves it (shuffled: its first examples are a random sample of it)."""
    loaders = {"train": data.train_dataloader(), "val": data.val_dataloader(), "test": data.test_dataloader()}
    return {name: _rows(loader) for name, loader in loaders.items()}


def _rows(batches) -> tuple[np.ndarray, np.ndarray]:
    inputs, targets = [], []
    for x, y in batches:
        inputs.append(x.detach().reshape(len(x), -1).double().cpu().numpy())
        targets.append(y.detach().cpu().numpy())
    return np.concatenate(inputs), np.concatenate(targets)


def _trained(kind: str, x: np.ndarray, y: np.ndarray):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if kind == "linear":
        estimator = LogisticRegression(max_iter=1_000)
    else:
        estimator = CalibratedClassifierCV(SVC(), ensemble=False)  # probabilities for the loss
    model = make_pipeline(StandardScaler(), estimator)
    with warnings.catch_warnings():  # a baseline that stops short of convergence is still the reference asked for
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def _scores(model, x: np.ndarray, y: np.ndarray, split: str, classes: int) -> dict[str, float]:
    """The loss (cross-entropy), accuracy and macro-F1 of ``model`` on a split: the names and sums
    a LightningModule's cross_entropy, accuracy and torchmetrics' F1 give."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    labels = list(range(classes))
    probabilities = np.zeros((len(y), classes))
    probabilities[:, model.classes_] = model.predict_proba(x)
    predicted = probabilities.argmax(axis=1)
    return {
        f"{split}_loss": float(log_loss(y, probabilities, labels=labels)),
        f"{split}_acc": float(accuracy_score(y, predicted)),
        f"{split}_f1": float(f1_score(y, predicted, labels=labels, average="macro", zero_division=0)),
    }


def _params(model) -> int:
    estimator = model[-1]
    if hasattr(estimator, "coef_"):
        return estimator.coef_.size + estimator.intercept_.size
    svc = estimator.calibrated_classifiers_[0].estimator
    return svc.support_vectors_.size + svc.dual_coef_.size + svc.intercept_.size


def _latency(model, one: np.ndarray) -> float:
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        model.predict_proba(one)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)
