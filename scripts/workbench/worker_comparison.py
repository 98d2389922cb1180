"""How a machine's cores are best split into workers: studies of the same experiment, each for the
same wall-clock budget, with every core count this machine can emulate (its cores, taken away
by CPU affinity) and, for each, one worker with all of them against one worker per core and the
counts between (see scripts/compare_workers.py).

Each study runs in a process of its own, pinned to its cores before anything starts a worker,
so that the workers it forks inherit the pinning. The machine's speed drifts: studies run seed
by seed, each seed's configurations in an order rotated from the last seed's. From every
trial's finish time: the trials a minute, when the first complete trial landed, and the best
val_loss by each moment.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence

from workbench import python_path
from workbench.search_comparison import best_by, run_study

METHOD = "tpe+median"  # what make tune searches with
MOMENTS = (30, 60, 120)  # seconds into the study at which the best val_loss is read


def configurations(cores: int) -> list[tuple[int, int]]:
    """(cores, workers) to compare: 1, 2, 4, ... cores up to the machine's, and on each, 1, 2, 4,
    ... workers up to one per core."""
    counts = sorted({2**i for i in range(cores.bit_length()) if 2**i <= cores} | {cores})
    return [(c, w) for c in counts for w in counts if w <= c]


def run_pinned(cores: int, workers: int, seed: int, budget: float) -> dict:
    """One study on the first ``cores`` cores with ``workers`` workers, in a process of its own."""
    command = [sys.executable, "-m", "workbench.worker_comparison", str(cores), str(workers), str(seed), str(budget)]
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": python_path()}
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(
    seeds: Sequence[int], budget: float, cores: int, done: Callable[[dict], None] = lambda study: None
) -> list[dict]:
    """Every configuration's study for every seed, seed by seed, in rotated orders."""
    configs, studies = configurations(cores), []
    for i, seed in enumerate(seeds):
        for cores_, workers in configs[i % len(configs) :] + configs[: i % len(configs)]:
            studies.append({**run_pinned(cores_, workers, seed, budget), "cores": cores_})
            done(studies[-1])
    return studies


def summarize(studies: list[dict]) -> list[dict]:
    """Per (cores, workers), the medians over the seeds."""
    rows = []
    for key in dict.fromkeys((s["cores"], s["workers"]) for s in studies):
        mine = [s for s in studies if (s["cores"], s["workers"]) == key]
        ended = [[t for t in s["trials"] if t["finished_s"] is not None] for s in mine]
        first = [min((t["finished_s"] for t in trials if t["state"] == "COMPLETE"), default=None) for trials in ended]
        rows.append({
            "cores": key[0],
            "workers": key[1],
            "trials_a_minute": statistics.median(60 * len(t) / s["budget"] for t, s in zip(ended, mine, strict=True)),
            "first_complete_s": statistics.median(f for f in first if f is not None) if any(first) else None,
            "best_by": {
                m: statistics.median(best_by(s["trials"], s["budget"] if m == "budget" else m) for s in mine)
                for m in (*MOMENTS, "budget")
                if m == "budget" or m < mine[0]["budget"]
            },
        })  # fmt: skip
    return rows


def table_markdown(rows: list[dict]) -> str:
    moments = list(rows[0]["best_by"])
    named = [f"{m} s" if m != "budget" else "at the budget" for m in moments]
    best = " | ".join(f"best val_loss {n}" for n in named)
    lines = [
        f"| cores | workers | trials a minute | first complete trial | {best} |",
        "|---:|---:|---:|---:|" + "---:|" * len(moments),
    ]
    for row in rows:
        first = f"{row['first_complete_s']:.0f} s" if row["first_complete_s"] is not None else "none"
        best = " | ".join(f"{row['best_by'][m]:.4f}" for m in moments)
        lines.append(f"| {row['cores']} | {row['workers']} | {row['trials_a_minute']:.1f} | {first} | {best} |")
    return "\n".join(lines)


def _one(cores: int, workers: int, seed: int, budget: float) -> None:
    """A study pinned to the first ``cores`` cores, printed as one JSON line."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])  # before any worker is forked
    from tunetrack.experiment.settings import Settings

    study = run_study(Settings(), METHOD, seed, budget, workers)
    print(json.dumps(study, default=str))


if __name__ == "__main__":
    _one(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
