"""Start a PostgreSQL server and an MLflow tracking server in a folder, to try on this machine a
study shared by several machines.

Makes (on first use) a PostgreSQL cluster in FOLDER/postgres with the databases optuna and
mlflow, starts it, starts `mlflow server` on it (artifacts served from FOLDER/mlflow), prints
the tune.py command that each "machine" runs, and stops both servers at Ctrl-C. The folder
keeps everything: the same command later starts the same servers again. Needs PostgreSQL
(apt-get install postgresql) and the [postgres] extra (pip install -e ".[postgres]").

    python scripts/servers.py
    python scripts/servers.py --folder /tmp/servers --port 5001
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from tunetrack.machinery.cli import flags


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(__doc__)
    parser.add_argument("--folder", default="servers", help="where the servers keep their data (default: %(default)s)")
    parser.add_argument(
        "--port", type=flags.positive_int, default=5000, help="the MLflow server's port (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    from workbench.servers import PostgresFailed, mlflow_server, postgres, postgres_bin

    if postgres_bin() is None:
        flags.fail(parser.prog, "PostgreSQL is not installed: apt-get install postgresql")
    folder = Path(args.folder).resolve()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with postgres(folder / "postgres") as database:
            # No password on any command line: libpq reads it from this file.
            env = {"PGPASSFILE": str(database.pgpass)}
            backend = database.url("mlflow", with_password=False)
            with mlflow_server(backend, folder / "mlflow", args.port, env) as tracking:
                storage = database.url("optuna", with_password=False)
                print(
                    f"PostgreSQL     {storage} (data in {database.folder})\n"
                    f"mlflow server  {tracking.url} (runs in PostgreSQL, artifacts in {tracking.artifacts})\n\n"
                    "Each machine runs, in a working directory of its own (here: another terminal, another folder):\n\n"
                    f"  PGPASSFILE={database.pgpass} python {Path(__file__).resolve().parent / 'tune.py'} "
                    f"--n-trials 10 --storage {storage} --tracking-uri {tracking.url}\n\n"
                    f"and {tracking.url} shows the study. Ctrl-C stops both servers; {folder} keeps their data.",
                    flush=True,
                )
                stop.wait()
    except (PostgresFailed, RuntimeError) as error:
        flags.fail(parser.prog, str(error))
    print("both servers stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
