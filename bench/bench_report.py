"""
How long C{ollamaproxy-report} takes on a large log.

Writes a CSV of C{--rows} requests (default 1,000,000, spread over a day,
12 models, some errors and unreported cells) in a temporary directory with
the proxy's own record format, then times the report on it::

    python bench/bench_report.py [--rows N] [--plot] [--keep]

Prints one line per timed run and the file size.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import shutil
import sys
import tempfile
import time

from ollamaproxy.record import COLUMNS, RequestRecord
from ollamaproxy.report import main as report

MODELS = [
    ("llama3.1:8b", 40, 1.8, 55.0),
    ("qwen2.5:7b", 20, 1.5, 60.0),
    ("mistral:7b", 12, 1.6, 58.0),
    ("llama3.1:70b", 8, 9.0, 9.0),
    ("gemma2:9b", 6, 2.2, 45.0),
    ("phi3:mini", 5, 0.8, 110.0),
    ("deepseek-r1:14b", 3, 12.0, 28.0),
    ("nomic-embed-text", 2, 0.1, 0.0),
    ("codellama:13b", 1.5, 3.0, 32.0),
    ("llava:7b", 1, 4.0, 40.0),
    ("qwen2.5-coder:32b", 1, 7.0, 14.0),
    ("tinyllama", 0.5, 0.3, 180.0),
]
ENDPOINTS = ["/api/chat", "/api/generate", "/v1/chat/completions", "/api/embed"]
PARAMETERS = [
    "",
    '{"temperature":0.7}',
    '{"num_ctx":8192,"temperature":0.2,"top_p":0.9}',
    '{"max_tokens":512,"stream":true}',
]
START = 1_714_521_600.0  # 2024-05-01T00:00:00Z
SPAN = 86_400.0


def write_log(path: str, rows: int, seed: int = 1) -> None:
    """
    Write C{rows} plausible requests, in time order, to C{path}.
    """
    rng = random.Random(seed)
    names = [m[0] for m in MODELS]
    weights = [m[1] for m in MODELS]
    profile = {m[0]: m[2:] for m in MODELS}
    step = SPAN / rows
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        batch = []
        for i in range(rows):
            model = rng.choices(names, weights)[0]
            seconds, speed = profile[model]
            total = rng.lognormvariate(0, 0.6) * seconds
            wall = START + i * step
            record = RequestRecord(
                request_id=f"r{i}",
                arrived_wall=wall,
                arrived=i * step,
                ip_source=f"10.0.{rng.randrange(4)}.{rng.randrange(1, 60)}",
                user_agent="ollama-python/0.4.7 (x86_64 linux) Python/3.11.7",
                http_method="POST",
                endpoint=rng.choice(ENDPOINTS),
                model=model,
                input_tokens=rng.randrange(10, 4000),
                request_size_bytes=rng.randrange(200, 20000),
                response_size_bytes=rng.randrange(200, 60000),
                sent_upstream=i * step + 0.001,
                upstream_ended=i * step + total,
                ended=i * step + total,
                stream_mode=rng.random() < 0.7,
                # JSON with quotes and commas: the csv module must unquote it.
                model_parameters=rng.choice(PARAMETERS),
                concurrent_requests=rng.randrange(1, 8),
                session_id=f"s{rng.randrange(500)}",
                api_key_name=rng.choice(["team-a", "team-b", "ci", ""]),
            )
            luck = rng.random()
            if luck < 0.02:
                record.http_status = rng.choice([400, 404, 500, 502, 504])
                record.fail("upstream said no")
            else:
                record.http_status = 200
                record.first_byte = i * step + total * rng.uniform(0.05, 0.3)
                if speed:
                    out = rng.randrange(20, 800)
                    record.output_tokens = out
                    record.ollama_eval_ns = int(out / (speed * rng.uniform(0.7, 1.3)) * 1e9)
                    record.done_reason = "stop"
                if luck < 0.03:
                    record.fail("stream broken: connection lost")
            batch.append(record.cells())
            if len(batch) == 10_000:
                writer.writerows(batch)
                batch.clear()
        writer.writerows(batch)


def timed(argv: list[str]) -> tuple[float, float]:
    """
    Run the report in this process; its wall-clock and CPU seconds.
    """
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    cpu = time.process_time()
    code = report(argv, stdout=out, stderr=err)
    cpu = time.process_time() - cpu
    elapsed = time.perf_counter() - started
    if code != 0:
        sys.stderr.write(err.getvalue())
        raise SystemExit(f"report failed with exit code {code}")
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--plot", action="store_true", help="also time --plot")
    parser.add_argument("--keep", action="store_true", help="keep the generated CSV")
    options = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="bench-report-")
    path = os.path.join(directory, "ollama-proxy.csv")
    try:
        started = time.perf_counter()
        write_log(path, options.rows)
        size = os.path.getsize(path)
        print(
            f"generated {options.rows:,} rows ({size / 1e6:.0f} MB) "
            f"in {time.perf_counter() - started:.1f} s"
        )
        runs = [
            ("report --by model", [path]),
            ("report --by session --format json", [path, "--by", "session", "--format", "json"]),
            ("report --since/--until (half the day)",
             [path, "--since", "2024-05-01T06:00Z", "--until", "2024-05-01T18:00Z"]),
        ]
        if options.plot:
            runs.append(
                ("report --plot", [path, "--plot", os.path.join(directory, "plot.png")])
            )
        for label, argv in runs:
            seconds, cpu = timed(argv)
            print(
                f"{label:40} {seconds:6.2f} s wall, {cpu:6.2f} s CPU  "
                f"({options.rows / seconds / 1e6:.2f} M rows/s)"
            )
    finally:
        if options.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
