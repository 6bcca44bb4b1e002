"""The OpenAI-compatible HTTP server: `build_app` (FastAPI) over an `AsyncLLMEngine`."""

from ember.server.app import build_app

__all__ = ["build_app"]
