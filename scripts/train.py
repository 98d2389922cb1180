"""Train one configuration of the MNIST classifier and track it in MLflow.

Fetches MNIST on first use, trains with Lightning (one point per epoch for train_loss, val_loss
and val_acc), evaluates the best epoch's weights on the test set, and logs everything, the
checkpoint and the model (for scripts/predict.py) included, to one MLflow run. Then `mlflow
ui`, in this folder, shows it.

    python scripts/train.py --lr 1e-3 --hidden-dim 128
    python scripts/train.py --batch-size 256 --max-epochs 5 --experiment quick
"""

from __future__ import annotations

import dataclasses
import sys

from mnist_hpo import cli
from mnist_hpo.config import TrainConfig

SETTINGS = [field.name for field in dataclasses.fields(TrainConfig)]


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(__doc__)
    cli.add_config_flags(parser, SETTINGS)
    parser.add_argument("--experiment", default="mnist-train", help="MLflow experiment (default: %(default)s)")
    cli.add_common_flags(parser)
    args = parser.parse_args(argv)
    config = TrainConfig(**cli.config_from_flags(args, SETTINGS))
    # Everything that can be checked is, before MNIST is fetched or any store or run is created.
    cli.check_data_dir(parser, args.data_dir)
    cli.check_accelerator(parser, args.accelerator)
    cli.check_tracking(parser, args.tracking_uri, args.experiment)
    cli.check_memory(parser, config)

    from mnist_hpo import interrupts, registry
    from mnist_hpo.data import ensure_mnist_once, first_test_digits
    from mnist_hpo.mnist_files import MNISTUnavailable
    from mnist_hpo.model import pixel_classifier
    from mnist_hpo.stores import public
    from mnist_hpo.training import TrainingDiverged, fit

    try:
        ensure_mnist_once(args.data_dir)
    except MNISTUnavailable as error:
        cli.fail(parser.prog, str(error))
    tracker = cli.connect_tracking(parser, args.tracking_uri, args.experiment)
    run_name = f"lr={config.lr:g} hidden={config.hidden_dim} batch={config.batch_size}"
    try:
        with interrupts.handling(), tracker.run(run_name) as run_id:
            with interrupts.interruptible():
                result = fit(config, tracker, run_id, data_dir=args.data_dir, accelerator=args.accelerator)
            example = first_test_digits(args.data_dir, 5).numpy()
            model_id = registry.log_model(tracker, run_id, pixel_classifier(result.model), example)
    except TrainingDiverged as error:
        cli.fail(parser.prog, str(error))
    except KeyboardInterrupt:
        cli.fail(parser.prog, "interrupted; the MLflow run is marked KILLED", code=130)

    print(
        f"\nbest epoch {result.best_epoch}: val_loss {result.val_loss:.4f}, val_acc {result.val_acc:.4f}; "
        f"test_acc {result.test_acc:.4f} (test_loss {result.test_loss:.4f}) in {result.seconds:.1f} s\n"
        f"MLflow run {result.run_id} in experiment {args.experiment!r} of {public(tracker.tracking_uri)}\n"
        f"the model: models:/{model_id} (python scripts/predict.py --model models:/{model_id} digit.png)\n"
        f"look at it: {tracker.ui_command()}   then {tracker.run_url(result.run_id)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
