"""FANOUT_ASSISTANT -> the reply generator a worker runs, opened for its lifetime."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import aiohttp

from common.config import ConfigError, Settings
from common.store import replies
from common.store.postgres import Store
from worker.assistant.base import ReplyGenerator
from worker.assistant.echo import EchoAssistant
from worker.assistant.openai import OpenAIAssistant


@asynccontextmanager
async def open_generator(settings: Settings, store: Store) -> AsyncIterator[ReplyGenerator]:
    """The configured generator; what it holds (an HTTP client, a user's `aclose`) is
    closed on exit."""
    if settings.assistant == "echo":
        yield EchoAssistant(delay=settings.echo_delay)
    elif settings.assistant == "openai":
        assert settings.assistant_url is not None  # Settings.from_env checks both
        assert settings.assistant_model is not None
        # One connection pool per worker; the concurrency cap bounds its use.
        connector = aiohttp.TCPConnector(limit=settings.assistant_concurrency)
        async with aiohttp.ClientSession(connector=connector) as http:
            yield OpenAIAssistant(
                http,
                partial(_history, store),
                base_url=settings.assistant_url,
                model=settings.assistant_model,
                api_key=settings.assistant_api_key,
                system_prompt=settings.assistant_system_prompt,
                history_size=settings.assistant_history,
                timeout=settings.assistant_timeout,
            )
    else:
        generator = load_callable(settings.assistant)
        try:
            yield generator
        finally:
            close = getattr(generator, "aclose", None)
            if close is not None:
                await close()


def load_callable(reference: str) -> ReplyGenerator:
    """Import `module:callable`, call it with no arguments, check what it returns."""
    module_name, _, attribute = reference.partition(":")
    try:
        factory: Any = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"FANOUT_ASSISTANT={reference}: cannot load it ({exc})") from exc
    if not callable(factory):
        raise ConfigError(f"FANOUT_ASSISTANT={reference} is not callable")
    generator = factory()
    if not callable(getattr(generator, "reply", None)):
        raise ConfigError(f"FANOUT_ASSISTANT={reference} returned an object without reply()")
    checked: ReplyGenerator = generator
    return checked


async def _history(store: Store, session_id: str, through: int, limit: int) -> list[replies.Turn]:
    return await replies.history(store, session_id, through=through, limit=limit)
