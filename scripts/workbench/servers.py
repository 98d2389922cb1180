"""A PostgreSQL server and an MLflow tracking server on this machine, each in a folder: what
the tests, the benchmark and scripts/servers.py start to run several "machines" against real
servers, as a study spread over many machines uses them.

PostgreSQL is Debian's package (``apt-get install postgresql``), whose ``initdb`` and
``pg_ctl`` live off PATH in /usr/lib/postgresql/VERSION/bin. It refuses to run as root; as
root, its commands run as the ``postgres`` user, who then owns the cluster's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

USER = "mnist"
DATABASES = ("optuna", "mlflow")
# MLflow 3's server starts seven job-queue consumers for its GenAI features, which poll all
# the time: together more than a core of the two this project trains on (measured: 16% each,
# idle). A study needs none of them.
NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# With more than one uvicorn worker, MLflow 3.17's server answered every request on a kept-alive
# connection 40 ms late (measured: 44 ms against 2 ms with one worker, for /health): the
# delayed-ACK stall of a socket without TCP_NODELAY. A trial makes some 25 requests.
SERVER_WORKERS = "1"


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl), or None if not installed."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def scratch_folder(prefix: str) -> Path:
    """A new temporary folder that the postgres user can reach (mkdtemp's are closed to it)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Postgres:
    """A PostgreSQL cluster in ``folder`` listening on 127.0.0.1:``port``, and on the addresses of
    ``also`` (a test's own network, say)."""

    folder: Path
    port: int
    password: str
    also: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()  # the server's own, NAME=VALUE: max_connections=300, say

    def url(self, database: str, with_password: bool = True, host: str = "127.0.0.1") -> str:
        """The database's URL; without the password, for clients that read it from PGPASSFILE."""
        user = f"{USER}:{self.password}" if with_password else USER
        return f"postgresql://{user}@{host}:{self.port}/{database}"

    @property
    def pgpass(self) -> Path:
        return self.folder / "pgpass"

    @property
    def pid(self) -> int:
        """The postmaster's process id: the parent of a process per connection."""
        return int((self.folder / "data" / "postmaster.pid").read_text().split()[0])

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses={','.join(['127.0.0.1', *self.also])}"
        options += "".join(f" -c {setting}" for setting in self.settings)
        self._pg_ctl("start", "-w", "-t", "60", "-o", options, "-l", str(self.folder / "server.log"))

    def stop(self) -> None:
        self._pg_ctl("stop", "-w", "-m", "fast")

    def restart(self) -> None:
        """Stop and start again on the same port: every open connection is cut."""
        self._pg_ctl("restart", "-w", "-m", "fast", "-t", "60", "-l", str(self.folder / "server.log"))

    def _pg_ctl(self, *args: str) -> None:
        _as_postgres([str(postgres_bin() / "pg_ctl"), "-D", str(self.folder / "data"), *args])


def open_postgres(folder: Path, port: int | None = None) -> Postgres:
    """The cluster in ``folder``, made there first if there is none; not started."""
    if (folder / "data" / "PG_VERSION").exists():
        return Postgres(folder, int((folder / "port").read_text()), (folder / "password").read_text())
    return init_postgres(folder, port)


def init_postgres(folder: Path, port: int | None = None) -> Postgres:
    """A new cluster in ``folder`` (which must not hold one yet), with the databases of
    :data:`DATABASES` for the user ``mnist`` and a random password; not started.

    The password is in ``folder/password``, and in ``folder/pgpass`` as libpq's password file
    (PGPASSFILE), so that a URL can leave it out: postgresql://mnist@127.0.0.1:PORT/optuna.
    """
    folder.mkdir(parents=True, exist_ok=True)
    password, port = secrets.token_urlsafe(12), port or free_port()
    (folder / "password").write_text(password)
    (folder / "port").write_text(str(port))
    pgpass = folder / "pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:*:{USER}:{password}\n")
    pgpass.chmod(0o600)  # libpq ignores a password file that others may read
    _give_to_postgres(folder)
    _as_postgres([
        str(postgres_bin() / "initdb"), "-D", str(folder / "data"), "-U", USER, "--auth=scram-sha-256",
        f"--pwfile={folder / 'password'}", "--no-sync",
    ])  # fmt: skip
    # Clients on the networks the server has an address on may connect too, with the password:
    # those of a test's own network namespace.
    _as_postgres(["sh", "-c", f"echo 'host all all samenet scram-sha-256' >> {folder / 'data' / 'pg_hba.conf'}"])
    server = Postgres(folder, port, password)
    server.start()
    try:
        import psycopg

        with psycopg.connect(server.url("postgres"), autocommit=True) as connection:
            for name in DATABASES:
                connection.execute(f"CREATE DATABASE {name}")
    finally:
        server.stop()
    return server


@contextlib.contextmanager
def postgres(folder: Path, also: tuple[str, ...] = (), settings: tuple[str, ...] = ()) -> Iterator[Postgres]:
    """The cluster in ``folder`` (made there on first use), started for the block and stopped
    after it, listening on the addresses of ``also`` too, with the server ``settings``."""
    server = dataclasses.replace(open_postgres(folder), also=also, settings=settings)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(PostgresFailed):
            server.stop()


@dataclass
class MlflowServer:
    """``mlflow server`` on 127.0.0.1:``port``: runs in PostgreSQL, artifacts in a folder that
    the server serves, so that clients need no shared file system."""

    backend_store_uri: str
    artifacts: Path
    port: int
    log: Path
    env: dict[str, str] | None = None  # PGPASSFILE, say, for a backend URI without its password
    process: subprocess.Popen | None = None
    host: str = "127.0.0.1"  # 0.0.0.0: every address of the machine

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
            "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
            "--host", self.host, "--port", str(self.port), "--workers", SERVER_WORKERS,
        ]  # fmt: skip
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **NO_JOBS, **(self.env or {})},
            )
        try:
            wait_until_healthy(self.url, self.process, "mlflow server", timeout)
        except RuntimeError as error:
            self.stop()
            raise RuntimeError(f"{error}; see {self.log}") from None

    def stop(self) -> None:
        """Stop the server and its worker processes (its whole process group)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def wait_until_healthy(url: str, process: subprocess.Popen, what: str, timeout: float, health: str = "/health") -> None:
    """Wait until ``url`` + ``health`` answers; RuntimeError if ``process`` ends, or ``timeout``
    seconds pass, first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}{health}", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer on {url} within {timeout:.0f} s")


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str,
    folder: Path,
    port: int | None = None,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> Iterator[MlflowServer]:
    """``mlflow server`` for the block, its artifacts and log in ``folder``, on ``host``."""
    folder.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(
        backend_store_uri, folder / "artifacts", port or free_port(), folder / "mlflow-server.log", env, host=host
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def cpu_seconds(pid: int) -> float:
    """The CPU time a process and its descendants have used so far, those that ended included
    (a parent that reaped them counts theirs): a server's whole tree, PostgreSQL's process per
    connection with it. 0 for a process that is gone."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            process = int(Path(stat).parent.name)
            children.setdefault(int(fields[1]), []).append(process)
            ticks[process] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    tree, total = [pid], 0
    while tree:
        member = tree.pop()
        total += ticks.get(member, 0)
        tree += children.get(member, [])
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Namespace:
    """A network namespace of this process's own, joined to this machine by a veth pair: a host
    at ``address`` that reaches this machine at ``gateway``, and whose link can be cut."""

    name: str
    link: str  # this machine's end of the pair
    gateway: str
    address: str

    def command(self, *args: str) -> list[str]:
        """``args``, run in the namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def cut(self) -> None:
        _ip("link", "set", self.link, "down")

    def mend(self) -> None:
        _ip("link", "set", self.link, "up")


def can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@contextlib.contextmanager
def network_namespace() -> Iterator[Namespace]:
    """A :class:`Namespace` for the block (iproute2's ``ip``; root), gone after it."""
    pid = os.getpid()
    block = 4 * (pid % 16384)  # a /30 of 10.200.0.0/16 of this process's own
    prefix = f"10.200.{block // 256}"
    space = Namespace(f"hpo-test-{pid}", f"hpo{pid}h", f"{prefix}.{block % 256 + 1}", f"{prefix}.{block % 256 + 2}")
    inside = f"hpo{pid}n"
    _ip("netns", "add", space.name)
    try:
        _ip("link", "add", space.link, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", space.name)
        _ip("addr", "add", f"{space.gateway}/30", "dev", space.link)
        _ip("link", "set", space.link, "up")
        for args in (["addr", "add", f"{space.address}/30", "dev", inside], ["link", "set", inside, "up"],
                     ["link", "set", "lo", "up"]):  # fmt: skip
            subprocess.run(space.command("ip", *args), check=True, capture_output=True)
        yield space
    finally:
        subprocess.run(["ip", "netns", "del", space.name], capture_output=True)
        subprocess.run(["ip", "link", "del", space.link], capture_output=True)  # gone with it, normally


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class PostgresFailed(RuntimeError):
    """One of PostgreSQL's programs failed; the message ends with what it said."""


def _as_postgres(command: list[str]) -> None:
    """Run one of PostgreSQL's programs, as the postgres user where this process is root."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    # Into a file, not a pipe: a server that pg_ctl starts would hold a pipe open for good.
    with tempfile.TemporaryFile("w+") as output:
        returncode = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode
        output.seek(0)
        said = output.read().strip().splitlines()[-3:]
    if returncode != 0:
        program = next((Path(part).name for part in command if part.endswith(("initdb", "pg_ctl"))), command[-1])
        raise PostgresFailed(f"{program} failed: {' / '.join(said)}")


def _give_to_postgres(folder: Path) -> None:
    """As root, hand the cluster's folder to the postgres user, who must be able to reach it."""
    if os.geteuid() != 0:
        return
    closed = [p for p in folder.resolve().parents if not p.stat().st_mode & 0o001]
    if closed:
        raise PostgresFailed(f"the postgres user cannot reach {folder}: {closed[0]} is closed to other users")
    for path in (folder, folder / "password"):
        shutil.chown(path, "postgres", "postgres")
