"""The database thread: every store call runs on one thread of its own, so the event loop never waits on SQL."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from .store import Store

T = TypeVar("T")
P = ParamSpec("P")


class Database:
    """The store and the one thread that talks to it (SQLite allows one writer; PostgreSQL gains nothing more)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heartbeat-db")

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the database thread; typed like ``fn``, so a wrong call fails mypy, not production."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
