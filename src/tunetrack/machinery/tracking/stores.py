"""The addresses of the two stores, an Optuna storage URL and an MLflow tracking URI: printed
without their passwords; checked before anything is created, so that a command that fails on
a bad address leaves no file, table or experiment behind; and created once, even when several
processes start on an empty store at the same moment."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tunetrack.machinery.data.files import unwritable

T = TypeVar("T")

# The database servers SQLAlchemy reaches, by URL scheme (before any +driver).
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "oracle")
# What MLflow accepts as a tracking URI here: a database, a tracking server, or a folder.
TRACKING_SCHEMES = (*DATABASE_SCHEMES, "http", "https", "file")


class StoreUnusable(ValueError):
    """The address cannot be used: its message says why, in one line, without the password."""


class ServerUnavailable(RuntimeError):
    """A store stopped answering for longer than the patience allowed; the message names it,
    without its password."""


def retried(call: Callable[[], T], attempts: int, again: Callable[[Exception], bool], pause: float) -> T:
    """``call()``, made again while it fails with an error that ``again`` says a race with
    another process caused (whose loser's transaction the store rolled back whole), up to
    ``attempts`` times in all, after a random pause of up to ``pause`` seconds times the attempts
    so far: processes that collided once do not collide again in step."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if attempt == attempts or not again(error):
                raise
            time.sleep(random.uniform(0.25, 1.0) * pause * attempt)
    raise AssertionError("unreachable")


def create_once(url: str, create: Callable[[], T], make_tables: Callable[[str], None] | None = None) -> T:
    """``create()`` opens the store at ``url``, making its tables on first use.

    Two processes making the tables of one empty store at the same moment fail each other (two
    tune.py started in an empty folder: "table datasets already exists", or an Alembic migration
    that finds its row gone). On SQLite, an exclusive flock on the database's folder
    makes them take turns; a server database gets a few tries instead, since the loser's
    transaction is rolled back whole and on its next try finds the tables made.

    A new SQLite store is made whole or not at all: ``make_tables(url)`` makes its tables in a
    file beside it, which takes its name only once they are all there. A store whose first
    making was cut off (a full disk: "database or disk is full") once refused every later run
    ("table _alembic_tmp_tags already exists"); now it is simply not there.
    """
    path = sqlite_path(url)
    if path is None:  # the next try tells a race from a real error
        return retried(create, attempts=5, again=lambda error: True, pause=1.0)
    # The flock is not one of SQLite's own (POSIX) locks, and is on the folder, not the file:
    # the file may not be there yet.
    folder = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        if make_tables is not None and (not path.exists() or path.stat().st_size == 0):  # empty: a new store
            _made_whole(path, make_tables)
        return create()
    finally:
        os.close(folder)


def _made_whole(path: Path, make_tables: Callable[[str], None]) -> None:
    new = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        make_tables("sqlite:///" + urllib.parse.quote(str(new)))
        os.replace(new, path)
    finally:
        for leftover in (new, *(new.with_name(new.name + end) for end in ("-journal", "-wal", "-shm"))):
            leftover.unlink(missing_ok=True)


def public(url: str) -> str:
    """``url`` with its password, if any, replaced by ***: fit to print and to log."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user_and_password, _, host = parts.netloc.rpartition("@")
    netloc = f"{user_and_password.split(':', 1)[0]}:***@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def scheme(url: str) -> str:
    return urllib.parse.urlsplit(url).scheme.split("+")[0]


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///...`` URL; None for another kind of store or an in-memory one.
    Its path may be percent-encoded, as MLflow's default URI is where a folder's name has a
    space or a letter outside ASCII (``sqlite:////home/me/My%20Projects/mlflow.db``): it is
    decoded as SQLAlchemy decodes it."""
    if scheme(url) != "sqlite":
        return None
    path = url.split(":///", 1)[1] if ":///" in url else ""
    path = urllib.parse.unquote(path.split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None


def check_database(url: str, read_only: bool = False) -> None:
    """A database URL that can be opened and written (or, ``read_only``, read), checked without
    creating anything."""
    kind = scheme(url)
    if kind not in DATABASE_SCHEMES:
        raise StoreUnusable(
            f"{public(url)!r}: the scheme {kind!r} is not a database's (use sqlite:///FILE, or postgresql://...)"
        )
    path = sqlite_path(url)
    if path is not None:
        _check_sqlite_file(path, read_only)
        return
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, connect_args=_connect_timeout(kind))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:  # noqa: BLE001 - a missing driver, a refused connection, a bad password
        raise StoreUnusable(f"cannot open {public(url)!r}: {reason(error, url)}") from None


def check_tracking_uri(uri: str, read_only: bool = False) -> None:
    """An MLflow tracking URI that can be used, checked without creating anything; with
    ``read_only``, one to read from (a SQLite file must be there, and need not be writable)."""
    kind = scheme(uri) or "file"
    if kind not in TRACKING_SCHEMES:
        raise StoreUnusable(
            f"the tracking URI's scheme {kind!r} is unknown ({public(uri)!r}): use sqlite:///FILE, "
            "http://HOST:PORT of an mlflow server, or a database URL"
        )
    if kind in ("http", "https"):
        try:
            # MLflow's client retries an unreachable server for minutes; one probe says it now.
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
        except Exception as error:  # noqa: BLE001 - refused, unknown host, an HTTP error
            why = reason(error, uri)
            raise StoreUnusable(f"no MLflow tracking server answers at {public(uri)!r}: {why}") from None
    elif kind == "file":
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise StoreUnusable(
                f"{public(uri)!r} is a folder, and MLflow 3 refuses folder stores: use a database such as "
                "sqlite:///mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)"
            )
        folder = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path) if uri.startswith("file:") else uri)
        _check_writable_place(folder)
    else:
        check_database(uri, read_only)


def _check_sqlite_file(path: Path, read_only: bool = False) -> None:
    if read_only and not path.is_file():
        raise StoreUnusable(f"there is no store {str(path)!r} here")
    if read_only:
        if not os.access(path, os.R_OK):
            raise StoreUnusable(f"{str(path)!r} cannot be read")
        return
    if path.exists():
        if path.is_dir():
            raise StoreUnusable(f"{str(path)!r} is a folder, not a database file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise StoreUnusable(f"{str(path)!r} is read-only: a study writes to it")
        with open(path, "rb") as f:
            header = f.read(16)
        if header and header != b"SQLite format 3\x00":
            raise StoreUnusable(f"{str(path)!r} is not a SQLite database")
    # Nothing the user did not ask for is created: a folder that is not there is refused, as
    # sqlite3 refuses it. SQLite writes a journal beside the database, so the folder must take
    # new files too.
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise StoreUnusable(f"the folder {str(folder)!r} does not exist: create it, or name another")
    _check_writable_place(folder)


def _check_writable_place(folder: Path) -> None:
    if why := unwritable(folder):
        raise StoreUnusable(why)


def _connect_timeout(kind: str) -> dict:
    return {"connect_timeout": 10} if kind in ("postgresql", "mysql") else {}


# What a command says when a disk filled under it.
DISK_FULL = "the disk is full: free some space and run the same command again (what finished is kept)"


def disk_full(error: BaseException) -> bool:
    """Whether ``error``, or what caused it, says that a disk is full: an OSError's ENOSPC, or
    SQLite's "database or disk is full" however it was passed on."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "database or disk is full" in str(error) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def reason(error: BaseException, *urls: str) -> str:
    """The error's first line, never showing the password of any of ``urls``."""
    text = str(getattr(error, "orig", None) or error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    for url in urls:
        if password := urllib.parse.urlsplit(url).password:
            line = line.replace(password, "***")
    return line
