"""Show the studies of an Optuna storage in optuna-dashboard: their history, the parameters'
importances, slices and contours, live while a study runs (`make dashboard`).

A storage with no study yet is said in one line, and nothing is created: optuna-dashboard
itself would make an empty optuna.db and fail on it.

    python scripts/dashboard.py                       # sqlite:///optuna.db, on http://127.0.0.1:8080
    python scripts/dashboard.py --storage postgresql://user:pw@db/optuna --port 8081
"""

from __future__ import annotations

import sys

from tunetrack.machinery.cli import checks, flags
from tunetrack.machinery.options import DEFAULT_STORAGE


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(__doc__)
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="the Optuna storage (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="where to listen (default: %(default)s)")
    parser.add_argument("--port", type=flags.positive_int, default=8080, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    storage = checks.studies_to_show(parser, args.storage)

    import optuna_dashboard

    print(f"optuna-dashboard on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    try:
        optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
