"""
C{ollamaproxy-report}: which model is slow, who uses what, what fails.

Reads the proxy's CSV logs (the current file and the rotated ones), groups the
requests by model, endpoint, session, client address or API key, and prints
for each group: requests, errors and error rate, p50/p95 total time, p50/p95
time to first token, input and output token sums, and the median
tokens per second.  C{--plot} draws the same story over time as a PNG.

Only the standard library is needed; C{--plot} needs matplotlib
(C{pip install 'ollamaproxy[plot]'}).

Reading is forgiving: columns are found by name, so older files (the original
tool's 23 columns) work and show C{-} for what they do not report; a row that
cannot be read is skipped, and the skipped rows are listed on stderr with their
file and line number.  Only the cells a statistic needs are converted.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import re
import sys
from array import array
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from operator import itemgetter
from typing import IO, Any, Iterable, Sequence

from ollamaproxy.record import COLUMNS

PROG = "ollamaproxy-report"
PLOT_INSTALL_HINT = "pip install 'ollamaproxy[plot]'"
DEFAULT_PATTERN = os.path.join("logs", "ollama-proxy*.csv")
FILE_PATTERN = "ollama-proxy*.csv"

#: C{--by} choices and the column each one groups on.
GROUPINGS: dict[str, str] = {
    "model": "model",
    "endpoint": "endpoint",
    "session": "session_id",
    "ip": "ip_source",
    "api_key_name": "api_key_name",
    # The column names themselves are accepted too.
    "session_id": "session_id",
    "ip_source": "ip_source",
}

#: The label of the group of rows whose group cell is empty.
NONE_GROUP = "(none)"
#: The label of the total line in machine formats.
TOTAL_GROUP = "(total)"

#: The statistics of one group, in output order (after the group column).
FIELDS: tuple[str, ...] = (
    "requests",
    "errors",
    "error_rate",
    "p50_total_ms",
    "p95_total_ms",
    "p50_ttft_ms",
    "p95_ttft_ms",
    "input_tokens",
    "output_tokens",
    "median_tokens_per_second",
)

#: Cells the report reads, besides the group column.
_TIMESTAMP = "timestamp"
_STATUS = "http_status"
_MESSAGE = "error_message"
_TOTAL = "total_time_ms"
_TTFT = "ttft_ms"
_INPUT = "input_tokens"
_OUTPUT = "output_tokens"
_TPS = "tokens_per_second"
_MODEL = "model"

#: What the CSV writer may have prefixed with C{'} (spreadsheet formula guard).
_GUARDED_FIRST = frozenset("=+-@\t\r")

#: How many skipped rows are listed one by one on stderr.
SKIPPED_LISTED = 20

#: The largest cell the reader accepts (the csv module's default is 128 KiB).
FIELD_SIZE_LIMIT = 64 * 1024 * 1024

#: Models drawn as their own line in the plot; the rest become "other".
PLOT_TOP_MODELS = 8

_UTC = timezone.utc
_INF = math.inf
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(Exception):
    """
    The command line asks for something impossible; exit code 2.
    """


# --------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """
    An C{ArgumentParser} that raises instead of exiting and writes its help
    to the given stream, so that L{main} can be called from tests.
    """

    def __init__(self, out: IO[str], **kwargs: Any) -> None:
        self._out = out
        super().__init__(**kwargs)

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message)

    def print_help(self, file: IO[str] | None = None) -> None:
        super().print_help(file or self._out)

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        raise _Exit(status)


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _build_parser(out: IO[str]) -> _Parser:
    parser = _Parser(
        out,
        prog=PROG,
        description=(
            "Summarise ollamaproxy CSV logs: per group, the requests, errors, "
            "latency percentiles, tokens and generation speed."
        ),
        epilog=(
            "Times are in milliseconds. A request is an error when its HTTP "
            "status is 400 or more or it has an error message (an error in the "
            "middle of a stream keeps status 200). Empty cells are left out of "
            "each statistic; '-' means no data. Rows that cannot be read are "
            "skipped and listed on stderr. Exit code: 0 when a report was "
            "produced, 2 for usage errors or when no file could be read."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="CSV",
        help=(
            "CSV files to read, or directories holding ollama-proxy*.csv files "
            f"(default: {DEFAULT_PATTERN}, the current file and the rotated ones)"
        ),
    )
    parser.add_argument(
        "--by",
        choices=list(GROUPINGS),
        default="model",
        metavar="{model,endpoint,session,ip,api_key_name}",
        help="group the requests by this column (default: model)",
    )
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help=(
            "only requests at or after WHEN: an ISO 8601 date or datetime "
            "(2024-05-01, 2024-05-01T12:00:00Z; no offset means UTC) or a "
            "duration before now (30m, 24h, 7d, 2w)"
        ),
    )
    parser.add_argument(
        "--until",
        metavar="WHEN",
        help="only requests before WHEN (same forms as --since)",
    )
    parser.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table: aligned text for a terminal (default); csv, json: for programs",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help=(
            "also draw requests per minute, p95 total latency and median "
            "tokens per second over time, one line per model, into this PNG "
            f"(needs matplotlib: {PLOT_INSTALL_HINT})"
        ),
    )
    parser.add_argument(
        "--bucket",
        metavar="DURATION",
        default="1m",
        help="time bucket of the plot (default: 1m; e.g. 5m, 1h for long ranges)",
    )
    return parser


def parse_when(text: str, now: datetime) -> datetime:
    """
    Read a C{--since}/C{--until} value: an ISO 8601 date or datetime (naive
    means UTC) or a duration (C{30m}, C{24h}, C{7d}) before C{now}.

    @raise ValueError: C{text} is neither.
    """
    duration = _parse_duration(text)
    if duration is not None:
        return now - timedelta(seconds=duration)
    value = text.strip()
    if value[-1:] in ("z", "Z"):
        value = value[:-1] + "+00:00"
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_UTC)
    return when


def _parse_duration(text: str) -> float | None:
    match = _RELATIVE.match(text)
    if match is None:
        return None
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True, slots=True)
class Query:
    """
    What the command line asks for.
    """

    paths: list[str]
    column: str
    since: datetime | None
    until: datetime | None
    format: str
    plot: str | None
    bucket_seconds: int


def _query(parser: _Parser, argv: Sequence[str], now: datetime) -> Query:
    options = parser.parse_args(list(argv))
    since = until = None
    for name in ("since", "until"):
        text = getattr(options, name)
        if text is None:
            continue
        try:
            when = parse_when(text, now)
        except (ValueError, OverflowError):
            raise UsageError(
                f"--{name}: cannot read {text!r}: expected an ISO 8601 date or "
                "datetime (2024-05-01, 2024-05-01T12:00:00Z) or a duration "
                "before now (30m, 24h, 7d)"
            ) from None
        if name == "since":
            since = when
        else:
            until = when
    if since is not None and until is not None and since >= until:
        raise UsageError("--since must be before --until")
    if options.plot is not None:
        directory = os.path.dirname(options.plot) or os.curdir
        if not os.path.isdir(directory):
            raise UsageError(f"--plot: directory {directory} does not exist")
    bucket = _parse_duration(options.bucket)
    if bucket is None or bucket < 60 or bucket % 60:
        raise UsageError(
            f"--bucket: cannot use {options.bucket!r}: expected whole minutes "
            "such as 1m, 5m, 1h"
        )
    return Query(
        paths=options.paths,
        column=GROUPINGS[options.by],
        since=since,
        until=until,
        format=options.format,
        plot=options.plot,
        bucket_seconds=int(bucket),
    )


# --------------------------------------------------------------------------
# Reading


def _floats() -> array[float]:
    return array("d")


@dataclass(slots=True)
class Group:
    """
    The raw material of one group's statistics.  Values are kept in arrays
    of doubles: a quarter of the memory of float objects, and quick to sort.
    """

    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    input_reported: int = 0
    output_tokens: int = 0
    output_reported: int = 0
    total_ms: array[float] = field(default_factory=_floats)
    ttft_ms: array[float] = field(default_factory=_floats)
    tokens_per_second: array[float] = field(default_factory=_floats)


@dataclass(slots=True)
class Skipped:
    path: str
    line: int
    reason: str


@dataclass(slots=True)
class Collected:
    """
    Everything read from the files that the report and the plot need.
    """

    groups: dict[str, Group] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    skipped_count: int = 0
    outside: int = 0
    first: datetime | None = None
    last: datetime | None = None
    # One entry per counted row, only when plotting.
    plot_minutes: list[int] = field(default_factory=list)
    plot_models: list[str] = field(default_factory=list)
    plot_total_ms: list[float | None] = field(default_factory=list)
    plot_tps: list[float | None] = field(default_factory=list)

    def skip(self, path: str, line: int, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < SKIPPED_LISTED:
            self.skipped.append(Skipped(path, line, reason))


def find_files(paths: Sequence[str], notes: list[str]) -> list[str]:
    """
    The CSV files named by the command line: files as given, directories as
    their C{ollama-proxy*.csv}, nothing as C{logs/ollama-proxy*.csv}.
    """
    found: list[str] = []
    if not paths:
        found = sorted(glob.glob(DEFAULT_PATTERN))
        if not found:
            notes.append(f"no log files found: nothing matches {DEFAULT_PATTERN}")
    for path in paths:
        if os.path.isdir(path):
            matches = sorted(glob.glob(os.path.join(glob.escape(path), FILE_PATTERN)))
            if not matches:
                notes.append(f"{path}: no {FILE_PATTERN} in this directory")
            found.extend(matches)
        else:
            found.append(path)
    unique: list[str] = []
    seen: set[str] = set()
    for path in found:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def _looks_like_timestamp(cell: str) -> bool:
    try:
        _read_timestamp(cell)
    except ValueError:
        return False
    return True


def _read_timestamp(cell: str) -> datetime:
    when = datetime.fromisoformat(cell)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_UTC)
    return when


def read_file(path: str, query: Query, into: Collected, notes: list[str]) -> bool:
    """
    Add the rows of one CSV file to C{into}.

    @return: C{False} when the file could not be read at all (the reason is
        in C{notes}).
    """
    try:
        handle = open(path, encoding="utf-8-sig", errors="replace", newline="")
    except OSError as e:
        notes.append(f"{path}: cannot read: {e.strerror or e}")
        return False
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
        except (csv.Error, OSError) as e:
            notes.append(f"{path}: cannot read: {e}")
            return False
        if header is None:
            # An empty file (a log just rotated): no rows, nothing wrong.
            into.files.append(path)
            return True
        names = [cell.strip().lower() for cell in header]
        known = set(names) & set(COLUMNS)
        first_row: list[str] | None = None
        if not known:
            if len(header) in (23, len(COLUMNS)) and _looks_like_timestamp(header[0]):
                notes.append(
                    f"{path}: no header; reading it in the standard column order"
                )
                names = list(COLUMNS[: len(header)])
                first_row = header
            else:
                notes.append(
                    f"{path}: not an ollamaproxy CSV (its first line names none "
                    "of the known columns)"
                )
                return False
        index = {}
        for i, name in enumerate(names):
            index.setdefault(name, i)
        needs_time = query.since is not None or query.until is not None
        if _TIMESTAMP not in index and needs_time:
            notes.append(f"{path}: no timestamp column, cannot filter by time; skipped")
            return False
        if _TIMESTAMP not in index and query.plot:
            notes.append(f"{path}: no timestamp column; its rows are not in the plot")
        missing = [
            name
            for name in (query.column, _STATUS, _MESSAGE, _TOTAL, _TTFT, _INPUT, _OUTPUT, _TPS)
            if name not in index
        ]
        if missing:
            notes.append(f"{path}: no {', '.join(missing)} column; shown as -")
        into.files.append(path)
        try:
            _read_rows(path, reader, first_row, names, index, query, into)
        except OSError as e:
            notes.append(
                f"{path}: reading stopped after line {reader.line_num}: {e.strerror or e}"
            )
    return True


def _read_rows(
    path: str,
    reader: Any,
    first_row: list[str] | None,
    header: list[str],
    index: dict[str, int],
    query: Query,
    into: Collected,
) -> None:
    """
    The hot loop: one pass over the rows, converting only what is used.
    """
    width = len(header)
    wanted = (
        _TIMESTAMP,
        query.column,
        _MODEL,
        _STATUS,
        _MESSAGE,
        _TOTAL,
        _TTFT,
        _INPUT,
        _OUTPUT,
        _TPS,
    )
    # A column the file does not have (an older schema) reads as an empty
    # cell appended to each row, at index C{width}.
    pick = itemgetter(*(index.get(name, width) for name in wanted))
    pad = any(name not in index for name in wanted)
    has_time = _TIMESTAMP in index
    since = query.since
    until = query.until
    plotting = query.plot is not None and has_time
    groups = into.groups
    first = into.first
    last = into.last
    fromisoformat = datetime.fromisoformat
    utc = _UTC
    inf = _INF
    guarded = _GUARDED_FIRST
    plot_minutes = into.plot_minutes
    plot_models = into.plot_models
    plot_total = into.plot_total_ms
    plot_tps = into.plot_tps
    outside = 0

    rows: Iterable[list[str]] = reader
    if first_row is not None:
        rows = _chain_first(first_row, reader)

    def skip(row: list[str], reason: str) -> None:
        into.skip(path, _first_line(reader, row), reason)

    failed_at = -1

    while True:
        try:
            for row in rows:
                if len(row) != width:
                    if row:
                        skip(row, f"expected {width} cells, found {len(row)}")
                    continue
                if pad:
                    row.append("")
                (
                    stamp,
                    key,
                    model,
                    status,
                    message,
                    total,
                    ttft,
                    tokens_in,
                    tokens_out,
                    tps,
                ) = pick(row)

                when = None
                if stamp:
                    try:
                        when = fromisoformat(stamp)
                    except ValueError:
                        # The header again (files joined with cat) is no news.
                        if [cell.strip().lower() for cell in row[:width]] != header:
                            skip(row, f"timestamp: cannot read {stamp[:40]!r}")
                        continue
                    if when.tzinfo is None:
                        when = when.replace(tzinfo=utc)
                    if since is not None and when < since:
                        outside += 1
                        continue
                    if until is not None and when >= until:
                        outside += 1
                        continue
                elif has_time:
                    skip(row, "timestamp: empty")
                    continue

                try:
                    code = int(status) if status else 0
                    t_total = float(total) if total else None
                    t_first = float(ttft) if ttft else None
                    n_in = int(tokens_in) if tokens_in else None
                    n_out = int(tokens_out) if tokens_out else None
                    speed = float(tps) if tps else None
                    if (
                        code < 0
                        or (t_total is not None and not 0.0 <= t_total < inf)
                        or (t_first is not None and not 0.0 <= t_first < inf)
                        or (speed is not None and not 0.0 <= speed < inf)
                        or (n_in is not None and n_in < 0)
                        or (n_out is not None and n_out < 0)
                    ):
                        raise ValueError
                except ValueError:
                    converted = _convert_slowly(
                        status, total, ttft, tokens_in, tokens_out, tps
                    )
                    if isinstance(converted, str):
                        skip(row, converted)
                        continue
                    code, t_total, t_first, n_in, n_out, speed = converted

                if key[:1] == "'" and key[1:2] in guarded:
                    key = key[1:]
                group = groups.get(key)
                if group is None:
                    group = groups[key] = Group()
                group.requests += 1
                if code >= 400 or message:
                    group.errors += 1
                if t_total is not None:
                    group.total_ms.append(t_total)
                if t_first is not None:
                    group.ttft_ms.append(t_first)
                if speed is not None:
                    group.tokens_per_second.append(speed)
                if n_in is not None:
                    group.input_tokens += n_in
                    group.input_reported += 1
                if n_out is not None:
                    group.output_tokens += n_out
                    group.output_reported += 1

                if when is not None:
                    if first is None or when < first:
                        first = when
                    if last is None or when > last:
                        last = when
                    if plotting:
                        if model[:1] == "'" and model[1:2] in guarded:
                            model = model[1:]
                        plot_minutes.append(int(when.timestamp()) // 60)
                        plot_models.append(model)
                        plot_total.append(t_total)
                        plot_tps.append(speed)
            break
        except csv.Error as e:
            # A row the csv module itself rejects (a cell beyond the field
            # size limit): skip it and go on with the next one.
            if reader.line_num == failed_at:
                break
            failed_at = reader.line_num
            into.skip(path, failed_at, f"cannot split into cells: {e}")
            rows = reader
    into.first = first
    into.last = last
    into.outside += outside


def _first_line(reader: Any, row: list[str]) -> int:
    """
    The line on which C{row}, just read, starts: the reader counts the line it
    ended on, and a quoted cell may hold line breaks.
    """
    return reader.line_num - sum(cell.count("\n") for cell in row)


def _chain_first(first: list[str], rest: Iterable[list[str]]) -> Iterable[list[str]]:
    yield first
    yield from rest


_Converted = tuple[int, float | None, float | None, int | None, int | None, float | None]


def _convert_slowly(
    status: str, total: str, ttft: str, tokens_in: str, tokens_out: str, tps: str
) -> _Converted | str:
    """
    Convert the numeric cells of a row the fast path refused, one by one.

    Accepts integral numbers written as decimals (C{"12.0"}) where an
    integer is expected.

    @return: the converted values, or why the row cannot be used.
    """
    values: list[Any] = []
    for name, cell, integral in (
        (_STATUS, status, True),
        (_TOTAL, total, False),
        (_TTFT, ttft, False),
        (_INPUT, tokens_in, True),
        (_OUTPUT, tokens_out, True),
        (_TPS, tps, False),
    ):
        if not cell:
            values.append(0 if name == _STATUS else None)
            continue
        try:
            number = float(cell)
        except ValueError:
            return f"{name}: not a number: {cell[:40]!r}"
        if not math.isfinite(number):
            return f"{name}: not a number: {cell[:40]!r}"
        if number < 0:
            return f"{name}: negative: {cell[:40]!r}"
        if integral:
            if not number.is_integer():
                return f"{name}: not a whole number: {cell[:40]!r}"
            values.append(int(number))
        else:
            values.append(number)
    return tuple(values)  # type: ignore[return-value]


# --------------------------------------------------------------------------
# Statistics


def percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """
    The C{fraction} quantile of sorted values, interpolating linearly between
    the two nearest (as numpy's and pandas' default do); C{None} if empty.
    """
    n = len(ordered)
    if n == 0:
        return None
    position = fraction * (n - 1)
    low = int(position)
    high = min(low + 1, n - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _round(value: float | None, places: int) -> float | None:
    return None if value is None else round(value, places)


_Values = tuple[list[float], list[float], list[float]]


def summarise(name: str, group: Group, values: _Values) -> dict[str, Any]:
    """
    One output row: the group's name and its L{FIELDS}, from its counts and
    its sorted total times, times to first token and tokens per second.
    """
    total, ttft, tps = values
    return {
        "group": name,
        "requests": group.requests,
        "errors": group.errors,
        "error_rate": round(group.errors / group.requests, 6) if group.requests else None,
        "p50_total_ms": _round(percentile(total, 0.50), 3),
        "p95_total_ms": _round(percentile(total, 0.95), 3),
        "p50_ttft_ms": _round(percentile(ttft, 0.50), 3),
        "p95_ttft_ms": _round(percentile(ttft, 0.95), 3),
        "input_tokens": group.input_tokens if group.input_reported else None,
        "output_tokens": group.output_tokens if group.output_reported else None,
        "median_tokens_per_second": _round(percentile(tps, 0.50), 2),
    }


def build_report(collected: Collected) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """
    The per-group rows, most requests first, and the total row.
    """
    ordered = sorted(collected.groups.items(), key=lambda item: (-item[1].requests, item[0]))
    rows = []
    everyone = Group()
    merged: _Values = ([], [], [])
    for name, group in ordered:
        # sorted() of an array makes fresh, adjacent floats: several times
        # quicker to sort than float objects made one per row over time.
        values = (
            sorted(group.total_ms),
            sorted(group.ttft_ms),
            sorted(group.tokens_per_second),
        )
        rows.append(summarise(name or NONE_GROUP, group, values))
        everyone.requests += group.requests
        everyone.errors += group.errors
        everyone.input_tokens += group.input_tokens
        everyone.input_reported += group.input_reported
        everyone.output_tokens += group.output_tokens
        everyone.output_reported += group.output_reported
        for into, part in zip(merged, values):
            into.extend(part)
    for values in merged:
        # Sorted runs, one per group: merged rather than sorted afresh.
        values.sort()
    return rows, summarise(TOTAL_GROUP, everyone, merged)


# --------------------------------------------------------------------------
# Output


def _iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(_UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _human_time(when: datetime) -> str:
    return when.astimezone(_UTC).strftime("%Y-%m-%d %H:%M:%S")


def _printable(text: str, limit: int = 48) -> str:
    """
    A group name made safe and short for a terminal: control characters
    (which could move the cursor or recolour the screen) are escaped.
    """
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > limit:
        text = text[: limit - 1] + "\N{HORIZONTAL ELLIPSIS}"
    return text


def _number(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# (bottom label, field, format spec), in output order.
_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("requests", "requests", ",d"),
    ("errors", "errors", ",d"),
    ("rate", "error_rate", ".1%"),
    ("p50", "p50_total_ms", ",.1f"),
    ("p95", "p95_total_ms", ",.1f"),
    ("p50", "p50_ttft_ms", ",.1f"),
    ("p95", "p95_ttft_ms", ",.1f"),
    ("in", "input_tokens", ",d"),
    ("out", "output_tokens", ",d"),
    ("median", "median_tokens_per_second", ",.1f"),
)
# The first header line: (label, how many columns it spans), from the
# group column on.
_TABLE_HEADS: tuple[tuple[str, int], ...] = (
    ("", 1),
    ("", 1),
    ("", 1),
    ("error", 1),
    ("total ms", 2),
    ("ttft ms", 2),
    ("tokens", 2),
    ("tok/s", 1),
)
_GAP = "  "


def render_table(
    query: Query, collected: Collected, rows: list[dict[str, Any]], total: dict[str, Any]
) -> str:
    """
    Aligned plain text: a one-line summary, then one line per group and the
    total.
    """
    body = [
        [_printable(row["group"])] + [_number(row[f], spec) for _, f, spec in _TABLE_COLUMNS]
        for row in rows
    ]
    total_cells = ["total"] + [_number(total[f], spec) for _, f, spec in _TABLE_COLUMNS]
    bottoms = [query.column] + [bottom for bottom, _, _ in _TABLE_COLUMNS]
    widths = [
        max(len(cells[i]) for cells in [*body, total_cells, bottoms])
        for i in range(len(bottoms))
    ]
    tops = []
    column = 0
    for label, span in _TABLE_HEADS:
        room = sum(widths[column : column + span]) + len(_GAP) * (span - 1)
        if len(label) > room:
            widths[column + span - 1] += len(label) - room
            room = len(label)
        tops.append(label.center(room) if span > 1 else label.rjust(room))
        column += span

    def line(cells: list[str]) -> str:
        return _GAP.join(
            [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        ).rstrip()

    return "\n".join(
        [
            _headline(query, collected),
            "",
            _GAP.join(tops).rstrip(),
            line(bottoms),
            *(line(cells) for cells in body),
            _GAP.join("-" * w for w in widths),
            line(total_cells),
        ]
    ) + "\n"


def _headline(query: Query, collected: Collected) -> str:
    requests = sum(group.requests for group in collected.groups.values())
    files = len(collected.files)
    parts = [
        f"ollamaproxy requests by {query.column}: {requests:,} "
        f"request{'s' if requests != 1 else ''} from {files} file{'s' if files != 1 else ''}"
    ]
    if collected.first is not None and collected.last is not None:
        parts.append(
            f"{_human_time(collected.first)} to {_human_time(collected.last)} UTC"
        )
    window = []
    if query.since is not None:
        window.append(f"since {_human_time(query.since)}")
    if query.until is not None:
        window.append(f"until {_human_time(query.until)}")
    if window:
        parts.append(" ".join(window) + f" UTC ({collected.outside:,} outside)")
    if collected.skipped_count:
        parts.append(f"{collected.skipped_count:,} unreadable rows skipped")
    return "; ".join(parts)


def _guard(cell: str) -> str:
    """
    Re-apply the spreadsheet formula guard to a text cell of our own CSV.
    """
    if cell[:1] in _GUARDED_FIRST:
        return "'" + cell
    return cell


def render_csv(query: Query, rows: list[dict[str, Any]], total: dict[str, Any]) -> str:
    """
    One CSV line per group and a last line for the total (group C{(total)});
    an empty cell means no data.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([query.column, *FIELDS])
    for row in [*rows, total]:
        writer.writerow(
            [_guard(row["group"])] + ["" if row[f] is None else row[f] for f in FIELDS]
        )
    return buffer.getvalue()


def render_json(
    query: Query, collected: Collected, rows: list[dict[str, Any]], total: dict[str, Any]
) -> str:
    """
    An object with the query, the time range and the rows; C{null} means
    no data.
    """

    def named(row: dict[str, Any]) -> dict[str, Any]:
        return {query.column: row["group"], **{f: row[f] for f in FIELDS}}

    document = {
        "by": query.column,
        "since": _iso(query.since),
        "until": _iso(query.until),
        "first": _iso(collected.first),
        "last": _iso(collected.last),
        "files": collected.files,
        "outside_time_range": collected.outside,
        "skipped_rows": collected.skipped_count,
        "groups": [named(row) for row in rows],
        "total": named(total),
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _report_skipped(collected: Collected, err: IO[str]) -> None:
    if not collected.skipped_count:
        return
    err.write(f"{PROG}: skipped {collected.skipped_count:,} rows that could not be read:\n")
    for skipped in collected.skipped:
        err.write(f"  {skipped.path}, line {skipped.line}: {_printable(skipped.reason, 200)}\n")
    more = collected.skipped_count - len(collected.skipped)
    if more > 0:
        err.write(f"  ... and {more:,} more\n")


# --------------------------------------------------------------------------
# Plot


def _load_matplotlib() -> Any:
    """
    The matplotlib pieces the plot needs, without pyplot (no global state,
    always the non-interactive Agg canvas).

    @raise UsageError: matplotlib is not installed.
    """
    try:
        import matplotlib.dates as dates
        import numpy
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed; install it with: "
            f"{PLOT_INSTALL_HINT}"
        ) from None
    return Figure, FigureCanvasAgg, dates, numpy


_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
)
_OTHER_COLOR = "#7f7f7f"


@dataclass(slots=True)
class _Series:
    """
    One line per panel: a model, or the models folded into "other".
    """

    label: str
    color: str
    dashed: bool
    requests_per_minute: Any  # numpy arrays, one value per bucket
    p95_total_ms: Any
    median_tps: Any


def _series(collected: Collected, bucket_minutes: int, numpy: Any) -> tuple[list[_Series], Any]:
    """
    Per-bucket statistics of the busiest models, and the buckets' times.
    """
    minutes = collected.plot_minutes
    models = collected.plot_models
    counts = Counter(models)
    ranked = sorted(counts, key=lambda m: (-counts[m], m))
    top = ranked[:PLOT_TOP_MODELS]
    rest = ranked[PLOT_TOP_MODELS:]
    index = {model: i for i, model in enumerate(top)}
    other = len(top)
    n_series = other + (1 if rest else 0)

    buckets = numpy.asarray(minutes, dtype="int64") // bucket_minutes
    first = int(buckets.min())
    size = int(buckets.max()) - first + 1
    # One cell per (series, bucket), numbered series * size + bucket.
    cells = numpy.fromiter(
        (index.get(model, other) for model in models), dtype="int64", count=len(models)
    ) * size + (buckets - first)
    shape = (n_series, size)
    requests = numpy.bincount(cells, minlength=n_series * size).reshape(shape) / bucket_minutes
    p95 = _cell_quantiles(numpy, cells, collected.plot_total_ms, 0.95, shape)
    median = _cell_quantiles(numpy, cells, collected.plot_tps, 0.50, shape)

    series = [
        _Series(
            label=f"{_printable(model or NONE_GROUP, 32)} ({counts[model]:,})",
            color=_PALETTE[i % len(_PALETTE)],
            dashed=False,
            requests_per_minute=requests[i],
            p95_total_ms=p95[i],
            median_tps=median[i],
        )
        for i, model in enumerate(top)
    ]
    if rest:
        series.append(
            _Series(
                label=f"other: {len(rest)} models ({sum(counts[m] for m in rest):,})",
                color=_OTHER_COLOR,
                dashed=True,
                requests_per_minute=requests[other],
                p95_total_ms=p95[other],
                median_tps=median[other],
            )
        )
    seconds = numpy.arange(first, first + size, dtype="int64") * (bucket_minutes * 60)
    return series, seconds.astype("datetime64[s]")


def _cell_quantiles(
    numpy: Any, cells: Any, values: list[float | None], fraction: float, shape: tuple[int, int]
) -> Any:
    """
    The C{fraction} quantile of the values of each cell, as L{percentile}
    computes it; NaN where a cell has no values.
    """
    result = numpy.full(shape[0] * shape[1], numpy.nan)
    data = numpy.array(values, dtype="float64")  # None becomes NaN
    present = ~numpy.isnan(data)
    if present.any():
        keys = cells[present]
        data = data[present]
        order = numpy.lexsort((data, keys))
        keys = keys[order]
        data = data[order]
        unique, starts, counts = numpy.unique(keys, return_index=True, return_counts=True)
        position = starts + fraction * (counts - 1)
        low = numpy.floor(position).astype("int64")
        high = numpy.minimum(low + 1, starts + counts - 1)
        result[unique] = data[low] + (data[high] - data[low]) * (position - low)
    return result.reshape(shape)


def _typical(values: Any) -> float | None:
    """
    The median of the positive values of a series, ignoring gaps.
    """
    present = sorted(v for v in values.tolist() if v > 0)
    return percentile(present, 0.5)


def plot(query: Query, collected: Collected, path: str, libraries: Any) -> bool:
    """
    Draw requests per minute, p95 total latency and median tokens per second
    over time in three stacked panels, one line per model (the busiest
    L{PLOT_TOP_MODELS}, the rest folded into "other"), into a PNG at C{path}.

    @return: C{False} when there is nothing to draw.
    """
    Figure, FigureCanvasAgg, dates, numpy = libraries
    if not collected.plot_minutes:
        return False
    bucket_minutes = query.bucket_seconds // 60
    series, times = _series(collected, bucket_minutes, numpy)

    # Seconds read better than five-digit milliseconds; fast and slow models
    # together (an embedding model at 50 ms, a 70b at 30 s) only read well on
    # a log scale.
    latencies = [line.p95_total_ms for line in series]
    highest = max((numpy.nanmax(v, initial=0.0) for v in latencies), default=0.0)
    unit, scale = ("s", 1000.0) if highest >= 10_000 else ("ms", 1.0)
    typical = [t for t in map(_typical, latencies) if t is not None]
    log_latency = len(typical) > 1 and max(typical) / min(typical) > 20

    figure = Figure(figsize=(13, 9.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(3, 1, sharex=True)
    panels = (
        (axes[0], "requests_per_minute", "requests / minute", 1.0),
        (
            axes[1],
            "p95_total_ms",
            f"p95 total latency ({unit}{', log scale' if log_latency else ''})",
            scale,
        ),
        (axes[2], "median_tps", "median tokens / second", 1.0),
    )
    for ax, attribute, ylabel, divisor in panels:
        for line in series:
            ys = getattr(line, attribute) / divisor
            style = {
                "color": line.color,
                "linewidth": 1.2 if line.dashed else 1.5,
                "linestyle": "--" if line.dashed else "-",
            }
            present = ~numpy.isnan(ys)
            if present.sum() < 0.5 * len(ys):
                # Mostly gaps: a line would be a few dashes; dots show the level.
                style["linestyle"] = "none"
                style["marker"] = "o"
                style["markersize"] = 3.5
                style["markerfacecolor"] = "none" if line.dashed else line.color
            ax.plot(times, ys, label=line.label, **style)
            if "marker" not in style:
                # A bucket between two gaps draws no line: mark it.
                alone = present.copy()
                alone[1:] &= ~present[:-1]
                alone[:-1] &= ~present[1:]
                if alone.any():
                    ax.plot(
                        times[alone],
                        ys[alone],
                        linestyle="none",
                        marker="o",
                        markersize=3,
                        color=line.color,
                    )
        ax.set_ylabel(ylabel, fontsize=11)
        if ax is axes[1] and log_latency:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_plain_number_formatter())
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, color="#dddddd", linewidth=0.8)
        ax.tick_params(labelsize=10)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    locator = dates.AutoDateLocator()
    axes[-1].xaxis.set_major_locator(locator)
    axes[-1].xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
    axes[-1].set_xlabel("time (UTC)", fontsize=11)
    axes[-1].margins(x=0.01)

    start = collected.first
    end = collected.last
    assert start is not None and end is not None
    until = f"{end:%H:%M}" if start.date() == end.date() else f"{end:%Y-%m-%d %H:%M}"
    figure.suptitle(
        f"ollamaproxy {start:%Y-%m-%d %H:%M} \N{EN DASH} {until} UTC: "
        f"{len(collected.plot_minutes):,} requests, "
        f"{_duration_label(query.bucket_seconds)} buckets",
        fontsize=14,
        fontweight="bold",
        # Left-aligned, so that it stays clear of the legend on the right.
        x=0.01,
        horizontalalignment="left",
    )
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        loc="outside right upper",
        title="model (requests)",
        fontsize=10,
        title_fontsize=11,
        frameon=False,
    )
    figure.savefig(path, format="png")
    return True


_SUGGESTED_BUCKETS = (5, 15, 30, 60, 180, 360, 1440)


def _bucket_hint(query: Query, collected: Collected) -> str | None:
    """
    A better C{--bucket} when most buckets of the plot are empty.
    """
    minutes = collected.plot_minutes
    if not minutes:
        return None
    bucket = query.bucket_seconds // 60
    size = max(minutes) // bucket - min(minutes) // bucket + 1
    used = len({minute // bucket for minute in minutes})
    if size < 60 or used > size / 5:
        return None
    span = size * bucket
    for suggestion in _SUGGESTED_BUCKETS:
        if suggestion > bucket and span / suggestion <= 120:
            return _duration_option(suggestion)
    return None


def _duration_option(minutes: int) -> str:
    if minutes % 1440 == 0:
        return f"{minutes // 1440}d"
    if minutes % 60 == 0:
        return f"{minutes // 60}h"
    return f"{minutes}m"


def _plain_number_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


def _duration_label(seconds: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            return f"{seconds // size}-{unit}"
    return f"{seconds}-second"


# --------------------------------------------------------------------------
# Entry point


def main(
    argv: list[str] | None = None,
    *,
    now: datetime | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """
    Run the report.

    @param argv: the arguments (default: C{sys.argv[1:]}).
    @param now: the time relative C{--since}/C{--until} count back from
        (default: the current time).
    @return: the exit code: 0 when a report was produced, 2 for a usage
        error or when no file could be read.
    """
    if stdout is None:
        out = sys.stdout
        # A model name the terminal's encoding cannot show is no reason to
        # fail.
        if hasattr(out, "reconfigure"):
            out.reconfigure(errors="backslashreplace")
    else:
        out = stdout
    err = sys.stderr if stderr is None else stderr
    if argv is None:
        argv = sys.argv[1:]
    if now is None:
        now = datetime.now(_UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=_UTC)
    parser = _build_parser(out)
    try:
        query = _query(parser, argv, now)
        libraries = _load_matplotlib() if query.plot else None
    except _Exit as e:
        return e.status
    except UsageError as e:
        err.write(parser.format_usage())
        err.write(f"{PROG}: error: {e}\n")
        return 2

    notes: list[str] = []
    paths = find_files(query.paths, notes)
    collected = Collected()
    old_limit = csv.field_size_limit(FIELD_SIZE_LIMIT)
    try:
        for path in paths:
            read_file(path, query, collected, notes)
    finally:
        csv.field_size_limit(old_limit)
    for note in notes:
        err.write(f"{PROG}: {note}\n")
    if not collected.files:
        err.write(f"{PROG}: no file could be read; no report\n")
        return 2

    rows, total = build_report(collected)
    if query.format == "json":
        text = render_json(query, collected, rows, total)
    elif query.format == "csv":
        text = render_csv(query, rows, total)
    else:
        text = render_table(query, collected, rows, total)
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        # Piped into C{head}, which has seen enough.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 0
    _report_skipped(collected, err)

    if query.plot:
        try:
            drawn = plot(query, collected, query.plot, libraries)
        except OSError as e:
            err.write(f"{PROG}: cannot write {query.plot}: {e.strerror or e}\n")
            return 2
        if drawn:
            err.write(f"{PROG}: plot written to {query.plot}\n")
            hint = _bucket_hint(query, collected)
            if hint:
                err.write(
                    f"{PROG}: most buckets of the plot are empty; "
                    f"--bucket {hint} may read better\n"
                )
        else:
            err.write(f"{PROG}: no timestamped requests to plot; {query.plot} not written\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
