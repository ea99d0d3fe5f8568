"""
Tests for L{ollamaproxy.report}: the log files are written with
L{RequestRecord.cells} and the L{COLUMNS} header, so they follow the real
format.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from unittest import mock

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ollamaproxy.record import COLUMNS, OUTSIDE_TEXT_COLUMNS, RequestRecord
from ollamaproxy import report
from ollamaproxy.report import PLOT_INSTALL_HINT, main, parse_when, percentile

# 2024-05-01T12:00:00Z
BASE = 1_714_564_800.0
NOW = datetime(2024, 5, 1, 14, 1, tzinfo=timezone.utc)

_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def request(
    at: float = 0.0,
    *,
    total_ms: float | None = 100.0,
    ttft_ms: float | None = None,
    status: int | None = 200,
    error: str = "",
    output_tokens: int | None = None,
    tps: float | None = None,
    **fields: object,
) -> RequestRecord:
    """
    A finished request that arrived C{at} seconds after L{BASE}, with the
    given times in milliseconds and tokens per second.
    """
    record = RequestRecord(
        request_id=f"r{at}",
        arrived_wall=BASE + at,
        arrived=0.0,
        http_status=status,
        output_tokens=output_tokens,
        **fields,  # type: ignore[arg-type]
    )
    if total_ms is not None:
        record.sent_upstream = 0.0
        record.ended = total_ms / 1000
    if ttft_ms is not None:
        record.first_byte = ttft_ms / 1000
    if tps is not None:
        assert output_tokens
        record.ollama_eval_ns = round(output_tokens / tps * 1e9)
    if error:
        record.fail(error)
    return record


def guarded(cells: list[str], header: Sequence[str] = COLUMNS) -> list[str]:
    """
    The cells as the CSV writer stores them: outside text that a spreadsheet
    would take for a formula gets a leading C{'}.
    """
    return [
        "'" + cell if name in OUTSIDE_TEXT_COLUMNS and cell.startswith(_TRIGGERS) else cell
        for name, cell in zip(header, cells)
    ]


def write_log(
    path: str,
    rows: Sequence[RequestRecord | list[str]],
    header: Sequence[str] | None = COLUMNS,
) -> str:
    """
    Write a log file as the proxy does (excel dialect, CRLF); rows given as
    cells are written as they are.
    """
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header is not None:
            writer.writerow(header)
        for row in rows:
            writer.writerow(guarded(row.cells()) if isinstance(row, RequestRecord) else row)
    return path


def sample() -> list[RequestRecord]:
    """
    Seven requests: llama3 (4, one failing mid-stream with status 200),
    mistral (2, one 500) and one without a model (404).
    """
    llama = [
        request(
            i * 10.0,
            model="llama3",
            endpoint="/api/chat",
            session_id="alice",
            ip_source="10.0.0.1",
            api_key_name="team-a",
            total_ms=100.0 * (i + 1),
            ttft_ms=10.0 * (i + 1),
            input_tokens=10,
            output_tokens=100,
            tps=10.0 * (i + 1),
            error="stream broken" if i == 3 else "",
        )
        for i in range(4)
    ]
    mistral = [
        request(
            50.0,
            model="mistral",
            endpoint="/api/generate",
            session_id="bob",
            ip_source="10.0.0.2",
            total_ms=1000.0,
            ttft_ms=50.0,
            input_tokens=5,
        ),
        request(
            60.0,
            model="mistral",
            endpoint="/api/chat",
            ip_source="10.0.0.2",
            total_ms=3000.0,
            status=500,
            error="upstream failed",
        ),
    ]
    unknown = [request(70.0, endpoint="/api/tags", total_ms=5.0, status=404)]
    return [*llama, *mistral, *unknown]


LLAMA = {
    "model": "llama3",
    "requests": 4,
    "errors": 1,
    "error_rate": 0.25,
    "p50_total_ms": 250.0,
    "p95_total_ms": 385.0,
    "p50_ttft_ms": 25.0,
    "p95_ttft_ms": 38.5,
    "input_tokens": 40,
    "output_tokens": 400,
    "median_tokens_per_second": 25.0,
}
MISTRAL = {
    "model": "mistral",
    "requests": 2,
    "errors": 1,
    "error_rate": 0.5,
    "p50_total_ms": 2000.0,
    "p95_total_ms": 2900.0,
    "p50_ttft_ms": 50.0,
    "p95_ttft_ms": 50.0,
    "input_tokens": 5,
    "output_tokens": None,
    "median_tokens_per_second": None,
}
NO_MODEL = {
    "model": "(none)",
    "requests": 1,
    "errors": 1,
    "error_rate": 1.0,
    "p50_total_ms": 5.0,
    "p95_total_ms": 5.0,
    "p50_ttft_ms": None,
    "p95_ttft_ms": None,
    "input_tokens": None,
    "output_tokens": None,
    "median_tokens_per_second": None,
}
TOTAL = {
    "model": "(total)",
    "requests": 7,
    "errors": 3,
    "error_rate": round(3 / 7, 6),
    "p50_total_ms": 300.0,
    "p95_total_ms": 2400.0,
    "p50_ttft_ms": 30.0,
    "p95_ttft_ms": 48.0,
    "input_tokens": 45,
    "output_tokens": 400,
    "median_tokens_per_second": 25.0,
}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class ReportTestCase(SynchronousTestCase):
    def directory(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def sample_log(self) -> str:
        return write_log(os.path.join(self.directory(), "ollama-proxy.csv"), sample())

    def run_report(self, *argv: str, now: datetime = NOW) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), now=now, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    def report_json(self, *argv: str, now: datetime = NOW) -> dict:
        code, out, err = self.run_report(*argv, "--format", "json", now=now)
        self.assertEqual(code, 0, err)
        return json.loads(out)

    def requests_by_group(self, document: dict) -> dict[str, int]:
        key = document["by"]
        return {row[key]: row["requests"] for row in document["groups"]}


class StatisticsTests(ReportTestCase):
    def test_json(self) -> None:
        """
        JSON holds, per model, the counts, error rate, percentiles, token sums
        and median tokens per second as numbers (C{null} for no data), groups
        sorted by requests, and the total over all requests.
        """
        document = self.report_json(self.sample_log())
        self.assertEqual(document["by"], "model")
        self.assertEqual(document["groups"], [LLAMA, MISTRAL, NO_MODEL])
        self.assertEqual(document["total"], TOTAL)
        self.assertEqual(document["skipped_rows"], 0)
        self.assertEqual(document["first"], "2024-05-01T12:00:00.000Z")
        self.assertEqual(document["last"], "2024-05-01T12:01:10.000Z")

    def test_csv(self) -> None:
        """
        CSV has the same fields, one line per group, the total last as
        C{(total)}, and an empty cell where there is no data.
        """
        code, out, err = self.run_report(self.sample_log(), "--format", "csv")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0], ",".join(LLAMA))
        rows = list(csv.DictReader(io.StringIO(out)))
        self.assertEqual([row["model"] for row in rows], ["llama3", "mistral", "(none)", "(total)"])
        self.assertEqual(
            rows[0],
            {
                "model": "llama3",
                "requests": "4",
                "errors": "1",
                "error_rate": "0.25",
                "p50_total_ms": "250.0",
                "p95_total_ms": "385.0",
                "p50_ttft_ms": "25.0",
                "p95_ttft_ms": "38.5",
                "input_tokens": "40",
                "output_tokens": "400",
                "median_tokens_per_second": "25.0",
            },
        )
        self.assertEqual(rows[1]["output_tokens"], "")
        self.assertEqual(rows[1]["median_tokens_per_second"], "")
        self.assertEqual(rows[3]["requests"], "7")
        self.assertEqual(rows[3]["p95_total_ms"], "2400.0")

    def test_table(self) -> None:
        """
        The table has a summary line, one aligned line per group with C{-}
        where there is no data, and a total line.
        """
        code, out, err = self.run_report(self.sample_log())
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(
            lines[0],
            "ollamaproxy requests by model: 7 requests from 1 file; "
            "2024-05-01 12:00:00 to 2024-05-01 12:01:10 UTC",
        )
        words = [line.split() for line in lines[4:]]
        self.assertEqual(
            words[0],
            ["llama3", "4", "1", "25.0%", "250.0", "385.0", "25.0", "38.5", "40", "400", "25.0"],
        )
        self.assertEqual(
            words[1],
            ["mistral", "2", "1", "50.0%", "2,000.0", "2,900.0", "50.0", "50.0", "5", "-", "-"],
        )
        self.assertEqual(
            words[2], ["(none)", "1", "1", "100.0%", "5.0", "5.0", "-", "-", "-", "-", "-"]
        )
        self.assertTrue(set(lines[7]) <= {"-", " "})
        self.assertEqual(
            words[4],
            ["total", "7", "3", "42.9%", "300.0", "2,400.0", "30.0", "48.0", "45", "400", "25.0"],
        )
        # Numbers are right-aligned under their headings.
        ends = {line.rstrip().rfind("25.0") + 4 for line in (lines[4], lines[8])}
        self.assertEqual(ends, {len(lines[3].rstrip())})
        self.assertIn("total ms", lines[2])
        self.assertIn("tok/s", lines[2])

    def test_error_rules(self) -> None:
        """
        A request is an error when its status is 400 or more or it has an
        error message (a stream that broke after status 200); a status below
        400 without a message, or no status at all, is not.
        """
        path = write_log(
            os.path.join(self.directory(), "ollama-proxy.csv"),
            [
                request(0, model="m", status=200),
                request(1, model="m", status=304),
                request(2, model="m", status=None),
                request(3, model="m", status=200, error="stream broken"),
                request(4, model="m", status=400),
                request(5, model="m", status=503, error="busy"),
                request(6, model="m", status=None, error="client left"),
            ],
        )
        (group,) = self.report_json(path)["groups"]
        self.assertEqual((group["requests"], group["errors"]), (7, 4))
        self.assertAlmostEqual(group["error_rate"], 4 / 7, places=6)

    def test_percentile(self) -> None:
        """
        Percentiles interpolate linearly between the nearest ranks, as numpy
        and pandas do by default.
        """
        values = [float(v) for v in range(100, 1001, 100)]
        self.assertEqual(percentile(values, 0.5), 550.0)
        self.assertAlmostEqual(percentile(values, 0.95), 955.0)
        self.assertEqual(percentile([7.0], 0.95), 7.0)
        self.assertIsNone(percentile([], 0.5))

    def test_empty_cells_ignored(self) -> None:
        """
        Empty cells are left out of a statistic instead of counting as 0; a
        statistic with no data at all is null.
        """
        path = write_log(
            os.path.join(self.directory(), "ollama-proxy.csv"),
            [
                request(0, model="m", total_ms=None, ttft_ms=None),
                request(1, model="m", total_ms=300.0, ttft_ms=None),
                request(2, model="m", total_ms=None, ttft_ms=None),
            ],
        )
        (group,) = self.report_json(path)["groups"]
        self.assertEqual(group["requests"], 3)
        self.assertEqual((group["p50_total_ms"], group["p95_total_ms"]), (300.0, 300.0))
        self.assertIsNone(group["p50_ttft_ms"])
        self.assertIsNone(group["input_tokens"])


class GroupingTests(ReportTestCase):
    def test_by_endpoint(self) -> None:
        """
        C{--by endpoint} groups on the endpoint column.
        """
        document = self.report_json(self.sample_log(), "--by", "endpoint")
        self.assertEqual(document["by"], "endpoint")
        self.assertEqual(
            self.requests_by_group(document),
            {"/api/chat": 5, "/api/generate": 1, "/api/tags": 1},
        )
        self.assertEqual(
            [row["endpoint"] for row in document["groups"]],
            ["/api/chat", "/api/generate", "/api/tags"],
        )
        self.assertEqual(document["total"]["requests"], 7)

    def test_by_session(self) -> None:
        """
        C{--by session} groups on C{session_id}; requests without one are
        under C{(none)}.
        """
        document = self.report_json(self.sample_log(), "--by", "session")
        self.assertEqual(document["by"], "session_id")
        self.assertEqual(
            self.requests_by_group(document), {"alice": 4, "bob": 1, "(none)": 2}
        )

    def test_by_ip(self) -> None:
        """
        C{--by ip} groups on C{ip_source}.
        """
        document = self.report_json(self.sample_log(), "--by", "ip")
        self.assertEqual(document["by"], "ip_source")
        self.assertEqual(
            self.requests_by_group(document), {"10.0.0.1": 4, "10.0.0.2": 2, "(none)": 1}
        )

    def test_by_api_key_name(self) -> None:
        """
        C{--by api_key_name} groups on the key name; its CSV header names the
        column.
        """
        code, out, err = self.run_report(
            self.sample_log(), "--by", "api_key_name", "--format", "csv"
        )
        self.assertEqual(code, 0)
        rows = list(csv.DictReader(io.StringIO(out)))
        self.assertEqual(
            [(row["api_key_name"], row["requests"]) for row in rows],
            [("team-a", "4"), ("(none)", "3"), ("(total)", "7")],
        )

    def test_formula_guard_stripped(self) -> None:
        """
        The writer's leading C{'} before C{= + - @} is removed from group
        names; a value that merely starts with C{'} is kept; the report's own
        CSV guards such names again.
        """
        path = write_log(
            os.path.join(self.directory(), "ollama-proxy.csv"),
            [
                request(0, model="=HYPERLINK(1)"),
                request(1, model="=HYPERLINK(1)"),
                request(2, model="-x"),
                request(3, model="'quoted"),
            ],
        )
        with open(path, encoding="utf-8") as f:
            self.assertIn("'=HYPERLINK(1)", f.read())
        document = self.report_json(path)
        self.assertEqual(
            self.requests_by_group(document), {"=HYPERLINK(1)": 2, "-x": 1, "'quoted": 1}
        )
        code, out, err = self.run_report(path, "--format", "csv")
        self.assertEqual(
            [row[0] for row in csv.reader(io.StringIO(out))][1:],
            ["'=HYPERLINK(1)", "'quoted", "'-x", "(total)"],
        )

    def test_control_characters_escaped_in_table(self) -> None:
        """
        Control characters in a group name (a terminal escape sequence sent
        as a session id) are shown escaped in the table.
        """
        path = write_log(
            os.path.join(self.directory(), "ollama-proxy.csv"),
            [request(0, model="m", session_id="\x1b[2Jevil")],
        )
        code, out, err = self.run_report(path, "--by", "session")
        self.assertNotIn("\x1b", out)
        self.assertIn("\\x1b[2Jevil", out)


class TimeWindowTests(ReportTestCase):
    def hourly_log(self) -> str:
        """
        Requests at 12:00, 13:00 and 14:00 UTC.
        """
        return write_log(
            os.path.join(self.directory(), "ollama-proxy.csv"),
            [request(0.0, model="a"), request(3600.0, model="b"), request(7200.0, model="c")],
        )

    def models(self, *argv: str) -> list[str]:
        return sorted(self.requests_by_group(self.report_json(*argv)))

    def test_absolute(self) -> None:
        """
        C{--since} is inclusive, C{--until} exclusive; dates, datetimes with
        C{Z} or an offset, and naive datetimes (UTC) are accepted.
        """
        path = self.hourly_log()
        self.assertEqual(self.models(path, "--since", "2024-05-01T13:00:00Z"), ["b", "c"])
        self.assertEqual(self.models(path, "--since", "2024-05-01T13:00"), ["b", "c"])
        self.assertEqual(self.models(path, "--until", "2024-05-01T13:00:00Z"), ["a"])
        self.assertEqual(
            self.models(path, "--since", "2024-05-01 12:30", "--until", "2024-05-01T13:30Z"),
            ["b"],
        )
        self.assertEqual(self.models(path, "--until", "2024-05-01T15:00:00+02:00"), ["a"])
        self.assertEqual(self.models(path, "--since", "2024-05-01"), ["a", "b", "c"])

    def test_relative(self) -> None:
        """
        C{30m}, C{24h}, C{7d} mean that long before now.
        """
        path = self.hourly_log()
        self.assertEqual(self.models(path, "--since", "90m"), ["b", "c"])
        self.assertEqual(self.models(path, "--since", "2h"), ["b", "c"])
        self.assertEqual(self.models(path, "--since", "1d"), ["a", "b", "c"])
        self.assertEqual(self.models(path, "--until", "30m"), ["a", "b"])

    def test_relative_counts_from_now(self) -> None:
        """
        A relative time counts back from the injected now.
        """
        path = self.hourly_log()
        later = datetime(2024, 5, 2, 13, 30, tzinfo=timezone.utc)
        document = self.report_json(path, "--since", "24h", now=later)
        self.assertEqual(sorted(self.requests_by_group(document)), ["c"])
        self.assertEqual(document["since"], "2024-05-01T13:30:00.000Z")
        self.assertEqual(document["outside_time_range"], 2)

    def test_parse_when(self) -> None:
        """
        L{parse_when} reads durations and ISO 8601, naive meaning UTC.
        """
        self.assertEqual(parse_when("30m", NOW), datetime(2024, 5, 1, 13, 31, tzinfo=timezone.utc))
        self.assertEqual(parse_when("7d", NOW), datetime(2024, 4, 24, 14, 1, tzinfo=timezone.utc))
        self.assertEqual(
            parse_when("2024-05-01", NOW), datetime(2024, 5, 1, tzinfo=timezone.utc)
        )
        self.assertEqual(
            parse_when("2024-05-01T10:00:00z", NOW),
            datetime(2024, 5, 1, 10, tzinfo=timezone.utc),
        )
        self.assertRaises(ValueError, parse_when, "yesterday", NOW)

    def test_empty_window(self) -> None:
        """
        A window with no requests is still a report: zero requests, C{-}
        statistics, exit code 0.
        """
        code, out, err = self.run_report(self.hourly_log(), "--until", "2024-05-01")
        self.assertEqual(code, 0, err)
        self.assertIn("0 requests", out)
        self.assertIn("3 outside", out)
        total = out.splitlines()[-1].split()
        self.assertEqual(total[:3], ["total", "0", "0"])
        self.assertEqual(set(total[3:]), {"-"})


class FileTests(ReportTestCase):
    def test_several_files_merged(self) -> None:
        """
        Rows of all files given are counted together.
        """
        directory = self.directory()
        first = write_log(os.path.join(directory, "a.csv"), sample())
        second = write_log(
            os.path.join(directory, "b.csv"), [request(100.0, model="mistral")]
        )
        document = self.report_json(first, second)
        self.assertEqual(self.requests_by_group(document)["mistral"], 3)
        self.assertEqual(document["total"]["requests"], 8)
        self.assertEqual(document["files"], [first, second])

    def test_directory(self) -> None:
        """
        A directory means its C{ollama-proxy*.csv} files: the current one
        and the rotated ones, not other files.
        """
        directory = self.directory()
        write_log(os.path.join(directory, "ollama-proxy.csv"), sample())
        write_log(
            os.path.join(directory, "ollama-proxy.2024-04-30T000000Z.csv"),
            [request(-86400.0, model="old")],
        )
        write_log(os.path.join(directory, "other.csv"), [request(0, model="other")])
        document = self.report_json(directory)
        self.assertEqual(document["total"]["requests"], 8)
        self.assertNotIn("other", self.requests_by_group(document))

    def test_default_files(self) -> None:
        """
        Without arguments the report reads C{logs/ollama-proxy*.csv} in the
        current directory.
        """
        directory = self.directory()
        os.makedirs(os.path.join(directory, "logs"))
        write_log(os.path.join(directory, "logs", "ollama-proxy.csv"), sample())
        write_log(
            os.path.join(directory, "logs", "ollama-proxy.2024-04-30T000000Z.csv"),
            [request(-86400.0, model="old")],
        )
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        document = self.report_json()
        self.assertEqual(document["total"]["requests"], 8)

    def test_same_file_once(self) -> None:
        """
        A file named twice (or also through its directory) is read once.
        """
        path = self.sample_log()
        document = self.report_json(path, path, os.path.dirname(path))
        self.assertEqual(document["total"]["requests"], 7)

    def test_old_schema(self) -> None:
        """
        A file with only the original tool's 23 columns is read; what it does
        not have (ttft, tokens per second, API key) is shown as C{-}, with a
        note on stderr.
        """
        directory = self.directory()
        path = write_log(
            os.path.join(directory, "ollama-proxy.old.csv"),
            [record.cells()[:23] for record in sample()],
            header=COLUMNS[:23],
        )
        code, out, err = self.run_report(path, "--format", "json")
        self.assertEqual(code, 0)
        self.assertIn("no ttft_ms, tokens_per_second column", err)
        document = json.loads(out)
        llama = document["groups"][0]
        self.assertEqual(
            {k: llama[k] for k in ("requests", "errors", "p95_total_ms", "input_tokens")},
            {"requests": 4, "errors": 1, "p95_total_ms": 385.0, "input_tokens": 40},
        )
        self.assertIsNone(llama["p50_ttft_ms"])
        self.assertIsNone(llama["median_tokens_per_second"])
        code, out, err = self.run_report(path)
        self.assertEqual(out.splitlines()[4].split()[6:8], ["-", "-"])
        by_key = self.report_json(path, "--by", "api_key_name")
        self.assertEqual(self.requests_by_group(by_key), {"(none)": 7})

    def test_old_and_new_schema_merged(self) -> None:
        """
        Old and new files are read together, each by its own header.
        """
        directory = self.directory()
        old = write_log(
            os.path.join(directory, "ollama-proxy.old.csv"),
            [request(0, model="llama3", total_ms=1000.0).cells()[:23]],
            header=COLUMNS[:23],
        )
        document = self.report_json(old, self.sample_log())
        llama = document["groups"][0]
        self.assertEqual(llama["requests"], 5)
        self.assertEqual(llama["p50_total_ms"], 300.0)
        self.assertEqual(llama["p50_ttft_ms"], 25.0)

    def test_columns_found_by_name(self) -> None:
        """
        A file whose columns are in another order, with unknown extra ones and
        a header in other case, is read by column name.
        """
        order = [*reversed(COLUMNS), "extra"]
        positions = [COLUMNS.index(name) for name in reversed(COLUMNS)]
        rows = [[record.cells()[i] for i in positions] + ["x"] for record in sample()]
        path = write_log(
            os.path.join(self.directory(), "ollama-proxy.csv"),
            rows,
            header=[name.upper() for name in order],
        )
        document = self.report_json(path)
        self.assertEqual(document["groups"], [LLAMA, MISTRAL, NO_MODEL])

    def test_headerless(self) -> None:
        """
        A file without a header whose rows have the standard number of cells
        is read in the standard column order, with a note.
        """
        path = write_log(
            os.path.join(self.directory(), "ollama-proxy.csv"), sample(), header=None
        )
        code, out, err = self.run_report(path, "--format", "json")
        self.assertEqual(code, 0)
        self.assertIn("no header", err)
        self.assertEqual(json.loads(out)["groups"], [LLAMA, MISTRAL, NO_MODEL])

    def test_empty_file(self) -> None:
        """
        An empty file (a log just rotated) reads as no requests.
        """
        path = os.path.join(self.directory(), "ollama-proxy.csv")
        open(path, "w").close()
        document = self.report_json(path)
        self.assertEqual((document["groups"], document["total"]["requests"]), ([], 0))


class BadDataTests(ReportTestCase):
    def test_bad_rows_skipped_and_reported(self) -> None:
        """
        Rows with the wrong number of cells, a number that is not one or a bad
        timestamp are skipped, counted, and listed on stderr with their file
        and line (line numbers count the line breaks inside quoted cells).
        """
        good = request(0, model="m", total_ms=100.0).cells()
        multiline = request(1, model="m", total_ms=300.0, error="line one\nline two").cells()
        bad_total = list(good)
        bad_total[COLUMNS.index("total_time_ms")] = "fast"
        bad_time = list(good)
        bad_time[COLUMNS.index("timestamp")] = "2024-13-45T99:00:00Z"
        negative = list(good)
        negative[COLUMNS.index("input_tokens")] = "-3"
        bad_tps = list(good)
        bad_tps[COLUMNS.index("tokens_per_second")] = "nan"
        path = write_log(
            os.path.join(self.directory(), "ollama-proxy.csv"),
            [good, good[:5], bad_total, multiline, bad_time, negative, bad_tps, good],
        )
        code, out, err = self.run_report(path, "--format", "json")
        self.assertEqual(code, 0)
        document = json.loads(out)
        self.assertEqual(document["skipped_rows"], 5)
        (group,) = document["groups"]
        self.assertEqual((group["requests"], group["errors"]), (3, 1))
        self.assertEqual(group["p95_total_ms"], 280.0)
        self.assertEqual(
            err.splitlines(),
            [
                "ollamaproxy-report: skipped 5 rows that could not be read:",
                f"  {path}, line 3: expected 30 cells, found 5",
                f"  {path}, line 4: total_time_ms: not a number: 'fast'",
                f"  {path}, line 7: timestamp: cannot read '2024-13-45T99:00:00Z'",
                f"  {path}, line 8: input_tokens: negative: '-3'",
                f"  {path}, line 9: tokens_per_second: not a number: 'nan'",
            ],
        )

    def test_skipped_list_is_capped(self) -> None:
        """
        At most 20 skipped rows are listed, then how many more there were.
        """
        good = request(0, model="m").cells()
        path = write_log(
            os.path.join(self.directory(), "ollama-proxy.csv"),
            [good] + [good[:3]] * 25,
        )
        code, out, err = self.run_report(path)
        self.assertEqual(code, 0)
        lines = err.splitlines()
        self.assertEqual(lines[0], "ollamaproxy-report: skipped 25 rows that could not be read:")
        self.assertEqual(len(lines), 22)
        self.assertEqual(lines[20], f"  {path}, line 22: expected 30 cells, found 3")
        self.assertEqual(lines[-1], "  ... and 5 more")
        self.assertIn("25 unreadable rows skipped", out.splitlines()[0])

    def test_integral_decimals_accepted(self) -> None:
        """
        A whole number written as a decimal (another tool's C{12.0}) is
        accepted where a count is expected.
        """
        cells = request(0, model="m", input_tokens=1).cells()
        cells[COLUMNS.index("input_tokens")] = "12.0"
        cells[COLUMNS.index("http_status")] = "500.0"
        path = write_log(os.path.join(self.directory(), "ollama-proxy.csv"), [cells])
        (group,) = self.report_json(path)["groups"]
        self.assertEqual((group["input_tokens"], group["errors"]), (12, 1))

    def test_header_repeated(self) -> None:
        """
        A header line in the middle of a file (logs joined with C{cat}) is
        passed over without a complaint.
        """
        directory = self.directory()
        path = write_log(os.path.join(directory, "ollama-proxy.csv"), sample())
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow(COLUMNS)
            csv.writer(f).writerow(request(100.0, model="llama3").cells())
        code, out, err = self.run_report(path, "--format", "json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["total"]["requests"], 8)

    def test_oversized_cell(self) -> None:
        """
        A row with a cell beyond the reader's size limit is skipped and
        reported; the rows after it are read.
        """
        self.patch(report, "FIELD_SIZE_LIMIT", 1000)
        limit = csv.field_size_limit()
        path = write_log(
            os.path.join(self.directory(), "ollama-proxy.csv"),
            [
                request(0, model="m"),
                request(1, model="m", user_agent="x" * 2000),
                request(2, model="m"),
                request(3, model="m"),
            ],
        )
        code, out, err = self.run_report(path, "--format", "json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["total"]["requests"], 3)
        self.assertIn(f"{path}, line 3: cannot split into cells: field larger than field limit", err)
        self.assertEqual(csv.field_size_limit(), limit)

    def test_naive_timestamps(self) -> None:
        """
        Timestamps without a zone (another tool's) are UTC, also when
        filtering by time.
        """
        cells = [request(at, model="m").cells()[:23] for at in (0.0, 3600.0)]
        cells[0][0] = "2024-05-01 12:00:00"
        cells[1][0] = "2024-05-01 13:00:00"
        path = write_log(
            os.path.join(self.directory(), "old.csv"), cells, header=COLUMNS[:23]
        )
        document = self.report_json(path, "--since", "2024-05-01T12:30:00Z")
        self.assertEqual(document["total"]["requests"], 1)
        self.assertEqual(document["first"], "2024-05-01T13:00:00.000Z")

    def test_not_a_log(self) -> None:
        """
        A file that names none of the known columns is not read; when no file
        can be read the exit code is 2.
        """
        path = os.path.join(self.directory(), "ollama-proxy.csv")
        with open(path, "w") as f:
            f.write("a,b,c\n1,2,3\n")
        code, out, err = self.run_report(path)
        self.assertEqual((code, out), (2, ""))
        self.assertIn("not an ollamaproxy CSV", err)
        self.assertIn("no file could be read", err)

    def test_nul_bytes_and_bad_encoding(self) -> None:
        """
        Bytes that are not UTF-8 and NUL bytes do not stop the report.
        """
        path = self.sample_log()
        with open(path, "ab") as f:
            f.write(b"\xff\xfe\x00garbage\r\n")
        code, out, err = self.run_report(path, "--format", "json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["total"]["requests"], 7)
        self.assertIn("line 9", err)


class ExitCodeTests(ReportTestCase):
    def test_no_files(self) -> None:
        """
        No log files at all: exit code 2 and a message saying where it looked.
        """
        directory = self.directory()
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        code, out, err = self.run_report()
        self.assertEqual((code, out), (2, ""))
        self.assertIn("logs/ollama-proxy*.csv", err.replace(os.sep, "/"))

    def test_missing_file(self) -> None:
        """
        A missing file is reported; the report goes on with the others (exit
        0) and fails only when none could be read (exit 2).
        """
        missing = os.path.join(self.directory(), "nope.csv")
        code, out, err = self.run_report(missing)
        self.assertEqual(code, 2)
        self.assertIn(f"{missing}: cannot read", err)
        code, out, err = self.run_report(missing, self.sample_log())
        self.assertEqual(code, 0)
        self.assertIn(f"{missing}: cannot read", err)
        self.assertIn("7 requests", out)

    def test_usage_errors(self) -> None:
        """
        Bad options exit with code 2 and a message, without a traceback.
        """
        path = self.sample_log()
        for argv, message in [
            (["--by", "colour"], "invalid choice"),
            (["--format", "xml"], "invalid choice"),
            (["--since", "yesterday"], "--since: cannot read 'yesterday'"),
            (["--until", "2024-02-30"], "--until: cannot read"),
            (["--since", "1h", "--until", "2h"], "--since must be before --until"),
            (["--bucket", "90s"], "--bucket"),
            (["--nope"], "unrecognized arguments"),
        ]:
            code, out, err = self.run_report(path, *argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(message, err)
            self.assertIn("usage: ollamaproxy-report", err)
            self.assertEqual(out, "")

    def test_plot_directory_missing(self) -> None:
        """
        A plot into a directory that does not exist is refused before the
        logs are read.
        """
        missing = os.path.join(self.directory(), "nope", "plot.png")
        code, out, err = self.run_report(self.sample_log(), "--plot", missing)
        self.assertEqual((code, out), (2, ""))
        self.assertIn("does not exist", err)

    def test_help(self) -> None:
        """
        C{--help} prints the usage to stdout and exits with 0.
        """
        code, out, err = self.run_report("--help")
        self.assertEqual(code, 0)
        self.assertIn("--since", out)

    def test_module_runs(self) -> None:
        """
        C{python -m ollamaproxy.report} runs the report.
        """
        result = subprocess.run(
            [sys.executable, "-m", "ollamaproxy.report", "--format", "json", self.sample_log()],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["total"]["requests"], 7)


class PlotTests(ReportTestCase):
    def test_plot_written(self) -> None:
        """
        C{--plot} writes a PNG and still prints the report.
        """
        if not have_matplotlib():
            raise SkipTest("matplotlib is not installed")
        directory = self.directory()
        records = sample() + [
            request(60.0 * i, model=f"model-{i % 10}", total_ms=100.0 * i, output_tokens=10, tps=5.0 + i)
            for i in range(30)
        ]
        path = write_log(os.path.join(directory, "ollama-proxy.csv"), records)
        png = os.path.join(directory, "report.png")
        code, out, err = self.run_report(path, "--plot", png)
        self.assertEqual(code, 0, err)
        self.assertIn("37 requests", out)
        self.assertIn(f"plot written to {png}", err)
        with open(png, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_no_matplotlib(self) -> None:
        """
        Without matplotlib, C{--plot} says how to install it and exits with 2
        before reading anything; the report itself does not need it.
        """
        path = self.sample_log()
        png = os.path.join(self.directory(), "report.png")
        hidden = {
            name: None
            for name in (
                "matplotlib",
                "matplotlib.dates",
                "matplotlib.figure",
                "matplotlib.backends",
                "matplotlib.backends.backend_agg",
            )
        }
        with mock.patch.dict(sys.modules, hidden):
            code, out, err = self.run_report(path, "--plot", png)
            self.assertEqual((code, out), (2, ""))
            self.assertIn(PLOT_INSTALL_HINT, err)
            self.assertIn("matplotlib", err)
            self.assertFalse(os.path.exists(png))
            code, out, err = self.run_report(path)
            self.assertEqual(code, 0)

    def test_cell_quantiles(self) -> None:
        """
        The plot's per-bucket quantiles, computed with numpy for speed, agree
        with L{percentile}.
        """
        try:
            import numpy
        except ImportError:
            raise SkipTest("numpy is not installed")
        import random

        rng = random.Random(7)
        cells = [rng.randrange(6) for _ in range(500)]
        values = [None if rng.random() < 0.2 else rng.uniform(0, 100) for _ in cells]
        result = report._cell_quantiles(
            numpy, numpy.array(cells, dtype="int64"), values, 0.95, (2, 4)
        )
        for cell in range(8):
            expected = percentile(
                sorted(v for c, v in zip(cells, values) if c == cell and v is not None), 0.95
            )
            got = result.flat[cell]
            if expected is None:
                self.assertTrue(numpy.isnan(got))
            else:
                self.assertAlmostEqual(got, expected)

    def test_bucket_hint(self) -> None:
        """
        When most one-minute buckets are empty, a wider bucket is suggested.
        """
        from ollamaproxy.report import Collected, _bucket_hint

        sparse = Collected(plot_minutes=[0, 300, 600, 900, 1200])
        dense = Collected(plot_minutes=list(range(0, 1200)))
        query = report._query(report._build_parser(io.StringIO()), ["--plot", "x.png"], NOW)
        self.assertEqual(_bucket_hint(query, sparse), "15m")
        self.assertIsNone(_bucket_hint(query, dense))
