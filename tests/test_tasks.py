"""gather_or_cancel: a request's parallel work ends with the request, and its first failure is raised as it is."""

from __future__ import annotations

import asyncio

import pytest

from serving.triton.tasks import gather_or_cancel


def test_results_in_order() -> None:
    async def value(x: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return x

    assert asyncio.run(gather_or_cancel(value(1, 0.02), value(2, 0.0))) == [1, 2]


def test_a_failure_stops_the_rest_before_it_is_raised() -> None:
    """With asyncio.gather the slow sibling went on after the failure reached the caller (here: it would still be
    running when the error is seen, and finish later)."""
    finished: list[str] = []
    ended: list[str] = []

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("images[0]: not a decodable image")

    async def slow() -> None:
        try:
            await asyncio.sleep(0.5)
            finished.append("slow")
        finally:
            ended.append("slow")

    async def main() -> None:
        with pytest.raises(ValueError, match=r"images\[0\]"):
            await gather_or_cancel(fails(), slow())
        assert ended == ["slow"]  # ended (cancelled) before the failure reached here
        await asyncio.sleep(0.6)
        assert finished == []

    asyncio.run(main())
