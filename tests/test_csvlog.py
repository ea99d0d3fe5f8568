"""
Tests for L{ollamaproxy.csvlog}: the file operators open is whole, one schema,
readable back exactly, and survives disk trouble without losing order.
"""

from __future__ import annotations

import calendar
import csv
import errno
import fcntl
import glob
import io
import os
import stat
from collections.abc import Callable
from typing import Any

import pandas as pd
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ollamaproxy import csvlog
from ollamaproxy.csvlog import CsvLog, check_log_directory
from ollamaproxy.record import COLUMNS, OUTSIDE_TEXT_COLUMNS, RequestRecord

HEADER = ",".join(COLUMNS) + "\r\n"
NUMERIC = [
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "request_size_bytes",
    "response_size_bytes",
    "queue_time_ms",
    "processing_time_ms",
    "total_time_ms",
    "http_status",
    "system_load_cpu",
    "system_load_memory",
    "concurrent_requests",
    "ttft_ms",
    "tokens_per_second",
    "ollama_load_ms",
    "ollama_prompt_eval_ms",
    "ollama_eval_ms",
]
TEXT = [c for c in COLUMNS if c not in NUMERIC and c != "timestamp"]

# 2026-11-27T23:59:58Z
NIGHT = float(calendar.timegm((2026, 11, 27, 23, 59, 58, 0, 0, 0)))

HOSTILE = [
    'a,b "quoted", and ""doubled""',
    "line one\nline two\r\nline three\rend",
    "\r\n",
    "\n",
    "trailing newline\n",
    "unicode: é ü 漢字 🦙 \u200f rtl \u0301 combining",
    "  spaces around  ",
    "",
    "NA",
    "null",
    "None",
    "#comment",
    "tab\tinside",
    '"',
    ",",
    "nul\x00byte",
]


def row(n: int, **overrides: str) -> list[str]:
    """
    A plausible row whose request_id is C{req-<n>}.
    """
    cells = dict.fromkeys(COLUMNS, "")
    cells.update(
        timestamp="2026-11-27T03:15:00.000Z",
        request_id=f"req-{n}",
        ip_source="10.0.0.1",
        user_agent="ollama-python/0.6.3",
        http_method="POST",
        endpoint="/api/chat",
        model="llama3.2:1b",
        input_tokens="12",
        output_tokens="30",
        total_tokens="42",
        request_size_bytes="100",
        response_size_bytes="2000",
        queue_time_ms="0.100",
        processing_time_ms="1200.000",
        total_time_ms="1200.500",
        http_status="200",
        stream_mode="true",
        concurrent_requests="1",
    )
    cells.update(overrides)
    return [cells[c] for c in COLUMNS]


def read_rows(path: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def ids(path: str) -> list[str]:
    rows = read_rows(path)
    return [r[COLUMNS.index("request_id")] for r in rows[1:]]


def read_frame(path: str) -> pd.DataFrame:
    """
    The loading recipe given in docs/csv-columns.md.
    """
    return pd.read_csv(
        path,
        keep_default_na=False,
        na_values=[""],
        dtype={c: "string" for c in TEXT},
        parse_dates=["timestamp"],
    )


class CsvLogTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.now = NIGHT - 3600
        self.events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "ollamaproxy.csvlog":
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        # (mktemp is under the working directory: _trial_temp under trial,
        # the test's tmp_path under pytest, as tests/conftest.py arranges.)
        self.dir = os.path.abspath(self.mktemp())

    def wall(self) -> float:
        return self.now

    def make(self, directory: str | None = None, **kw: Any) -> CsvLog:
        log = CsvLog(directory or self.dir, clock=self.clock, wall=self.wall, **kw)
        return log

    def start(self, directory: str | None = None, **kw: Any) -> CsvLog:
        log = self.make(directory, **kw)
        log.startService()
        self.addCleanup(lambda: log.running and log.stopService())
        return log

    def messages(self, level: str | None = None) -> list[str]:
        return [
            formatEvent(e)
            for e in self.events
            if level is None or e["log_level"].name == level
        ]

    def content(self, path: str | None = None) -> str:
        with open(path or os.path.join(self.dir, "ollama-proxy.csv"), encoding="utf-8", newline="") as f:
            return f.read()


class FileTests(CsvLogTestCase):
    def test_created_with_directory_and_header(self) -> None:
        """
        Starting creates the directory and the file, holding just the header.
        """
        directory = os.path.join(self.dir, "a", "b")
        log = self.start(directory)
        self.assertEqual(log.path, os.path.join(directory, "ollama-proxy.csv"))
        self.assertEqual(self.content(log.path), HEADER)
        self.assertTrue(log.healthy)
        self.assertIsNone(log.last_error)

    def test_not_opened_before_start(self) -> None:
        """
        Constructing the service touches no file; rows written before it
        starts wait in memory and are written, in order, when it starts.
        """
        log = self.make()
        log.write_cells(row(1))
        log.write_cells(row(2))
        self.assertFalse(os.path.exists(self.dir))
        self.assertEqual(log.rows_buffered, 2)
        log.startService()
        self.addCleanup(log.stopService)
        self.assertEqual(ids(log.path), ["req-1", "req-2"])
        self.assertEqual((log.rows_buffered, log.rows_written), (0, 2))

    def test_header_once(self) -> None:
        """
        The header is written once, rows after it, each on its own.
        """
        log = self.start()
        for n in range(3):
            log.write_cells(row(n))
        text = self.content()
        self.assertEqual(text.count("timestamp,request_id"), 1)
        self.assertTrue(text.startswith(HEADER))
        self.assertEqual(ids(log.path), ["req-0", "req-1", "req-2"])
        self.assertEqual(log.rows_written, 3)

    def test_each_row_is_one_write(self) -> None:
        """
        Each row reaches the file in one write call, complete, on an
        append-mode descriptor.
        """
        log = self.start()
        writes: list[tuple[int, bytes]] = []

        def write(fd: int, data: bytes) -> int:
            writes.append((fd, data))
            return os.write(fd, data)

        log._write = write
        log.write_cells(row(1, user_agent="a\nb"))
        log.write_cells(row(2))
        self.assertEqual(len(writes), 2)
        for fd, data in writes:
            self.assertTrue(data.endswith(b"\r\n"))
            self.assertTrue(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)
        self.assertEqual(len(list(csv.reader(io.StringIO(writes[0][1].decode())))), 1)

    def test_append_across_restarts(self) -> None:
        """
        A restarted log appends to the existing file without a second header.
        """
        first = self.start()
        first.write_cells(row(1))
        first.stopService()
        second = self.start()
        second.write_cells(row(2))
        second.stopService()
        text = self.content()
        self.assertEqual(text.count("timestamp,request_id"), 1)
        self.assertEqual(ids(second.path), ["req-1", "req-2"])
        self.assertEqual(glob.glob(os.path.join(self.dir, "*")), [second.path])

    def test_request_finished(self) -> None:
        """
        A L{RequestRecord} becomes one row of its cells.
        """
        log = self.start()
        record = RequestRecord(request_id="abc", arrived_wall=NIGHT, arrived=5.0)
        record.ended = 6.5
        record.http_status = 200
        log.request_finished(record)
        self.assertEqual(read_rows(log.path)[1], record.cells())

    def test_request_finished_never_raises(self) -> None:
        """
        A record that cannot be formatted is logged and counted, not raised.
        """

        class Broken(RequestRecord):
            def cells(self) -> list[str]:
                raise ZeroDivisionError()

        log = self.start()
        log.request_finished(Broken(request_id="x", arrived_wall=NIGHT, arrived=0.0))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(log.rows_dropped, 1)
        self.assertEqual(self.content(), HEADER)

    def test_wrong_cell_count(self) -> None:
        """
        A row with the wrong number of cells is refused (the file would no
        longer line up with its header), logged and counted.
        """
        log = self.start()
        log.write_cells(["too", "few"])
        self.assertEqual(self.content(), HEADER)
        self.assertEqual(log.rows_dropped, 1)
        self.assertIn("2 cells", self.messages("error")[0])


class RoundTripTests(CsvLogTestCase):
    def hostile_rows(self) -> list[list[str]]:
        rows = []
        for n, value in enumerate(HOSTILE):
            rows.append(row(n, **{c: value for c in TEXT if c != "request_id"}))
        return rows

    def test_csv_reader(self) -> None:
        """
        Commas, quotes, CR/LF, NUL and any unicode in every text column read
        back exactly with L{csv.reader}.
        """
        log = self.start(guard_formulas=False)
        rows = self.hostile_rows()
        for r in rows:
            log.write_cells(r)
        self.assertEqual(read_rows(log.path), [list(COLUMNS)] + rows)

    def test_pandas(self) -> None:
        """
        The same rows read back exactly with pandas and the documented
        recipe: text as strings (an empty cell as NA, "NA" as "NA"), numbers
        as numbers, timestamps as UTC instants.
        """
        log = self.start(guard_formulas=False)
        rows = self.hostile_rows()
        rows.append(row(99, input_tokens="", total_tokens="30"))
        for r in rows:
            log.write_cells(r)
        frame = read_frame(log.path)
        self.assertEqual(list(frame.columns), list(COLUMNS))
        self.assertEqual(len(frame), len(rows))
        for c in TEXT:
            got = [None if pd.isna(v) else v for v in frame[c]]
            want = [r[COLUMNS.index(c)] or None for r in rows]
            self.assertEqual(got, want, c)
        self.assertEqual(
            frame["timestamp"].iloc[0], pd.Timestamp("2026-11-27T03:15:00.000", tz="UTC")
        )
        self.assertEqual(frame["input_tokens"].iloc[0], 12)
        self.assertTrue(pd.isna(frame["input_tokens"].iloc[-1]))
        self.assertEqual(frame["http_status"].iloc[0], 200)

    def test_lone_surrogate(self) -> None:
        """
        A lone surrogate (a header decoded with surrogateescape) is kept
        visible as an escape and the file stays valid UTF-8.
        """
        log = self.start()
        log.write_cells(row(1, user_agent="bad\udcff"))
        self.assertEqual(read_rows(log.path)[1][COLUMNS.index("user_agent")], "bad\\udcff")


class FormulaGuardTests(CsvLogTestCase):
    triggers = ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"]

    def cell(self, log: CsvLog, column: str) -> str:
        return read_rows(log.path)[-1][COLUMNS.index(column)]

    def test_guarded(self) -> None:
        """
        Outside text starting with a formula trigger gets a leading quote, in
        every outside-text column.
        """
        log = self.start()
        for value in self.triggers:
            log.write_cells(row(0, **dict.fromkeys(OUTSIDE_TEXT_COLUMNS, value)))
            for column in OUTSIDE_TEXT_COLUMNS:
                self.assertEqual(self.cell(log, column), "'" + value, column)

    def test_harmless_untouched(self) -> None:
        """
        Text not starting with a trigger is written as is.
        """
        log = self.start()
        for value in ["a=1", "llama3", " =x", "'quoted", ""]:
            log.write_cells(row(0, user_agent=value))
            self.assertEqual(self.cell(log, "user_agent"), value)

    def test_numeric_and_own_columns_untouched(self) -> None:
        """
        Numeric cells and cells the proxy makes itself are never guarded,
        even when they start with a trigger.
        """
        log = self.start()
        inside = [c for c in COLUMNS if c not in OUTSIDE_TEXT_COLUMNS]
        log.write_cells(row(0, **dict.fromkeys(inside, "-5")))
        for column in inside:
            self.assertEqual(self.cell(log, column), "-5", column)

    def test_off(self) -> None:
        """
        With C{guard_formulas=False} every cell is written as given.
        """
        log = self.start(guard_formulas=False)
        for value in self.triggers:
            log.write_cells(row(0, user_agent=value, model=value))
            self.assertEqual(self.cell(log, "user_agent"), value)
            self.assertEqual(self.cell(log, "model"), value)


class SchemaTests(CsvLogTestCase):
    def write_file(self, text: str, name: str = "ollama-proxy.csv") -> str:
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, name)
        with open(path, "w", newline="", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_other_header_moved_aside(self) -> None:
        """
        A file whose header is not today's is renamed aside, unchanged, with
        a timestamp in its name, and a new file started.
        """
        old = ",".join(COLUMNS[:23]) + "\r\n" + "x," * 22 + "x\r\n"
        self.write_file(old)
        log = self.start()
        log.write_cells(row(1))
        aside = os.path.join(self.dir, "ollama-proxy.2026-11-27T225958Z.old-schema.csv")
        self.assertEqual(self.content(aside), old)
        self.assertEqual(ids(log.path), ["req-1"])
        self.assertTrue(self.content().startswith(HEADER))
        self.assertIn(aside, self.messages("warn")[0])

    def test_aside_name_taken(self) -> None:
        """
        Moving aside never overwrites: a taken name gets a counter.
        """
        taken = self.write_file("keep me\n", "ollama-proxy.2026-11-27T225958Z.old-schema.csv")
        self.write_file("other,header\n1,2\n")
        self.start()
        self.assertEqual(self.content(taken), "keep me\n")
        self.assertEqual(
            self.content(os.path.join(self.dir, "ollama-proxy.2026-11-27T225958Z_2.old-schema.csv")),
            "other,header\n1,2\n",
        )

    def test_not_csv(self) -> None:
        """
        A file without any newline in its first block is not ours either.
        """
        self.write_file("garbage without a newline")
        log = self.start()
        self.assertEqual(self.content(), HEADER)
        self.assertEqual(len(glob.glob(os.path.join(self.dir, "*.old-schema.csv"))), 1)
        self.assertTrue(log.healthy)

    def test_partial_header(self) -> None:
        """
        A file holding only the start of the header (a crash while creating
        it) is emptied and given the whole header.
        """
        self.write_file(HEADER[:40])
        self.start()
        self.assertEqual(self.content(), HEADER)
        self.assertEqual(os.listdir(self.dir), ["ollama-proxy.csv"])

    def test_aside_fails(self) -> None:
        """
        If the other-schema file cannot be moved aside, nothing is appended
        to it: the log is degraded until it can be.
        """
        old = "other,header\n1,2\n"
        path = self.write_file(old)
        log = self.make()
        renames = []

        def rename(src: str, dst: str) -> None:
            renames.append(src)
            raise PermissionError(errno.EACCES, "Permission denied")

        self.patch(csvlog.os, "rename", rename)
        log.startService()
        log.write_cells(row(1))
        self.assertEqual(self.content(path), old)
        self.assertFalse(log.healthy)
        self.assertEqual(log.rows_buffered, 1)


class TornRowTests(CsvLogTestCase):
    def prepare(self, tail: bytes, whole: int = 2) -> tuple[str, bytes]:
        log = self.start()
        for n in range(whole):
            log.write_cells(row(n, user_agent="multi\nline \"ua\"\r\n"))
        log.stopService()
        with open(log.path, "rb") as f:
            good = f.read()
        with open(log.path, "ab") as f:
            f.write(tail)
        return log.path, good

    def torn_files(self) -> list[str]:
        return glob.glob(os.path.join(self.dir, "ollama-proxy.csv.torn-*"))

    def check_repaired(self, tail: bytes, whole: int = 2) -> None:
        path, good = self.prepare(tail, whole)
        log = self.start()
        with open(path, "rb") as f:
            self.assertEqual(f.read(), good)
        [side] = self.torn_files()
        self.assertEqual(os.path.basename(side), "ollama-proxy.csv.torn-2026-11-27T225958Z")
        with open(side, "rb") as f:
            self.assertEqual(f.read(), tail)
        [warning] = self.messages("warn")
        self.assertIn(f"torn row ({len(tail)} bytes", warning)
        log.write_cells(row(9))
        self.assertEqual(ids(path), [f"req-{n}" for n in range(whole)] + ["req-9"])

    def test_torn_plain(self) -> None:
        """
        A last row cut short by a crash is cut off at start-up and saved in a
        side file; the next row starts on a row boundary.
        """
        self.check_repaired(b"2026-11-27T03:15:00.000Z,req-x,10.0.0.1,curl")

    def test_torn_inside_quoted_newlines(self) -> None:
        """
        A torn row whose open quoted field holds newlines (so the file even
        ends in a newline) is cut at the last newline outside quotes.
        """
        self.check_repaired(b'2026-11-27T03:15:00.000Z,req-x,10.0.0.1,"line1\r\nline2\n')

    def test_torn_after_escaped_quotes(self) -> None:
        """
        Doubled quotes inside a field do not confuse the boundary search.
        """
        self.check_repaired(b'2026-11-27T03:15:00.000Z,req-x,1,"say ""hi""\r\n, ""x""')

    def test_torn_only_row(self) -> None:
        """
        A torn first row leaves just the header.
        """
        self.check_repaired(b'2026-11-27T03:15:00.000Z,"a\n', whole=0)

    def test_torn_across_blocks(self) -> None:
        """
        The boundary is found when the file spans many read blocks.
        """
        self.patch(csvlog, "_BLOCK", 7)
        self.check_repaired(b'2026-11-27T03:15:00.000Z,req-x,"a\r\nb""\n\n"",c\r\n')

    def test_complete_multiline_row_kept(self) -> None:
        """
        A complete last row whose quoted fields hold newlines is not torn.
        """
        path, good = self.prepare(b"")
        self.patch(csvlog, "_BLOCK", 5)
        self.start()
        with open(path, "rb") as f:
            self.assertEqual(f.read(), good)
        self.assertEqual(self.torn_files(), [])
        self.assertEqual(self.messages("warn"), [])

    def test_last_row_end(self) -> None:
        """
        L{csvlog._last_row_end} is the offset after the last newline outside
        quotes, 0 if there is none, at any block size.
        """
        cases = [
            (b"", 0),
            (b"abc", 0),
            (b"a\n", 2),
            (b'a\n"b\nc', 2),
            (b'a\n"b\nc"\n', 8),
            (b'a\n"b""\n', 2),
            (b'"\n"\n"\n', 4),
        ]
        path = self.mktemp()
        for block in [1, 2, 3, 1 << 20]:
            self.patch(csvlog, "_BLOCK", block)
            for data, expected in cases:
                with open(path, "wb") as f:
                    f.write(data)
                fd = os.open(path, os.O_RDONLY)
                try:
                    self.assertEqual(csvlog._last_row_end(fd, len(data)), expected, (data, block))
                finally:
                    os.close(fd)


class FailureTests(CsvLogTestCase):
    def block_directory(self, log: CsvLog) -> Callable[[], None]:
        """
        Remove the file and make its directory unusable, in a way that works
        as root too (root ignores permissions): a regular file takes the
        directory's place.  Return a function that undoes it.
        """
        os.unlink(log.path)
        moved = self.dir + ".moved"
        os.rename(self.dir, moved)
        with open(self.dir, "w") as f:
            f.write("in the way")

        def undo() -> None:
            os.unlink(self.dir)
            os.rename(moved, self.dir)

        return undo

    def test_failure_buffered_logged_once_then_flushed(self) -> None:
        """
        While the file cannot be written rows wait in memory, the log is
        unhealthy and says so once; when it can again, the rows are written
        in order and the recovery is logged once.
        """
        log = self.start()
        log.write_cells(row(0))
        undo = self.block_directory(log)
        for n in range(1, 5):
            log.write_cells(row(n))
        self.assertFalse(log.healthy)
        self.assertIsNotNone(log.last_error)
        self.assertIn(log.path, log.last_error or "")
        self.assertEqual(log.rows_buffered, 4)
        for _ in range(5):
            self.clock.advance(1.0)
        self.assertEqual(len(self.messages("error")), 1)
        self.assertEqual(log.rows_buffered, 4)

        undo()
        log.write_cells(row(5))
        self.assertEqual(log.rows_buffered, 5, "no retry before the interval")
        self.clock.advance(1.0)
        self.assertTrue(log.healthy)
        self.assertIsNone(log.last_error)
        self.assertEqual(log.rows_buffered, 0)
        self.assertEqual(ids(log.path), ["req-1", "req-2", "req-3", "req-4", "req-5"])
        self.assertTrue(self.content().startswith(HEADER))
        self.assertEqual(len(self.messages("error")), 1)
        [recovered] = [m for m in self.messages("info") if "writable again" in m]
        self.assertIn("wrote 5 buffered rows, dropped 0", recovered)
        self.assertEqual(log.rows_written, 6)

    def test_read_only_directory(self) -> None:
        """
        A removed file in a directory made read-only: rows wait until the
        directory is writable again.
        """
        if os.geteuid() == 0:
            raise self.skipTest("root ignores permissions; see the test above")
        log = self.start()
        os.unlink(log.path)
        os.chmod(self.dir, 0o500)
        self.addCleanup(os.chmod, self.dir, 0o700)
        log.write_cells(row(1))
        self.clock.advance(1.0)
        self.assertFalse(log.healthy)
        self.assertEqual(log.rows_buffered, 1)
        os.chmod(self.dir, 0o700)
        self.clock.advance(1.0)
        self.assertTrue(log.healthy)
        self.assertEqual(ids(log.path), ["req-1"])

    def test_dev_full(self) -> None:
        """
        A file that answers every write with ENOSPC (C{/dev/full}) degrades
        the log; rows are written once a real file is back.
        """
        if not os.path.exists("/dev/full"):
            raise self.skipTest("no /dev/full")
        log = self.start()
        log.write_cells(row(0))
        aside = log.path + ".real"
        os.rename(log.path, aside)
        os.symlink("/dev/full", log.path)
        log.reopen()
        log.write_cells(row(1))
        log.write_cells(row(2))
        self.assertFalse(log.healthy)
        self.assertIn("No space left", log.last_error or "")
        self.assertEqual(log.rows_buffered, 2)
        self.clock.advance(1.0)
        self.assertEqual(log.rows_buffered, 2)
        os.unlink(log.path)
        self.clock.advance(1.0)
        self.assertTrue(log.healthy)
        self.assertEqual(ids(log.path), ["req-1", "req-2"])
        self.assertEqual(ids(aside), ["req-0"])
        self.assertEqual(len(self.messages("error")), 1)

    def test_dev_full_at_start(self) -> None:
        """
        A log that cannot even write its header at start-up starts degraded
        and does not raise.
        """
        if not os.path.exists("/dev/full"):
            raise self.skipTest("no /dev/full")
        os.makedirs(self.dir)
        os.symlink("/dev/full", os.path.join(self.dir, "ollama-proxy.csv"))
        log = self.start()
        self.assertFalse(log.healthy)
        log.write_cells(row(1))
        os.unlink(log.path)
        self.clock.advance(1.0)
        self.assertTrue(self.content().startswith(HEADER))
        self.assertEqual(ids(log.path), ["req-1"])

    def test_short_write_cut_back(self) -> None:
        """
        A write that stops part-way (disk full mid-row) is cut back off the
        file, so no half row stays; the row is written whole later.
        """
        log = self.start()
        log.write_cells(row(0))
        before = self.content()

        def short(fd: int, data: bytes) -> int:
            return os.write(fd, data[: len(data) // 2])

        log._write = short
        log.write_cells(row(1, user_agent="x" * 100))
        self.assertEqual(self.content(), before)
        self.assertFalse(log.healthy)
        self.assertIn("short write", log.last_error or "")
        log._write = os.write
        self.clock.advance(1.0)
        self.assertEqual(ids(log.path), ["req-0", "req-1"])
        self.assertEqual(glob.glob(os.path.join(self.dir, "*torn*")), [])

    def test_short_write_not_cut_back(self) -> None:
        """
        If the half row cannot be cut back, the file is scanned when it is
        next opened: the fragment goes to a side file, the row is written
        whole.
        """
        log = self.start()
        log.write_cells(row(0))
        before = self.content()

        def short(fd: int, data: bytes) -> int:
            return os.write(fd, data[: len(data) // 2])

        def no_truncate(fd: int, size: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        log._write = short
        log._truncate = no_truncate
        log.write_cells(row(1))
        self.assertFalse(log.healthy)
        log._write = os.write
        log._truncate = os.ftruncate
        self.clock.advance(1.0)
        self.assertTrue(log.healthy)
        self.assertEqual(ids(log.path), ["req-0", "req-1"])
        self.assertEqual(self.content()[: len(before)], before)
        self.assertEqual(len(glob.glob(os.path.join(self.dir, "ollama-proxy.csv.torn-*"))), 1)

    def test_buffer_bound_drops_newest(self) -> None:
        """
        Past C{buffer_limit} rows the newest are dropped and counted, logged
        once; the kept ones are written in order.
        """
        log = self.start(buffer_limit=3)
        undo = self.block_directory(log)
        for n in range(1, 7):
            log.write_cells(row(n))
        self.assertEqual((log.rows_buffered, log.rows_dropped), (3, 3))
        full = [m for m in self.messages("error") if "buffer is full" in m]
        self.assertEqual(len(full), 1)
        undo()
        self.clock.advance(1.0)
        self.assertEqual(ids(log.path), ["req-1", "req-2", "req-3"])
        [recovered] = [m for m in self.messages("info") if "writable again" in m]
        self.assertIn("wrote 3 buffered rows, dropped 3", recovered)
        log.write_cells(row(7))
        self.assertEqual(ids(log.path)[-1], "req-7")
        self.assertEqual(log.rows_dropped, 3)

    def test_no_buffer(self) -> None:
        """
        With C{buffer_limit=0} a row that cannot be written is dropped.
        """
        log = self.start(buffer_limit=0)
        undo = self.block_directory(log)
        log.write_cells(row(1))
        self.assertEqual((log.rows_buffered, log.rows_dropped), (0, 1))
        undo()
        self.clock.advance(1.0)
        self.assertTrue(log.healthy)

    def test_stop_flushes(self) -> None:
        """
        Stopping makes a last attempt to write buffered rows.
        """
        log = self.start()
        undo = self.block_directory(log)
        log.write_cells(row(1))
        undo()
        log.stopService()
        self.assertEqual(ids(log.path), ["req-1"])
        self.assertFalse(self.clock.getDelayedCalls())

    def test_row_after_stop(self) -> None:
        """
        A request ending after the log stopped is still written.
        """
        log = self.start()
        log.stopService()
        log.write_cells(row(1))
        self.assertEqual(ids(log.path), ["req-1"])
        self.assertIsNone(log._fd)


class ReopenTests(CsvLogTestCase):
    def test_deleted_noticed_before_write(self) -> None:
        """
        A deleted file is noticed at the next row, which starts a new file
        with a header instead of vanishing into the removed one.
        """
        log = self.start()
        log.write_cells(row(1))
        os.unlink(log.path)
        log.write_cells(row(2))
        self.assertTrue(self.content().startswith(HEADER))
        self.assertEqual(ids(log.path), ["req-2"])

    def test_deleted_noticed_by_check(self) -> None:
        """
        The periodic check notices a deleted file and starts a new one.
        """
        log = self.start()
        os.unlink(log.path)
        self.clock.advance(1.0)
        self.assertEqual(self.content(), HEADER)

    def test_replaced_noticed_by_check(self) -> None:
        """
        A file moved away (logrotate without SIGHUP) is noticed by the
        periodic check; rows until then go to the moved file.
        """
        log = self.start()
        moved = os.path.join(self.dir, "moved.csv")
        os.rename(log.path, moved)
        log.write_cells(row(1))
        self.clock.advance(1.0)
        log.write_cells(row(2))
        self.assertEqual(ids(moved), ["req-1"])
        self.assertEqual(ids(log.path), ["req-2"])

    def test_reopen(self) -> None:
        """
        L{CsvLog.reopen} (SIGHUP) starts writing to whatever is at the path
        now, here a new file with its header.
        """
        log = self.start()
        log.write_cells(row(1))
        moved = os.path.join(self.dir, "ollama-proxy.csv.1")
        os.rename(log.path, moved)
        log.reopen()
        self.assertEqual(self.content(), HEADER)
        log.write_cells(row(2))
        self.assertEqual(ids(moved), ["req-1"])
        self.assertEqual(ids(log.path), ["req-2"])

    def test_emptied(self) -> None:
        """
        A file emptied behind the log's back gets a header before the next row.
        """
        log = self.start()
        log.write_cells(row(1))
        os.truncate(log.path, 0)
        log.write_cells(row(2))
        self.assertEqual(ids(log.path), ["req-2"])
        self.assertTrue(self.content().startswith(HEADER))


class RotationTests(CsvLogTestCase):
    def files(self) -> list[str]:
        rotated = sorted(glob.glob(os.path.join(self.dir, "ollama-proxy*.csv")))
        current = os.path.join(self.dir, "ollama-proxy.csv")
        rotated.remove(current)
        return rotated + [current]

    def test_size(self) -> None:
        """
        With C{max_bytes} the file is rotated before a row would make it too
        big; every file starts with the header, stays under the limit, and
        the files in name order hold every row in order.
        """
        size = len(HEADER) + 2 * len(csvlog.CsvLog(".", clock=self.clock)._format(row(0)))
        log = self.start(max_bytes=size)
        for n in range(7):
            log.write_cells(row(n))
            self.now += 1
        files = self.files()
        self.assertEqual(len(files), 4)
        self.assertEqual(
            [os.path.basename(f) for f in files[:2]],
            ["ollama-proxy.2026-11-27T230000Z.csv", "ollama-proxy.2026-11-27T230002Z.csv"],
        )
        got = []
        for f in files:
            self.assertTrue(self.content(f).startswith(HEADER), f)
            self.assertLessEqual(os.path.getsize(f), size)
            got += ids(f)
        self.assertEqual(got, [f"req-{n}" for n in range(7)])
        self.assertEqual(log.rows_written, 7)

    def test_size_name_taken(self) -> None:
        """
        Rotations within one second get counters and still sort in order.
        """
        log = self.start(max_bytes=1)
        for n in range(4):
            log.write_cells(row(n))
        names = [os.path.basename(f) for f in self.files()]
        self.assertEqual(
            names,
            [
                "ollama-proxy.2026-11-27T225958Z.csv",
                "ollama-proxy.2026-11-27T225958Z_2.csv",
                "ollama-proxy.2026-11-27T225958Z_3.csv",
                "ollama-proxy.csv",
            ],
        )
        self.assertEqual([ids(f) for f in self.files()], [["req-0"], ["req-1"], ["req-2"], ["req-3"]])

    def test_row_bigger_than_limit(self) -> None:
        """
        A row larger than C{max_bytes} on its own still gets written, once.
        """
        log = self.start(max_bytes=10)
        log.write_cells(row(1))
        self.assertEqual(self.files(), [log.path])
        self.assertEqual(ids(log.path), ["req-1"])

    def test_daily(self) -> None:
        """
        With C{rotate_daily} the first write on a new UTC day rotates the
        file; writes on the same day do not.
        """
        self.now = NIGHT
        log = self.start(rotate_daily=True)
        log.write_cells(row(1))
        self.now = NIGHT + 1
        log.write_cells(row(2))
        self.assertEqual(self.files(), [log.path])
        self.now = NIGHT + 3
        log.write_cells(row(3))
        self.now = NIGHT + 7200
        log.write_cells(row(4))
        rotated, current = self.files()
        self.assertEqual(os.path.basename(rotated), "ollama-proxy.2026-11-28T000001Z.csv")
        self.assertEqual(ids(rotated), ["req-1", "req-2"])
        self.assertEqual(ids(current), ["req-3", "req-4"])
        self.assertTrue(self.content(rotated).startswith(HEADER))
        self.assertTrue(self.content(current).startswith(HEADER))

    def test_daily_after_restart(self) -> None:
        """
        An existing file last written on an earlier day is rotated at the
        first write after a restart.
        """
        self.now = NIGHT
        first = self.start(rotate_daily=True)
        first.write_cells(row(1))
        first.stopService()
        os.utime(first.path, (NIGHT, NIGHT))
        self.now = NIGHT + 3600
        second = self.start(rotate_daily=True)
        second.write_cells(row(2))
        rotated, current = self.files()
        self.assertEqual(ids(rotated), ["req-1"])
        self.assertEqual(ids(current), ["req-2"])

    def test_rotation_fails(self) -> None:
        """
        If the file cannot be renamed, rows keep going to it; the problem is
        logged once and rotation tried again after the retry interval.
        """
        log = self.start(max_bytes=1)

        def rename(src: str, dst: str) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")

        real = os.rename
        self.patch(csvlog.os, "rename", rename)
        for n in range(3):
            log.write_cells(row(n))
        self.assertTrue(log.healthy)
        self.assertEqual(ids(log.path), ["req-0", "req-1", "req-2"])
        self.assertEqual(len(self.messages("warn")), 1)
        self.patch(csvlog.os, "rename", real)
        log.write_cells(row(3))
        self.assertEqual(self.files(), [log.path])
        self.clock.advance(1.0)
        log.write_cells(row(4))
        self.assertEqual(ids(log.path), ["req-4"])


class CheckDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def test_creatable(self) -> None:
        """
        A directory that can be made is made, and no probe file is left.
        """
        path = os.path.join(self.base, "x", "y")
        self.assertIsNone(check_log_directory(path))
        self.assertEqual(os.listdir(path), [])

    def test_under_regular_file(self) -> None:
        """
        A path under a regular file is refused with a one-line reason.
        """
        blocker = os.path.join(self.base, "file")
        open(blocker, "w").close()
        problem = check_log_directory(os.path.join(blocker, "logs"))
        self.assertIsNotNone(problem)
        assert problem is not None
        self.assertIn(blocker, problem)
        self.assertNotIn("\n", problem)

    def test_is_a_file(self) -> None:
        """
        A path that is a regular file is refused.
        """
        blocker = os.path.join(self.base, "file")
        open(blocker, "w").close()
        self.assertIsNotNone(check_log_directory(blocker))

    def test_unwritable(self) -> None:
        """
        A place where no file can be created is refused.
        """
        if os.geteuid() == 0:
            if not os.path.isdir("/proc/self"):
                raise self.skipTest("root and no /proc")
            path = "/proc/self/ollamaproxy-logs"
        else:
            path = os.path.join(self.base, "ro")
            os.mkdir(path)
            os.chmod(path, stat.S_IRUSR | stat.S_IXUSR)
        problem = check_log_directory(path)
        self.assertIsNotNone(problem)
        self.assertIn(path, problem or "")

    def test_log_file_not_appendable(self) -> None:
        """
        An existing log file that cannot be opened for appending is refused.
        """
        os.mkdir(os.path.join(self.base, "ollama-proxy.csv"))
        problem = check_log_directory(self.base)
        self.assertIn("ollama-proxy.csv", problem or "")
