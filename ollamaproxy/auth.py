"""
Optional API keys: the proxy as the gate in front of an Ollama that has no
authentication of its own.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

from twisted.web.http_headers import Headers


class KeyFileError(ValueError):
    """
    A keys file line that is not C{name:secret}.
    """


def parse_key(text: str) -> tuple[str, str]:
    """
    C{"name:secret"} as C{(name, secret)}; raises L{ValueError} otherwise.
    """
    name, sep, secret = text.strip().partition(":")
    name, secret = name.strip(), secret.strip()
    if not sep or not name or not secret:
        raise ValueError(f"an API key must look like NAME:SECRET, got {_shown(text)}")
    return name, secret


def read_keys_file(path: str) -> list[tuple[str, str]]:
    """
    One C{name:secret} per line; blank lines and C{#} comments are skipped.
    """
    keys = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                keys.append(parse_key(line))
            except ValueError as e:
                raise KeyFileError(f"{path}:{number}: {e}") from None
    return keys


class ApiKeys:
    """
    The accepted keys, looked up by a digest of the presented secret, so
    that finding a key takes the same time whatever the secret's bytes.

    Clients send C{Authorization: Bearer SECRET} (what the official ollama
    client sends when C{OLLAMA_API_KEY} is set, and what the openai client
    sends) or C{X-API-Key: SECRET}.  Both headers are consumed: they are not
    forwarded upstream.
    """

    headers = (b"authorization", b"x-api-key")

    def __init__(self, keys: Iterable[tuple[str, str]]) -> None:
        self.replace(keys)

    def replace(self, keys: Iterable[tuple[str, str]]) -> None:
        self._names = {_digest(secret.encode("utf-8")): name for name, secret in keys}

    def __len__(self) -> int:
        return len(self._names)

    def identify(self, headers: Headers) -> str | None:
        """
        The name of the key these request headers present, or L{None}.
        """
        for secret in _presented(headers):
            digest = _digest(secret)
            for known, name in self._names.items():
                if hmac.compare_digest(digest, known):
                    return name
        return None


def _presented(headers: Headers) -> list[bytes]:
    secrets = []
    for value in headers.getRawHeaders(b"authorization", ()):
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            secrets.append(token.strip())
    for value in headers.getRawHeaders(b"x-api-key", ()):
        if value.strip():
            secrets.append(value.strip())
    return secrets


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _shown(text: str) -> str:
    """
    What an error message may show of a bad key: its name at most.  Text
    without a colon may be a bare secret, and the message goes to the log.
    """
    name, sep, _ = text.strip().partition(":")
    return repr(f"{name.strip()}:…") if sep else f"{len(text.strip())} characters without ':'"
