"""
Settings: every option once, with its environment variable, default, parser
and help text.  Values come from, in order: the command line, the
environment, a C{.env} file in the working directory, the defaults.

The four settings the original tool documented keep its environment names
(C{OLLAMA_URL}, C{HOST}, C{PORT}, C{LOG_PATH}); every other one is
C{OLLAMAPROXY_} plus the option's name in capitals.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from twisted.internet.endpoints import serverFromString

from .auth import parse_key
from .upstream import Upstream

MiB = 1024 * 1024
LISTEN_BACKLOG = 1024


class ConfigError(ValueError):
    """
    A setting with a value that cannot work; the message names the setting.
    """


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None
    parse: Callable[[str], Any]
    help: str
    env: str = ""
    repeatable: bool = False

    @property
    def env_name(self) -> str:
        return self.env or "OLLAMAPROXY_" + self.name.upper().replace("-", "_")


def _port(text: str) -> int:
    port = _integer(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text} is not a TCP port (1-65535)")
    return port


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise ValueError(f"{text} must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise ValueError(f"{text} must not be negative")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not value > 0:
        raise ValueError(f"{text} must be more than 0 seconds")
    return value


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(text: str) -> Any:
        if text.strip().lower() in ("", "none", "off", "0"):
            return None
        return parse(text)

    return parse_optional


def _rotation(text: str) -> str | None:
    value = text.strip().lower()
    if value in ("", "none", "off"):
        return None
    if value != "daily":
        raise ValueError(f"{text!r} is not a rotation (daily or none)")
    return value


def _text(text: str) -> str:
    return text


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def parse_upstream(text: str) -> Upstream:
    """
    An C{http://host[:port][/prefix]} URL as an L{Upstream}.
    """
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{text!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} needs a scheme and a host, like http://localhost:11434")
    if parts.username or parts.password:
        raise ValueError(f"{text!r}: credentials in the URL are not supported")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r}: a query or fragment makes no sense here")
    if not parts.path.isascii():
        raise ValueError(f"{text!r}: percent-encode the path's non-ASCII characters")
    if parts.scheme == "https":
        try:
            import OpenSSL  # noqa: F401
        except ImportError:
            raise ValueError("an https:// upstream needs: pip install 'twisted[tls]'") from None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    origin = f"{parts.scheme}://{netloc}".encode("ascii")
    return Upstream(origin=origin, base_path=parts.path.rstrip("/").encode("utf-8"))


def _listen(text: str) -> str:
    try:
        # Parsing only: the endpoint keeps the reactor and does nothing yet.
        serverFromString(object(), text)
    except Exception as e:
        raise ValueError(f"{text!r} is not a server endpoint ({e})") from None
    return text


def _trusted_proxy(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an address or CIDR range") from None


SETTINGS: tuple[Setting, ...] = (
    Setting("port", "3001", _port, "TCP port to listen on", env="PORT"),
    Setting("host", "localhost", _text, "Interface to listen on", env="HOST"),
    Setting(
        "listen",
        None,
        _listen,
        "A Twisted server endpoint, e.g. tcp:3001:interface=127.0.0.1 or "
        "unix:/run/ollamaproxy.sock (repeatable; replaces --host/--port)",
        repeatable=True,
    ),
    Setting(
        "ollama-url", "http://localhost:11434", parse_upstream, "The Ollama server", env="OLLAMA_URL"
    ),
    Setting("log-path", "./logs", _text, "Directory of ollama-proxy.csv", env="LOG_PATH"),
    Setting("connect-timeout", "10", _seconds, "Seconds to wait for a connection to Ollama"),
    Setting(
        "header-timeout",
        "300",
        _seconds,
        "Seconds to wait for Ollama's response headers (they come after queueing, "
        "model load and the first token)",
    ),
    Setting("idle-timeout", "300", _seconds, "Seconds Ollama may stay silent mid-response"),
    Setting(
        "client-timeout",
        "60",
        _seconds,
        "Seconds a client may stay silent while sending a request, or idle on a keep-alive connection",
    ),
    Setting("grace-period", "30", _seconds, "Seconds in-flight requests get to finish at shutdown"),
    Setting(
        "max-concurrent",
        None,
        _optional(_positive_int),
        "Most requests in flight to Ollama at once (default: no limit)",
    ),
    Setting("max-queue", "512", _non_negative_int, "Most requests waiting for a slot; more get 503"),
    Setting(
        "max-body-bytes",
        str(100 * MiB),
        _positive_int,
        "Largest request body accepted (blob uploads under /api/blobs/ are exempt)",
    ),
    Setting(
        "usage-injection",
        "true",
        _bool,
        "Ask Ollama for token usage on /v1/chat/completions streams and hide it from clients "
        "that did not ask (true/false)",
    ),
    Setting(
        "formula-guard",
        "true",
        _bool,
        "Prefix CSV text cells starting with =, +, -, @, tab or CR with ' (true/false)",
    ),
    Setting(
        "log-max-bytes",
        None,
        _optional(_positive_int),
        "Rotate the CSV file before it grows past this size",
    ),
    Setting("log-rotate", None, _rotation, "Rotate the CSV file daily (daily or none)"),
    Setting(
        "api-key",
        None,
        parse_key,
        "An accepted API key, NAME:SECRET (repeatable; env: comma-separated)",
        env="OLLAMAPROXY_API_KEYS",
        repeatable=True,
    ),
    Setting(
        "api-keys-file", None, _text, "File of NAME:SECRET lines, re-read on SIGHUP"
    ),
    Setting(
        "trusted-proxy",
        None,
        _trusted_proxy,
        "Believe X-Forwarded-For from this address or CIDR (repeatable; env: comma-separated)",
        env="OLLAMAPROXY_TRUSTED_PROXIES",
        repeatable=True,
    ),
    Setting(
        "host-check",
        "true",
        _bool,
        "When listening on loopback without API keys, refuse Host names Ollama itself "
        "would refuse there (DNS rebinding protection) (true/false)",
    ),
    Setting(
        "open-status",
        "false",
        _bool,
        "Serve /health/ready and /metrics without an API key when keys are configured",
    ),
)

_BY_NAME = {setting.name: setting for setting in SETTINGS}


def read_dotenv(path: str = ".env") -> dict[str, str]:
    """
    The variables a C{.env} file sets (without touching C{os.environ}).
    """
    if not os.path.isfile(path):
        return {}
    from dotenv import dotenv_values

    return {key: value for key, value in dotenv_values(path).items() if value is not None}


def resolve(
    cli: Mapping[str, Any], environ: Mapping[str, str], dotenv: Mapping[str, str]
) -> dict[str, Any]:
    """
    Every setting's value.  C{cli} maps option names to what the command line
    gave (L{None} or an empty list when it gave nothing).
    """
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        values[setting.name] = _resolve_one(setting, cli.get(setting.name), environ, dotenv)
    return values


def _resolve_one(
    setting: Setting, given: Any, environ: Mapping[str, str], dotenv: Mapping[str, str]
) -> Any:
    if given not in (None, []):
        label = f"--{setting.name}"
        texts = given if setting.repeatable else [given]
    else:
        for source, label_suffix in ((environ, "environment"), (dotenv, ".env")):
            if setting.env_name in source:
                label = f"{setting.env_name} (from {label_suffix})"
                raw = source[setting.env_name]
                texts = _split(raw) if setting.repeatable else [raw]
                break
        else:
            if setting.default is None:
                return [] if setting.repeatable else None
            label = f"--{setting.name} default"
            texts = [setting.default]
    try:
        parsed = [setting.parse(text) for text in texts]
    except ValueError as e:
        raise ConfigError(f"{label}: {e}") from None
    return parsed if setting.repeatable else parsed[0]


def _split(raw: str) -> list[str]:
    return [part for part in re.split(r"[,\s]+", raw) if part]


def listen_endpoints(values: Mapping[str, Any]) -> list[str]:
    """
    The server endpoint strings to listen on.
    """
    if values["listen"]:
        return list(values["listen"])
    host = values["host"]
    # Twisted's default backlog of 50 drops connections when many clients
    # open at once (Ollama's Go server allows the kernel's maximum).
    if ":" in host:
        escaped = host.strip("[]").replace(":", r"\:")
        return [f"tcp6:port={values['port']}:interface={escaped}:backlog={LISTEN_BACKLOG}"]
    return [f"tcp:port={values['port']}:interface={host}:backlog={LISTEN_BACKLOG}"]


def exposed_endpoints(endpoints: list[str]) -> list[str]:
    """
    The endpoints that accept connections from beyond this machine.
    """
    return [endpoint for endpoint in endpoints if not _loopback_only(endpoint)]


def _loopback_only(endpoint: str) -> bool:
    kind = endpoint.split(":", 1)[0].lower()
    if kind == "unix":
        return True
    match = re.search(r"(?:^|:)interface=((?:\\:|[^:])*)", endpoint)
    if match is None:
        return False
    interface = match.group(1).replace("\\:", ":").strip("[]")
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False
