"""A folder of results that moved: renamed, moved elsewhere, copied to another machine.

MLflow records where each experiment, run, logged model and model version keeps its artifacts
as absolute paths (``/home/me/orig/mlruns/1/...``), made when they were created. In a folder
that moved, those paths lead nowhere (or, worse, to a re-created ``orig/`` outside the folder):
the champion does not load and a continued study finds no checkpoint. When a SQLite store's
experiments name a folder that is gone, and the store's own folder holds their ``mlruns/``,
the paths are made to name the store's folder, in one transaction, and the command says so.
Paths that lead somewhere are left as they are.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

# Where MLflow keeps an artifact location: (table, column).
LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)
ARTIFACTS_FOLDER = "mlruns"  # MLflow's default, beside its SQLite store
FILE_SCHEME = "file://"


def follow(store: Path) -> str | None:
    """Make the artifact locations of the SQLite store ``store`` name its folder, if its folder
    moved; return the line that says so, or None where nothing moved (or nothing could be
    written: a read-only store is read as it is)."""
    if not store.is_file() or store.stat().st_size == 0:
        return None
    folder = store.resolve().parent
    with contextlib.closing(sqlite3.connect(store, timeout=30)) as db:
        try:
            locations = [row[0] for row in db.execute("SELECT artifact_location FROM experiments")]
        except sqlite3.Error:
            return None  # no MLflow tables (yet)
        old = _old_folder(locations, folder)
        if old is None:
            return None
        try:
            with db:  # one transaction: every location, or none
                for table, column in LOCATIONS:
                    for prefix in (str(old), FILE_SCHEME + str(old)):
                        new = (FILE_SCHEME if prefix.startswith(FILE_SCHEME) else "") + str(folder)
                        db.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 - names are ours
                            f"WHERE substr({column}, 1, ?) = ?",
                            (new, len(prefix) + 1, len(prefix) + 1, prefix + "/"),
                        )
        except sqlite3.Error:
            return None
    return f"this folder was {old}: MLflow's records of where its artifacts are now name {folder}"


def _old_folder(locations: list[str], folder: Path) -> Path | None:
    """The folder that the experiments' locations name, if it is gone and this one holds their
    artifacts instead."""
    for location in locations:
        path = Path(location.removeprefix(FILE_SCHEME))
        if not path.is_absolute() or path.exists() or ARTIFACTS_FOLDER not in path.parts:
            continue
        at = len(path.parts) - 1 - path.parts[::-1].index(ARTIFACTS_FOLDER)
        old, tail = Path(*path.parts[:at]), Path(*path.parts[at:])
        if old != folder and (folder / tail).exists():
            return old
    return None


if __name__ == "__main__":  # make ui: before mlflow ui shows the store of this folder
    import sys

    if note := follow(Path(sys.argv[1] if len(sys.argv) > 1 else "mlflow.db")):
        print(note)
