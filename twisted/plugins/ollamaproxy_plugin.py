from twisted.application.service import ServiceMaker

ollamaproxy = ServiceMaker(
    "ollamaproxy",
    "ollamaproxy.tap",
    "Streaming proxy for Ollama that logs one CSV row per request",
    "ollamaproxy",
)
