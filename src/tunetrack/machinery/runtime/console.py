"""Where the scripts' lines go: a terminal, a pipe, a file. A reader that goes away (``tune.py |
head``) or a disk that fills (``> /dev/full``) costs the lines that were still to come, never
the study's bookkeeping: the trials, the test, the registration and the runs' ends go on as if
someone were reading."""

from __future__ import annotations

import io
import os
import sys


class _Forgiving(io.TextIOBase):
    """A text stream that stops writing, silently, the first time its file refuses a write."""

    def __init__(self, stream):
        self._stream = stream
        self.lost = False

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                return self._stream.write(text)
            except OSError:
                self._lose()
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self._stream.flush()
            except OSError:
                self._lose()

    def _lose(self) -> None:
        self.lost = True
        # What the stream still holds would fail again when Python flushes it at exit, and say
        # so on stderr: its file descriptor is pointed at /dev/null, where flushing succeeds.
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # a stream without a file descriptor (a test's StringIO) has nothing to flush later

    def isatty(self) -> bool:
        return not self.lost and self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        return self._stream.encoding

    def writable(self) -> bool:
        return True


def forgive() -> None:
    """Make this process's stdout and stderr forgiving (once); processes it forks inherit them."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Forgiving):
            setattr(sys, name, _Forgiving(stream))
