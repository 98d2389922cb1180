"""Train one configuration and track it in MLflow.

Builds the experiment's model and data (src/experiment: MNIST and the original pipeline's
network by default), fetches the data on first use, trains with Lightning (one point per epoch
for train_loss, val_loss and val_acc), tests the best epoch's weights, and logs it all, the
checkpoint and the model (for scripts/predict.py) included, to one MLflow run. Then `mlflow
ui`, in this folder, shows it.

    python scripts/train.py --lr 1e-3 --hidden-dim 128
    python scripts/train.py --model cnn --batch-size 256 --max-epochs 5 --experiment quick
    python scripts/train.py --import shapes.py --dataset shapes --model tiny --val-size 60  # docs/make-it-yours.md
"""

from __future__ import annotations

import sys

from experiment.settings import Settings
from machinery import cli, collector
from machinery.options import Options


def main(argv: list[str] | None = None) -> int:
    # Every flag, store address and size is checked before any data is fetched or any store or
    # run is created.
    parser, settings, options = cli.parse(__doc__, Settings, Options, argv)
    cli.check_accelerator(parser, options.accelerator)
    cli.check_tracking(parser, options.tracking_uri)

    from experiment.search import EXPERIMENT, build
    from machinery import interrupts, registry
    from machinery.contract import SettingError
    from machinery.stores import public
    from machinery.training import TrainingDiverged, fit

    collector.freeze_imports()
    cli.check_memory(parser, EXPERIMENT, settings)
    cli.prepare_data(parser, EXPERIMENT, settings)
    tracker = cli.connect_tracking(parser, options.tracking_uri, options.experiment)
    run_name = f"{settings.study} lr={settings.lr:g} hidden={settings.hidden_dim} batch={settings.batch_size}"
    try:
        with interrupts.handling(), tracker.run(run_name) as run_id:
            with interrupts.interruptible():
                model, data = build(settings)
                result = fit(model, data, settings, options, tracker, run_id)
            model_id = registry.log_model(tracker, run_id, result.model, data, settings.task)
    except SettingError as error:
        cli.setting_error(parser, settings, error)
    except TrainingDiverged as error:
        cli.fail(parser.prog, str(error))
    except KeyboardInterrupt:
        cli.fail(parser.prog, f"{interrupts.describe()}; the MLflow run is marked KILLED", interrupts.exit_code())
    if interrupts.requested():  # while the model was logged: the run is complete, and says so
        cli.fail(parser.prog, f"{interrupts.describe()} after the run was complete", interrupts.exit_code())

    print(
        f"\nbest epoch {result.best_epoch}: val_loss {result.val_loss:.4f}, val_acc {result.val_acc:.4f}; "
        f"test_acc {result.test_acc:.4f} (test_loss {result.test_loss:.4f}) in {result.seconds:.1f} s\n"
        f"MLflow run {result.run_id} in experiment {options.experiment!r} of {public(tracker.tracking_uri)}\n"
        f"the model: models:/{model_id} (python scripts/predict.py --model models:/{model_id} picture.png)\n"
        f"look at it: {tracker.ui_command()}   then {tracker.run_url(result.run_id)}"
    )
    return 0


if __name__ == "__main__":
    collector.pause()  # until the imports are done (machinery.collector)
    sys.exit(main())
