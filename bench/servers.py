"""
The processes the benchmark measures: the fake Ollama, the proxy and,
optionally, nginx, each in its own process on 127.0.0.1 so that its CPU time
and memory are its own.

Every child gets the hard limit of open files as its soft limit (1,000 held
streams need 2,000 sockets in the proxy) and is told by the kernel to exit if
the benchmark dies (C{PR_SET_PDEATHSIG}), so no server outlives a run, even
one killed with SIGKILL.  L{Servers} stops them all on exit, error or Ctrl-C.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HOST = "127.0.0.1"

# Settings a developer may have exported that would change what is measured.
_FOREIGN_SETTINGS = ("OLLAMAPROXY_", "OLLAMA_", "LOG_PATH", "PORT", "HOST")

_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 8192;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log {dir}/access.log;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream ollama {{
        server {host}:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def raise_open_files_limit() -> None:
    """Make the soft limit of open files the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _prepare_child() -> None:
    raise_open_files_limit()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """One child process listening on C{HOST:port}."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    output: str
    csv_path: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> tuple[float, float]:
        """(user, system) CPU seconds used so far, from C{/proc/PID/stat}."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def memory(self) -> tuple[int, int]:
        """(current, peak) resident set size in bytes: VmRSS and VmHWM."""
        values = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
        return values["VmRSS"], values["VmHWM"]

    def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} is not listening on {self.port}: {self.tail()}")

    def tail(self) -> str:
        with open(self.output, errors="replace") as f:
            return f.read()[-2000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Servers:
    """
    Starts servers in a fresh temporary directory and, as a context manager,
    stops every one of them and removes the directory on the way out.
    """

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="ollamaproxy-bench-")
        self._started: list[Server] = []

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for server in reversed(self._started):
            server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _start(self, name: str, port: int, argv: list[str], csv_path: str | None = None) -> Server:
        output = os.path.join(self.directory, f"{name}.out")
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_SETTINGS)}
        with open(output, "wb") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=env,
                preexec_fn=_prepare_child,
            )
        server = Server(name, port, process, output, csv_path)
        self._started.append(server)
        server.wait_listening()
        return server

    def fake(self, name: str, token_delay: float) -> Server:
        """The fake Ollama, one token every C{token_delay} seconds."""
        port = free_port()
        return self._start(name, port, [
            sys.executable, "-m", "ollamaproxy.testing.fake_ollama",
            "--host", HOST, "--port", str(port),
            "--token-delay", str(token_delay), "--no-host-check",
        ])

    def proxy(self, name: str, upstream: Server) -> Server:
        """The proxy in front of C{upstream}, with CSV logging on."""
        port = free_port()
        logs = os.path.join(self.directory, f"{name}-logs")
        return self._start(name, port, [
            sys.executable, "-m", "twisted", "ollamaproxy",
            "--host", HOST, "--port", str(port),
            "--ollama-url", f"http://{HOST}:{upstream.port}",
            "--log-path", logs,
        ], csv_path=os.path.join(logs, "ollama-proxy.csv"))

    def twisted(self, name: str, upstream: Server) -> Server:
        """
        Twisted's own C{twisted.web.proxy.ReverseProxyResource} in front of
        C{upstream}: the stock Twisted proxy (HTTP/1.0, a new upstream
        connection per request, no logging), the reference the issue quotes
        at about 250 µs per request.  Measured in the same run, it shows
        what this machine makes of a Twisted proxy.
        """
        port = free_port()
        return self._start(name, port, [
            sys.executable, "-c", _TWISTED_PROXY, HOST, str(port), str(upstream.port),
        ])

    def nginx(self, name: str, upstream: Server) -> Server | None:
        """
        nginx as an unbuffered streaming reverse proxy in front of
        C{upstream}, in one process, with its access log on; L{None} when
        nginx is not installed.
        """
        binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
        if binary is None:
            return None
        directory = os.path.join(self.directory, name)
        os.makedirs(directory)
        port = free_port()
        conf = os.path.join(directory, "nginx.conf")
        with open(conf, "w") as f:
            f.write(_NGINX_CONF.format(dir=directory, host=HOST, port=port, upstream=upstream.port))
        return self._start(name, port, [binary, "-p", directory, "-c", conf, "-e", "stderr"])


_TWISTED_PROXY = """
import sys
from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site
host, port, upstream = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
reactor.listenTCP(port, Site(ReverseProxyResource(host, upstream, b"")), interface=host)
reactor.run()
"""
