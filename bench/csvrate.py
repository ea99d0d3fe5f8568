"""
Figure 5: how fast the CSV log writes rows, in this process.

A L{CsvLog} on a L{task.Clock} appends to a file in a fresh temporary
directory; it is fed finished L{RequestRecord}s like the proxy's (a streamed
C{/api/generate} with every cell filled), each through C{request_finished}:
the row is formatted, guarded against formulas and written with one
C{os.write}, exactly what the proxy does once per request.  The best of three
runs is kept; the CPU per row is this process's user+system time.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

from twisted.internet.task import Clock

from ollamaproxy.csvlog import CsvLog
from ollamaproxy.record import RequestRecord


@dataclass(frozen=True)
class CsvRate:
    rows: int
    seconds: float
    cpu: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds

    @property
    def cpu_per_row(self) -> float:
        return self.cpu / self.rows


def _record(i: int) -> RequestRecord:
    now = time.monotonic()
    return RequestRecord(
        request_id=f"7c4b9a52-1f0e-4d8e-9b1a-{i:012d}",
        arrived_wall=time.time(),
        arrived=now,
        ip_source="127.0.0.1",
        user_agent="ollama-python/0.6.0 (x86_64 linux) Python/3.11.7",
        http_method="POST",
        endpoint="/api/generate",
        model="llama3.2:latest",
        input_tokens=26,
        output_tokens=64,
        request_size_bytes=96,
        response_size_bytes=6150,
        sent_upstream=now + 0.0002,
        upstream_ended=now + 0.33,
        first_byte=now + 0.0052,
        ended=now + 0.3302,
        http_status=200,
        model_parameters='{"num_predict":64,"temperature":0.7}',
        stream_mode=True,
        system_load_cpu=12.5,
        system_load_memory=41.0,
        concurrent_requests=3,
        session_id="",
        ollama_load_ns=1_234_567,
        ollama_prompt_eval_ns=2_345_678,
        ollama_eval_ns=320_000_000,
        done_reason="stop",
        api_key_name="team-a",
    )


def csv_rate(rows: int) -> CsvRate:
    """Write C{rows} rows three times; the fastest run."""
    records = [_record(i) for i in range(rows)]
    best: CsvRate | None = None
    for _ in range(3):
        with tempfile.TemporaryDirectory(prefix="ollamaproxy-csv-") as directory:
            log = CsvLog(directory, clock=Clock())
            log.startService()
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for record in records:
                log.request_finished(record)
            run = CsvRate(rows, time.perf_counter() - start_wall, time.process_time() - start_cpu)
            log.stopService()
            assert log.rows_written == rows, "every row should be written"
            assert os.path.getsize(log.path) > rows * 100
        if best is None or run.seconds < best.seconds:
            best = run
    assert best is not None
    return best
