"""
The per-request CSV log: one row per request, appended to
C{LOG_PATH/ollama-proxy.csv}.

The file is what operators open in a spreadsheet or pandas, so the writer's
promises are about the file, not the process:

  - every row is whole: it is formatted to bytes first and appended with one
    C{os.write} on an C{O_APPEND} descriptor, so C{tail -f} sees each row as it
    is written and rows never interleave; a short write is cut back off;
  - a file holds one schema: it starts with the header (L{COLUMNS}); a file
    with another header is moved aside, never appended to or overwritten;
  - a row torn by a crash is cut off (and kept in a side file) at start-up;
  - while the file cannot be written, rows wait in memory, in order, and are
    written when it can be written again.

Everything runs on the reactor thread: a thread pool would reorder rows.
The column definitions are in C{docs/csv-columns.md}.
"""

from __future__ import annotations

import csv
import os
import stat
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ollamaproxy.record import COLUMNS, OUTSIDE_TEXT_COLUMNS, RequestRecord

log = Logger()

# A text cell starting with one of these is a formula (or becomes one) in
# Excel, LibreOffice and Google Sheets.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")

# Read size for the start-up scan of an existing file.
_BLOCK = 1 << 20
# How much of an existing file's start is read to find its header line.
_HEAD = 1 << 16

_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_SIDE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
# The log holds client addresses and API key names: not world-readable.
_FILE_MODE = 0o640


class _Echo:
    """
    A pseudo-file for L{csv.writer} whose C{write} returns the formatted row,
    so that C{writerow} does too.
    """

    def write(self, line: str) -> str:
        return line


def _dialect_writer() -> Any:
    # The default "excel" dialect: RFC 4180 quoting with CRLF line ends.  The
    # CRLF matters: with a bare "\n" terminator Python 3.11 does not quote a
    # field holding a lone "\r", and the row no longer reads back.
    return csv.writer(_Echo())


_HEADER: bytes = _dialect_writer().writerow(COLUMNS).encode("ascii")
_HEADER_LINE: bytes = _HEADER.rstrip(b"\r\n")


def _utc_stamp(wall: float) -> str:
    """
    C{2026-11-27T031500Z}: a UTC instant that is safe in a file name.
    """
    return time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime(wall))


def _utc_day(wall: float) -> tuple[int, int, int]:
    t = time.gmtime(wall)
    return (t.tm_year, t.tm_mon, t.tm_mday)


def _describe(error: OSError) -> str:
    return error.strerror or str(error)


def check_log_directory(directory: str, filename: str = "ollama-proxy.csv") -> str | None:
    """
    Create C{directory} if needed and prove a file can be written there (and
    that C{filename}, if it exists, can be appended to).

    @return: a one-line description of the problem, or L{None} if there is
        none.  Used at start-up to refuse a bad C{--log-path} before
        listening.
    """
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        return f"cannot create log directory {directory}: {_describe(e)}"
    if not os.path.isdir(directory):
        return f"log path {directory} is not a directory"
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".ollama-proxy-probe-")
    except OSError as e:
        return f"cannot create files in log directory {directory}: {_describe(e)}"
    try:
        try:
            os.write(fd, b"probe\n")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        return f"cannot write to log directory {directory}: {_describe(e)}"
    path = os.path.join(directory, filename)
    if os.path.lexists(path):
        try:
            os.close(os.open(path, os.O_RDWR | os.O_APPEND))
        except OSError as e:
            return f"cannot append to {path}: {_describe(e)}"
    return None


def _last_row_end(fd: int, size: int) -> int:
    """
    The offset just after the last complete row in the first C{size} bytes of
    C{fd}: after its last newline that is outside quotes.

    With RFC 4180 quoting every C{"} belongs to a quoted field, so a position
    is outside quotes exactly when an even number of C{"} come before it.  A
    forward pass counts them (C{bytes.count} over blocks, so neither the file
    nor a Python loop per byte); a backward pass then tries the newlines from
    the end, usually one or two, each by C{rfind}.
    """
    quotes = 0
    offset = 0
    while offset < size:
        block = os.pread(fd, min(_BLOCK, size - offset), offset)
        if not block:
            size = offset
            break
        quotes += block.count(b'"')
        offset += len(block)

    after = 0  # quotes at or after the current position
    end = size
    while end > 0:
        start = max(0, end - _BLOCK)
        block = os.pread(fd, end - start, start)
        high = len(block)
        while (i := block.rfind(b"\n", 0, high)) >= 0:
            after += block.count(b'"', i, high)
            if (quotes - after) % 2 == 0:
                return start + i + 1
            high = i
        after += block.count(b'"', 0, high)
        end = start
    return 0


class CsvLog(Service):
    """
    Appends one CSV row per finished request to C{directory/filename}.

    Degraded mode: when a write (or open, or rotation's new file) fails, the
    row is kept in an in-memory buffer, L{healthy} becomes C{False},
    L{last_error} says why, and the failure is logged once.  Every
    C{retry_interval} seconds the log tries again and, once it can, writes
    the buffered rows in their order and logs, once, how many it wrote and
    dropped.

    The buffer holds at most C{buffer_limit} rows; past that, the I{newest}
    rows are dropped and counted in L{rows_dropped}.  Dropping the newest
    rather than the oldest keeps what is kept contiguous with what is
    already in the file: the file stays a complete record up to the moment
    the buffer filled, followed by one gap (whose start is logged) instead of
    a gap that silently moves forward while rows already accepted are
    discarded.  It is also what a bounded queue does everywhere else, and
    costs nothing per row.

    The same periodic check compares C{os.stat(path)} with the open
    descriptor, so a file removed or replaced behind the log's back is
    noticed and a new one started; a removed file is also noticed before
    each write (its link count is 0).  L{reopen} does the same on demand,
    for SIGHUP from logrotate.

    Rows that arrive before the service starts wait in the buffer; rows that
    arrive after it stopped (requests ending during shutdown) are written by
    opening, appending and closing the file.
    """

    def __init__(
        self,
        directory: str,
        *,
        clock: IReactorTime,
        wall: Callable[[], float] = time.time,
        filename: str = "ollama-proxy.csv",
        guard_formulas: bool = True,
        max_bytes: int | None = None,
        rotate_daily: bool = False,
        buffer_limit: int = 10_000,
        retry_interval: float = 1.0,
    ) -> None:
        if buffer_limit < 0:
            raise ValueError("buffer_limit must be >= 0")
        if retry_interval <= 0:
            raise ValueError("retry_interval must be > 0")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self._directory = directory
        self._filename = filename
        self._path = os.path.join(directory, filename)
        stem, ext = os.path.splitext(filename)
        self._stem = stem
        self._ext = ext
        self._clock = clock
        self._wall = wall
        self._guard = guard_formulas
        self._guarded = tuple(
            i for i, name in enumerate(COLUMNS) if name in OUTSIDE_TEXT_COLUMNS
        )
        self._max_bytes = max_bytes
        self._rotate_daily = rotate_daily
        self._buffer_limit = buffer_limit
        self._retry_interval = retry_interval
        self._writer = _dialect_writer()

        # Seams for tests: an os.write-like and an os.ftruncate-like.
        self._write: Callable[[int, bytes], int] = os.write
        self._truncate: Callable[[int, int], None] = os.ftruncate

        self._fd: int | None = None
        self._regular = True
        # (st_dev, st_ino) of a file whose end is known to be a row boundary:
        # reopening it needs no scan.
        self._trusted: tuple[int, int] | None = None
        # UTC day of the last write to the open file, for daily rotation.
        self._day: tuple[int, int, int] | None = None
        self._rotation_blocked_until: float | None = None
        self._rotation_warned = False

        self._pending: deque[bytes] = deque()
        self._started = False
        self._rows_written = 0
        self._rows_dropped = 0
        self._last_error: str | None = None
        # Counters for the degraded episode in progress.
        self._episode_written = 0
        self._episode_dropped = 0

        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    # -- public state ------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def healthy(self) -> bool:
        """
        C{False} while rows cannot be written (degraded).
        """
        return self._last_error is None

    @property
    def last_error(self) -> str | None:
        """
        Why the log is degraded; L{None} while it is healthy.
        """
        return self._last_error

    @property
    def rows_written(self) -> int:
        """
        Data rows written since construction (headers not counted).
        """
        return self._rows_written

    @property
    def rows_buffered(self) -> int:
        """
        Rows waiting in memory to be written.
        """
        return len(self._pending)

    @property
    def rows_dropped(self) -> int:
        """
        Rows never written: dropped because the buffer was full, or malformed.
        """
        return self._rows_dropped

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._started = True
        try:
            self._open(scan=True)
            self._flush()
        except OSError as e:
            self._fail(e)
        self._loop.start(self._retry_interval, now=False).addErrback(
            lambda f: log.failure("CSV log check loop stopped", f)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        try:
            if self._pending:
                if self._fd is None:
                    self._open(scan=False)
                self._flush()
        except OSError as e:
            self._fail(e)
        if self._pending:
            log.error(
                "{count} rows could not be written to {path} before stopping: {error}",
                count=len(self._pending),
                path=self._path,
                error=self._last_error,
            )
        self._close()

    # -- rows --------------------------------------------------------------

    def request_finished(self, record: RequestRecord) -> None:
        """
        Log one finished request.  Never raises.
        """
        try:
            cells = record.cells()
        except Exception:
            log.failure("Cannot format the CSV row of request {id}", id=record.request_id)
            self._rows_dropped += 1
            return
        self.write_cells(cells)

    def write_cells(self, cells: Sequence[str]) -> None:
        """
        Log one row of ready cells, in L{COLUMNS} order.  Never raises.
        """
        try:
            self._accept(cells)
        except Exception:
            log.failure("Unexpected error in the CSV log")

    def reopen(self) -> None:
        """
        Close the file and open C{path} again (a new file, with a header, if
        it is gone): for SIGHUP after logrotate moved the file.  Never raises.
        """
        if not self.running:
            return
        try:
            log.info("Reopening {path}", path=self._path)
            self._close()
            self._open(scan=False)
            self._flush()
        except OSError as e:
            self._fail(e)
        except Exception:
            log.failure("Unexpected error reopening the CSV log")

    # -- internals ---------------------------------------------------------

    def _format(self, cells: Sequence[str]) -> bytes:
        if len(cells) != len(COLUMNS):
            raise ValueError(f"{len(cells)} cells, expected {len(COLUMNS)}")
        if self._guard:
            cells = list(cells)
            for i in self._guarded:
                cell = cells[i]
                if cell and isinstance(cell, str) and cell.startswith(FORMULA_TRIGGERS):
                    cells[i] = "'" + cell
        line: str = self._writer.writerow(cells)
        # A lone surrogate (from a header decoded with surrogateescape) would
        # make the file invalid UTF-8; keep it visible as \udcxx instead.
        return line.encode("utf-8", "backslashreplace")

    def _accept(self, cells: Sequence[str]) -> None:
        try:
            row = self._format(cells)
        except ValueError as e:
            log.error("CSV row not written: {problem}", problem=str(e))
            self._rows_dropped += 1
            return
        if self.running:
            if self._last_error is None and not self._pending:
                try:
                    self._write_row(row)
                except OSError as e:
                    self._fail(e)
                else:
                    self._rows_written += 1
                    return
            self._buffer(row)
        elif self._started:
            # Stopped: a request that ended during shutdown.
            self._buffer(row)
            try:
                if self._fd is None:
                    self._open(scan=False)
                self._flush()
            except OSError as e:
                self._fail(e)
            finally:
                self._close()
        else:
            self._buffer(row)

    def _buffer(self, row: bytes) -> None:
        if len(self._pending) < self._buffer_limit:
            self._pending.append(row)
            return
        if self._episode_dropped == 0:
            log.error(
                "CSV log buffer is full ({limit} rows); new rows are dropped until "
                "{path} can be written",
                limit=self._buffer_limit,
                path=self._path,
            )
        self._rows_dropped += 1
        self._episode_dropped += 1

    def _flush(self) -> None:
        """
        Write the buffered rows, in order; raise L{OSError} at the first
        failure, leaving that row and those after it buffered.
        """
        pending = self._pending
        while pending:
            self._write_row(pending[0])
            pending.popleft()
            self._rows_written += 1
            self._episode_written += 1
        if self._last_error is not None:
            log.info(
                "CSV log {path} is writable again: wrote {written} buffered rows, "
                "dropped {dropped}",
                path=self._path,
                written=self._episode_written,
                dropped=self._episode_dropped,
            )
            self._last_error = None
        self._episode_written = 0
        self._episode_dropped = 0

    def _fail(self, error: OSError) -> None:
        """
        Enter (or stay in) degraded mode; log only on entering it.
        """
        self._close()
        message = f"{self._path}: {_describe(error)}"
        if self._last_error is None:
            self._episode_written = 0
            self._episode_dropped = 0
            log.error(
                "Cannot write the CSV log ({error}); keeping up to {limit} rows in "
                "memory and retrying every {interval}s",
                error=message,
                limit=self._buffer_limit,
                interval=self._retry_interval,
            )
        self._last_error = message

    def _tick(self) -> None:
        """
        The periodic check: notice a removed or replaced file, retry after a
        failure.  Never raises (an exception would stop the L{LoopingCall}).
        """
        try:
            if self._fd is not None and self._replaced():
                log.info("{path} was removed or replaced; starting a new file", path=self._path)
                self._close()
            if self._fd is None:
                self._open(scan=False)
            self._flush()
        except OSError as e:
            self._fail(e)
        except Exception:
            log.failure("Unexpected error in the CSV log check")

    def _replaced(self) -> bool:
        assert self._fd is not None
        try:
            on_disk = os.stat(self._path)
        except FileNotFoundError:
            return True
        except OSError:
            # Cannot tell (the directory is not searchable): keep writing to
            # the file we have.
            return False
        mine = os.fstat(self._fd)
        return (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino)

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _open(self, *, scan: bool) -> None:
        """
        Open C{path} for appending, creating it (and its directory) if
        needed, and make it a file this log may append to: a file with another
        header is moved aside; a torn last row is cut off (when C{scan}, or
        when the file is not one known to end cleanly); a new or empty file
        gets the header.
        """
        self._close()
        os.makedirs(self._directory, exist_ok=True)
        fd = os.open(self._path, _OPEN_FLAGS, _FILE_MODE)
        try:
            st = os.fstat(fd)
            self._regular = stat.S_ISREG(st.st_mode)
            identity = (st.st_dev, st.st_ino)
            size = st.st_size
            if self._regular and size > 0:
                verdict = self._check_header(fd, size)
                if verdict == "other":
                    os.close(fd)
                    fd = -1
                    aside = self._move_aside(".old-schema")
                    log.warn(
                        "{path} has other columns than this version writes; moved it to "
                        "{aside} and started a new file",
                        path=self._path,
                        aside=aside,
                    )
                    fd = os.open(self._path, _OPEN_FLAGS, _FILE_MODE)
                    st = os.fstat(fd)
                    identity = (st.st_dev, st.st_ino)
                    size = st.st_size
                elif verdict == "partial":
                    log.warn(
                        "{path} held only part of a header ({size} bytes); emptied it",
                        path=self._path,
                        size=size,
                    )
                    self._truncate(fd, 0)
                    size = 0
                elif scan or identity != self._trusted:
                    size = self._repair_tail(fd, size)
            if size == 0 or not self._regular:
                self._append(fd, _HEADER)
            if self._regular:
                self._trusted = identity
                if size > len(_HEADER):
                    self._day = _utc_day(st.st_mtime)
                else:
                    self._day = _utc_day(self._wall())
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        self._fd = fd

    def _check_header(self, fd: int, size: int) -> str:
        """
        C{"ok"} if the file starts with today's header, C{"partial"} if all it
        holds is the start of it, else C{"other"}.
        """
        head = os.pread(fd, min(size, _HEAD), 0)
        newline = head.find(b"\n")
        if newline < 0:
            if size <= len(_HEADER) and _HEADER.startswith(head):
                return "partial"
            return "other"
        return "ok" if head[:newline].rstrip(b"\r") == _HEADER_LINE else "other"

    def _repair_tail(self, fd: int, size: int) -> int:
        """
        Cut a torn last row off the file, saving it in a side file; return
        the new size.
        """
        end = _last_row_end(fd, size)
        if end >= size:
            return size
        aside = self._side_name()
        out = os.open(aside, _SIDE_FLAGS, _FILE_MODE)
        try:
            offset = end
            while offset < size:
                block = os.pread(fd, min(_BLOCK, size - offset), offset)
                if not block:
                    break
                view = memoryview(block)
                while view:
                    view = view[os.write(out, view):]
                offset += len(block)
        finally:
            os.close(out)
        self._truncate(fd, end)
        log.warn(
            "{path} ended in a torn row ({torn} bytes after the last complete row); "
            "cut it off and saved it in {aside}",
            path=self._path,
            torn=size - end,
            aside=aside,
        )
        return end

    def _unused(self, make: Callable[[str], str]) -> str:
        """
        The first of C{make("")}, C{make("_2")}, C{make("_3")}, ... that names
        nothing.  (C{_} sorts after C{.}, so names stay in time order.)
        """
        n = 1
        while True:
            candidate = os.path.join(self._directory, make("" if n == 1 else f"_{n}"))
            if not os.path.lexists(candidate):
                return candidate
            n += 1

    def _move_aside(self, label: str) -> str:
        stamp = _utc_stamp(self._wall())
        aside = self._unused(lambda n: f"{self._stem}.{stamp}{n}{label}{self._ext}")
        os.rename(self._path, aside)
        return aside

    def _side_name(self) -> str:
        stamp = _utc_stamp(self._wall())
        return self._unused(lambda n: f"{self._filename}.torn-{stamp}{n}")

    def _write_row(self, row: bytes) -> None:
        """
        Append one formatted row (with the header first if the file is
        empty), rotating first if it is time; raise L{OSError} on failure.
        """
        if self._fd is None:
            self._open(scan=False)
        assert self._fd is not None
        data = row
        if self._regular:
            st = os.fstat(self._fd)
            if st.st_nlink == 0:
                log.info("{path} was removed; starting a new file", path=self._path)
                self._open(scan=False)
                assert self._fd is not None
                st = os.fstat(self._fd)
            size = st.st_size
            if size > len(_HEADER) and self._rotation_due(size, len(row)) and self._rotate():
                assert self._fd is not None
                size = os.fstat(self._fd).st_size
            if size == 0:
                # Emptied behind our back (copytruncate, "> file").
                data = _HEADER + row
        assert self._fd is not None
        self._append(self._fd, data)
        if self._rotate_daily:
            self._day = _utc_day(self._wall())

    def _append(self, fd: int, data: bytes) -> None:
        """
        One C{write}; a short write is cut back off the file and raised.
        """
        written = self._write(fd, data)
        if written == len(data):
            return
        if written > 0 and self._regular:
            try:
                self._truncate(fd, os.fstat(fd).st_size - written)
            except OSError:
                # A part row stays in the file: whoever opens it next must
                # scan and cut it off.
                self._trusted = None
        raise OSError(f"short write ({written} of {len(data)} bytes)")

    def _rotation_due(self, size: int, incoming: int) -> bool:
        if self._max_bytes is not None and size + incoming > self._max_bytes:
            return True
        if self._rotate_daily and self._day is not None:
            return _utc_day(self._wall()) != self._day
        return False

    def _rotate(self) -> bool:
        """
        Move the current file aside under a timestamped name and open a new
        one.  A failed rename is logged (once until a rotation succeeds) and
        the current file kept; it is tried again after the next check.
        """
        now = self._clock.seconds()
        if self._rotation_blocked_until is not None and now < self._rotation_blocked_until:
            return False
        try:
            aside = self._move_aside("")
        except OSError as e:
            self._rotation_blocked_until = now + self._retry_interval
            if not self._rotation_warned:
                self._rotation_warned = True
                log.warn(
                    "Cannot rotate {path} ({error}); still writing to it",
                    path=self._path,
                    error=_describe(e),
                )
            return False
        self._rotation_warned = False
        self._rotation_blocked_until = None
        log.info("Rotated {path} to {aside}", path=self._path, aside=aside)
        self._open(scan=False)
        return True
