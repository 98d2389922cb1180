"""Measure what each command costs before and around its work: --help, a refused flag, predict.py
on one picture, and train.py's one epoch on a small folder (scikit-learn's 8x8 digits, 1,437
pictures to train on) against its fit, beside the floor: a Python that imports torch,
pytorch_lightning and MLflow and exits.

Each checkout given (default: this one) runs every command --rounds times, the checkouts taking
turns command by command so that the machine's drift falls on all alike; the table gives the
median wall time. To compare with an earlier commit, check it out beside this one:

    git worktree add /tmp/before HEAD~3
    python scripts/compare_startup.py --trees /tmp/before . --rounds 5
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunetrack.machinery.cli import flags

FLOOR = "import gc; gc.disable(); import torch, pytorch_lightning, mlflow"  # as the scripts import (collector.py)
EPOCH = ["--dataset", "folder", "--max-epochs", "1", "--model", "mlp"]


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(__doc__)
    parser.add_argument("--trees", nargs="+", default=["."], help="checkouts to compare (default: this one)")
    parser.add_argument("--rounds", type=flags.positive_int, default=3, help="runs of each (default: %(default)s)")
    args = parser.parse_args(argv)
    trees = [Path(tree).resolve() for tree in args.trees]
    for tree in trees:
        if not (tree / "scripts" / "train.py").is_file():
            parser.error(f"argument --trees: {tree} is not a checkout of this repository")

    from workbench.digits import export_digits

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        digits = export_digits(work / "digits")
        commands = {
            "train.py --help": ["scripts/train.py", "--help"],
            "tune.py --model nope (refused)": ["scripts/tune.py", "--model", "nope"],
            "train.py, 1 epoch of digits": ["scripts/train.py", *EPOCH, "--data-dir", str(digits), "--register"],
            "predict.py, one picture": [
                "scripts/predict.py",
                "--model",
                "models:/digits-classifier@champion",
                str(next(digits.rglob("*.png"))),
            ],
        }
        for tree in trees:  # each its own store, made and holding a champion before anything is timed
            (work / tree.name).mkdir(exist_ok=True)
            _run(tree, commands["train.py, 1 epoch of digits"], work / tree.name)
        times = {(tree, name): [] for tree in trees for name in [*commands, FLOOR]}
        fits = {tree: [] for tree in trees}
        for _ in range(args.rounds):
            for name, command in commands.items():
                for tree in trees:
                    took, out = _run(tree, command, work / tree.name)
                    times[tree, name].append(took)
                    if found := re.search(r"^best epoch .* in ([\d.]+) s$", out, re.MULTILINE):
                        fits[tree].append(float(found[1]))
            for tree in trees:
                times[tree, FLOOR].append(_run(tree, ["-c", FLOOR], work / tree.name)[0])
    print("| command | " + " | ".join(str(tree) for tree in trees) + " |\n|---|" + "---:|" * len(trees))
    for name in [FLOOR, *commands]:
        print(f"| {name} | " + " | ".join(f"{statistics.median(times[tree, name]):.2f} s" for tree in trees) + " |")
    if all(fits.values()):
        print(
            "| its fit (train.py's last line) | "
            + " | ".join(f"{statistics.median(fits[t]):.2f} s" for t in trees)
            + " |"
        )
    return 0


def _run(tree: Path, command: list[str], cwd: Path) -> tuple[float, str]:
    """Run ``command`` with ``tree``'s package first on the path; its wall time and output."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    script = [str(tree / command[0]), *command[1:]] if command[0].startswith("scripts/") else command
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - start
    if done.returncode not in (0, 2):
        raise SystemExit(f"{' '.join(command)} in {tree} failed: {done.stderr.strip().splitlines()[-1:]}")
    return took, done.stdout


if __name__ == "__main__":
    sys.exit(main())
