from twisted.application.service import ServiceMaker

fakeollama = ServiceMaker(
    "fakeollama",
    "ollamaproxy.testing.fake_tap",
    "A fake Ollama server for tests and benchmarks",
    "fakeollama",
)
