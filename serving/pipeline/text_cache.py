"""An LRU cache of prompt features, keyed by prompt and truncation length, shared by concurrent requests."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptFeatures:
    features: torch.Tensor  # unpadded (L, D)
    truncated: int  # tokens cut from the templated prompt


# Encodes distinct prompts at one truncation length, returning their features in the same order.
Encoder = Callable[[list[str], int], Awaitable[list[PromptFeatures]]]


class TextFeatureCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, int], PromptFeatures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def lookup(self, prompts: Mapping[str, str], max_length: int, encode: Encoder) -> dict[str, PromptFeatures]:
        """Features for each key of `prompts`; uncached prompts are encoded together in one `encode` call.

        A request's features are collected locally before the cache is touched again, so neither its own
        insertions nor other requests' (during the await) can evict what it is about to return.
        """
        found: dict[str, PromptFeatures] = {}
        for prompt in dict.fromkeys(prompts.values()):
            entry = self._entries.get((prompt, max_length))
            if entry is not None:
                self._entries.move_to_end((prompt, max_length))
                found[prompt] = entry
        missing = sorted(set(prompts.values()) - found.keys())
        if missing:
            encoded = await encode(missing, max_length)
            for prompt, entry in zip(missing, encoded, strict=True):
                found[prompt] = entry
                self._insert((prompt, max_length), entry)
        return {key: found[prompt] for key, prompt in prompts.items()}

    def _insert(self, key: tuple[str, int], entry: PromptFeatures) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
