"""
Tests for L{ollamaproxy.jsonfields}.
"""

from __future__ import annotations

import json
import random
import tracemalloc
from collections.abc import Iterable, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ollamaproxy.jsonfields import TopLevelFields

WANTED = ("model", "stream", "options", "images")


def scan(
    pieces: Iterable[bytes],
    wanted: Iterable[str] = WANTED,
    value_limit: int = 65536,
    close: bool = True,
) -> TopLevelFields:
    """Feed C{pieces} to a new L{TopLevelFields}, then close it."""
    parser = TopLevelFields(wanted, value_limit)
    for piece in pieces:
        parser.feed(piece)
    if close:
        parser.close()
    return parser


def split(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Cut C{body} at each of C{cuts}."""
    points = [0, *sorted(cuts), len(body)]
    return [body[start:stop] for start, stop in zip(points, points[1:], strict=False)]


def bytewise(body: bytes) -> list[bytes]:
    return [body[i : i + 1] for i in range(len(body))]


def random_string(rng: random.Random) -> str:
    """Text around the lengths where the scanner changes strategy."""
    length = rng.choice([0, 1, 50, 255, 256, 257, 300, 1000])
    return "".join(
        rng.choice('ab"\\{}[]:, \n\u00e9\U0001f600') if rng.random() < 0.3 else "x"
        for _ in range(length)
    )


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value with long strings, long number runs and some nesting."""
    roll = rng.random()
    if depth > 4 or roll < 0.3:
        return rng.choice(
            [
                None,
                True,
                rng.randint(-(10**20), 10**20),
                rng.uniform(-1e9, 1e9),
                random_string(rng),
            ]
        )
    if roll < 0.5:
        return [rng.uniform(-1, 1) for _ in range(rng.choice([0, 1, 10, 300]))]
    if roll < 0.75:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {
        rng.choice(["model", "x", random_string(rng)[:20]]): random_value(
            rng, depth + 1
        )
        for _ in range(rng.randint(0, 4))
    }


def go_fields(document: dict[str, Any], wanted: Sequence[str]) -> dict[str, Any]:
    """
    What Go's encoding/json would put in a struct with the C{wanted} fields:
    exact or case-insensitive key matches, the last one winning.
    """
    fields: dict[str, Any] = {}
    for key, value in document.items():
        for name in wanted:
            # Go also folds the Kelvin sign onto K; Python's upper() already
            # folds the long s onto S.
            if key == name or key.replace("\u212a", "k").upper() == name.upper():
                fields[name] = value
                break
    return fields


TRICKY_BODY = (
    b' \r\n{"mo\\u0064el" : "llama3.2:3b", "messages":[{"role":"user",'
    b'"content":"a \\"quoted\\" {brace} [bracket] back\\\\slash \\u00e9\xc3\xa9'
    b'\xf0\x9f\x98\x80\\ud83d\\ude00","model":"inner"}],\t"options":'
    b'{"temperature":0.7,"stop":["}","]","\\""],"stream":true},'
    b'"images":["aGVsbG8=", "d29ybGQ="],"x":-12.5e+3,"y":null,"z":true,'
    b'"stream":false}\n '
)
TRICKY_FIELDS = {
    "model": "llama3.2:3b",
    "options": {"temperature": 0.7, "stop": ["}", "]", '"'], "stream": True},
    "images": ["aGVsbG8=", "d29ybGQ="],
    "stream": False,
}


class MemberTests(SynchronousTestCase):
    """
    Which members are picked out, and how their values are parsed.
    """

    def test_wantedMembersParsed(self) -> None:
        """
        The wanted top-level members are parsed into L{fields}; the others
        are left out.
        """
        parser = scan([b'{"model":"m","prompt":"hi","stream":true,"n":3}'])
        self.assertEqual(parser.fields, {"model": "m", "stream": True})
        self.assertTrue(parser.complete)
        self.assertFalse(parser.failed)

    def test_everyValueType(self) -> None:
        """
        Strings, numbers, literals, arrays and objects are parsed as
        L{json.loads} parses them.
        """
        values: dict[str, Any] = {
            "s": 't\u00e9xt "q" \\ \n',
            "i": -42,
            "big": 10**30,
            "f": 1.5e-7,
            "z": -0.0,
            "t": True,
            "nope": False,
            "nil": None,
            "list": [1, "two", [3.0], {"four": None}],
            "obj": {"a": {"b": []}, "c": {}},
        }
        body = json.dumps(values).encode()
        self.assertEqual(scan([body], values).fields, json.loads(body))

    def test_nestedKeyInObjectIgnored(self) -> None:
        """
        A wanted key nested in an inner object is ignored.
        """
        parser = scan([b'{"options":{"stream":true,"model":"x"}}'], ["stream", "model"])
        self.assertEqual(parser.fields, {})
        self.assertTrue(parser.complete)

    def test_nestedKeyInArrayIgnored(self) -> None:
        """
        A wanted key in an object inside an array is ignored.
        """
        parser = scan([b'{"messages":[{"model":"x"}],"model":"y"}'], ["model"])
        self.assertEqual(parser.fields, {"model": "y"})

    def test_caseInsensitiveKey(self) -> None:
        """
        A key equal to a wanted name but for case is stored under the wanted
        name.
        """
        parser = scan([b'{"MODEL":"a","Stream":false}'], ["model", "stream"])
        self.assertEqual(parser.fields, {"model": "a", "stream": False})

    def test_goUnicodeFolding(self) -> None:
        """
        As in Go, the Kelvin sign matches C{k} and the long s matches C{s}.
        """
        parser = scan(
            ['{"\u212aeep_alive":"5m","\u017ftream":true}'.encode()],
            ["keep_alive", "stream"],
        )
        self.assertEqual(parser.fields, {"keep_alive": "5m", "stream": True})

    def test_lastOccurrenceWins(self) -> None:
        """
        When a key occurs several times, in any case, the last value wins.
        """
        parser = scan([b'{"model":"a","x":1,"MODEL":"b","Model":"c"}'], ["model"])
        self.assertEqual(parser.fields, {"model": "c"})

    def test_exactNameBeforeFoldedName(self) -> None:
        """
        A key matching one wanted name exactly goes to it, even if it also
        matches another wanted name case-insensitively.
        """
        parser = scan([b'{"Model":"a","model":"b"}'], ["model", "Model"])
        self.assertEqual(parser.fields, {"Model": "a", "model": "b"})

    def test_escapedKey(self) -> None:
        """
        Keys are compared after JSON unescaping.
        """
        parser = scan([b'{"mo\\u0064el":"a","\\u0053TREAM":true}'], ["model", "stream"])
        self.assertEqual(parser.fields, {"model": "a", "stream": True})

    def test_escapedNearMiss(self) -> None:
        """
        A key that only looks like a wanted name before unescaping does not
        match it.
        """
        parser = scan([b'{"model\\u0000":"a","model\\\\":"b"}'], ["model"])
        self.assertEqual(parser.fields, {})
        self.assertTrue(parser.complete)

    def test_longKeyNeverMatches(self) -> None:
        """
        A key far longer than any wanted name is skipped, split or not.
        """
        body = b'{"' + b"m" * 10000 + b'":1,"model":"a"}'
        self.assertEqual(scan([body], ["model"]).fields, {"model": "a"})
        self.assertEqual(scan(split(body, [5, 5000]), ["model"]).fields, {"model": "a"})

    def test_emptyObject(self) -> None:
        """
        An empty object is complete, with no fields.
        """
        parser = scan([b" {\n} "])
        self.assertEqual(parser.fields, {})
        self.assertTrue(parser.complete)

    def test_whitespaceAnywhere(self) -> None:
        """
        JSON whitespace is allowed between all tokens.
        """
        body = (
            b' \t{ "model" \n: "m" ,\r"a" : [ 1 , { "b" : 2 } ] , "stream" :true } \n'
        )
        for pieces in ([body], bytewise(body)):
            parser = scan(pieces)
            self.assertEqual(parser.fields, {"model": "m", "stream": True})
            self.assertTrue(parser.complete)

    def test_nothingWanted(self) -> None:
        """
        With no wanted names the object is still checked.
        """
        self.assertTrue(scan([TRICKY_BODY], []).complete)

    def test_invalidUtf8Replaced(self) -> None:
        """
        Invalid UTF-8 in a wanted string becomes U+FFFD, as in Go.
        """
        parser = scan([b'{"model":"a\xffb"}'])
        self.assertEqual(parser.fields, {"model": "a\ufffdb"})

    def test_fieldsKeptAfterFailure(self) -> None:
        """
        What was learnt before the input turned out malformed stays in
        L{fields}.
        """
        parser = scan([b'{"model":"m","stream":tru}'])
        self.assertTrue(parser.failed)
        self.assertEqual(parser.fields, {"model": "m"})


class ChunkingTests(SynchronousTestCase):
    """
    The input may be cut anywhere.
    """

    def test_oneByteAtATime(self) -> None:
        """
        Fed one byte at a time, the object gives the same fields.
        """
        parser = scan(bytewise(TRICKY_BODY))
        self.assertEqual(parser.fields, TRICKY_FIELDS)
        self.assertTrue(parser.complete)

    def test_anySplitPoint(self) -> None:
        """
        Cut in two at any point, the object gives the same fields.
        """
        for cut in range(len(TRICKY_BODY) + 1):
            parser = scan(split(TRICKY_BODY, [cut]))
            self.assertEqual(parser.fields, TRICKY_FIELDS, cut)
            self.assertTrue(parser.complete, cut)

    def test_backslashEndsChunk(self) -> None:
        """
        A backslash at the end of a chunk escapes the first byte of the next,
        in a key, in a value and inside an array.
        """
        cases = [
            [b'{"mo\\', b'u0064el":"a"}'],
            [b'{"model":"a\\', b'"b"}'],
            [b'{"model":"a\\\\', b'"}'],
            [b'{"x":["\\', b'"]"],"model":"a\\"b"}'],
            [b'{"model":"\\u00', b'e9"}'],
        ]
        expected = ["a", 'a"b', "a\\", 'a"b', "\u00e9"]
        for pieces, model in zip(cases, expected, strict=True):
            self.assertEqual(scan(pieces).fields, {"model": model}, pieces)

    def test_splitScalar(self) -> None:
        """
        A number split between its digits, or C{true} split inside, is read
        whole.
        """
        self.assertEqual(scan([b'{"model":12', b"34}"]).fields, {"model": 1234})
        self.assertEqual(
            scan([b'{"model":-1.', b"5e", b"2 }"]).fields, {"model": -150.0}
        )
        self.assertEqual(scan([b'{"stream":tr', b"ue}"]).fields, {"stream": True})
        self.assertEqual(scan([b'{"stream":true', b"}"]).fields, {"stream": True})

    def test_splitMultiByteCharacter(self) -> None:
        """
        A multi-byte UTF-8 character split between chunks is decoded whole.
        """
        body = '{"model":"\u00e9\U0001f600"}'.encode()
        for cut in range(len(body) + 1):
            self.assertEqual(
                scan(split(body, [cut])).fields, {"model": "\u00e9\U0001f600"}
            )

    def test_largeDocumentsAnyChunking(self) -> None:
        """
        Documents with long strings full of escapes, long runs of numbers and
        nested containers, cut into random pieces, give the same fields as
        L{json.loads}.
        """
        rng = random.Random(4)
        for attempt in range(60):
            document = {
                rng.choice(
                    ["model", "MODEL", "options", "images", "x", "y"]
                ): random_value(rng)
                for _ in range(rng.randint(1, 6))
            }
            body = json.dumps(document, ensure_ascii=rng.random() < 0.5).encode()
            cuts = [rng.randint(0, len(body)) for _ in range(rng.choice([0, 3, 40]))]
            parser = scan(split(body, cuts))
            self.assertEqual(parser.fields, go_fields(document, WANTED), attempt)
            self.assertTrue(parser.complete, attempt)

    def test_emptyChunks(self) -> None:
        """
        Empty chunks change nothing.
        """
        parser = scan([b"", b'{"model"', b"", b':"m"}', b""])
        self.assertEqual(parser.fields, {"model": "m"})
        self.assertTrue(parser.complete)


class LimitTests(SynchronousTestCase):
    """
    Wanted values longer than the limit are dropped, and nothing large is
    held in memory.
    """

    def test_overLimitDropped(self) -> None:
        """
        A wanted value longer than C{value_limit} bytes is not stored and is
        listed in L{TopLevelFields.oversized}; one of exactly the limit is
        stored.
        """
        body = b'{"model":"' + b"a" * 8 + b'","options":[' + b"1," * 9 + b"1]}"
        for pieces in ([body], bytewise(body)):
            parser = scan(pieces, value_limit=10)
            self.assertEqual(parser.fields, {"model": "a" * 8})
            self.assertEqual(parser.oversized, {"options"})
            self.assertTrue(parser.complete)

    def test_overLimitScalar(self) -> None:
        """
        A number longer than the limit is dropped too.
        """
        parser = scan([b'{"model":123456,"stream":1}'], value_limit=5)
        self.assertEqual(parser.fields, {"stream": 1})
        self.assertEqual(parser.oversized, {"model"})

    def test_lastOccurrenceOverLimit(self) -> None:
        """
        An oversized last occurrence removes an earlier value; a later value
        that fits replaces an oversized one.
        """
        parser = scan([b'{"model":"ok","model":"far too long"}'], value_limit=6)
        self.assertEqual(parser.fields, {})
        self.assertEqual(parser.oversized, {"model"})
        parser = scan([b'{"model":"far too long","model":"ok"}'], value_limit=6)
        self.assertEqual(parser.fields, {"model": "ok"})
        self.assertEqual(parser.oversized, frozenset())

    def assertSmallPeak(self, body_chunk: bytes, prefix: bytes, suffix: bytes) -> None:
        """
        Streaming C{prefix}, 160 copies of C{body_chunk}, then C{suffix}
        allocates far less than the 10 MB that passed.
        """
        parser = TopLevelFields(["model", "images"], value_limit=65536)
        tracemalloc.start()
        try:
            parser.feed(prefix)
            for _ in range(160):
                parser.feed(body_chunk)
            parser.feed(suffix)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        parser.close()
        self.assertTrue(parser.complete)
        self.assertEqual(parser.fields, {"model": "m"})
        self.assertLess(peak, 200_000)

    def test_oversizedWantedStringNotHeld(self) -> None:
        """
        A 10 MB wanted string is not held in memory while it streams past.
        """
        self.assertSmallPeak(b"QUJD" * 16384, b'{"images":["', b'"],"model":"m"}')

    def test_unwantedNumbersNotHeld(self) -> None:
        """
        A 10 MB unwanted array of numbers is not held in memory.
        """
        self.assertSmallPeak(
            b"0.1234,-5e-3," * 5041, b'{"embedding":[[', b'1]],"model":"m"}'
        )


class MalformedTests(SynchronousTestCase):
    """
    What is not a well-formed object fails, and never raises.
    """

    def assertFails(self, body: bytes, wanted: Iterable[str] = WANTED) -> None:
        for pieces in ([body], bytewise(body)):
            parser = scan(pieces, wanted, close=False)
            self.assertTrue(parser.failed, body)
            self.assertFalse(parser.complete, body)
            parser.close()
            self.assertTrue(parser.failed, body)

    def test_notAnObject(self) -> None:
        """
        Arrays, strings, numbers, literals and a byte order mark fail.
        """
        for body in [b"[1,2]", b'"str"', b"12", b"null", b"\xef\xbb\xbf{}", b"}"]:
            self.assertFails(body)

    def test_malformedTopLevel(self) -> None:
        """
        Missing or extra colons and commas, bad keys and bad top-level
        values fail, wanted or not.
        """
        for body in [
            b'{"a" 1}',
            b'{"a":1 "b":2}',
            b'{"a":1,}',
            b'{,"a":1}',
            b'{"a"::1}',
            b"{a:1}",
            b'{"a":}',
            b'{"a":tru}',
            b'{"a":01}',
            b'{"a":1.}',
            b'{"a":NaN}',
            b'{"a":-Infinity}',
            b"{\"a\":'x'}",
            b'{"a":1]',
            b'{"a\\x":1}',
            b'{"model":"\x01"}',
        ]:
            self.assertFails(body)

    def test_invalidWantedValue(self) -> None:
        """
        A wanted array or object that is not valid JSON fails.
        """
        for body in [
            b'{"options":{"a":tru}}',
            b'{"options":{"a" 1}}',
            b'{"options":[NaN]}',
            b'{"options":[1,]}',
            b'{"model":"\\q"}',
        ]:
            self.assertFails(body)

    def test_unbalancedUnwantedValue(self) -> None:
        """
        An unwanted array or object with mismatched brackets fails.
        """
        for body in [b'{"a":[1}}', b'{"a":{"b":[}]}', b'{"a":[[]]]}']:
            self.assertFails(body)

    def test_tooDeep(self) -> None:
        """
        Nesting deeper than Go's limit of 10000 fails; a wanted value nested
        too deeply for L{json} fails.
        """
        deepest = b'{"a":' + b"[" * 9999 + b"]" * 9999 + b"}"
        self.assertTrue(scan([deepest]).complete)
        self.assertTrue(scan(bytewise(deepest)).complete)
        self.assertFails(b'{"a":' + b"[" * 10000 + b"]" * 10000 + b"}")
        self.assertFails(b'{"a":' + b"[" * 9999 + b"{}" + b"]" * 9999 + b"}")
        self.assertFails(b'{"options":' + b"[" * 5000 + b"]" * 5000 + b"}")

    def test_truncated(self) -> None:
        """
        Input that stops before the closing brace is not complete; closing
        it makes it failed.
        """
        for cut in range(len(TRICKY_BODY.rstrip())):
            parser = scan([TRICKY_BODY[:cut]], close=False)
            self.assertFalse(parser.complete, cut)
            self.assertFalse(parser.failed, cut)
            parser.close()
            self.assertTrue(parser.failed, cut)

    def test_trailingData(self) -> None:
        """
        Anything but whitespace after the closing brace fails, in the same
        chunk or a later one.
        """
        self.assertFails(b'{"a":1}{"b":2}')
        self.assertFails(b'{"a":1} x')
        parser = scan([b'{"model":"m"} ', b"\n"], close=False)
        self.assertTrue(parser.complete)
        parser.feed(b" ,")
        self.assertTrue(parser.failed)
        self.assertFalse(parser.complete)
        self.assertEqual(parser.fields, {"model": "m"})

    def test_feedAfterFailure(self) -> None:
        """
        Once failed, further input is ignored.
        """
        parser = scan([b'{"a":x', b'"model":"m"}'], close=False)
        self.assertTrue(parser.failed)
        self.assertEqual(parser.fields, {})

    def test_closeTwice(self) -> None:
        """
        Closing twice changes nothing.
        """
        parser = scan([b"{}"])
        parser.close()
        self.assertTrue(parser.complete)
        self.assertFalse(parser.failed)

    def test_garbage(self) -> None:
        """
        Garbage never raises, and is never complete.
        """
        for body in [
            b"",
            b"{",
            b"[1,2]",
            b'"str"',
            b'{"a":1}{"b":2}',
            b"\xff\xfe\x00",
            b'{"\xff":"\xc3"}x',
            b"\x00" * 10,
            b"{{{{",
            b'{"a":"',
            b'{"model":"\\',
        ]:
            for pieces in ([body], bytewise(body)):
                self.assertFalse(scan(pieces).complete, body)


# Strings that stress the scanner: quotes, backslashes, brackets, non-ASCII.
tricky_text = st.text(
    alphabet=st.sampled_from('"\\{}[]:, a\n\t\u00e9\u20ac\U0001f600\x00\x1f/')
    | st.characters(exclude_categories=["Cs"]),
    max_size=12,
)
keys = (
    st.sampled_from(
        ["model", "MODEL", "Model", "stream", "\u017ftream", "options", "images"]
    )
    | tricky_text
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=12,
)
objects = st.dictionaries(keys, values, max_size=6)
non_objects = values.filter(lambda value: not isinstance(value, dict))
dump_styles = st.sampled_from(
    [
        {},
        {"separators": (",", ":")},
        {"ensure_ascii": False},
        {"indent": 2, "ensure_ascii": False},
        {"indent": "\t", "separators": (" ,", " : ")},
    ]
)
padding = st.sampled_from(["", " ", "\n", " \r\n\t "])
json_soup = st.lists(
    st.sampled_from(
        [
            b"{",
            b"}",
            b"[",
            b"]",
            b'"',
            b"\\",
            b":",
            b",",
            b"1",
            b"-2.5",
            b"true",
            b" ",
            b'"model"',
            b'"x"',
            b"\xff",
            b"\\u00",
            b"\xc3",
        ]
    ),
    max_size=30,
).map(b"".join)


def encode(document: Any, style: dict[str, Any], before: str, after: str) -> bytes:
    return (before + json.dumps(document, **style) + after).encode()


def cut_points(data: st.DataObject, body: bytes) -> list[int]:
    return data.draw(st.lists(st.integers(0, len(body)), max_size=8))


class PropertyTests(SynchronousTestCase):
    """
    Properties over random documents and random cuts.
    """

    @settings(max_examples=100, deadline=None, database=None)
    @given(objects, dump_styles, padding, padding, st.data())
    def test_piecesMatchJsonLoads(
        self,
        document: dict[str, Any],
        style: dict[str, Any],
        before: str,
        after: str,
        data: st.DataObject,
    ) -> None:
        """
        Any object, cut anywhere, gives the fields Go would take from what
        L{json.loads} reads in the whole, and is complete.
        """
        body = encode(document, style, before, after)
        parser = scan(split(body, cut_points(data, body)), WANTED)
        self.assertEqual(parser.fields, go_fields(json.loads(body), WANTED))
        self.assertTrue(parser.complete)
        self.assertFalse(parser.failed)

    @settings(max_examples=50, deadline=None, database=None)
    @given(objects, st.integers(0, 40), st.data())
    def test_limitMatchesRawLength(
        self, document: dict[str, Any], limit: int, data: st.DataObject
    ) -> None:
        """
        A wanted value is stored exactly when it is at most C{value_limit}
        bytes long as written, and is listed as oversized otherwise.
        """
        body = json.dumps(document, separators=(",", ":")).encode()
        parser = scan(split(body, cut_points(data, body)), WANTED, value_limit=limit)
        fields = go_fields(document, WANTED)
        oversized = {
            name
            for name, value in fields.items()
            if len(json.dumps(value, separators=(",", ":")).encode()) > limit
        }
        self.assertEqual(
            parser.fields, {k: v for k, v in fields.items() if k not in oversized}
        )
        self.assertEqual(parser.oversized, oversized)
        self.assertTrue(parser.complete)

    @settings(max_examples=50, deadline=None, database=None)
    @given(objects, dump_styles, padding, st.data())
    def test_truncatedNeverComplete(
        self,
        document: dict[str, Any],
        style: dict[str, Any],
        before: str,
        data: st.DataObject,
    ) -> None:
        """
        An object cut short, fed in pieces, never raises and is never
        complete; closed, it has failed.
        """
        body = encode(document, style, before, "")
        body = body[: data.draw(st.integers(0, len(body) - 1))]
        parser = scan(split(body, cut_points(data, body)), WANTED, close=False)
        self.assertFalse(parser.complete)
        parser.close()
        self.assertTrue(parser.failed)

    @settings(max_examples=40, deadline=None, database=None)
    @given(non_objects, dump_styles, padding, st.data())
    def test_nonObjectsNeverComplete(
        self, document: Any, style: dict[str, Any], before: str, data: st.DataObject
    ) -> None:
        """
        Any JSON value but an object, fed in pieces, never raises and is
        never complete.
        """
        body = encode(document, style, before, "")
        parser = scan(split(body, cut_points(data, body)), WANTED)
        self.assertFalse(parser.complete)
        self.assertTrue(parser.failed)

    @settings(max_examples=100, deadline=None, database=None)
    @given(st.binary(max_size=64) | json_soup, st.data())
    def test_garbageNeverRaises(self, body: bytes, data: st.DataObject) -> None:
        """
        Random bytes and JSON-like token soup never raise, end either
        complete or failed, and when they happen to be a JSON object they
        give the same fields as L{json.loads}.
        """
        parser = scan(split(body, cut_points(data, body)), WANTED)
        self.assertNotEqual(parser.complete, parser.failed)
        try:
            document = json.loads(body)
        except ValueError:
            return
        if isinstance(document, dict):
            self.assertTrue(parser.complete)
            self.assertEqual(parser.fields, go_fields(document, WANTED))
