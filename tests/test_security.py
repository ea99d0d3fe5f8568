"""
The proxy as the only gate in front of an Ollama without authentication:
API keys, whom X-Forwarded-For is believed from, and request targets that
must never take a request anywhere but the configured upstream.
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ollamaproxy.auth import ApiKeys, KeyFileError, parse_key, read_keys_file
from ollamaproxy.record import COLUMNS

from .rawhttp import captured_log, connect
from .support import InMemoryProxy, LiveProxy, csv_rows, eventually, http_client, in_reactor_thread

KESTREL, OSPREY = "kestrel", "osprey"
KESTREL_SECRET, OSPREY_SECRET = "sk-kestrel-4f9a1c77e2", "sk-osprey-b03d58e6aa"
KEYS = [(KESTREL, KESTREL_SECRET), (OSPREY, OSPREY_SECRET)]
KEY_ARGS = ["--api-key", f"{KESTREL}:{KESTREL_SECRET}", "--api-key", f"{OSPREY}:{OSPREY_SECRET}"]

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}], "stream": False}
# One request per route family: (method, path, body, family).
FAMILIES = [
    ("POST", "/api/chat", CHAT, "native"),
    ("GET", "/api/tags", None, "native"),
    ("POST", "/v1/chat/completions", CHAT, "openai"),
    ("GET", "/v1/models", None, "openai"),
    ("POST", "/v1/messages", {**CHAT, "max_tokens": 5}, "anthropic"),
]
# Credentials that are not a valid key, as headers.
NOT_A_KEY: list[dict[bytes, list[bytes]]] = [
    {},
    {b"authorization": [b"Bearer sk-wrong"]},
    {b"x-api-key": [b"sk-wrong"]},
    {b"authorization": [b"Bearer " + KESTREL_SECRET.encode()[:-1]]},
    {b"authorization": [b"Basic " + KESTREL_SECRET.encode()]},
    {b"authorization": [KESTREL_SECRET.encode()]},
    {b"authorization": [b"Bearer"]},
    {b"x-api-key": [b""]},
    {b"x-api-key": [KESTREL.encode()]},
]


def assert_error_shape(test: SynchronousTestCase, family: str, status: int, body: bytes) -> str:
    """
    Check C{body} is the route family's error shape; return its message.
    """
    error = json.loads(body)
    if family == "native":
        test.assertEqual(list(error), ["error"])
        test.assertIsInstance(error["error"], str)
        return error["error"]
    if family == "openai":
        test.assertEqual(set(error), {"error"})
        test.assertEqual(set(error["error"]), {"message", "type", "param", "code"})
        return error["error"]["message"]
    test.assertEqual(set(error), {"type", "error"})
    test.assertEqual(error["type"], "error")
    test.assertEqual(error["error"]["type"], {401: "authentication_error"}[status])
    return error["error"]["message"]


class ApiKeyTests(SynchronousTestCase):
    """
    API keys, in memory.
    """

    def test_requests_without_a_valid_key_never_reach_ollama(self) -> None:
        """
        With keys configured, a request without a valid key (none, a wrong
        or truncated one, the right secret under another scheme, the key's
        name instead of its secret) gets 401 in its route family's error
        shape and a 401 record, and nothing at all reaches the upstream.
        """
        for method, path, body, family in FAMILIES:
            for headers in NOT_A_KEY:
                where = f"{method} {path} {headers}"
                proxy = InMemoryProxy(keys=ApiKeys(KEYS))
                response = proxy.send(self, method, path, body, headers=headers)
                self.assertEqual(response.code, 401, where)
                message = assert_error_shape(self, family, 401, proxy.read(self, response))
                self.assertEqual(message, "missing or invalid API key", where)
                self.assertEqual(proxy.fake.received, [], where)
                record = proxy.records.only
                self.assertEqual((record.http_status, record.api_key_name), (401, ""), where)
                self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [b"Bearer"], where)

    def test_cors_preflight_passes_without_a_key(self) -> None:
        """
        A browser's CORS preflight (OPTIONS with Access-Control-Request-Method)
        carries no credentials; it reaches Ollama, which answers it.  A plain
        OPTIONS still needs a key.
        """
        proxy = InMemoryProxy(keys=ApiKeys(KEYS))
        preflight = proxy.send(
            self, "OPTIONS", "/api/chat",
            headers={b"origin": [b"http://localhost:8080"], b"access-control-request-method": [b"POST"]},
        )
        proxy.read(self, preflight)
        self.assertEqual([r.method for r in proxy.fake.received], [b"OPTIONS"])
        self.assertNotEqual(preflight.code, 401)
        plain = proxy.send(self, "OPTIONS", "/api/chat")
        proxy.read(self, plain)
        self.assertEqual(plain.code, 401)
        self.assertEqual(len(proxy.fake.received), 1)

    def test_bearer_and_x_api_key_are_accepted_and_not_forwarded(self) -> None:
        """
        C{Authorization: Bearer SECRET} and C{X-API-Key: SECRET} both let the
        request through; its record names the key (never the secret), and
        the header the proxy consumed is not forwarded upstream.
        """
        for headers, name in (
            ({b"authorization": [b"Bearer " + KESTREL_SECRET.encode()]}, KESTREL),
            ({b"Authorization": [b"bearer  " + OSPREY_SECRET.encode() + b" "]}, OSPREY),
            ({b"x-api-key": [OSPREY_SECRET.encode()]}, OSPREY),
            ({b"X-Api-Key": [KESTREL_SECRET.encode()], b"authorization": [b"Bearer sk-wrong"]}, KESTREL),
        ):
            for method, path, body, _ in FAMILIES:
                where = f"{method} {path} {headers}"
                proxy = InMemoryProxy(keys=ApiKeys(KEYS))
                response = proxy.send(self, method, path, body, headers=headers)
                self.assertEqual(response.code, 200, where)
                proxy.read(self, response)
                [received] = proxy.fake.received
                self.assertFalse(received.headers.hasHeader(b"authorization"), where)
                self.assertFalse(received.headers.hasHeader(b"x-api-key"), where)
                forwarded = repr(list(received.headers.getAllRawHeaders()))
                for secret in (KESTREL_SECRET, OSPREY_SECRET):
                    self.assertNotIn(secret, forwarded, where)
                record = proxy.records.only
                self.assertEqual((record.http_status, record.api_key_name), (200, name), where)
                cells = ",".join(record.cells())
                self.assertNotIn(KESTREL_SECRET, cells)
                self.assertNotIn(OSPREY_SECRET, cells)

    def test_without_keys_authorization_goes_upstream(self) -> None:
        """
        Without keys configured the proxy consumes nothing: an Authorization
        header is the client's business with Ollama and is forwarded.
        """
        proxy = InMemoryProxy()
        response = proxy.send(self, "GET", "/api/tags", headers={b"authorization": [b"Bearer for-ollama"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(proxy.fake.received[0].headers.getRawHeaders(b"authorization"), [b"Bearer for-ollama"])
        self.assertEqual(proxy.records.only.api_key_name, "")

    def test_a_key_file_line_that_is_a_bare_secret_is_not_quoted(self) -> None:
        """
        A keys file line without a name (a bare secret pasted in) is
        reported by line number, without its text, since the report goes to
        the log.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"{KESTREL}:{KESTREL_SECRET}\n{OSPREY_SECRET}\n")
        error = self.assertRaises(KeyFileError, read_keys_file, path)
        self.assertIn(":2:", str(error))
        self.assertNotIn(OSPREY_SECRET[:8], str(error))
        for text in (OSPREY_SECRET, f":{OSPREY_SECRET}", f"  {OSPREY_SECRET}  "):
            error = self.assertRaises(ValueError, parse_key, text)
            self.assertNotIn(OSPREY_SECRET[:8], str(error))


class LiveApiKeyTests(TestCase):
    """
    API keys, on the whole service over loopback.
    """

    async def test_keys_guard_everything_but_health(self) -> None:
        """
        With --api-key given: a keyless request gets 401 and a 401 row and
        never reaches Ollama; a keyed one passes and its row names the key;
        /health stays open and shows neither secrets nor key names;
        /health/ready and /metrics need a key.  No secret reaches the CSV
        file or the log.
        """
        log = captured_log(self)
        proxy = LiveProxy(self, args=KEY_ARGS)
        http = http_client(self)
        refused = await http.post(proxy.url + "/api/chat", json=CHAT)
        self.assertEqual(refused.code, 401)
        self.assertEqual(await refused.json(), {"error": "missing or invalid API key"})
        self.assertEqual(proxy.fake.received, [])
        allowed = await http.post(
            proxy.url + "/api/chat", json=CHAT, headers={"Authorization": f"Bearer {OSPREY_SECRET}"}
        )
        self.assertEqual(allowed.code, 200)
        await allowed.content()
        self.assertFalse(proxy.fake.received[0].headers.hasHeader(b"authorization"))

        health = await http.get(proxy.url + "/health")
        self.assertEqual(health.code, 200)
        text = await health.text()
        self.assertEqual(json.loads(text)["status"], "ok")
        for hidden in (KESTREL, OSPREY, KESTREL_SECRET, OSPREY_SECRET):
            self.assertNotIn(hidden, text)
        for path in ("/health/ready", "/metrics", "/%68ealth/ready"):
            response = await http.get(proxy.url + path)
            self.assertEqual(response.code, 401, path)
            self.assertEqual(await response.json(), {"error": "missing or invalid API key"})
            response = await http.get(proxy.url + path, headers={"X-API-Key": KESTREL_SECRET})
            self.assertEqual(response.code, 200, path)
            await response.content()

        rows = proxy.rows()
        self.assertEqual(
            [(row["endpoint"], row["http_status"], row["api_key_name"]) for row in rows],
            [("/api/chat", "401", ""), ("/api/chat", "200", OSPREY)],
        )
        self.assertEqual(rows[0]["error_message"], "missing or invalid API key")
        await proxy.stop()
        with open(proxy.csv, encoding="utf-8") as f:
            written = f.read()
        self.assertNotIn(KESTREL_SECRET, written)
        self.assertNotIn(OSPREY_SECRET, written)
        self.assertTrue(log)
        for line in log:
            self.assertNotIn(KESTREL_SECRET, line)
            self.assertNotIn(OSPREY_SECRET, line)

    async def test_open_status_serves_ready_and_metrics_without_a_key(self) -> None:
        """
        --open-status true opens /health/ready and /metrics; Ollama's routes
        still need a key.
        """
        proxy = LiveProxy(self, args=[*KEY_ARGS, "--open-status", "true"])
        http = http_client(self)
        for path in ("/health", "/health/ready", "/metrics"):
            response = await http.get(proxy.url + path)
            self.assertEqual(response.code, 200, path)
            text = await response.text()
            for hidden in (KESTREL, OSPREY, KESTREL_SECRET, OSPREY_SECRET):
                self.assertNotIn(hidden, text)
        response = await http.get(proxy.url + "/api/tags")
        self.assertEqual(response.code, 401)
        await response.content()
        # The readiness probe asked /api/version; nothing else got through.
        self.assertEqual({r.uri for r in proxy.fake.received}, {b"/api/version"})

    async def test_keys_from_the_environment(self) -> None:
        """
        OLLAMAPROXY_API_KEYS (comma-separated NAME:SECRET) configures keys
        just as --api-key does.
        """
        proxy = LiveProxy(
            self, environ={"OLLAMAPROXY_API_KEYS": f"{KESTREL}:{KESTREL_SECRET}, {OSPREY}:{OSPREY_SECRET}"}
        )
        http = http_client(self)
        response = await http.get(proxy.url + "/api/tags")
        self.assertEqual(response.code, 401)
        await response.content()
        response = await http.get(proxy.url + "/api/tags", headers={"X-API-Key": OSPREY_SECRET})
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual([row["api_key_name"] for row in proxy.rows()], ["", OSPREY])
        self.assertEqual(len(proxy.fake.received), 1)

    async def test_keys_file_is_re_read_on_reload(self) -> None:
        """
        ProxyService.reload (what SIGHUP calls) re-reads --api-keys-file: a
        removed key is refused at once, a new one accepted; a file that has
        become unreadable or broken keeps the previous keys, and the log of
        that names no secret even when a line is a bare secret.
        """
        log = captured_log(self)
        keys_file = self.mktemp()
        with open(keys_file, "w") as f:
            f.write(f"# keys\n{KESTREL}:{KESTREL_SECRET}\n")
        proxy = LiveProxy(self, args=["--api-keys-file", keys_file])
        http = http_client(self)

        async def status(secret: str) -> int:
            response = await http.get(proxy.url + "/api/tags", headers={"Authorization": f"Bearer {secret}"})
            await response.content()
            return response.code

        self.assertEqual(await status(KESTREL_SECRET), 200)
        self.assertEqual(await status(OSPREY_SECRET), 401)
        with open(keys_file, "w") as f:
            f.write(f"{OSPREY}:{OSPREY_SECRET}\n")
        proxy.service.reload()
        self.assertEqual(await status(KESTREL_SECRET), 401)
        self.assertEqual(await status(OSPREY_SECRET), 200)

        with open(keys_file, "w") as f:
            f.write(f"{KESTREL}:{KESTREL_SECRET}\n{KESTREL_SECRET}\n")
        proxy.service.reload()
        self.assertEqual(await status(KESTREL_SECRET), 401)
        self.assertEqual(await status(OSPREY_SECRET), 200)
        os.remove(keys_file)
        proxy.service.reload()
        self.assertEqual(await status(OSPREY_SECRET), 200)

        self.assertEqual(
            [row["api_key_name"] for row in proxy.rows()], [KESTREL, "", "", OSPREY, "", OSPREY, OSPREY]
        )
        kept = [line for line in log if "Keeping the previous API keys" in line]
        self.assertEqual(len(kept), 2)
        self.assertIn(":2:", kept[0])
        for line in log:
            self.assertNotIn(KESTREL_SECRET, line)
            self.assertNotIn(OSPREY_SECRET, line)

    async def test_an_unreadable_keys_file_at_start_refuses_everything(self) -> None:
        """
        A keys file that cannot be read at start-up leaves the proxy closed
        (every request 401), never open.
        """
        proxy = LiveProxy(self, args=["--api-keys-file", self.mktemp()])
        response = await http_client(self).get(proxy.url + "/api/tags", headers={"X-API-Key": "anything"})
        self.assertEqual(response.code, 401)
        await response.content()
        self.assertEqual(proxy.fake.received, [])

    async def test_official_ollama_client_with_ollama_api_key(self) -> None:
        """
        The official ollama client with OLLAMA_API_KEY set (it sends
        C{Authorization: Bearer}) works through the proxy; without it, it
        gets a ResponseError with status 401 and the proxy's message.
        """
        import ollama

        proxy = LiveProxy(self, args=KEY_ARGS)
        self.patch(os, "environ", {**os.environ, "OLLAMA_API_KEY": KESTREL_SECRET})
        keyed = ollama.Client(host=proxy.url)
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "OLLAMA_API_KEY"})
        keyless = ollama.Client(host=proxy.url)

        def session() -> tuple[object, object, Exception]:
            chat = keyed.chat(model="llama3.2", messages=[{"role": "user", "content": "Hi"}])
            streamed = list(keyed.generate(model="llama3.2", prompt="Hi", stream=True))
            try:
                keyless.list()
            except ollama.ResponseError as e:
                return chat, streamed, e
            raise AssertionError("no error without a key")

        chat, streamed, error = await in_reactor_thread(session)
        self.assertEqual(chat.message.role, "assistant")
        self.assertTrue(streamed[-1].done)
        self.assertEqual((error.status_code, error.error), (401, "missing or invalid API key"))
        self.assertEqual(
            [(row["endpoint"], row["http_status"], row["api_key_name"]) for row in proxy.rows()],
            [("/api/chat", "200", KESTREL), ("/api/generate", "200", KESTREL), ("/api/tags", "401", "")],
        )
        self.assertEqual(len(proxy.fake.received), 2)
        for received in proxy.fake.received:
            self.assertFalse(received.headers.hasHeader(b"authorization"))

    async def test_openai_client_with_api_key(self) -> None:
        """
        The openai client with api_key=SECRET works through the proxy; with
        a wrong key it raises AuthenticationError, its 401 type.
        """
        import openai

        proxy = LiveProxy(self, args=KEY_ARGS)
        messages = [{"role": "user", "content": "Hi"}]
        keyed = openai.OpenAI(base_url=proxy.url + "/v1", api_key=OSPREY_SECRET, max_retries=0)
        wrong = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-wrong", max_retries=0)

        def session() -> tuple[object, object, Exception]:
            chat = keyed.chat.completions.create(model="llama3.2", messages=messages, max_tokens=3)
            stream = list(keyed.chat.completions.create(model="llama3.2", messages=messages, max_tokens=3, stream=True))
            try:
                wrong.models.list()
            except openai.AuthenticationError as e:
                return chat, stream, e
            raise AssertionError("no error with a wrong key")

        chat, stream, error = await in_reactor_thread(session)
        self.assertEqual(chat.usage.completion_tokens, 3)
        self.assertTrue(stream)
        self.assertEqual(error.status_code, 401)
        self.assertEqual(error.body["message"], "missing or invalid API key")
        self.assertEqual(
            [(row["http_status"], row["api_key_name"]) for row in proxy.rows()],
            [("200", OSPREY), ("200", OSPREY), ("401", "")],
        )
        self.assertEqual(len(proxy.fake.received), 2)


class ForwardedForTests(TestCase):
    """
    Whom X-Forwarded-For is believed from.  The test client is 127.0.0.1.
    """

    async def forwarded(self, args: list[str]) -> list[str]:
        proxy = LiveProxy(self, args=args)
        http = http_client(self)
        for header in (
            "203.0.113.7",
            "198.51.100.1, 203.0.113.7, 127.0.0.9",
            "203.0.113.7, not-an-address",
            "=HYPERLINK(\"http://evil\")",
        ):
            response = await http.get(proxy.url + "/api/tags", headers={"X-Forwarded-For": header})
            await response.content()
        response = await http.get(proxy.url + "/api/tags")
        await response.content()
        self.assertEqual(len(proxy.fake.received), 5)
        chain = proxy.fake.received[1].headers.getRawHeaders(b"x-forwarded-for")
        self.assertEqual(chain, [b"198.51.100.1, 203.0.113.7, 127.0.0.9, 127.0.0.1"])
        return [row["ip_source"] for row in proxy.rows()]

    async def test_believed_from_a_trusted_proxy(self) -> None:
        """
        From a --trusted-proxy address, ip_source is the rightmost hop that
        is not itself trusted; a hop that is not an address ends the walk.
        """
        sources = await self.forwarded(["--trusted-proxy", "127.0.0.0/8"])
        self.assertEqual(sources, ["203.0.113.7", "203.0.113.7", "127.0.0.1", "127.0.0.1", "127.0.0.1"])

    async def test_ignored_from_anyone_else(self) -> None:
        """
        Without trusted proxies, or when the peer is not one, ip_source is
        the peer's address whatever X-Forwarded-For says.
        """
        self.assertEqual(await self.forwarded([]), ["127.0.0.1"] * 5)
        self.assertEqual(await self.forwarded(["--trusted-proxy", "10.0.0.0/8"]), ["127.0.0.1"] * 5)


REFUSED = (
    "request target must be a path (no absolute URLs, CONNECT, '*', "
    "dot segments, backslashes, NUL, control or non-ASCII bytes)"
)


class RequestTargetTests(TestCase):
    """
    Whatever the request line and Host say, requests go to the configured
    upstream only, and only to the path that was asked for.
    """

    async def exchange(self, proxy: LiveProxy, request: bytes) -> tuple[int, bytes]:
        client = await connect(self, proxy.port)
        client.send(request)
        response = await client.response()
        await client.hang_up()
        return response.status, response.body

    async def test_targets_that_are_not_a_path_are_refused(self) -> None:
        """
        Absolute-form (C{GET http://evil.example/...}), authority-form
        (C{CONNECT}), C{*}, paths with dot segments (plain or
        percent-encoded), backslashes or NUL, and targets with bytes that
        are not visible ASCII (which Twisted's parser lets through) get a
        400 JSON error and a row, and the upstream receives nothing at all.
        """
        proxy = LiveProxy(self)
        targets = [
            (b"GET", b"http://evil.example/api/tags"),
            (b"GET", b"http://127.0.0.1:1/api/tags"),
            (b"POST", b"https://evil.example:443/api/chat"),
            (b"CONNECT", b"evil.example:443"),
            (b"OPTIONS", b"*"),
            (b"GET", b"api/tags"),
            (b"GET", b"/api/../health"),
            (b"GET", b"/api/./tags"),
            (b"GET", b"/api/%2e%2e/x"),
            (b"GET", b"/api/%2E%2e/%2e%2E/health"),
            (b"GET", b"/%2e%2e/etc/passwd"),
            (b"GET", b"/api/tags/.."),
            (b"GET", b"/api/tags/%2e"),
            (b"GET", b"/api\\tags"),
            (b"GET", b"/api%5ctags"),
            (b"GET", b"/api%5Ctags"),
            (b"GET", b"/api/tags%00"),
            (b"GET", b"/api/\x7ftags"),
            (b"GET", b"/api/\x80tags"),
            (b"GET", b"/api/tags?q=\xb0"),
            (b"GET", b"/api/tags?x=1&../../y"),
        ]
        statuses = []
        for method, target in targets:
            request = method + b" " + target + b" HTTP/1.1\r\nHost: evil.example\r\n\r\n"
            status, body = await self.exchange(proxy, request)
            statuses.append((target, status))
            if status == 400:
                self.assertEqual(json.loads(body), {"error": REFUSED}, target)
        # A query is not a path: dot segments in it are data, forwarded.
        self.assertEqual(statuses[:-1], [(target, 400) for _, target in targets[:-1]])
        self.assertEqual(statuses[-1], (b"/api/tags?x=1&../../y", 200))
        [received] = proxy.fake.received
        self.assertEqual(received.uri, b"/api/tags?x=1&../../y")
        rows = csv_rows(proxy.csv)
        self.assertEqual(len(rows), len(targets))
        status_column = COLUMNS.index("http_status")
        self.assertEqual([row[status_column] for row in rows[:-1]], ["400"] * (len(targets) - 1))

    async def test_odd_host_values_still_go_to_the_upstream(self) -> None:
        """
        A Host naming another server, an IP, garbage, or none at all does not
        change where the request goes: the upstream receives it with its
        own host:port in Host.
        """
        proxy = LiveProxy(self)
        upstream_host = f"127.0.0.1:{proxy.fake_port.getHost().port}".encode()
        hosts = [
            b"Host: evil.example\r\n",
            b"Host: evil.example:11434\r\n",
            b"Host: 169.254.169.254\r\n",
            b"Host: [::1]:80\r\n",
            b"Host: @@@ !!! garbage\r\n",
            b"Host: http://evil.example/\r\n",
            b"Host: \r\n",
            b"",
        ]
        for host in hosts:
            request = b"GET /api/tags HTTP/1.1\r\n" + host + b"Accept: */*\r\n\r\n"
            status, _ = await self.exchange(proxy, request)
            self.assertEqual(status, 200, host)
        self.assertEqual(len(proxy.fake.received), len(hosts))
        for received in proxy.fake.received:
            self.assertEqual(received.uri, b"/api/tags")
            self.assertEqual(received.headers.getRawHeaders(b"host"), [upstream_host])
        self.assertEqual(len(csv_rows(proxy.csv)), len(hosts))

    async def test_two_host_headers_are_refused(self) -> None:
        """
        Two Host headers (which a proxy in front may read differently) get
        400 and a row; nothing reaches the upstream.
        """
        proxy = LiveProxy(self)
        status, body = await self.exchange(
            proxy, b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n"
        )
        self.assertEqual(status, 400)
        self.assertIn("Host", json.loads(body)["error"])
        self.assertEqual(proxy.fake.received, [])
        [row] = proxy.rows()
        self.assertEqual(row["http_status"], "400")

    async def test_paths_pass_byte_for_byte(self) -> None:
        """
        Paths the proxy does not refuse reach the upstream exactly as sent:
        C{//api/tags} stays C{//api/tags} (and does not name a host),
        percent-encoding is not decoded.  A fragment, which a client never
        sends and Twisted's client would drop, is refused rather than cut.
        """
        proxy = LiveProxy(self)
        targets = [b"//api/tags", b"//evil.example/api/tags", b"/api%2Ftags", b"/@evil.example/x", b"/api/tags#frag"]
        for target in targets:
            await self.exchange(proxy, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertEqual([r.uri for r in proxy.fake.received], targets[:-1])
        await eventually(lambda: len(proxy.rows()) == len(targets))
        self.assertEqual(proxy.rows()[-1]["http_status"], "400")


class HostCheckTests(TestCase):
    """
    A proxy on loopback without API keys answers only local Host names, as
    Ollama does there: rewriting Host must not switch off Ollama's
    protection against DNS rebinding.
    """

    async def test_foreign_names_are_refused_local_ones_pass(self) -> None:
        """
        evil.example gets 403 and a row, and nothing reaches Ollama;
        localhost, loopback and private addresses, *.internal names (Docker's
        host.docker.internal) and this machine's name pass.
        """
        import socket as sockets

        proxy = LiveProxy(self, host_check=True)
        for host, allowed in (
            (b"evil.example", False),
            (b"evil.example:3001", False),
            (b"8.8.8.8", False),
            (b"localhost:3001", True),
            (b"127.0.0.1", True),
            (b"192.168.1.10:3001", True),
            (b"host.docker.internal:3001", True),
            (b"ollama.local", True),
            (sockets.gethostname().encode(), True),
        ):
            client = await connect(self, proxy.port)
            client.send(b"GET /api/tags HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            await client.when_closed()
            status = client.received[9:12]
            self.assertEqual(status, b"200" if allowed else b"403", host)
        refused = [row for row in csv_rows(proxy.csv) if row[COLUMNS.index("http_status")] == "403"]
        self.assertEqual(len(refused), 3)
        self.assertIn("DNS rebinding", refused[0][COLUMNS.index("error_message")])
        self.assertEqual(len(proxy.fake.received), 6)

    async def test_not_applied_with_keys(self) -> None:
        """
        With API keys the key is the gate: any Host name passes with one.
        """
        proxy = LiveProxy(self, host_check=True, args=["--api-key", "alice:sk-alice-key"])
        client = await connect(self, proxy.port)
        client.send(
            b"GET /api/tags HTTP/1.1\r\nHost: ollama.example.com\r\n"
            b"Authorization: Bearer sk-alice-key\r\nConnection: close\r\n\r\n"
        )
        await client.when_closed()
        self.assertEqual(client.received[9:12], b"200")

    def test_not_applied_beyond_loopback(self) -> None:
        """
        Listening beyond loopback, like Ollama bound to 0.0.0.0, the proxy
        checks no Host (clients use whatever name reaches it).
        """
        from ollamaproxy.service import ProxyService
        from ollamaproxy.tap import Options

        for host, checked in (("127.0.0.1", True), ("0.0.0.0", False)):
            options = Options(environ={}, dotenv={})
            options.parseOptions(["--host", host, "--log-path", self.mktemp()])
            service = ProxyService(options.settings, reactor, owns_process=False)
            self.assertEqual(service.root._host_policy is not None, checked, host)
