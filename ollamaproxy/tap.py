"""
The command line (C{twist ollamaproxy ...}) and the one function both entry
points (the C{twist} plugin and C{ollamaproxy.tac}) build the service with.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from twisted.application.service import IService
from twisted.python import usage

from .config import SETTINGS, ConfigError, read_dotenv, resolve
from .csvlog import check_log_directory


class Options(usage.Options):
    """
    Options for C{twist ollamaproxy}; each one can also come from the
    environment or a C{.env} file (see L{ollamaproxy.config}).
    """

    synopsis = "[options]"
    longdesc = (
        "Proxy every request to Ollama, streaming, and append one CSV row per "
        "request to LOG_PATH/ollama-proxy.csv."
    )
    optParameters = [
        [setting.name, None, None, f"{setting.help} [env {setting.env_name}" + (f", default {setting.default}]" if setting.default is not None else "]")]
        for setting in SETTINGS
        if not setting.repeatable
    ]

    def __init__(
        self, environ: Mapping[str, str] | None = None, dotenv: Mapping[str, str] | None = None
    ) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self._dotenv = dotenv
        for setting in SETTINGS:
            if setting.repeatable:
                self[setting.name] = []
        self.settings: dict[str, Any] = {}

    def opt_listen(self, endpoint: str) -> None:
        """A Twisted server endpoint, e.g. tcp:3001:interface=127.0.0.1 (repeatable; replaces --host/--port) [env OLLAMAPROXY_LISTEN]"""
        self["listen"].append(endpoint)

    def opt_api_key(self, key: str) -> None:
        """An accepted API key, NAME:SECRET (repeatable) [env OLLAMAPROXY_API_KEYS, comma-separated]"""
        self["api-key"].append(key)

    def opt_trusted_proxy(self, cidr: str) -> None:
        """Believe X-Forwarded-For from this address or CIDR range (repeatable) [env OLLAMAPROXY_TRUSTED_PROXIES]"""
        self["trusted-proxy"].append(cidr)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse, and turn any problem into one line on stderr and a non-zero
        exit, before anything listens.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"ollamaproxy: {e}") from None

    def postOptions(self) -> None:
        dotenv = read_dotenv() if self._dotenv is None else self._dotenv
        try:
            self.settings = resolve(self, self._environ, dotenv)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self.settings["log-path"] = os.path.abspath(self.settings["log-path"])
        problem = check_log_directory(self.settings["log-path"])
        if problem is not None:
            raise usage.UsageError(f"--log-path {self.settings['log-path']}: {problem}")


def makeService(options: Options) -> IService:
    """
    Wire the proxy together; nothing is opened until the service starts.
    """
    from twisted.internet import reactor

    from .service import ProxyService

    return ProxyService(options.settings, reactor=reactor)
