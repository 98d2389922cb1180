"""How a command runs, beyond the experiment's settings: every option with its default, once.

Each field is a flag, made by machinery.cli.flags as the experiment's settings are: ``--tracking-uri``
for tracking_uri, ``--no-pruning`` for a switch that is on by default. A default of None is
filled in from the settings by :meth:`Options.resolved` (the MLflow experiment, the study, the
registered model follow the settings' task).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tunetrack.machinery.objectives import DEFAULT_METRIC, MINIMIZE, Objective

# How a study searches, by name: study/samplers.py makes each.
SAMPLERS = ("tpe", "gp", "random")
PRUNERS = ("median", "hyperband", "halving")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# What a study trains beside its best, for reference: scikit-learn's models of the pixels as they are.
BASELINES = ("linear", "svc", "none")
DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_TRIALS = 50


def option(default, help: str, **more):
    """A field, with what its flag needs: ``help``, and where the usual do not fit, ``minimum``,
    ``maximum`` (numbers are otherwise at least 1, or above 0), ``choices`` (a list, or a
    registry named as "module:NAME" and imported once the other flags are checked), or
    ``compared=False`` (a study's trials may differ in it and still compare). Settings and
    options alike are made of these."""
    return field(default=default, metadata={"help": help, **more})


def flag(field: dataclasses.Field) -> str:
    """The flag of a field: ``--tracking-uri`` for tracking_uri."""
    return field.metadata.get("flag", f"--{field.name.replace('_', '-')}")


@dataclass(frozen=True)
class Options:
    """The options train.py and tune.py share."""

    verb = "train"  # names the MLflow experiment of the command's runs: TASK-train

    objective: str | None = option(
        None,
        "the metric a run keeps its best epoch by and a study optimizes: one the LightningModule logs per validation "
        "epoch (val_loss, val_acc, val_f1 here), or two, comma-separated, for a study of two objectives, params "
        "(the network's size) and latency_ms (the time to classify one picture) among them (default: the "
        "experiment's, val_loss)",
    )
    direction: str | None = option(
        None,
        "minimize or maximize: the direction of a metric of your own LightningModule's (one per metric of "
        "--objective, comma-separated)",
    )
    experiment: str | None = option(None, "MLflow experiment (default: TASK-train, TASK-tune for tune.py)")
    tracking_uri: str | None = option(
        None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's default: sqlite:///mlflow.db here)"
    )
    accelerator: str = option("auto", "where to train", choices=ACCELERATORS)
    minibatches_per_step: int = option(
        16, "minibatches that one Lightning step carries, each its own optimizer step; 1: Lightning's own loop"
    )
    imports: tuple[str, ...] = option(
        (), "a Python file to import first, with a data set or network of your own registered in it", flag="--import"
    )
    storage: str = option(DEFAULT_STORAGE, "Optuna storage URL")
    verbose: bool = option(False, "show tracebacks, and Lightning's progress bars inside trials")
    registered_model: str | None = option(
        None,
        "the Model Registry's model that a study's tested best (or train.py --register's model) is registered as; "
        "its alias champion moves to it when it is the better model (default: TASK-classifier, the settings' task)",
    )

    def resolved(self, settings) -> Options:
        """These options with each default that follows the settings filled in."""
        return dataclasses.replace(
            self,
            experiment=self.experiment or f"{settings.task}-{self.verb}",
            registered_model=self.registered_model or registered_name(settings.task),
        )

    def aimed(self, experiment) -> Options:
        """These options with the objective chosen: --objective and --direction, or the experiment's
        default; raises ObjectiveError for a choice that cannot be used."""
        spec = self.objective or experiment.optimize
        return self.aiming_at(Objective.parse(spec, self.direction, experiment.metrics))

    def aiming_at(self, objective: Objective) -> Options:
        """These options with ``objective``, every direction said."""
        return dataclasses.replace(self, objective=objective.spec, direction=",".join(objective.directions))

    @property
    def goal(self) -> Objective:
        """The objective, as :meth:`aimed` chose it (unchosen: the contract's default, val_loss)."""
        if self.objective is None:
            return Objective((DEFAULT_METRIC,), (MINIMIZE,))
        return Objective.parse(self.objective, self.direction, {})


@dataclass(frozen=True)
class TrainOptions(Options):
    """train.py's options."""

    from_trial: str | None = option(
        None, "train a trial of a study again, its settings and seed, and these flags over them: STUDY:NUMBER "
        "(of --storage)",
    )  # fmt: skip
    from_run: str | None = option(
        None, "train an MLflow run of train.py or of a trial again, its settings and seed, and these flags over them "
        "(of --tracking-uri)",
    )  # fmt: skip
    register: bool = option(False, "register the model as --registered-model; @champion moves to it if it is better")


@dataclass(frozen=True)
class TuneOptions(Options):
    """tune.py's options."""

    verb = "tune"

    n_trials: int | None = option(
        None, f"trials to add to the study (default: {DEFAULT_TRIALS}, or what --until leaves)"
    )
    until: int | None = option(
        None,
        "the study's total: add trials until it holds this many that ended with a result (complete or pruned) or are "
        "under way, so that the same command after an interruption adds the rest",
    )
    timeout: float | None = option(
        None,
        "the study's wall time in seconds, counted from the command's start: no trial starts after it but "
        "each worker's first, and the running ones finish",
    )
    study_name: str | None = option(None, "Optuna study to create or continue (default: the settings' study)")
    workers: int | None = option(
        None,
        "worker processes, dealt in turn to the GPUs when training on them (default: one per core, at most 8, "
        "and no more than fit in memory, the GPUs' too)",
    )
    sampler: str = option("tpe", "how trials are proposed (docs/search.md compares them)", choices=SAMPLERS)
    defaults_first: bool = option(True, "propose a new study's first trial at random, not at the experiment's defaults")
    warm_start: str | None = option(
        None,
        "another study of --storage whose best trials a new study tries first, in what of their settings its space "
        "holds: STUDY, or STUDY:K for its K best (default 3)",
    )
    pruner: str = option("median", "how poor trials are stopped early", choices=PRUNERS)
    pruning: bool = option(True, "train every trial for all its epochs")
    grace_period: int = option(
        60,
        "seconds a running trial may go without a heartbeat before it counts as dead, its machine gone, and "
        "the next process to start a trial hands it back to the study (or marks it FAIL: --resume-attempts)",
    )
    resume_attempts: int = option(
        3,
        "times a trial cut short (its worker killed, its machine gone, a SIGTERM) goes on from its last epoch on the "
        "next free worker of any machine, before it fails; 0: it fails at once, and no epoch's state is kept",
        minimum=0,
    )
    server_patience: float = option(
        120, "seconds to keep retrying a database or tracking server that does not answer, before the study stops"
    )
    repeats: int | None = option(
        None,
        "times each of the --repeat-best trials trains again, with new seeds (and new validation splits where the "
        "data has no validation folder), before the best is chosen by the mean; 0: none (default: 2 where the "
        "training split holds at most 10,000 examples, else 0)",
        minimum=0,
    )
    repeat_best: int = option(3, "how many of the best trials --repeats trains again")
    baseline: str = option(
        "linear",
        "a model that needs no tuning, trained, scored and logged beside the best: linear (scikit-learn's "
        "LogisticRegression on the standardized pixels), svc (an RBF SVC too), none",
        choices=BASELINES,
    )
    # The searched settings that the command line fixed (tune.py --batch-size 64): the study
    # searches the others. Not a flag: each setting's own flag fixes it.
    fixed: tuple[str, ...] = option((), "searched settings fixed by their flags", flag=None)

    def resolved(self, settings) -> TuneOptions:
        return dataclasses.replace(super().resolved(settings), study_name=self.study_name or settings.study)

    @property
    def most_trials(self) -> int:
        """The most trials this session adds: --n-trials, or at most --until's total."""
        return self.n_trials if self.n_trials is not None else (self.until or DEFAULT_TRIALS)


def registered_name(task: str) -> str:
    """The registered model of a task's studies: models:/NAME@champion is the best of that task."""
    return f"{task}-classifier"
