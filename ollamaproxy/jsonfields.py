"""
Pick a few top-level members out of a JSON object that arrives in pieces,
without holding the object in memory.

The proxy wants C{model}, C{stream}, C{options}... from request bodies and
C{prompt_eval_count}, C{error}... from JSON responses, but bodies can be
100 MB of base64 images and responses can be large embedding arrays.
L{TopLevelFields} scans each chunk as it passes, keeps only the raw bytes of
the wanted members (each up to a limit) and parses those with L{json.loads}.

Matching mirrors how Go's C{encoding/json} (which Ollama uses) fills a struct:
only top-level members count, a key matches a wanted name exactly or
case-insensitively, and the last occurrence of a key wins.

Speed matters more than anything else here, because this runs on the reactor
thread for every request, so there is no Python loop over bytes:
  - strings are skipped with C{bytes.find} (memchr), so a 100 MB base64
    string costs a couple of C calls per chunk;
  - inside arrays and objects (which are only checked for balanced brackets
    and terminated strings), one compiled regex swallows runs of short
    strings, short numbers and small nested containers in C, and long runs of
    numbers are crossed with C{bytes.find} for the next bracket or quote.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["TopLevelFields"]

# Parser states.
_BEFORE_OBJECT = 0  # leading whitespace, then "{"
_BEFORE_FIRST_KEY = 1  # just after "{": a key or "}"
_BEFORE_KEY = 2  # just after ",": a key
_IN_KEY = 3  # inside a key string
_BEFORE_COLON = 4
_BEFORE_VALUE = 5
_IN_STRING = 6  # inside a member's string value
_IN_SCALAR = 7  # inside a member's number, true, false or null
_IN_CONTAINER = 8  # inside a member's array or object
_AFTER_VALUE = 9  # "," or "}"
_DONE = 10  # only whitespace may follow
_FAILED = 11
# The states in which a key or value may straddle chunks.
_IN_TOKEN = frozenset({_IN_KEY, _IN_STRING, _IN_SCALAR, _IN_CONTAINER})

_QUOTE = ord('"')
_BACKSLASH = ord("\\")
_COLON = ord(":")
_COMMA = ord(",")
_OPEN_SQUARE = ord("[")
_OPEN_CURLY = ord("{")
_CLOSE_CURLY = ord("}")
_WHITESPACE = b" \t\n\r"
_SCALAR_START = b"-0123456789tfn"
# The bytes that matter inside arrays and objects; an opening bracket plus 2
# is its closing bracket.
_STRUCTURAL = (b'"', b"[", b"]", b"{", b"}")
_STRUCTURAL_BYTES = b'"[]{}'

# Go's encoding/json refuses documents nested deeper than this, counting the
# top-level object.  _DENSE reaches two levels below where it starts.
_MAX_DEPTH = 10000
_DENSE_MAX_DEPTH = _MAX_DEPTH - 2

_SKIP_WHITESPACE = re.compile(rb"[ \t\n\r]*+")
_NOT_WHITESPACE = re.compile(rb"[^ \t\n\r]")
# The common cases, each in one call: a key without escapes with its colon,
# and a whole member whose value is a short plain string, number or literal,
# with the comma or brace after it.
_SIMPLE_KEY = re.compile(rb'"([^"\\\x00-\x1f]{0,255}+)"[ \t\n\r]*+:[ \t\n\r]*+')
_SIMPLE_MEMBER = re.compile(
    rb'"([^"\\\x00-\x1f]{0,255}+)"[ \t\n\r]*+:[ \t\n\r]*+'
    rb'(?:("[^"\\\x00-\x1f]{0,255}+")|([-+.0-9A-Za-z]{1,255}+))'
    rb"[ \t\n\r]*+([,}])"
)
_PLAIN_STRING = re.compile(rb'"[^"\\\x00-\x1f]*+"')
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
_SCALAR_CHARS = re.compile(rb"[-+.0-9A-Za-z]*+")
_SCALAR = re.compile(
    rb"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][-+]?[0-9]++)?|true|false|null"
)


def _dense_pattern() -> re.Pattern[bytes]:
    """
    Build the regex that skips, in C, what follows inside an array or object:
    runs of at most 256 non-structural bytes, separated by short strings and
    by containers at most two levels deep built from the same.  It stops at a
    long run (crossed with C{bytes.find} instead, which is much faster than a
    regex character class), a long string, a deeper or unfinished container,
    or the closing bracket of the current level.
    """
    flat = rb'[^"\[\]{}]{0,256}+'
    short_string = rb'"[^"\\]{0,256}+(?:\\.[^"\\]{0,256}+){0,32}+"'

    def items(inner: bytes) -> bytes:
        return flat + rb"(?:(?:" + inner + rb")" + flat + rb")*+"

    def containers(inner: bytes) -> bytes:
        return rb"\[" + items(inner) + rb"\]|\{" + items(inner) + rb"\}"

    leaf = containers(short_string)
    small = containers(short_string + b"|" + leaf)
    return re.compile(items(short_string + b"|" + small), re.DOTALL)


_DENSE = _dense_pattern()


def _fold(text: str) -> str:
    """
    Approximate Go's case folding of keys (C{foldName}): ASCII letters fold
    to upper case, and so do the odd non-ASCII runes that Go folds onto
    them, such as the Kelvin sign and the long s.
    """
    if text.isascii():
        return text.upper()
    folded = []
    for char in text:
        lower = char.lower()
        upper = lower.upper()
        if len(upper) == 1:
            folded.append(upper)
        elif len(lower) == 1:
            folded.append(lower)
        else:
            folded.append(char)
    return "".join(folded)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# json.loads would build a new decoder on every call with parse_constant.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_LITERALS: dict[bytes, Any] = {b"true": True, b"false": False, b"null": None}


def _parse(raw: bytes) -> Any:
    """
    Parse one complete JSON value.  Invalid UTF-8 becomes U+FFFD, as in Go.

    @raise ValueError: if C{raw} is not JSON.
    """
    if _PLAIN_STRING.fullmatch(raw) is not None:
        return raw[1:-1].decode("utf-8", "replace")
    try:
        return _DECODER.decode(raw.decode("utf-8", "replace"))
    except RecursionError as e:
        raise ValueError("nested too deeply") from e


def _parse_scalar(raw: bytes) -> Any:
    """Parse a number or literal already checked against L{_SCALAR}."""
    if raw in _LITERALS:
        return _LITERALS[raw]
    if b"." in raw or b"e" in raw or b"E" in raw:
        return float(raw)
    return int(raw)


@functools.lru_cache(maxsize=32)
def _name_tables(wanted: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str], int]:
    """
    The wanted names by exact key and by folded key, and the longest key
    (in bytes, quotes included) that may still match one of them.  Parsers
    wanting the same names share these, so they are never changed.
    """
    exact: dict[str, str] = {}
    folded: dict[str, str] = {}
    for name in wanted:
        exact[name] = name
        folded.setdefault(_fold(name), name)
    # Room for a wanted key written as a \uXXXX\uXXXX pair per character.
    key_limit = 12 * max(map(len, exact), default=0) + 2
    return exact, folded, key_limit


class TopLevelFields:
    """
    Incrementally pick chosen members out of a JSON object fed in pieces.

    Memory stays below C{value_limit} plus a small constant: only the raw
    bytes of a wanted member being read are kept, never the object.
    Unwanted members are checked only for balanced brackets and terminated
    strings (and number or literal syntax at the top level); wanted ones are
    fully parsed.  After L{close}, exactly one of L{complete} and L{failed}
    is true; L{fields} keeps what was learnt before a failure.
    """

    def __init__(self, wanted: Iterable[str], value_limit: int = 65536) -> None:
        """
        @param wanted: the member names to pick out.
        @param value_limit: wanted values longer than this many bytes (as
            written in the input) are dropped; see L{oversized}.
        """
        self._exact, self._folded, self._key_limit = _name_tables(tuple(wanted))
        self._value_limit = value_limit
        self._fields: dict[str, Any] = {}
        self._oversized: set[str] = set()
        self._state = _BEFORE_OBJECT
        # The wanted name of the member being read, if it is wanted.
        self._name: str | None = None
        # Whether the bytes of the current key or value are being kept; the
        # ones from earlier chunks, and where it starts in the current chunk.
        self._keep = False
        self._kept = bytearray()
        self._token_start = 0
        # A chunk ended just after a backslash inside a string.
        self._escaped = False
        # Inside a member's array or object: the closing brackets expected,
        # innermost last, and whether we are inside a string there.
        self._closers = bytearray()
        self._in_string = False
        # Where each of _STRUCTURAL next occurs in the current chunk, at or
        # after the last place it was looked for.
        self._next_structural = [-1] * len(_STRUCTURAL)

    @property
    def fields(self) -> dict[str, Any]:
        """The wanted names seen so far, each with its last parsed value."""
        return self._fields

    @property
    def oversized(self) -> frozenset[str]:
        """The wanted names whose last value was dropped for being too long."""
        return frozenset(self._oversized)

    @property
    def complete(self) -> bool:
        """
        Whether the closing brace of a well-formed top-level object was seen,
        followed by nothing but whitespace so far.
        """
        return self._state == _DONE

    @property
    def failed(self) -> bool:
        """Whether the input is not a JSON object, is malformed or truncated."""
        return self._state == _FAILED

    def close(self) -> None:
        """Note the end of the input: an unfinished object has failed."""
        if self._state != _DONE:
            self._fail()

    def feed(self, data: bytes) -> None:
        """Scan the next piece of the input, which may be cut anywhere."""
        state = self._state
        if state >= _DONE:
            if state == _DONE and _NOT_WHITESPACE.search(data) is not None:
                self._fail()
            return
        end = len(data)
        pos = 0
        self._token_start = 0
        if self._next_structural[0] != -1:
            self._next_structural = [-1] * len(_STRUCTURAL)
        while pos < end:
            if state == _IN_CONTAINER:
                pos = self._scan_container(data, pos)
            elif state == _IN_STRING:
                quote = self._string_end(data, pos)
                if quote < 0:
                    pos = end
                else:
                    pos = quote + 1
                    self._end_value(data, pos, scalar=False)
            elif state == _IN_SCALAR:
                match = _SCALAR_CHARS.match(data, pos)
                assert match is not None  # the pattern also matches ""
                stop = match.end()
                if stop < end:
                    self._end_value(data, stop, scalar=True)
                pos = stop
            elif state == _IN_KEY:
                quote = self._string_end(data, pos)
                if quote < 0:
                    pos = end
                else:
                    pos = quote + 1
                    self._end_key(data, pos)
            else:
                char = data[pos]
                if char in _WHITESPACE:
                    match = _SKIP_WHITESPACE.match(data, pos)
                    assert match is not None  # the pattern also matches ""
                    pos = match.end()
                    continue
                if state == _AFTER_VALUE:
                    if char == _COMMA:
                        self._state = _BEFORE_KEY
                    elif char == _CLOSE_CURLY:
                        self._state = _DONE
                    else:
                        self._fail()
                    pos += 1
                elif state == _BEFORE_VALUE:
                    pos = self._start_value(data, pos, char)
                elif state == _BEFORE_KEY or state == _BEFORE_FIRST_KEY:
                    pos = self._start_key(data, pos, char)
                elif state == _BEFORE_COLON:
                    if char == _COLON:
                        self._state = _BEFORE_VALUE
                    else:
                        self._fail()
                    pos += 1
                elif state == _BEFORE_OBJECT:
                    if char == _OPEN_CURLY:
                        self._state = _BEFORE_FIRST_KEY
                    else:
                        self._fail()
                    pos += 1
                else:  # _DONE, and something other than whitespace follows
                    self._fail()
            state = self._state
            if state == _FAILED:
                return
        if self._keep and state in _IN_TOKEN:
            self._keep_rest(data, state)

    def _start_key(self, data: bytes, pos: int, char: int) -> int:
        """Begin reading a key at C{pos}; return where to go on."""
        if char == _QUOTE:
            match = _SIMPLE_MEMBER.match(data, pos)
            if match is not None:
                key, string, scalar, after = match.groups()
                self._name = self._wanted_name(key.decode("utf-8", "replace"))
                self._state = _BEFORE_KEY if after == b"," else _DONE
                if string is not None:
                    self._store(string, scalar=False)
                else:
                    self._store(scalar, scalar=True)
                return match.end()
            match = _SIMPLE_KEY.match(data, pos)
            if match is not None:
                self._name = self._wanted_name(
                    match.group(1).decode("utf-8", "replace")
                )
                self._state = _BEFORE_VALUE
                return match.end()
            self._state = _IN_KEY
            self._token_start = pos
            self._keep = True
        elif char == _CLOSE_CURLY and self._state == _BEFORE_FIRST_KEY:
            self._state = _DONE
        else:
            self._fail()
        return pos + 1

    def _end_key(self, data: bytes, stop: int) -> None:
        """Finish reading a key that ends just before C{stop}."""
        self._state = _BEFORE_COLON
        raw = self._take(data, stop, self._key_limit)
        if raw is None:
            # Too long to be any wanted name.
            self._name = None
            return
        try:
            key = _parse(raw)
        except ValueError:
            self._fail()
            return
        self._name = self._wanted_name(key)

    def _wanted_name(self, key: str) -> str | None:
        name = self._exact.get(key)
        if name is None and self._folded:
            name = self._folded.get(_fold(key))
        return name

    def _start_value(self, data: bytes, pos: int, char: int) -> int:
        """Begin reading a member's value at C{pos}; return where to go on."""
        self._token_start = pos
        if char == _QUOTE:
            self._state = _IN_STRING
            self._keep = self._name is not None
        elif char == _OPEN_SQUARE or char == _OPEN_CURLY:
            self._state = _IN_CONTAINER
            self._keep = self._name is not None
            self._closers.append(char + 2)
            self._in_string = False
        elif char in _SCALAR_START:
            # Kept even when unwanted, to check its syntax.
            self._state = _IN_SCALAR
            self._keep = True
            return pos
        else:
            self._fail()
        return pos + 1

    def _end_value(self, data: bytes, stop: int, scalar: bool) -> None:
        """Finish reading a member's value that ends just before C{stop}."""
        self._state = _AFTER_VALUE
        self._store(self._take(data, stop, self._value_limit), scalar)

    def _store(self, raw: bytes | None, scalar: bool) -> None:
        """
        Check and, if wanted, record the value C{raw} of the current member.

        @param raw: the whole value, or L{None} if it was too long to keep.
        @param scalar: whether it is a number or literal rather than a
            string, array or object.
        """
        name = self._name
        if raw is None or len(raw) > self._value_limit:
            if name is not None:
                self._fields.pop(name, None)
                self._oversized.add(name)
            return
        if scalar and _SCALAR.fullmatch(raw) is None:
            self._fail()
            return
        if name is not None:
            try:
                self._fields[name] = _parse_scalar(raw) if scalar else _parse(raw)
            except ValueError:
                # Not JSON, nested too deeply, or an integer too long for int().
                self._fail()
                return
            self._oversized.discard(name)

    def _take(self, data: bytes, stop: int, limit: int) -> bytes | None:
        """
        The whole of the key or value that ends just before C{stop}, or
        L{None} if it was not kept or is longer than C{limit}.
        """
        if not self._keep:
            return None
        self._keep = False
        start = self._token_start
        kept = self._kept
        if not kept:
            return data[start:stop] if stop - start <= limit else None
        self._kept = bytearray()
        if len(kept) + stop - start > limit:
            return None
        kept += data[start:stop]
        return bytes(kept)

    def _keep_rest(self, data: bytes, state: int) -> None:
        """Keep the unfinished key or value at the end of C{data}, if it fits."""
        limit = self._key_limit if state == _IN_KEY else self._value_limit
        start = self._token_start
        if len(self._kept) + len(data) - start > limit:
            self._keep = False
            self._kept = bytearray()
        else:
            self._kept += memoryview(data)[start:]

    def _string_end(self, data: bytes, pos: int) -> int:
        """
        The index of the quote closing the string that C{pos} is inside, or
        -1 if C{data} ends first.
        """
        if self._escaped:
            if pos >= len(data):
                return -1
            pos += 1
            self._escaped = False
        quote = data.find(b'"', pos)
        if data.find(b"\\", pos, len(data) if quote < 0 else quote) < 0:
            return quote
        match = _STRING_REST.match(data, pos)
        assert match is not None  # the pattern also matches ""
        stop = match.end()
        if stop == len(data):
            return -1
        if data[stop] == _BACKSLASH:
            self._escaped = True
            return -1
        return stop

    def _scan_container(self, data: bytes, pos: int) -> int:
        """
        Skip through the member's array or object from C{pos}; return where
        it ends, or the end of C{data}.
        """
        closers = self._closers
        end = len(data)
        while True:
            if self._in_string:
                quote = self._string_end(data, pos)
                if quote < 0:
                    return end
                self._in_string = False
                pos = quote + 1
            # 1 + len(closers) is the depth here, counting the top level.
            if len(closers) < _DENSE_MAX_DEPTH:
                match = _DENSE.match(data, pos)
                assert match is not None  # the pattern also matches ""
                pos = match.end()
            if pos >= end:
                return end
            char = data[pos]
            if char not in _STRUCTURAL_BYTES:
                pos = self._find_structural(data, pos)
                if pos >= end:
                    return end
                char = data[pos]
            pos += 1
            if char == _QUOTE:
                self._in_string = True
            elif char == _OPEN_SQUARE or char == _OPEN_CURLY:
                if len(closers) >= _MAX_DEPTH - 1:
                    self._fail()
                    return end
                closers.append(char + 2)
            elif closers.pop() != char:
                self._fail()
                return end
            elif not closers:
                self._end_value(data, pos, scalar=False)
                return pos

    def _find_structural(self, data: bytes, pos: int) -> int:
        """
        The index of the first quote or bracket at or after C{pos}, or the
        length of C{data}.  Each of the five is looked for with C{bytes.find}
        and remembered, so each byte is searched at most once per character.
        """
        nexts = self._next_structural
        nearest = end = len(data)
        for i, char in enumerate(_STRUCTURAL):
            found = nexts[i]
            if found < pos:
                found = data.find(char, pos)
                if found < 0:
                    found = end
                nexts[i] = found
            if found < nearest:
                nearest = found
        return nearest

    def _fail(self) -> None:
        self._state = _FAILED
        self._keep = False
        self._kept = bytearray()
        self._closers = bytearray()
