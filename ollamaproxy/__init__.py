"""ollamaproxy: a streaming Twisted proxy for Ollama with a per-request CSV log."""

__version__ = "0.1.0"
