"""Serving: the OpenAI-compatible HTTP API (``create_app``; FastAPI is imported only when an app is
built) and the incremental chat-output parser it streams with."""

from gemma4.serve.app import APIError, ServeConfig, create_app
from gemma4.serve.parser import Delta, IncrementalDetokenizer, StreamParser

__all__ = ["APIError", "ServeConfig", "create_app", "Delta", "IncrementalDetokenizer", "StreamParser"]
