"""Prompt -> chat template -> token ids. Runs without the MLLM, so the BLS can tokenise on its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."


@dataclass(frozen=True)
class TokenizedPrompts:
    input_ids: torch.Tensor  # (B, L) right-padded to the longest
    attention_mask: torch.Tensor  # (B, L)
    truncated: list[int]  # tokens cut from each templated prompt


class PromptTokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, processor_dir: Path | str) -> PromptTokenizer:
        """`processor/` of the official layout: tokenizer files and the chat template."""
        return cls(AutoTokenizer.from_pretrained(Path(processor_dir)))

    def apply_template(self, prompt: str) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        assert isinstance(text, str)
        return text

    def __call__(self, prompts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the templated prompts, right-padded to the longest."""
        batch = self.encode(prompts, max_length)
        return batch.input_ids, batch.attention_mask

    def encode(self, prompts: list[str], max_length: int | None = None) -> TokenizedPrompts:
        """Templated prompts cut to `max_length` tokens as the reference cuts them: the chat template counts, and
        the end is cut (the template's closing tokens first)."""
        texts = [self.apply_template(p) for p in prompts]
        batch = self.tokenizer(
            texts,
            padding="longest",
            max_length=max_length,
            truncation=max_length is not None,
            return_tensors="pt",
        )
        kept = batch.attention_mask.sum(dim=1).tolist()
        full = [len(ids) for ids in self.tokenizer(texts).input_ids] if max_length is not None else kept
        return TokenizedPrompts(batch.input_ids, batch.attention_mask, [f - k for f, k in zip(full, kept, strict=True)])
