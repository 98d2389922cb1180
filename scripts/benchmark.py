"""Benchmark what an epoch and a trial cost, on the real MNIST, in one run.

Times epochs of (a) the project's training path as train.py and tune.py run it, (b) the
original pipeline (per-image transforms through a DataLoader, self.log on every step,
MLFlowLogger), and (c) a plain PyTorch loop on in-memory tensors, for batch sizes 32, 64 and
256, the default network. (a) and (c) run in lockstep, an epoch of one and then one of the
other, and the figure is the median of the ratios of neighbouring epochs: the machine's speed
drifts too much for anything else. Times what keeping each epoch's state (for a trial cut short
to go on where it stopped) adds to an epoch of (a). Then times a short study with 1 and with 2
workers, in trials per minute, and with --servers the 2-worker study again on PostgreSQL and an
mlflow server instead of SQLite files. Prints a table; --json writes the figures as JSON.

    python scripts/benchmark.py
    python scripts/benchmark.py --epochs 8 --json benchmark.json
    python scripts/benchmark.py --skip-study --batch-sizes 64
    python scripts/benchmark.py --batch-sizes 64 --servers
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import time

from tunetrack.experiment.data import MNISTDataModule
from tunetrack.experiment.settings import Settings
from tunetrack.machinery.cli import checks, flags
from tunetrack.machinery.options import Options
from tunetrack.machinery.study import time_split

# The lockstep pairs each of (c)'s epochs but the first with its neighbours among (a)'s.
at_least_two = flags.whole_number(2)


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(__doc__)
    parser.add_argument(
        "--batch-sizes", type=flags.positive_int, nargs="+", default=[32, 64, 256], help="(default: %(default)s)"
    )
    parser.add_argument(
        "--epochs", type=at_least_two, default=6, help="timed epochs of (a) and of (c), after one warm-up each "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--original-epochs", type=flags.positive_int, default=1, help="timed epochs of (b), after one warm-up "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--study-trials", type=flags.positive_int, default=12, help="trials of the timed study (default: %(default)s)"
    )
    parser.add_argument(
        "--study-epochs",
        type=flags.positive_int,
        default=2,
        help="epochs per trial of the timed study (default: %(default)s)",
    )
    parser.add_argument(
        "--minibatches-per-step", type=flags.positive_int, default=Options().minibatches_per_step,
        help="of (a), as train.py's flag: 1 times Lightning's own loop (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--startup-rounds", type=flags.positive_int, default=3,
        help="new processes timed per way of starting, alternated (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--skip-study", action="store_true", help="time epochs only")
    parser.add_argument(
        "--servers",
        action="store_true",
        help="also time the 2-worker study against PostgreSQL and an mlflow server started here, "
        "beside the SQLite files (needs PostgreSQL: apt-get install postgresql)",
    )
    rounds_help = "studies on each kind of store, with --servers (default: %(default)s)"
    parser.add_argument("--rounds", type=flags.positive_int, default=3, help=rounds_help)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where all three paths train (default: cuda if there is one)",
    )
    parser.add_argument("--data-dir", default=Settings().data_dir, help="where MNIST is kept (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)

    import torch

    from tunetrack.machinery.study.workers import available_cores
    from workbench.benchmark import lockstep, time_keeping, time_original, time_startup, time_study

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: there is no CUDA device here")
    machine = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "pytorch-lightning", "optuna", "mlflow")},
    }
    print(" ".join(f"{k}={v}" for k, v in machine.items()), flush=True)

    base = Settings(data_dir=args.data_dir)
    checks.prepare_data(parser, _experiment(), base)
    table = []
    for batch_size in args.batch_sizes:
        settings = dataclasses.replace(base, batch_size=batch_size, max_epochs=args.epochs)
        pairs = lockstep(settings, device, args.minibatches_per_step)
        original = time_original(dataclasses.replace(settings, max_epochs=1 + args.original_epochs), device)[1:]
        a, b, c = statistics.median(pairs["project"]), statistics.median(original), statistics.median(pairs["plain"])
        row = {
            "batch_size": batch_size,
            "project_s": a,
            "original_s": b,
            "plain_s": c,
            "project_images_per_s": (60_000 - MNISTDataModule(settings).held_out) / a,
            "b_over_a": b / a,
            "a_over_c": pairs["ratio"],
            "a_over_c_pairs": pairs["ratios"],
            "project_epochs": pairs["project"],
            "plain_epochs": pairs["plain"],
            "original_epochs": original,
        }
        table.append(row)
        spread = f"{min(pairs['ratios']):.2f}-{max(pairs['ratios']):.2f}"
        print(
            f"  batch {batch_size:>3}: (a) {a:.2f} s  (b) {b:.2f} s  (c) {c:.2f} s  a/c {pairs['ratio']:.2f} "
            f"(pairs {spread})",
            flush=True,
        )

    print(
        f"\nseconds per epoch on the {machine['device']} (medians; 55,000 images trained, 5,000 validated); a/c is "
        f"the median of {2 * (args.epochs - 1)} neighbouring pairs of epochs, (a) and (c) run in lockstep:"
    )
    header = ("batch", "(a) project", "(b) original", "(c) plain", "(a) img/s", "b/a", "a/c", "a/c pairs")
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, (5, 11, 12, 9, 9, 5, 5, 11), strict=True)))
    for row in table:
        spread = f"{min(row['a_over_c_pairs']):.2f}-{max(row['a_over_c_pairs']):.2f}"
        print(
            f"{row['batch_size']:>5}  {row['project_s']:>11.2f}  {row['original_s']:>12.2f}  {row['plain_s']:>9.2f}  "
            f"{row['project_images_per_s']:>9.0f}  {row['b_over_a']:>5.1f}  {row['a_over_c']:>5.2f}  {spread:>11}"
        )

    # The shortest epoch (the largest batch) is where a fixed cost an epoch weighs most.
    keeping_settings = dataclasses.replace(base, batch_size=max(args.batch_sizes), max_epochs=args.epochs)
    keeping = time_keeping(keeping_settings, device, args.minibatches_per_step)
    print(
        f"\nkeeping each epoch's state, for a trial cut short to go on (batch {max(args.batch_sizes)}): "
        f"{1000 * keeping['keeping_s']:.0f} ms an epoch of {keeping['epoch_s']:.2f} s, "
        f"{100 * keeping['share']:.1f}% (medians of {args.epochs - 1} epochs)",
        flush=True,
    )

    startup = time_startup(base, args.startup_rounds)
    print("\nstart-up, paid once per process (a train.py run, a tune worker):")
    for name, seconds in startup.items():
        print(f"  {name:<60} {seconds:5.2f} s")

    studies = []
    if not args.skip_study:
        print(f"\na study of {args.study_trials} trials x {args.study_epochs} epochs (no pruning, seed 0):")
        for workers in (1, 2):
            study = time_study(dataclasses.replace(base, max_epochs=args.study_epochs), workers, args.study_trials)
            studies.append(study)
            print(
                f"  --workers {workers}: {study['seconds']:5.1f} s in all, {study['trials_per_minute']:5.1f} "
                f"trials/minute; once the workers run, {study['steady_trials_per_minute']:5.1f} trials/minute",
                f"\n    {time_split.line(study['split'], workers)}",
                flush=True,
            )
        ratio = studies[1]["steady_trials_per_minute"] / studies[0]["steady_trials_per_minute"]
        print(f"  2 workers / 1 worker, once running: {ratio:.2f}x")
        if args.servers:
            # The machine's speed drifts from run to run: alternate the order in each round
            # (SQLite first, then the servers first, ...) and compare each round's pair.
            print(f"  --workers 2, SQLite files against PostgreSQL + mlflow server, {args.rounds} rounds:")
            ratios, cpu_ratios = [], []
            for round_ in range(args.rounds):
                pair = {}
                for stores in ("sqlite", "servers")[:: 1 if round_ % 2 == 0 else -1]:
                    study_settings = dataclasses.replace(base, max_epochs=args.study_epochs)
                    study = time_study(study_settings, 2, args.study_trials, stores=stores)
                    studies.append(study)
                    pair[stores] = study
                    in_stores = study["stores_cpu_seconds"] / args.study_trials
                    cpu = study["study_cpu_seconds"] / args.study_trials + in_stores
                    print(
                        f"    {stores:<8} {study['steady_trials_per_minute']:5.1f} trials/minute once running; "
                        f"CPU {cpu:.2f} s a trial ({in_stores:.2f} s in the stores)",
                        flush=True,
                    )
                ratios.append(pair["servers"]["steady_trials_per_minute"] / pair["sqlite"]["steady_trials_per_minute"])
                cpu_ratios.append(
                    sum(pair["servers"][k] for k in ("study_cpu_seconds", "stores_cpu_seconds"))
                    / pair["sqlite"]["study_cpu_seconds"]
                )
            print(
                f"  with the servers: {statistics.median(ratios):.2f}x SQLite's trials per minute and "
                f"{statistics.median(cpu_ratios):.2f}x its CPU a trial (medians of the rounds' pairs)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "epochs": table,
                    "keeping": keeping,
                    "startup": startup,
                    "study": studies,
                },
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0


def _experiment():
    from tunetrack.experiment.search import EXPERIMENT

    return EXPERIMENT


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


if __name__ == "__main__":
    sys.exit(main())
