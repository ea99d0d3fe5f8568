"""
What the proxy needs to know about a request path: which API family it
belongs to (so errors come back in the shape its clients parse), whether it
is safe, and which native routes stream.

All decisions are made on the percent-decoded path, because that is the path
Ollama routes on (Go decodes C{/api%2Fchat} to C{/api/chat}); the raw bytes
are what gets forwarded.
"""

from __future__ import annotations

import enum
import json
import re
from urllib.parse import unquote_to_bytes


class Family(enum.Enum):
    NATIVE = "native"
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


# Native routes that stream NDJSON unless the body says "stream": false.
NATIVE_STREAMING = frozenset(
    {b"/api/generate", b"/api/chat", b"/api/pull", b"/api/push", b"/api/create"}
)

BLOBS_PREFIX = b"/api/blobs/"
OPENAI_MODEL_PREFIX = b"/v1/models/"

# A request target is visible ASCII (RFC 9112 section 3.2); Twisted lets
# DEL and some bytes over 0x7f through.
# Control, space, DEL and non-ASCII bytes are never part of a request
# target; nor is "#": a fragment stays with the client, and Twisted's client
# would drop it, so the proxy's routing and Ollama's would differ.
_NOT_TARGET_BYTE = re.compile(rb"[^\x21-\x7e]|#")


def decoded_path(target: bytes) -> bytes | None:
    """
    The percent-decoded path of an origin-form request target, or L{None}
    when the target is one a reverse proxy must refuse: absolute-form
    (C{http://elsewhere/}), authority-form (C{CONNECT host:443}), C{*}, or a
    path with dot segments, backslashes or NUL bytes, which upstream servers
    and the proxy's own routing could read differently, or with a control
    or non-ASCII byte, which no valid target has.
    """
    if not target.startswith(b"/") or _NOT_TARGET_BYTE.search(target):
        return None
    path = target.split(b"?", 1)[0]
    decoded = unquote_to_bytes(path)
    if b"\\" in decoded or b"\x00" in decoded:
        return None
    for segment in decoded.split(b"/"):
        if segment == b"." or segment == b"..":
            return None
    return decoded


def family(path: bytes) -> Family:
    if path.startswith(b"/v1/"):
        if path == b"/v1/messages":
            return Family.ANTHROPIC
        return Family.OPENAI
    return Family.NATIVE


_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error"}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(fam: Family, status: int, message: str) -> tuple[bytes, bytes]:
    """
    The content type and body of an error the proxy itself reports, in the
    shape that the route family's clients parse: Ollama's C{{"error": "..."}},
    OpenAI's C{{"error": {"message", "type", "param", "code"}}}, or
    Anthropic's C{{"type": "error", "error": {"type", "message"}}}.
    """
    if fam is Family.NATIVE:
        body: object = {"error": message}
        content_type = b"application/json; charset=utf-8"
    elif fam is Family.OPENAI:
        kind = _OPENAI_TYPES.get(status, "api_error")
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        content_type = b"application/json"
    else:
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": message}}
        content_type = b"application/json"
    return content_type, json.dumps(body, ensure_ascii=False).encode("utf-8")
