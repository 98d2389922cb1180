"""Benchmark what an epoch and a trial cost, on the real MNIST, in one run.

Times one epoch (the median over several, after a warm-up) of (a) the project's training path
as train.py and tune.py run it, (b) the write-up's pipeline (per-image transforms through a
DataLoader, self.log on every step, MLFlowLogger), and (c) a plain PyTorch loop on in-memory
tensors, for batch sizes 32, 64 and 256, hidden_dim 128. Then times a short study with 1 and
with 2 workers, in trials per minute, and with --servers the 2-worker study again on
PostgreSQL and an mlflow server instead of SQLite files. Prints a table; --json writes the
figures as JSON.

    python scripts/benchmark.py
    python scripts/benchmark.py --epochs 5 --json benchmark.json
    python scripts/benchmark.py --skip-study --batch-sizes 64
    python scripts/benchmark.py --batch-sizes 64 --servers
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time

from mnist_hpo import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(__doc__)
    parser.add_argument(
        "--batch-sizes", type=cli.positive_int, nargs="+", default=[32, 64, 256], help="(default: %(default)s)"
    )
    parser.add_argument(
        "--epochs",
        type=cli.positive_int,
        default=3,
        help="timed epochs per measurement, after one warm-up (default: %(default)s)",
    )
    parser.add_argument(
        "--study-trials", type=cli.positive_int, default=12, help="trials of the timed study (default: %(default)s)"
    )
    parser.add_argument(
        "--study-epochs",
        type=cli.positive_int,
        default=2,
        help="epochs per trial of the timed study (default: %(default)s)",
    )
    parser.add_argument("--skip-study", action="store_true", help="time epochs only")
    parser.add_argument(
        "--servers",
        action="store_true",
        help="also time the 2-worker study against PostgreSQL and an mlflow server started here, "
        "beside the SQLite files (needs PostgreSQL: apt-get install postgresql)",
    )
    rounds_help = "studies on each kind of store, with --servers (default: %(default)s)"
    parser.add_argument("--rounds", type=cli.positive_int, default=3, help=rounds_help)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where all three paths train (default: cuda if there is one)",
    )
    parser.add_argument("--data-dir", default="data", help="where MNIST is kept (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    cli.check_data_dir(parser, args.data_dir)

    import torch

    from mnist_hpo.devtools.benchmark import PATHS, time_epochs, time_startup, time_study
    from mnist_hpo.workers import available_cores

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

    epochs = []
    for batch_size in args.batch_sizes:
        for path in PATHS:
            timing = time_epochs(path, args.data_dir, batch_size, args.epochs, device)
            epochs.append(timing)
            each = ", ".join(f"{t:.2f}" for t in timing.epochs)
            print(f"  {path:<8} batch {batch_size:>3}: {timing.seconds:6.2f} s/epoch  ({each})", flush=True)

    print(
        f"\nseconds per epoch on the {machine['device']} (median of {args.epochs} after a warm-up; "
        "55,000 images trained, 5,000 validated):"
    )
    header = ("batch", "(a) project", "(b) write-up", "(c) plain", "(a) img/s", "b/a", "a/c")
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, (5, 11, 12, 9, 9, 5, 5), strict=True)))
    table = []
    for batch_size in args.batch_sizes:
        a, b, c = (next(t for t in epochs if t.batch_size == batch_size and t.path == p) for p in PATHS)
        row = {
            "batch_size": batch_size,
            "project_s": a.seconds,
            "write_up_s": b.seconds,
            "plain_s": c.seconds,
            "project_samples_per_s": a.samples_per_second,
            "b_over_a": b.seconds / a.seconds,
            "a_over_c": a.seconds / c.seconds,
        }
        table.append(row)
        print(
            f"{batch_size:>5}  {a.seconds:>11.2f}  {b.seconds:>12.2f}  {c.seconds:>9.2f}  "
            f"{a.samples_per_second:>9.0f}  {row['b_over_a']:>5.1f}  {row['a_over_c']:>5.2f}"
        )

    startup = time_startup(args.data_dir)
    print("\nstart-up, paid once per process (a train.py run, a tune worker):")
    for name, seconds in startup.items():
        print(f"  {name:<52} {seconds:5.2f} s")

    studies = []
    if not args.skip_study:
        print(f"\na study of {args.study_trials} trials x {args.study_epochs} epochs (no pruning, seed 0):")
        for workers in (1, 2):
            study = time_study(args.data_dir, workers, args.study_trials, args.study_epochs)
            studies.append(study)
            print(
                f"  --workers {workers}: {study['seconds']:5.1f} s in all, {study['trials_per_minute']:5.1f} "
                f"trials/minute; once the workers run, {study['steady_trials_per_minute']:5.1f} trials/minute",
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
                    study = time_study(args.data_dir, 2, args.study_trials, args.study_epochs, stores=stores)
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
                f"  the servers cost {100 * (1 - statistics.median(ratios)):.1f}% of the throughput and "
                f"{100 * (statistics.median(cpu_ratios) - 1):.1f}% more CPU a trial (medians of the rounds' pairs)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "epochs": table,
                    "startup": startup,
                    "study": studies,
                    "raw": [t.__dict__ for t in epochs],
                },
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


if __name__ == "__main__":
    sys.exit(main())
