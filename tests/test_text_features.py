"""Prompt truncation at max_sequence_length, and the text-feature cache the BLS shares between requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from serving.pipeline.prompts import PromptTokenizer
from serving.pipeline.text_cache import PromptFeatures, TextFeatureCache

LONG = "A photo of a red car on a blue road under a cloudy sky. " * 20


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> PromptTokenizer:
    return PromptTokenizer.from_dir(tiny_checkpoint / "processor")


def test_truncation_keeps_the_first_tokens_of_the_template_and_counts_the_rest(tokenizer: PromptTokenizer) -> None:
    full = tokenizer.encode([LONG, "a"])
    cut = tokenizer.encode([LONG, "a"], max_length=64)
    long_len = int(full.attention_mask[0].sum())
    short_len = int(full.attention_mask[1].sum())
    assert long_len > 64 and short_len < 64
    assert cut.input_ids.shape == (2, 64)
    assert torch.equal(cut.input_ids[0], full.input_ids[0, :64])  # the template's start counts, its end is cut
    assert cut.truncated == [long_len - 64, 0]
    assert full.truncated == [0, 0]
    assert torch.equal(cut.input_ids[1, :short_len], full.input_ids[1, :short_len])


def test_truncation_matches_the_reference_tokenizer_call(tokenizer: PromptTokenizer) -> None:
    """The reference tokenises the templated prompt with truncation at max_sequence_length, padding to the longest."""
    ids, mask = tokenizer([LONG], max_length=100)
    reference = tokenizer.tokenizer(
        [tokenizer.apply_template(LONG)], padding="longest", max_length=100, truncation=True, return_tensors="pt"
    )
    assert torch.equal(ids, reference.input_ids) and torch.equal(mask, reference.attention_mask)


class FakeEncoder:
    """Features that identify the prompt and length they came from; optionally waits for `release`."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []
        self.release: asyncio.Event | None = None

    async def __call__(self, prompts: list[str], max_length: int) -> list[PromptFeatures]:
        self.calls.append((list(prompts), max_length))
        if self.release is not None:
            await self.release.wait()
        return [PromptFeatures(self.features(p, max_length), 0) for p in prompts]

    @staticmethod
    def features(prompt: str, max_length: int) -> torch.Tensor:
        return torch.tensor([[float(sum(map(ord, prompt))), float(max_length)]])


def _assert_own(got: dict[str, PromptFeatures], prompts: dict[str, str], max_length: int) -> None:
    assert got.keys() == prompts.keys()
    for key, prompt in prompts.items():
        assert torch.equal(got[key].features, FakeEncoder.features(prompt, max_length)), key


def test_a_full_cache_never_evicts_the_requests_own_prompt() -> None:
    """The prompt is cached, the negative prompt is not, and inserting it fills the cache: both still come back."""
    cache, encoder = TextFeatureCache(capacity=1), FakeEncoder()

    async def run() -> None:
        await cache.lookup({"prompt": "a cat"}, 256, encoder)
        prompts = {"prompt": "a cat", "negative": "blurry"}
        _assert_own(await cache.lookup(prompts, 256, encoder), prompts, 256)

    asyncio.run(run())
    assert encoder.calls == [(["a cat"], 256), (["blurry"], 256)]
    assert len(cache) == 1


def test_concurrent_requests_get_their_own_features_while_evicting_each_other() -> None:
    cache, encoder = TextFeatureCache(capacity=1), FakeEncoder()
    requests = [{"prompt": f"prompt {i}", "negative": ""} for i in range(4)]

    async def run() -> list[dict[str, PromptFeatures]]:
        encoder.release = asyncio.Event()
        tasks = [asyncio.create_task(cache.lookup(p, 128, encoder)) for p in requests]
        await asyncio.sleep(0)  # all four are waiting on the encoder
        encoder.release.set()
        return await asyncio.gather(*tasks)

    for prompts, got in zip(requests, asyncio.run(run()), strict=True):
        _assert_own(got, prompts, 128)
    assert len(cache) == 1


def test_hits_are_not_encoded_again_and_the_length_is_part_of_the_key() -> None:
    cache, encoder = TextFeatureCache(capacity=8), FakeEncoder()

    async def run() -> None:
        prompts = {"prompt": "a cat", "negative": ""}
        await cache.lookup(prompts, 256, encoder)
        await cache.lookup(prompts, 256, encoder)
        _assert_own(await cache.lookup(prompts, 64, encoder), prompts, 64)

    asyncio.run(run())
    assert encoder.calls == [(["", "a cat"], 256), (["", "a cat"], 64)]


def test_one_prompt_used_twice_is_encoded_once() -> None:
    cache, encoder = TextFeatureCache(capacity=8), FakeEncoder()
    prompts = {"prompt": "same", "negative": "same"}
    got = asyncio.run(cache.lookup(prompts, 32, encoder))
    _assert_own(got, prompts, 32)
    assert encoder.calls == [(["same"], 32)]
