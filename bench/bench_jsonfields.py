"""
Time L{ollamaproxy.jsonfields.TopLevelFields} on the bodies it must handle
quickly, and print the figures.  Not a test: run it by hand,

    python bench/bench_jsonfields.py
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable

from ollamaproxy.jsonfields import TopLevelFields

CHUNK = 65536
REQUEST_FIELDS = ("model", "stream", "options", "format", "keep_alive", "think")
RESPONSE_FIELDS = ("prompt_eval_count", "eval_count", "usage", "error", "done_reason")


def best_of(repeat: int, run: Callable[[], object]) -> float:
    """The fastest of C{repeat} runs of C{run}, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def scan_in_chunks(body: bytes, wanted: tuple[str, ...]) -> TopLevelFields:
    view = memoryview(body)
    fields = TopLevelFields(wanted)
    for offset in range(0, len(body), CHUNK):
        fields.feed(bytes(view[offset : offset + CHUNK]))
    fields.close()
    assert fields.complete, "the body should scan as a complete object"
    return fields


def slice_only(body: bytes) -> None:
    """The cost of cutting the body into chunks, for reference."""
    view = memoryview(body)
    for offset in range(0, len(body), CHUNK):
        bytes(view[offset : offset + CHUNK])


def report_large(label: str, body: bytes, wanted: tuple[str, ...]) -> None:
    seconds = best_of(3, lambda: scan_in_chunks(body, wanted))
    slicing = best_of(3, lambda: slice_only(body))
    megabytes = len(body) / 1e6
    print(
        f"{label}: {megabytes:.1f} MB in {CHUNK // 1024} KiB chunks: "
        f"{seconds * 1e3:.1f} ms ({megabytes / seconds:,.0f} MB/s; "
        f"slicing the chunks alone {slicing * 1e3:.1f} ms)"
    )
    print(f"    fields: {scan_in_chunks(body, wanted).fields}")


def images_body() -> bytes:
    image = base64.b64encode(random.randbytes(75_000_000))
    return b'{"model":"m","images":["' + image + b'"],"stream":false}'


def embeddings_body() -> bytes:
    numbers = ",".join(f"{random.uniform(-1, 1):.4f}" for _ in range(1_400_000))
    return (
        b'{"model":"m","embeddings":[[' + numbers.encode() + b"]],"
        b'"total_duration":123,"prompt_eval_count":8}'
    )


def show_body() -> bytes:
    """An C{/api/show?verbose=true}-like dump: many short strings and objects."""
    tokens = [f"tok\\u0120{i}" if i % 7 else f"t{i}" for i in range(120_000)]
    tensors = [
        {"name": f"blk.{i}.attn_q.weight", "type": "Q4_K", "shape": [4096, 4096]}
        for i in range(300)
    ]
    info = {
        "general.architecture": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 120_000,
    }
    dump = {"modelfile": "FROM x\n" * 50, "model_info": info, "tensors": tensors}
    return json.dumps(dump).encode()


CHAT_REQUEST = json.dumps(
    {
        "model": "llama3.2:3b",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": 'Why is the sky blue? Answer in "one" line.'},
        ],
        "stream": False,
        "options": {"temperature": 0.7, "num_ctx": 4096, "seed": 42},
        "keep_alive": "5m",
    }
).encode()


def report_small() -> None:
    body = CHAT_REQUEST
    rounds = 20000

    def scan() -> None:
        for _ in range(rounds):
            fields = TopLevelFields(REQUEST_FIELDS)
            fields.feed(body)
            fields.close()

    def loads() -> None:
        for _ in range(rounds):
            json.loads(body)

    ours = best_of(5, scan) / rounds
    theirs = best_of(5, loads) / rounds
    print(
        f"chat request: {len(body)} bytes in one piece: {ours * 1e6:.1f} µs "
        f"(json.loads of the same bytes: {theirs * 1e6:.1f} µs, "
        f"ratio {ours / theirs:.1f}x)"
    )


def main() -> None:
    random.seed(1)
    report_small()
    report_large("images request", images_body(), REQUEST_FIELDS)
    report_large("embeddings response", embeddings_body(), RESPONSE_FIELDS)
    report_large("verbose show response", show_body(), RESPONSE_FIELDS)


if __name__ == "__main__":
    main()
