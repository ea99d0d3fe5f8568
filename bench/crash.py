"""
Crash: the proxy is killed with SIGKILL in the middle of a load and started
again on the same log directory.  Is the CSV still whole?

    python bench/crash.py [--requests 3000] [--kill-after 1500] [--no-tear] [--json FILE]

Starts the fake Ollama and the proxy (L{servers}), sends the L{soak} mix from
32 workers and, when C{--kill-after} responses are in, sends the proxy
SIGKILL; the workers then stop (the requests in flight fail, as they must).

A row is appended with one C{write} on an C{O_APPEND} descriptor, so a
SIGKILL cannot tear one: the kernel finishes a write a killed process has
started.  What tears a row is a power cut or a full disk, so unless
C{--no-tear} is given, the first half of a row is then appended to the file,
as a power cut would leave it, to exercise the start-up repair.

The proxy is then started again on the same directory, and checked:

  - it starts and listens;
  - its start-up log names the torn row, and a C{ollama-proxy.csv.torn-*}
    side file holds exactly the torn bytes (or, with no torn row, neither
    the message nor the file exists);
  - the file parses with L{csv.reader} and, if installed, C{pandas.read_csv},
    with the full column count on every row;
  - every response the client read whole before the kill has its row;
  - 200 more requests after the restart each add exactly one row, with the
    status the client saw.

Bounded by the request count, a timeout per request and an alarm; every
server is stopped on the way out.  Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ollamaproxy.record import COLUMNS
from servers import Servers, raise_open_files_limit
from soak import CsvCheck, check_csv, plan, read_rows, run_load, wait_for_rows

BUDGET = 240  # seconds
AFTER_RESTART = 200
TORN_MESSAGE = "ended in a torn row"


@dataclass
class Crash:
    requests_sent: int = 0
    killed_after: int = 0
    complete_before_kill: int = 0
    failed_by_kill: int = 0
    rows_at_kill: int = 0
    complete_without_row: int = 0
    file_ended_whole_after_kill: bool = False
    torn_bytes_appended: int = 0
    restarted: bool = False
    startup_log_names_torn_row: bool = False
    torn_side_files: list[str] = field(default_factory=list)
    side_file_holds_torn_bytes: bool = False
    rows_after_restart: int = 0
    rows_with_wrong_width: int = 0
    pandas_rows: int | None = None  # None: pandas not installed
    after_restart: CsvCheck = field(default_factory=CsvCheck)

    def failures(self) -> list[str]:
        problems = []
        if not self.restarted:
            problems.append("the proxy did not start again")
        if self.complete_without_row:
            problems.append(f"{self.complete_without_row} complete responses have no row")
        torn = self.torn_bytes_appended > 0 or not self.file_ended_whole_after_kill
        if torn != self.startup_log_names_torn_row or torn != bool(self.torn_side_files):
            problems.append("the torn row was not set aside as expected")
        if self.torn_bytes_appended and not self.side_file_holds_torn_bytes:
            problems.append("the side file does not hold the torn bytes")
        if self.rows_with_wrong_width:
            problems.append(f"{self.rows_with_wrong_width} rows without {len(COLUMNS)} cells")
        if self.pandas_rows is not None and self.pandas_rows != self.rows_after_restart:
            problems.append(f"pandas read {self.pandas_rows} rows, csv.reader {self.rows_after_restart}")
        if self.rows_after_restart != self.rows_at_kill + AFTER_RESTART:
            problems.append(f"{self.rows_after_restart} rows after the restart, expected "
                            f"{self.rows_at_kill} + {AFTER_RESTART}")
        c = self.after_restart
        if c.short_or_long_rows or c.missing_ids or c.unknown_ids or c.status_mismatches or c.duplicate_ids:
            problems.append(f"rows after the restart do not match: {asdict(c)}")
        return problems


def crash(requests: int, kill_after: int, tear: bool) -> Crash:
    report = Crash()
    with Servers() as servers:
        fake = servers.fake("fake", 0.005)
        proxy = servers.proxy("proxy", fake)
        path = proxy.csv_path
        assert path is not None
        killed = False

        def on_result(done: int) -> None:
            nonlocal killed
            if done == kill_after and not killed:
                os.kill(proxy.pid, signal.SIGKILL)
                killed = True

        results = asyncio.run(run_load(proxy.port, plan(requests), 32, on_result, lambda: killed))
        proxy.process.wait(10)
        sent = [r for r in results if r.status is not None or r.error is not None]
        report.requests_sent = len(sent)
        report.killed_after = kill_after
        report.complete_before_kill = sum(1 for r in sent if r.complete)
        report.failed_by_kill = sum(1 for r in sent if not r.complete and not r.kind.startswith("abandoned"))

        with open(path, "rb") as f:
            data = f.read()
        report.file_ended_whole_after_kill = data.endswith(b"\r\n")
        header, rows = read_rows(path)
        report.rows_at_kill = len(rows) if report.file_ended_whole_after_kill else len(rows) - 1
        logged = {row[COLUMNS.index("request_id")] for row in rows}
        report.complete_without_row = sum(1 for r in sent if r.complete and r.request_id not in logged)
        torn = b""
        if tear:
            last_row = data.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
            torn = last_row[: len(last_row) // 2]
            with open(path, "ab") as f:
                f.write(torn)
        report.torn_bytes_appended = len(torn)

        again = servers.proxy("proxy", fake)  # the same name: the same log directory
        assert again.csv_path == path, "servers.proxy() no longer reuses the log directory"
        report.restarted = True
        more = asyncio.run(run_load(again.port, plan(AFTER_RESTART, seed=2), 32))
        wait_for_rows(path, report.rows_at_kill + AFTER_RESTART)
        with open(again.output, errors="replace") as f:
            report.startup_log_names_torn_row = TORN_MESSAGE in f.read()
        report.torn_side_files = sorted(glob.glob(path + ".torn-*"))
        if torn and report.torn_side_files:
            with open(report.torn_side_files[0], "rb") as f:
                report.side_file_holds_torn_bytes = f.read() == torn

        header, rows = read_rows(path)
        report.rows_after_restart = len(rows)
        report.rows_with_wrong_width = sum(1 for row in rows if len(row) != len(COLUMNS))
        report.pandas_rows = _pandas_rows(path)
        report.after_restart = check_csv(rows[report.rows_at_kill:], header, more)
        report.torn_side_files = [os.path.basename(p) for p in report.torn_side_files]
    return report


def _pandas_rows(path: str) -> int | None:
    try:
        import pandas
    except ImportError:
        return None
    return len(pandas.read_csv(path, dtype=str, keep_default_na=False))


def table(c: Crash) -> str:
    lines = [
        f"{'requests sent / killed after':<44}{c.requests_sent} / {c.killed_after} responses",
        f"{'complete before the kill':<44}{c.complete_before_kill}",
        f"{'failed by the kill (in flight)':<44}{c.failed_by_kill}",
        f"{'rows at the kill':<44}{c.rows_at_kill}",
        f"{'complete responses without a row (0)':<44}{c.complete_without_row}",
        f"{'file ended on a whole row after SIGKILL':<44}{c.file_ended_whole_after_kill}",
        f"{'torn bytes appended (power-cut stand-in)':<44}{c.torn_bytes_appended}",
        f"{'restarted on the same log dir':<44}{c.restarted}",
        f"{'start-up log names the torn row':<44}{c.startup_log_names_torn_row}",
        f"{'side files':<44}{', '.join(c.torn_side_files) or '-'}",
        f"{'side file holds exactly the torn bytes':<44}{c.side_file_holds_torn_bytes}",
        f"{'rows after restart (+{0})'.format(AFTER_RESTART):<44}{c.rows_after_restart}",
        f"{'rows without {0} cells'.format(len(COLUMNS)):<44}{c.rows_with_wrong_width}",
        f"{'pandas.read_csv rows':<44}{'not installed' if c.pandas_rows is None else c.pandas_rows}",
        f"{'after restart: missing/unknown/status':<44}{c.after_restart.missing_ids} / "
        f"{c.after_restart.unknown_ids} / {c.after_restart.status_mismatches}",
    ]
    problems = c.failures()
    lines.append("RESULT: " + ("all checks passed" if not problems else "; ".join(problems)))
    return "\n".join(lines)


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError(f"the crash run took longer than {BUDGET} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--kill-after", type=int, default=1500, help="responses before SIGKILL")
    parser.add_argument("--no-tear", action="store_true", help="do not append half a row after the kill")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.kill_after < args.requests:
        parser.error("--kill-after must be between 0 and --requests")
    raise_open_files_limit()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(BUDGET)
    try:
        result = crash(args.requests, args.kill_after, tear=not args.no_tear)
    finally:
        signal.alarm(0)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(result), "failures": result.failures()}, f, indent=2)
    return 1 if result.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
