"""A run's system metrics: MLflow's own (CPU use, memory, disk and network, read with psutil by
MLflow's monitors; a GPU's where pynvml can read one), under MLflow's names
(``system/cpu_utilization_percentage``, ...), which mlflow ui shows in a run's System metrics tab.

Sampled when a run writes anyway, once an epoch with the epoch's metrics, in the same request,
rather than by MLflow's SystemMetricsMonitor thread (``log_system_metrics=True``): that thread
writes through a client of its own on a timer of its own, one more request every interval from
every worker, and a run's end waits for it, for minutes of MLflow's retries where a tracking
server is down. CPU use is the machine's, averaged since the sampler's previous sample (the
epoch, or the study for its parent run); memory and disk as they are at the sample.
"""

from __future__ import annotations

PREFIX = "system/"


class Sampler:
    """MLflow's monitors of this machine, read on demand."""

    def __init__(self):
        import psutil
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            self.monitors.append(GPUMonitor())
        except (ImportError, RuntimeError):  # no pynvml, or no NVIDIA GPU: MLflow's own test
            pass
        psutil.cpu_percent()  # CPU use is counted from here: the first sample covers what follows

    def sample(self) -> dict[str, float]:
        """The machine's metrics now (CPU use since the previous sample), by MLflow's names."""
        metrics = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        return {PREFIX + name: float(value) for name, value in metrics.items()}
