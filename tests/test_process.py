"""
The proxy as operators run it: C{twist ollamaproxy} in a process of its own,
in front of the fake Ollama in another, over loopback; and what only a real
process shows: SIGKILL and a restart, SIGHUP after logrotate, SIGTERM with a
stream in flight, settings refused before listening, and the warning for a
public interface.

Every wait has a deadline and every process started is killed in cleanup.
Every server listens on a port the kernel picks, read from its log, so no
port is chosen before it is bound.  The tests skip when C{twist} is not
next to the Python running them or 127.0.0.1 cannot be bound.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ollamaproxy.record import COLUMNS

from . import support
from .support import clean_environment, csv_rows, read_csv, refused_port

HOST = "127.0.0.1"
TWIST = os.path.join(os.path.dirname(sys.executable), "twist")
# Every wait gives up after this many seconds: an upper bound only, wide
# enough for processes starting on a slow, loaded machine.
PATIENCE = 2 * support.PATIENCE
# What the fake Ollama and the proxy log once they listen.
FAKE_LISTENING = r"\bSite starting on (\d+)"
PROXY_LISTENING = r"ollamaproxy listening on IPv4Address\(.*?port=(\d+)\)"


def _require_loopback() -> None:
    try:
        with socket.socket() as s:
            s.bind((HOST, 0))
    except OSError as e:
        raise SkipTest(f"cannot bind to {HOST}: {e}") from None


def _taken_port(test: SynchronousTestCase) -> int:
    """
    A loopback port another socket listens on until the test ends, so
    that the proxy cannot bind it.
    """
    held = socket.socket()
    test.addCleanup(held.close)
    try:
        held.bind((HOST, 0))
    except OSError as e:
        raise SkipTest(f"cannot bind to {HOST}: {e}") from None
    held.listen()
    return int(held.getsockname()[1])


def _eventually(condition: Callable[[], object], what: str) -> None:
    support.eventually_blocking(condition, what, PATIENCE)


class Child:
    """
    A process started for a test, its output (stdout and stderr) in a file,
    killed in the test's cleanup if it is still running.
    """

    def __init__(self, test: SynchronousTestCase, name: str, argv: Sequence[str], cwd: str) -> None:
        self.output = os.path.join(cwd, f"{name}.out")
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=cwd, env=clean_environment(),
            )
        test.addCleanup(self.kill)

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        with open(self.output, errors="replace") as f:
            return f.read()

    def wait_for_text(self, text: str) -> None:
        self._wait(lambda: text in self.text(), f"logged {text!r}")

    def _wait(self, condition: Callable[[], object], what: str) -> None:
        try:
            _eventually(condition, what)
        except AssertionError as e:
            raise AssertionError(f"{e}; it said: {self.text()[-2000:]}") from None

    def listening_port(self, pattern: str) -> int:
        """
        The port the process says, in a line matching C{pattern}, it
        listens on, once it has said so.
        """
        found: list[int] = []

        def said() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode}")
            match = re.search(pattern, self.text())
            if match:
                found.append(int(match.group(1)))
            return bool(found)

        self._wait(said, f"logged {pattern!r}")
        return found[0]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _twist(*arguments: str) -> list[str]:
    return [TWIST, "--log-format", "text", "ollamaproxy", *arguments]


def _generate_body(tokens: int) -> bytes:
    return json.dumps({"model": "llama3.2", "prompt": "hi", "options": {"num_predict": tokens}}).encode()


class Stream:
    """A streamed generation through the proxy, read one NDJSON line at a time."""

    def __init__(self, port: int, tokens: int) -> None:
        self.connection = http.client.HTTPConnection(HOST, port, timeout=PATIENCE)
        self.connection.request("POST", "/api/generate", _generate_body(tokens))
        self.response = self.connection.getresponse()
        self.request_id = self.response.getheader("x-request-id")
        self.first_line = self.response.readline()

    def rest(self) -> list[bytes]:
        return self.response.read().splitlines()

    def close(self) -> None:
        self.connection.close()


def _generate(port: int, tokens: int = 3) -> str:
    """One whole streamed generation; its request id."""
    stream = Stream(port, tokens)
    try:
        stream.rest()
    finally:
        stream.close()
    assert stream.response.status == 200 and stream.request_id
    return stream.request_id


class RunningProxyTests(SynchronousTestCase):
    """
    The proxy process in front of a fake Ollama process.
    """

    def setUp(self) -> None:
        if not os.access(TWIST, os.X_OK):
            raise SkipTest(f"no twist executable at {TWIST}")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.logs = os.path.join(self.directory, "logs")
        self.csv = os.path.join(self.logs, "ollama-proxy.csv")
        _require_loopback()
        fake = Child(self, "fake", [
            sys.executable, "-m", "ollamaproxy.testing.fake_ollama", "--host", HOST,
            "--port", "0", "--token-delay", "0.005", "--no-host-check",
        ], self.directory)
        self.fake_port = fake.listening_port(FAKE_LISTENING)
        self.started = 0

    def start_proxy(self, *extra: str) -> tuple[Child, int]:
        self.started += 1
        proxy = Child(self, f"proxy-{self.started}", _twist(
            "--listen", f"tcp:0:interface={HOST}",
            "--ollama-url", f"http://{HOST}:{self.fake_port}",
            "--log-path", self.logs, *extra,
        ), self.directory)
        return proxy, proxy.listening_port(PROXY_LISTENING)

    def wait_rows(self, path: str, count: int) -> list[list[str]]:
        """
        Wait until C{path} has C{count} data rows or more; its data rows
        (L{csv_rows}: the header and every row's column count checked).
        """
        def enough() -> bool:
            return os.path.exists(path) and len(read_csv(path)) - 1 >= count

        _eventually(enough, f"{count} rows in {path}")
        return csv_rows(path)

    def test_sigkill_then_restart_keeps_the_csv_whole(self) -> None:
        """
        SIGKILL with streams in flight leaves only whole rows (one write per
        row); a torn last row, as a power cut leaves it, is cut off at the
        next start-up, saved in a C{.torn-*} side file and named in the log,
        and the restarted proxy appends to the same file.
        """
        proxy, port = self.start_proxy()
        finished = [_generate(port) for _ in range(3)]
        # In flight for 100 s (20,000 tokens 5 ms apart), so still at the kill.
        streams = [Stream(port, tokens=20_000) for _ in range(2)]
        for stream in streams:
            self.addCleanup(stream.close)
            self.assertIn(b'"done":false', stream.first_line)
        self.wait_rows(self.csv, 3)

        os.kill(proxy.pid, signal.SIGKILL)
        proxy.process.wait(PATIENCE)
        with open(self.csv, "rb") as f:
            data = f.read()
        self.assertTrue(data.endswith(b"\r\n"), "SIGKILL tore a row")
        last_row = data.rstrip(b"\r\n").rsplit(b"\r\n", 1)[1]
        torn = last_row[: len(last_row) // 2]
        with open(self.csv, "ab") as f:
            f.write(torn)

        again, port = self.start_proxy()
        again.wait_for_text("ended in a torn row")
        [side_file] = glob.glob(self.csv + ".torn-*")
        with open(side_file, "rb") as f:
            self.assertEqual(f.read(), torn)
        after = _generate(port)

        rows = self.wait_rows(self.csv, 4)
        ids = [row[COLUMNS.index("request_id")] for row in rows]
        self.assertEqual(ids, [*finished, after])
        try:
            import pandas
        except ImportError:
            return
        self.assertEqual(list(pandas.read_csv(self.csv, dtype=str)["request_id"]), ids)

    def test_sighup_reopens_a_renamed_csv(self) -> None:
        """
        After logrotate renames the CSV (no copytruncate) and sends SIGHUP,
        the next row goes to a new C{ollama-proxy.csv} with a header; the
        old rows stay in the renamed file.
        """
        proxy, port = self.start_proxy()
        before = _generate(port)
        self.wait_rows(self.csv, 1)
        rotated = self.csv + ".1"
        os.rename(self.csv, rotated)

        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for_text("Reopening")
        after = _generate(port)

        rows = self.wait_rows(self.csv, 1)
        self.assertEqual([row[COLUMNS.index("request_id")] for row in rows], [after])
        old = csv_rows(rotated)
        self.assertEqual([row[COLUMNS.index("request_id")] for row in old], [before])

    def test_sigterm_lets_a_stream_in_flight_finish(self) -> None:
        """
        SIGTERM with a 1.5 s stream in flight: the stream runs to its end
        within the grace period (an hour), the process then exits cleanly,
        as soon as the stream is done rather than at the grace period's
        end, and the row is whole.
        """
        proxy, port = self.start_proxy("--grace-period", "3600")
        stream = Stream(port, tokens=300)
        self.addCleanup(stream.close)
        os.kill(proxy.pid, signal.SIGTERM)
        lines = [stream.first_line, *stream.rest()]
        self.assertEqual(len(lines), 300)
        self.assertTrue(json.loads(lines[-1])["done"])

        code = proxy.process.wait(PATIENCE)
        # twist shuts down in order and then re-raises the SIGTERM it got
        # (twisted.application.app._exitWithSignal), so a clean exit is 0 or
        # "terminated by SIGTERM", which systemd also counts as success.
        self.assertIn(code, (0, -signal.SIGTERM), proxy.text()[-2000:])
        self.assertIn("Waiting up to 3600.0 s for 1 requests in flight", proxy.text())

        [row] = [dict(zip(COLUMNS, row)) for row in csv_rows(self.csv)]
        self.assertEqual(row["request_id"], stream.request_id)
        self.assertEqual(row["http_status"], "200")
        self.assertEqual(row["error_message"], "")
        self.assertEqual(row["output_tokens"], "300")


class StartUpTests(SynchronousTestCase):
    """
    What the process says and does before it listens.
    """

    def setUp(self) -> None:
        if not os.access(TWIST, os.X_OK):
            raise SkipTest(f"no twist executable at {TWIST}")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def run_twist(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _twist(*arguments), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            cwd=self.directory, env=clean_environment(), timeout=PATIENCE,
        )

    def test_a_bad_setting_exits_non_zero_with_one_line_naming_it(self) -> None:
        """
        A port out of range, an upstream URL without a scheme and a log path
        that cannot be created each stop the process before it listens, with
        a non-zero status and one line that names the setting.
        """
        not_a_directory = os.path.join(self.directory, "a-file")
        open(not_a_directory, "w").close()
        logs = os.path.join(self.directory, "logs")
        _require_loopback()
        port = str(refused_port(self))  # (held: were it ever listened on, that would fail)
        for arguments, setting in [
            (["--port", "70000", "--host", HOST, "--log-path", logs], "--port"),
            (["--port", port, "--host", HOST, "--ollama-url", "localhost:11434",
              "--log-path", logs], "--ollama-url"),
            (["--port", port, "--host", HOST, "--log-path", os.path.join(not_a_directory, "logs")],
             "--log-path"),
        ]:
            result = self.run_twist(*arguments)
            said = (result.stdout + result.stderr).strip().splitlines()
            self.assertNotEqual(result.returncode, 0, arguments)
            self.assertEqual(len(said), 1, said)
            self.assertIn(setting, said[0])
            self.assertNotIn("listening", said[0])

    def test_a_public_interface_is_warned_about_louder_without_keys(self) -> None:
        """
        Listening on 0.0.0.0 logs, before listening, that the proxy is
        reachable from the network, in capitals and naming the missing
        authentication when no API key is set.  (The port is held on
        127.0.0.1 by the test, so the bind then fails and nothing is ever
        reachable from the network.)
        """
        port = str(_taken_port(self))
        common = ["--host", "0.0.0.0", "--port", port, "--log-path", os.path.join(self.directory, "logs")]
        without_keys = self.start(common)
        with_keys = self.start([*common, "--api-key", "alice:a-long-secret"])
        self.assertIn("WARNING", without_keys)
        self.assertIn("reachable from the network WITHOUT authentication", without_keys)
        self.assertIn("reachable from the network", with_keys)
        self.assertNotIn("WITHOUT", with_keys)
        for said in (without_keys, with_keys):
            tried = [said.find(text) for text in ("#critical] Cannot listen", "ollamaproxy listening on")]
            self.assertLess(said.index("reachable from the network"), max(tried))

    def test_a_port_that_cannot_be_bound_stops_the_process(self) -> None:
        """
        When the port is taken the process logs why and exits with status 1
        instead of running on, listening on nothing.
        """
        port = _taken_port(self)
        proxy = Child(self, "proxy", _twist(
            "--listen", f"tcp:{port}:interface={HOST}",
            "--log-path", os.path.join(self.directory, "logs"),
        ), self.directory)
        try:
            proxy.process.wait(PATIENCE)
        except subprocess.TimeoutExpired:
            self.fail(f"still running after it could not listen: {proxy.text()[-2000:]}")
        self.assertIn(f"Cannot listen on tcp:{port}:interface={HOST}", proxy.text())
        self.assertEqual(proxy.process.returncode, 1)

    def start(self, arguments: list[str]) -> str:
        """
        Start the proxy until it has tried to listen; what it logged.
        """
        proxy = Child(self, "proxy", _twist(*arguments), self.directory)
        _eventually(
            lambda: "Cannot listen on" in proxy.text() or "ollamaproxy listening on" in proxy.text(),
            "done trying to listen",
        )
        proxy.kill()
        return proxy.text()
