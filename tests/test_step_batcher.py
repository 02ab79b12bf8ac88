"""The step batcher merges concurrent generations' steps and keeps serving through failures."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serving.pipeline.denoise import Sample
from serving.pipeline.guidance import Branch
from serving.triton.step_batcher import StepBatcher


def _samples(tag: float, count: int) -> list[Sample]:
    latent = torch.full((16, 2, 2), tag)
    return [Sample(Branch.COND, latent, torch.tensor(0.5), torch.zeros(3, 4), ()) for _ in range(count)]


class Recorder:
    """Doubles each latent; fails every call (`fail`) or every call carrying a sample tagged `poison`."""

    def __init__(self, fail: bool = False, poison: float | None = None) -> None:
        self.calls: list[int] = []
        self.fail = fail
        self.poison = poison

    async def __call__(self, samples: list[Sample]) -> list[torch.Tensor]:
        self.calls.append(len(samples))
        await asyncio.sleep(0.001)
        if self.fail or any(float(s.latent[0, 0, 0]) == self.poison for s in samples):
            raise RuntimeError("transformer down")
        return [s.latent * 2 for s in samples]


async def _generation(batcher: StepBatcher, tag: float, steps: int, branches: int) -> list[float]:
    batcher.register()
    seen = []
    try:
        for _ in range(steps):
            out = await batcher.submit(_samples(tag, branches))
            assert len(out) == branches
            seen.append(float(out[0][0, 0, 0]))
    finally:
        batcher.unregister()
    return seen


def test_concurrent_generations_share_calls_and_get_their_own_results() -> None:
    async def main() -> tuple[Recorder, list[list[float]]]:
        run = Recorder()
        batcher = StepBatcher(run, max_samples=24)
        results = await asyncio.gather(*(_generation(batcher, tag, 5, 3) for tag in (1.0, 2.0, 3.0)))
        return run, results

    run, results = asyncio.run(main())
    assert results == [[2.0] * 5, [4.0] * 5, [6.0] * 5]
    assert run.calls == [9] * 5  # three generations x three branches in one call per step


def test_max_samples_splits_a_step_and_uneven_lengths_finish() -> None:
    async def main() -> Recorder:
        run = Recorder()
        batcher = StepBatcher(run, max_samples=4)
        await asyncio.gather(_generation(batcher, 1.0, 2, 3), _generation(batcher, 2.0, 4, 3))
        return run

    run = asyncio.run(main())
    assert all(c <= 4 for c in run.calls) and sum(run.calls) == 2 * 3 + 4 * 3


def test_a_failed_call_reaches_every_waiter() -> None:
    async def main() -> list[BaseException | list[float]]:
        batcher = StepBatcher(Recorder(fail=True))
        return await asyncio.gather(*(_generation(batcher, t, 1, 1) for t in (1.0, 2.0)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)


def test_a_failing_sample_fails_only_its_own_generation() -> None:
    async def main() -> tuple[Recorder, list[BaseException | list[float]]]:
        run = Recorder(poison=3.0)
        batcher = StepBatcher(run, max_samples=24)
        tags = (1.0, 2.0, 3.0, 4.0, 5.0)
        results = await asyncio.gather(*(_generation(batcher, t, 2, 2) for t in tags), return_exceptions=True)
        return run, results

    run, results = asyncio.run(main())
    assert results[:2] == [[2.0, 2.0], [4.0, 4.0]] and results[3:] == [[8.0, 8.0], [10.0, 10.0]]
    assert isinstance(results[2], RuntimeError)
    # Step 1: the merged call of 5 submissions (10 samples) fails; its halves are retried: tags 1-2 pass (4),
    # tags 3-5 fail (6) and split again: tag 3 alone fails (2), tags 4-5 pass (4). Step 2: the other four (8).
    assert run.calls == [10, 4, 6, 2, 4, 8]


def test_a_lone_generation_is_not_delayed_by_the_window() -> None:
    async def main() -> float:
        batcher = StepBatcher(Recorder(), window_s=1.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await _generation(batcher, 1.0, 3, 1)
        return loop.time() - start

    assert asyncio.run(main()) < 0.5


@pytest.mark.parametrize("count", [0, 1])
def test_unregister_wakes_waiters(count: int) -> None:
    """A generation that finishes early must not leave the others waiting for the window."""

    async def main() -> None:
        batcher = StepBatcher(Recorder(), window_s=5.0)
        await asyncio.wait_for(
            asyncio.gather(_generation(batcher, 1.0, 1 + count, 1), _generation(batcher, 2.0, 3, 1)), timeout=2.0
        )

    asyncio.run(main())
