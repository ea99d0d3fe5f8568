"""
Settings: where each comes from, and how a bad one is refused before
anything listens.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

from twisted.application.service import IServiceCollection
from twisted.trial.unittest import SynchronousTestCase

from ollamaproxy.config import exposed_endpoints, listen_endpoints
from ollamaproxy.upstream import Upstream
from ollamaproxy.service import ProxyService
from ollamaproxy.tap import Options

from .support import use_clean_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(args: list[str], environ: dict[str, str] | None = None, dotenv: dict[str, str] | None = None) -> dict:
    options = Options(environ=environ or {}, dotenv=dotenv or {})
    options.parseOptions(args)
    return options.settings


class PrecedenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = self.mktemp()

    def test_command_line_then_environment_then_dotenv_then_default(self) -> None:
        """
        Each setting takes the first of: command line, environment, .env,
        built-in default.
        """
        environ = {"PORT": "4000", "OLLAMA_URL": "http://env:1", "LOG_PATH": self.logs}
        dotenv = {"PORT": "5000", "OLLAMA_URL": "http://dotenv:2", "HOST": "127.0.0.2"}
        settings = parse(["--port", "3002"], environ, dotenv)
        self.assertEqual(settings["port"], 3002)
        self.assertEqual(settings["ollama-url"], Upstream(b"http://env:1"))
        self.assertEqual(settings["host"], "127.0.0.2")
        self.assertEqual(settings["max-queue"], 512)
        self.assertEqual(settings["log-path"], os.path.abspath(self.logs))

    def test_defaults(self) -> None:
        """
        With nothing set: port 3001 on localhost, Ollama on localhost:11434.
        """
        settings = parse(["--log-path", self.logs])
        self.assertEqual((settings["port"], settings["host"]), (3001, "localhost"))
        self.assertEqual(settings["ollama-url"], Upstream(b"http://localhost:11434"))
        self.assertIsNone(settings["max-concurrent"])
        self.assertEqual(listen_endpoints(settings), ["tcp:port=3001:interface=localhost:backlog=1024"])

    def test_repeatable_options(self) -> None:
        """
        --api-key, --trusted-proxy and --listen repeat; their environment
        forms are comma-separated.
        """
        settings = parse(
            ["--api-key", "a:1", "--api-key", "b:2", "--listen", "tcp:3005", "--log-path", self.logs],
            {"OLLAMAPROXY_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1"},
        )
        self.assertEqual(settings["api-key"], [("a", "1"), ("b", "2")])
        self.assertEqual([str(n) for n in settings["trusted-proxy"]], ["10.0.0.0/8", "192.168.1.1/32"])
        self.assertEqual(listen_endpoints(settings), ["tcp:3005"])

    def test_upstream_prefix_and_ipv6(self) -> None:
        """
        A path in the Ollama URL is a prefix; IPv6 hosts keep their brackets.
        """
        settings = parse(["--ollama-url", "http://[::1]:8080/ollama/", "--log-path", self.logs])
        self.assertEqual(settings["ollama-url"], Upstream(b"http://[::1]:8080", b"/ollama"))


class RefusalTests(SynchronousTestCase):
    def refusal(self, args: list[str], environ: dict[str, str] | None = None) -> str:
        environ = {"LOG_PATH": self.mktemp(), **(environ or {})}
        error = self.assertRaises(SystemExit, parse, args, environ)
        message = str(error.code)
        self.assertEqual(message.count("\n"), 0, "one line")
        return message

    def test_bad_port(self) -> None:
        """
        A port out of range names the option, or the variable it came from.
        """
        self.assertIn("--port: 70000 is not a TCP port", self.refusal(["--port", "70000"]))
        self.assertIn("PORT (from environment)", self.refusal([], {"PORT": "http"}))

    def test_bad_upstream_url(self) -> None:
        """
        An Ollama URL without scheme or host is refused.
        """
        for url in ("localhost:11434", "http://", "ftp://x", "http://u:p@x"):
            self.assertIn("--ollama-url", self.refusal(["--ollama-url", url]))

    def test_unusable_log_path(self) -> None:
        """
        A log path that cannot be created is refused, naming --log-path.
        """
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        message = self.refusal(["--log-path", os.path.join(blocker, "logs")])
        self.assertIn("--log-path", message)

    def test_bad_values(self) -> None:
        """
        Every parser refuses nonsense with the setting's name.
        """
        for args, name in (
            (["--max-concurrent", "-1"], "--max-concurrent"),
            (["--idle-timeout", "0"], "--idle-timeout"),
            (["--idle-timeout", "inf"], "--idle-timeout"),
            (["--ollama-url", "http://localhost:11434/ollamä"], "--ollama-url"),
            (["--api-key", "nosecret"], "--api-key"),
            (["--trusted-proxy", "10.0.0.0/33"], "--trusted-proxy"),
            (["--listen", "nonsense:3001"], "--listen"),
            (["--log-rotate", "hourly"], "--log-rotate"),
            (["--usage-injection", "maybe"], "--usage-injection"),
            (["--no-such-option"], "no-such-option"),
        ):
            self.assertIn(name, self.refusal(args))


class ExposureTests(SynchronousTestCase):
    def test_loopback_or_not(self) -> None:
        """
        Loopback and unix sockets are private; anything else is exposed.
        """
        private = [
            "tcp:port=1:interface=localhost",
            "tcp:port=1:interface=127.0.0.1",
            r"tcp6:port=1:interface=\:\:1",
            "unix:/tmp/s",
        ]
        public = ["tcp:port=1:interface=0.0.0.0", "tcp:1", r"tcp6:port=1:interface=\:\:", "tcp:port=1:interface=192.168.1.5"]
        self.assertEqual(exposed_endpoints(private), [])
        self.assertEqual(exposed_endpoints(public), public)


class EntryPointTests(SynchronousTestCase):
    def test_tac_builds_the_same_service(self) -> None:
        """
        ollamaproxy.tac reads the environment and builds a ProxyService with
        the same settings the plugin would.  (Settings the developer
        exported are left out, or they would win over the .env file.)
        """
        use_clean_environment(self)
        logs = self.mktemp()
        cwd = os.getcwd()
        workdir = self.mktemp()
        os.makedirs(workdir)
        with open(os.path.join(workdir, ".env"), "w") as f:
            f.write(f"PORT=3555\nLOG_PATH={logs}\nOLLAMA_URL=http://127.0.0.1:9\n")
        os.chdir(workdir)
        self.addCleanup(os.chdir, cwd)
        namespace = runpy.run_path(os.path.join(REPO, "ollamaproxy.tac"))
        services = list(IServiceCollection(namespace["application"]))
        self.assertEqual(len(services), 1)
        self.assertIsInstance(services[0], ProxyService)
        self.assertEqual(services[0].forwarder.upstream, Upstream(b"http://127.0.0.1:9"))
        self.assertEqual(services[0]._endpoints, ["tcp:port=3555:interface=localhost:backlog=1024"])

    def test_twist_plugin_from_any_directory(self) -> None:
        """
        `twist ollamaproxy --help` works outside the repository, and the
        twisted/ folder here never shadows the real Twisted.
        """
        elsewhere = self.mktemp()
        os.makedirs(elsewhere)
        twist = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "twist"), "ollamaproxy", "--help"],
            cwd=elsewhere, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(twist.returncode, 0, twist.stderr)
        self.assertIn("--ollama-url", twist.stdout)
        for cwd in (elsewhere, REPO):
            where = subprocess.run(
                [sys.executable, "-c", "import twisted; print(twisted.__file__)"],
                cwd=cwd, capture_output=True, text=True, timeout=60,
            )
            package = os.path.dirname(where.stdout.strip())
            self.assertNotEqual(package, os.path.join(REPO, "twisted"))
            self.assertTrue(os.path.isdir(os.path.join(package, "internet")), package)
