"""tune.py's workers over a machine's GPUs, on a CPU: a stand-in answers the device query
(machinery.runtime.devices.visible_gpus) in tune.py's process, and the real code deals the workers,
sizes them against the GPUs' memory and gives each worker its CUDA_VISIBLE_DEVICES. The real
device is covered by the CUDA tests where one is present."""

from __future__ import annotations

import os
import queue
import re

import optuna
import pytest

from conftest import TINY
from tiny.settings import TinySettings
from tunetrack.machinery.cli import checks, flags
from tunetrack.machinery.options import TuneOptions
from tunetrack.machinery.runtime import devices, memory
from tunetrack.machinery.study import fork_server, workers
from tunetrack.machinery.tracking.mlflow_runs import connect

GB = 2**30
EACH = 3 * GB  # what the stand-in estimate says one worker needs


def stand_ins(count: int, memory_gb: int) -> list[devices.Gpu]:
    return [devices.Gpu(i, "stand-in", memory_gb * GB) for i in range(count)]


@pytest.fixture
def machine(monkeypatch):
    """``machine(gpus, workers=None, accelerator="auto")``: what tune.py's check of --workers
    makes of a machine of 64 cores and ample host memory with ``gpus``, for workers that need
    3 GB each: the number of workers, or SystemExit with the refusal on stderr."""
    monkeypatch.setattr(memory, "bytes_to_train", lambda experiment, settings: EACH)
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**40)
    monkeypatch.setattr(workers, "available_cores", lambda: 64)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def check(gpus, workers=None, accelerator="auto") -> int:
        monkeypatch.setattr(devices, "visible_gpus", lambda: gpus)
        options = TuneOptions(n_trials=1000, workers=workers, accelerator=accelerator)
        return checks.check_workers(flags.Parser("tune.py.", prog="tune.py"), TINY, TinySettings(), options)

    return check


def refusal(capsys) -> str:
    [line] = capsys.readouterr().err.strip().splitlines()
    return line


def test_four_workers_over_two_gpus_are_dealt_0_1_0_1(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    dealt = devices.assign(4, stand_ins(2, 16))
    assert [gpu.id for gpu in dealt] == ["0", "1", "0", "1"]
    assert [str(gpu) for gpu in dealt][:2] == ["0 (stand-in)", "1 (stand-in)"]
    assert devices.assign(3, []) == [None, None, None]  # no GPU: every worker as before


def test_the_gpus_the_user_made_visible_are_the_ones_dealt(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert [gpu.id for gpu in devices.assign(4, stand_ins(2, 16))] == ["2", "3", "2", "3"]


@pytest.mark.slow
def test_each_worker_sees_only_its_gpu_and_cuda_has_not_started_in_it(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    dealt = devices.assign(4, stand_ins(2, 16))
    fork_server.start()  # the server tune.py's workers are forked from
    reports = fork_server.CONTEXT.Queue()
    processes = [fork_server.CONTEXT.Process(target=_a_worker, args=(i, gpu, reports)) for i, gpu in enumerate(dealt)]
    for process in processes:
        process.start()
    seen = {}
    for _ in processes:
        try:
            index, *what = reports.get(timeout=60)
        except queue.Empty:
            pytest.fail("a worker did not report")
        seen[index] = tuple(what)
    for process in processes:
        process.join()
    assert [seen[i] for i in range(4)] == [
        ("2", "2 (stand-in)", False),
        ("3", "3 (stand-in)", False),
        ("2", "2 (stand-in)", False),
        ("3", "3 (stand-in)", False),
    ]


def _a_worker(index: int, gpu: devices.Assigned, reports) -> None:
    """What a worker does first (workers._worker_main), and what it then sees."""
    devices.see_only(gpu)
    import torch

    reports.put((index, os.environ["CUDA_VISIBLE_DEVICES"], devices.params()["gpu"], torch.cuda.is_initialized()))


@pytest.mark.slow
def test_a_studys_trials_and_runs_say_which_gpu_trained_them(tiny_settings, tmp_path, tracking_uri, monkeypatch,
                                                              capsys):  # fmt: skip
    from tunetrack.machinery.study.tuning import tune

    # On this CPU the workers, told of GPUs that are not there, train on the CPU (--accelerator
    # auto), and say which stand-in they were dealt.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "visible_gpus", lambda: stand_ins(2, 16))
    tracker = connect(tracking_uri, "tune-tests")
    options = TuneOptions(n_trials=4, workers=4, accelerator="auto", study_name="gpus",
                          storage=f"sqlite:///{tmp_path / 'optuna.db'}", pruning=False)  # fmt: skip
    session = tune(TINY, tiny_settings, options.resolved(tiny_settings), lambda: tracker)
    assert not session.problems
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"trial +\d+ COMPLETE", line)]
    assert sorted(line.rsplit("  ", 1)[1] for line in lines) == ["gpu 0", "gpu 0", "gpu 1", "gpu 1"]
    study = optuna.load_study(study_name="gpus", storage=options.storage)
    params = [tracker.client.get_run(t.user_attrs["mlflow_run_id"]).data.params for t in study.trials]
    assert sorted(p["gpu"] for p in params) == ["0 (stand-in)", "0 (stand-in)", "1 (stand-in)", "1 (stand-in)"]
    assert devices.params() == {}  # tune.py's own process trained nothing, and says no GPU


def test_on_the_cpu_nothing_asks_about_gpus_and_nothing_changes(machine, monkeypatch, capsys):
    def asked():
        raise AssertionError("asked about GPUs")

    monkeypatch.setattr(devices, "visible_gpus", asked)
    parser = flags.Parser("tune.py.", prog="tune.py")
    for accelerator in ("cpu", "mps"):
        assert checks.check_workers(parser, TINY, TinySettings(), TuneOptions(n_trials=9, accelerator=accelerator)) == 8
    assert machine([], workers=12) == 12  # auto without CUDA: the host's memory alone sizes them
    assert devices.params() == {}


def test_two_gpus_of_16_gb_hold_ten_workers_of_3_gb(machine, capsys):
    two = stand_ins(2, 16)  # 5 workers of 3 GB on each
    assert machine(two) == 8  # the default: one per core, at most 8, and they fit
    assert machine(two, workers=10) == 10
    with pytest.raises(SystemExit):
        machine(two, workers=11)
    assert refusal(capsys) == (
        "tune.py: error: argument --workers: 11 workers put 6 on GPU 0 (stand-in), which need about 18.0 GB "
        "(3.0 GB each); the GPU has 16.0 GB: use --workers 10 or fewer"
    )


def test_eight_gpus_of_80_gb_hold_208_workers_of_3_gb(machine, capsys):
    eight = stand_ins(8, 80)  # 26 workers of 3 GB on each
    assert machine(eight) == 8  # one on each GPU
    assert machine(eight, workers=11) == 11  # two on GPUs 0 to 2, one on the others
    assert machine(eight, workers=208) == 208
    assert "208 workers share 64 cores" in capsys.readouterr().err  # allowed, with the usual warning
    with pytest.raises(SystemExit):
        machine(eight, workers=209)
    assert "209 workers put 27 on GPU 0 (stand-in), which need about 81.0 GB (3.0 GB each); the GPU has 80.0 GB: " \
           "use --workers 208 or fewer" in refusal(capsys)  # fmt: skip


def test_the_default_takes_what_the_gpus_hold_and_an_explicit_count_is_refused(machine, capsys, monkeypatch):
    small = stand_ins(2, 4)  # one worker of 3 GB on each
    assert machine(small) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    with pytest.raises(SystemExit) as refused:
        machine(small, workers=3)
    assert refused.value.code == 2
    assert refusal(capsys) == (
        "tune.py: error: argument --workers: 3 workers put 2 on GPU 5 (stand-in), which need about 6.0 GB "
        "(3.0 GB each); the GPU has 4.0 GB: use --workers 2 or fewer"
    )


def test_with_gpus_of_different_sizes_the_first_that_runs_out_is_named(machine, capsys):
    mixed = [devices.Gpu(0, "large", 80 * GB), devices.Gpu(1, "small", 16 * GB)]
    assert machine(mixed, workers=11) == 11  # 6 on the large one, 5 on the small one
    with pytest.raises(SystemExit):
        machine(mixed, workers=12)
    assert "12 workers put 6 on GPU 1 (small), which need about 18.0 GB" in refusal(capsys)


def test_a_gpu_that_cannot_hold_one_worker_is_refused_even_by_default(machine, capsys):
    with pytest.raises(SystemExit):
        machine(stand_ins(2, 2))
    assert refusal(capsys) == (
        "tune.py: error: argument --workers: not even one worker fits on GPU 0 (stand-in): it needs about 3.0 GB "
        "and the GPU has 2.0 GB"
    )
