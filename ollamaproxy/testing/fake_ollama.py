"""
A faithful fake Ollama server, for the test suite and the benchmark.

L{FakeOllama} serves Ollama's whole route table (see
C{/work/shared/ollama-api.md}) from a Twisted resource: NDJSON streams with
late headers and one write per object, gin's plain-text 404/405 and
trailing-slash redirects, the error texts and statuses of each endpoint, the
/v1 OpenAI and Anthropic layers (in L{ollamaproxy.testing.fake_openai}), and
the Host check.  Generation is deterministic and every delay goes through the
injected clock, so a test with L{twisted.internet.task.Clock} releases chunks
one C{advance} at a time.

Run it alone with C{twist fakeollama} or
C{python -m ollamaproxy.testing.fake_ollama} (see L{fake_tap}).
"""

from __future__ import annotations

import hashlib
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import IO, ClassVar
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ollamaproxy.hostcheck import HostPolicy, this_machine
from ollamaproxy.testing import fake_native, fake_openai
from ollamaproxy.testing.fake_support import (
    CT_HTML_UTF8, CT_TEXT, DEFAULT_MODELS, QUEUE_FULL_MESSAGE, ApiError, Exchange, FakeModel,
    GenerationPlan, Job, Metrics, Reply, compute_metrics, embedding_vector,
    full_model_name, model_key, native_error, normalize, plan_generation, shortest_float32,
)

__all__ = ["DEFAULT_MODELS", "FakeModel", "FakeOllama", "Fault", "FaultKind", "HostPolicy",
           "ReceivedRequest"]

log = Logger()

BODY_KEEP_LIMIT = 1024 * 1024
"""Bodies up to this size are kept verbatim in L{ReceivedRequest.body}."""
DEFAULT_KEEP_ALIVE = 300.0


class FaultKind(Enum):
    """What a L{Fault} does; see L{FakeOllama.inject} for when."""

    MIDSTREAM_ERROR = "midstream-error"
    RESET_MIDSTREAM = "reset-midstream"
    RESET_BEFORE_HEADERS = "reset-before-headers"
    HANG_BEFORE_HEADERS = "hang-before-headers"
    HANG_MIDSTREAM = "hang-midstream"
    STATUS = "status"
    QUEUE_FULL = "queue-full"


_BEFORE_HEADERS = frozenset({FaultKind.STATUS, FaultKind.RESET_BEFORE_HEADERS,
                             FaultKind.HANG_BEFORE_HEADERS})


@dataclass(frozen=True)
class Fault:
    """
    A failure to play on the next generating request (see
    L{FakeOllama.inject}).  Use the constants, or L{Fault.status}.
    """

    kind: FaultKind
    status_code: int = 500
    message: str = ""

    MIDSTREAM_ERROR: ClassVar[Fault]
    RESET_MIDSTREAM: ClassVar[Fault]
    RESET_BEFORE_HEADERS: ClassVar[Fault]
    HANG_BEFORE_HEADERS: ClassVar[Fault]
    HANG_MIDSTREAM: ClassVar[Fault]
    QUEUE_FULL: ClassVar[Fault]

    @classmethod
    def status(cls, code: int, message: str) -> Fault:
        """An Ollama error JSON with this status, before any chunk."""
        return cls(FaultKind.STATUS, code, message)


Fault.MIDSTREAM_ERROR = Fault(
    FaultKind.MIDSTREAM_ERROR,
    message="an error was encountered while running the model: fake runner failure")
Fault.RESET_MIDSTREAM = Fault(FaultKind.RESET_MIDSTREAM)
Fault.RESET_BEFORE_HEADERS = Fault(FaultKind.RESET_BEFORE_HEADERS)
Fault.HANG_BEFORE_HEADERS = Fault(FaultKind.HANG_BEFORE_HEADERS)
Fault.HANG_MIDSTREAM = Fault(FaultKind.HANG_MIDSTREAM)
Fault.QUEUE_FULL = Fault(FaultKind.QUEUE_FULL, 503, QUEUE_FULL_MESSAGE)


@dataclass(frozen=True)
class ReceivedRequest:
    """What the fake saw of one request."""

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    body_length: int
    body_sha256: str


def _native_error_reply(error: ApiError) -> Reply:
    return native_error(error.status, error.message)


@dataclass(frozen=True)
class _Route:
    """A path pattern (C{:name} matches one segment) and its handlers by method."""

    pattern: tuple[str, ...]
    handlers: dict[bytes, Callable[[Exchange, dict[str, str]], None]]
    error_reply: Callable[[ApiError], Reply]

    def match(self, segments: Sequence[str]) -> dict[str, str] | None:
        if len(segments) != len(self.pattern):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.pattern, segments):
            if want.startswith(":") and got:
                params[want[1:]] = got
            elif want != got:
                return None
        return params


_METHOD_ORDER = (b"HEAD", b"GET", b"POST", b"DELETE")
"""gin's method-tree order, which is the order of the C{Allow} header."""


class FakeOllama:
    """
    A fake Ollama: its state, its faults, and the resource that serves it.

    @ivar received: every request seen, in order.
    @ivar disconnects: URIs whose client left before the answer was complete.
    @ivar blobs: digests (C{sha256:...}) uploaded to C{/api/blobs}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        token_delay: float = 0.0,
        load_delay: float = 0.0,
        models: Iterable[FakeModel] = DEFAULT_MODELS,
        version: str = "0.12.6",
        max_pending: int | None = None,
        check_host: bool = False,
        host_policy: HostPolicy | None = None,
    ) -> None:
        """
        @param clock: drives every delay (a L{task.Clock} in tests).
        @param token_delay: seconds between chunks; 0 writes the whole
            stream synchronously inside C{render}.
        @param load_delay: extra seconds before the first chunk.
        @param max_pending: answer 503 "queue full" when this many
            generations are already in flight.
        @param check_host: emulate Ollama bound to loopback (Host check).
        @param host_policy: the Host check's view of this machine; by
            default the real hostname and interface addresses.
        """
        self.clock = clock
        self.token_delay = token_delay
        self.load_delay = load_delay
        self.version = version
        self.max_pending = max_pending
        self.received: list[ReceivedRequest] = []
        self.disconnects: list[bytes] = []
        self._host_policy = (host_policy or this_machine()) if check_host else None
        self.blobs: set[str] = set()
        self._models = {model_key(m.name): m for m in models}
        self._loaded: dict[str, float] = {}
        self._faults: deque[tuple[Fault, int]] = deque()
        self._disconnect_waiters: list[Deferred[bytes]] = []
        self._active: set[Exchange] = set()
        self._jobs: set[_JobRun] = set()
        self._serial = 0
        self._routes = self._build_routes()

    # -- public API -------------------------------------------------------

    def resource(self) -> Resource:
        """A C{twisted.web} resource serving Ollama's whole route table."""
        return _OllamaResource(self)

    @property
    def in_flight(self) -> int:
        """Requests currently being answered."""
        return len(self._active)

    @property
    def models(self) -> tuple[FakeModel, ...]:
        """The installed models, most recently modified first."""
        return tuple(sorted(self._models.values(), key=lambda m: -m.modified_at))

    def add_model(self, model: FakeModel) -> None:
        """Install C{model}, replacing any model of the same name."""
        self._models[model_key(model.name)] = model

    def remove_model(self, name: str) -> None:
        self._models.pop(model_key(name), None)
        self._loaded.pop(model_key(name), None)

    def inject(self, fault: Fault, after_chunks: int = 0) -> None:
        """
        Queue C{fault} for the next request that generates (generate, chat,
        embed, pull, push, create and their /v1 forms).  Mid-stream faults
        fire after C{after_chunks} chunks, and at the latest instead of the
        final C{done} chunk; the other faults fire before the first chunk.
        """
        self._faults.append((fault, after_chunks))

    def when_disconnected(self) -> Deferred[bytes]:
        """Fires with the URI at the next client disconnect."""
        waiter: Deferred[bytes] = Deferred()
        self._disconnect_waiters.append(waiter)
        return waiter

    # -- the engine the route handlers share -------------------------------

    def find_model(self, name: str) -> FakeModel | None:
        return self._models.get(model_key(name)) if name else None

    def check_generation(self, kind: str, name: str, think: bool | str | None, *,
                         tools: bool = False, relax_thinking: bool = False) -> tuple[FakeModel, bool]:
        """
        Ollama's checks before a C{kind} ("generate" or "chat") runs.

        @return: the model, and whether it will think.
        @raise ApiError: missing/unknown model, or a missing capability.
        """
        if not name and kind == "generate":
            raise ApiError(404, "model '' not found")
        if not name:
            raise ApiError(400, "model is required")
        model = self.find_model(name)
        if model is None:
            raise ApiError(404, f"model '{name}' not found")
        thinks = "thinking" in model.capabilities
        if not thinks and think not in (None, False) and not relax_thinking:
            raise ApiError(400, f'"{name}" does not support thinking')
        if "completion" not in model.capabilities:
            raise ApiError(400, f'"{name}" does not support {kind}')
        if tools and "tools" not in model.capabilities:
            raise ApiError(400, f"{full_model_name(name)} does not support tools")
        return model, thinks and think is not False

    def admit(self, *, generating: bool = True) -> tuple[Fault, int] | None:
        """
        The scheduler's door: 503 when the queue is full, else the fault
        this request will play (only a generating request takes one).
        """
        if self.max_pending is not None and len(self._jobs) >= self.max_pending:
            raise ApiError(503, QUEUE_FULL_MESSAGE)
        armed = self._faults.popleft() if generating and self._faults else None
        if armed is not None and armed[0].kind is FaultKind.QUEUE_FULL:
            raise ApiError(503, QUEUE_FULL_MESSAGE)
        return armed

    def plan(self, prompt_texts: Iterable[str], limit: int | None, thinking: bool) -> GenerationPlan:
        return plan_generation(prompt_texts, limit=limit, thinking=thinking,
                               token_delay=self.token_delay, load_delay=self.load_delay)

    def embed(self, name: str, inputs: Sequence[str],
              dimensions: int | None) -> tuple[list[list[float]], Metrics]:
        """Vectors for C{inputs} (which must be non-empty), and their metrics."""
        model = self.find_model(name)
        if model is None:
            raise ApiError(404, f'model "{name}" not found, try pulling it first')
        vectors = [embedding_vector(text, model.embedding_length) for text in inputs]
        if dimensions and 0 < dimensions < model.embedding_length:
            vectors = [normalize(vector[:dimensions]) for vector in vectors]
        tokens = sum(max(len(text.split()), 1) for text in inputs)
        metrics = compute_metrics(tokens, 0, self.token_delay, self.load_delay)
        return [[shortest_float32(v) for v in vector] for vector in vectors], metrics

    def run_job(self, exchange: Exchange, job: Job, armed: tuple[Fault, int] | None) -> None:
        """Answer C{exchange} step by step under the clock (see L{_JobRun})."""
        _JobRun(self, exchange, job, armed).start()

    def next_serial(self) -> int:
        """A counter for the ids the /v1 layers make up."""
        self._serial += 1
        return self._serial

    def loaded_models(self) -> list[tuple[float, FakeModel]]:
        """C{/api/ps}: (expiry, model) of loaded models, longest remaining first."""
        now = self.clock.seconds()
        running = [(expiry, self._models[key]) for key, expiry in self._loaded.items()
                   if expiry > now and key in self._models]
        return sorted(running, key=lambda item: -item[0])

    def note_loaded(self, model: FakeModel, keep_alive: float | None) -> None:
        """Track C{/api/ps}: a model stays loaded C{keep_alive} seconds."""
        if keep_alive == 0:
            self._loaded.pop(model_key(model.name), None)
        else:
            seconds = DEFAULT_KEEP_ALIVE if keep_alive is None else keep_alive
            self._loaded[model_key(model.name)] = self.clock.seconds() + seconds

    # -- request plumbing ---------------------------------------------------

    def _open(self, request: Request) -> Exchange:
        body, length, digest = _summarize_body(request.content)
        self.received.append(ReceivedRequest(request.method, request.uri,
                                             request.requestHeaders.copy(), body, length, digest))
        exchange = Exchange(request, digest, self._client_gone, self._active.discard)
        self._active.add(exchange)
        return exchange

    def _client_gone(self, exchange: Exchange) -> None:
        log.info("client left {uri}", uri=exchange.uri)
        self.disconnects.append(exchange.uri)
        waiters, self._disconnect_waiters = self._disconnect_waiters, []
        for waiter in waiters:
            waiter.callback(exchange.uri)

    def _dispatch(self, exchange: Exchange) -> None:
        path = unquote(exchange.request.path.decode("latin-1"))
        route, params = self._match(path)
        handler = route.handlers.get(exchange.method) if route else None
        if route is None or handler is None:
            redirect = self._trailing_slash_redirect(path, exchange)
            exchange.reply(redirect or self._host_denial(exchange) or _no_route(route, exchange.method))
            return
        denial = self._host_denial(exchange)
        if denial is not None:
            exchange.reply(denial)
            return
        try:
            handler(exchange, params)
        except ApiError as error:
            exchange.reply(route.error_reply(error))

    def _match(self, path: str) -> tuple[_Route | None, dict[str, str]]:
        segments = path.split("/")[1:]
        for route in self._routes:
            params = route.match(segments)
            if params is not None:
                return route, params
        return None, {}

    def _trailing_slash_redirect(self, path: str, exchange: Exchange) -> Reply | None:
        """gin's C{RedirectTrailingSlash}: 301 for GET, 307 otherwise."""
        if len(path) < 2 or not path.endswith("/"):
            return None
        route, _ = self._match(path[:-1])
        if route is None or exchange.method not in route.handlers:
            return None
        location = path[:-1].encode("utf-8")
        query = exchange.uri.partition(b"?")[2]
        if query:
            location += b"?" + query
        status, text = ((301, b"Moved Permanently") if exchange.method == b"GET"
                        else (307, b"Temporary Redirect"))
        if exchange.method in (b"GET", b"HEAD"):
            body = b'<a href="' + location + b'">' + text + b"</a>.\n"
            return Reply(status, CT_HTML_UTF8, body, ((b"location", location),))
        return Reply(status, None, b"", ((b"location", location),))

    def _host_denial(self, exchange: Exchange) -> Reply | None:
        """Ollama's C{allowedHostsMiddleware}, when emulating a loopback bind."""
        if self._host_policy is None:
            return None
        verdict = self._host_policy.classify(exchange.header(b"host") or "")
        if verdict == "denied":
            return Reply(403, None)
        if verdict == "name" and exchange.method == b"OPTIONS":
            return Reply(204, None)
        return None

    def _build_routes(self) -> tuple[_Route, ...]:
        """The route table, in Ollama's registration order."""
        native, v1 = fake_native, fake_openai

        def route(path: str, error_reply: Callable[[ApiError], Reply] = _native_error_reply,
                  **handlers: Callable[[FakeOllama, Exchange, dict[str, str]], None]) -> _Route:
            bound = {method.upper().encode(): partial(handler, self)
                     for method, handler in handlers.items()}
            return _Route(tuple(path.split("/")[1:]), bound, error_reply)

        return (
            route("/", head=native.root, get=native.root),
            route("/api/version", head=native.version, get=native.version),
            route("/api/status", get=native.status),
            route("/api/pull", post=native.pull),
            route("/api/push", post=native.push),
            route("/api/tags", head=native.tags, get=native.tags),
            route("/api/show", post=native.show),
            route("/api/delete", delete=native.delete),
            route("/api/me", post=native.me),
            route("/api/signout", post=native.signout),
            route("/api/user/keys/:encodedKey", delete=native.signout),
            route("/api/create", post=native.create),
            route("/api/blobs/:digest", post=native.create_blob, head=native.head_blob),
            route("/api/copy", post=native.copy),
            route("/api/experimental/web_search", post=native.web_proxy),
            route("/api/experimental/web_fetch", post=native.web_proxy),
            route("/api/experimental/model-recommendations", get=native.recommendations),
            route("/api/ps", get=native.ps),
            route("/api/generate", post=native.generate),
            route("/api/chat", post=native.chat),
            route("/api/embed", post=native.embed),
            route("/api/embeddings", post=native.embeddings),
            route("/v1/chat/completions", v1.openai_error, post=v1.chat_completions),
            route("/v1/completions", v1.openai_error, post=v1.completions),
            route("/v1/embeddings", v1.openai_error, post=v1.embeddings),
            route("/v1/models", v1.openai_error, get=v1.list_models),
            route("/v1/models/:model", v1.openai_error, get=v1.retrieve_model),
            route("/v1/responses", v1.openai_error, post=v1.responses),
            route("/v1/audio/transcriptions", v1.openai_error, post=v1.transcriptions),
            route("/v1/messages", v1.anthropic_error, post=v1.messages),
        )


class _OllamaResource(Resource):
    """The root of the fake: every path is routed by L{FakeOllama} itself."""

    isLeaf = True

    def __init__(self, fake: FakeOllama) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Request) -> object:
        request.defaultContentType = None
        request.responseHeaders.removeHeader(b"server")
        self._fake._dispatch(self._fake._open(request))
        return NOT_DONE_YET


class _JobRun:
    """
    Drives one generating answer under the clock.  Step C{n} is due
    C{load_delay + (n + 1) * token_delay} after the request arrived (an
    absolute schedule: no drift, and one big C{Clock.advance} releases every
    step that is due); steps already due run at once, in a loop.  A stream
    writes one chunk per step (headers leave with the first); a non-streamed
    answer is written after the last step.  An armed fault replaces one step.
    """

    def __init__(self, fake: FakeOllama, exchange: Exchange, job: Job,
                 armed: tuple[Fault, int] | None) -> None:
        self._fake = fake
        self._clock = fake.clock
        self._exchange = exchange
        self._job = job
        self._encoder = job.encoder
        self._fault = armed[0] if armed else None
        self._fault_step = _fault_step(armed, job.steps)
        self._first_due = self._clock.seconds() + fake.token_delay + (
            fake.load_delay if job.loads_model else 0.0)
        self._pending: IDelayedCall | None = None

    def start(self) -> None:
        self._fake._jobs.add(self)
        self._exchange.when_closed(self._stop)
        model = self._fake.find_model(self._job.model or "")
        if model is not None:
            self._fake.note_loaded(model, None if self._job.keep_alive == 0 else self._job.keep_alive)
        if not self._wait_for(0):
            self._run(0)

    def _wait_for(self, step: int) -> bool:
        """Schedule C{step} if it is not due yet; C{False} if it is due now."""
        delay = self._first_due + step * self._fake.token_delay - self._clock.seconds()
        if delay <= 0:
            return False
        self._pending = self._clock.callLater(delay, self._run, step)
        return True

    def _run(self, step: int) -> None:
        self._pending = None
        while not self._exchange.closed:
            if step == self._fault_step and self._fault is not None:
                self._play(self._fault, step)
                return
            if self._encoder.stream:
                if step == 0:
                    self._exchange.start_stream(self._encoder.stream_content_type,
                                                self._encoder.stream_headers)
                self._exchange.write(self._encoder.frame(step))
            if step == self._job.steps - 1:
                self._complete()
                return
            step += 1
            if self._wait_for(step):
                return

    def _complete(self) -> None:
        if self._encoder.stream:
            self._exchange.finish()
        else:
            self._exchange.reply(self._encoder.body())
        if self._job.on_success is not None:
            self._job.on_success()

    def _play(self, fault: Fault, step: int) -> None:
        log.info("playing fault {fault} at step {step}", fault=fault.kind.value, step=step)
        if fault.kind in (FaultKind.HANG_BEFORE_HEADERS, FaultKind.HANG_MIDSTREAM):
            return
        if fault.kind in (FaultKind.RESET_BEFORE_HEADERS, FaultKind.RESET_MIDSTREAM):
            self._exchange.abort()
        elif fault.kind is FaultKind.MIDSTREAM_ERROR and self._encoder.stream and step > 0:
            self._exchange.write(self._encoder.midstream_error(fault.message))
            self._exchange.finish()
        else:
            self._exchange.reply(self._encoder.runner_error(fault.status_code, fault.message))

    def _stop(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._fake._jobs.discard(self)
        model = self._fake.find_model(self._job.model or "")
        if model is not None and self._job.keep_alive == 0:
            self._fake.note_loaded(model, 0)


def _fault_step(armed: tuple[Fault, int] | None, steps: int) -> int | None:
    if armed is None:
        return None
    fault, after_chunks = armed
    return 0 if fault.kind in _BEFORE_HEADERS else min(max(after_chunks, 0), steps - 1)


def _summarize_body(content: IO[bytes]) -> tuple[bytes, int, str]:
    """Hash and measure the body block by block, keeping it only if small."""
    content.seek(0)
    digest, kept, length = hashlib.sha256(), [], 0
    while block := content.read(64 * 1024):
        digest.update(block)
        length += len(block)
        if length <= BODY_KEEP_LIMIT:
            kept.append(block)
    content.seek(0)
    return (b"".join(kept) if length <= BODY_KEEP_LIMIT else b""), length, digest.hexdigest()


def _no_route(route: _Route | None, method: bytes) -> Reply:
    if route is None:
        return Reply(404, CT_TEXT, b"404 page not found")
    allow = b", ".join(m for m in _METHOD_ORDER if m in route.handlers)
    return Reply(405, CT_TEXT, b"405 method not allowed", ((b"allow", allow),))


def main(argv: Sequence[str]) -> None:
    """Run the fake in the foreground: C{python -m ollamaproxy.testing.fake_ollama}."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python.usage import UsageError

    from ollamaproxy.testing import fake_tap

    options = fake_tap.Options()
    try:
        options.parseOptions(list(argv))
    except UsageError as error:
        raise SystemExit(f"{error}\n\n{options}") from None
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    service = fake_tap.makeService(options)
    service.startService()
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", service.stopService)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
