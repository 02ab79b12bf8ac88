"""Prompt -> chat template -> token ids. Runs without the MLLM, so the BLS can tokenise on its own."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."


class PromptTokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_dir(cls, processor_dir: Path | str, max_length: int | None = None) -> PromptTokenizer:
        """`processor/` of the official layout: tokenizer files and the chat template."""
        return cls(AutoTokenizer.from_pretrained(Path(processor_dir)), max_length)

    def apply_template(self, prompt: str) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        assert isinstance(text, str)
        return text

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the templated prompts, right-padded to the longest."""
        batch = self.tokenizer(
            [self.apply_template(p) for p in prompts],
            padding="longest",
            max_length=self.max_length,
            truncation=self.max_length is not None,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask
