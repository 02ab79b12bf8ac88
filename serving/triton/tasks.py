"""Awaiting a request's parallel work so that none of it outlives the request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def gather_or_cancel(*work: Awaitable[T]) -> list[T]:
    """The results of `work`, run together. On the first failure the rest is cancelled and awaited before the
    failure is raised (as it is, not wrapped in a group like TaskGroup's): asyncio.gather leaves them running, and a
    sibling still running after its request's error response checked `is_cancelled()` on a request Triton had
    freed, which crashed tritonserver (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled)."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
