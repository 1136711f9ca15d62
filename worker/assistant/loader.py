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
from worker.assistant.context import RecentTurns
from worker.assistant.echo import EchoAssistant
from worker.assistant.openai import OpenAIAssistant

Opened = tuple[ReplyGenerator, RecentTurns | None]


@asynccontextmanager
async def open_generator(settings: Settings, store: Store) -> AsyncIterator[Opened]:
    """The configured generator, and the in-memory context it reads (openai with history;
    the worker feeds it). What the generator holds (an HTTP client, a user's `aclose`)
    is closed on exit."""
    if settings.assistant == "echo":
        yield EchoAssistant(delay=settings.echo_delay), None
    elif settings.assistant == "openai":
        assert settings.assistant_url is not None  # Settings.from_env checks both
        assert settings.assistant_model is not None
        context = recent_turns(settings, store)
        # One connection pool per worker; the concurrency cap bounds its use.
        connector = aiohttp.TCPConnector(limit=settings.assistant_concurrency)
        async with aiohttp.ClientSession(connector=connector) as http:
            openai = OpenAIAssistant(
                http,
                context.before if context is not None else partial(_history, store),
                base_url=settings.assistant_url,
                model=settings.assistant_model,
                api_key=settings.assistant_api_key,
                system_prompt=settings.assistant_system_prompt,
                history_size=settings.assistant_history,
                timeout=settings.assistant_timeout,
            )
            yield openai, context
    else:
        generator = load_callable(settings.assistant)
        try:
            yield generator, None
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


def recent_turns(settings: Settings, store: Store) -> RecentTurns | None:
    """The in-memory context of `openai` replies (none without history)."""
    if settings.assistant_history == 0:
        return None
    return RecentTurns(
        partial(replies.recent, store),
        partial(_history, store),
        size=settings.assistant_history,
        partitions=settings.partitions,
    )


async def _history(store: Store, session_id: str, before: int, limit: int) -> list[replies.Turn]:
    return await replies.history(store, session_id, through=before - 1, limit=limit)
