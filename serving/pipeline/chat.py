"""Visual understanding, model-independent parts: the chat template with vision tokens, streaming
detokenization and stop strings (requests and their limits are in chat_request.py). The Triton `mllm` model and
the eager reference share them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from serving.errors import InvalidArgumentError
from serving.pipeline.chat_request import DEFAULT_CHAT_LIMITS, ChatLimits, ChatPart, ChatRequest

IMAGE_PAD = "<|image_pad|>"


@dataclass
class ChatInputs:
    input_ids: torch.Tensor  # (1, L)
    attention_mask: torch.Tensor  # (1, L)
    pixel_values: torch.Tensor | None  # (patches, C * T * P * P)
    image_grid_thw: torch.Tensor | None  # (images, 3)

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None and self.image_grid_thw is not None:
            kwargs |= {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}
        return kwargs


class ChatEncoder:
    """Messages + images -> model inputs: the processor's chat template, each image's `<|image_pad|>` repeated
    once per merged vision patch (what Qwen2.5-VL's processor does; that processor itself wants torchvision)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: Qwen2VLImageProcessorPil) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        # Typed into a message, the tokenizer's special tokens would be parsed as the template's control tokens: a
        # forged turn, or an image placeholder with no image. Text holding one is refused (docs/api.md).
        specials = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
        longest_first = sorted(specials, key=len, reverse=True)
        self.specials = re.compile("|".join(map(re.escape, longest_first))) if specials else None

    @classmethod
    def from_dir(cls, processor_dir: Path | str) -> ChatEncoder:
        return cls(
            AutoTokenizer.from_pretrained(processor_dir), Qwen2VLImageProcessorPil.from_pretrained(processor_dir)
        )

    def template(self, request: ChatRequest) -> str:
        messages = [{"role": m.role, "content": [_template_part(p) for p in m.parts]} for m in request.messages]
        # transformers types a message's content as str; Qwen2.5-VL's template takes the list of parts made here.
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[arg-type]
        return str(text)

    def vision_size(self, request: ChatRequest) -> dict[str, int]:
        """The checkpoint's own pixel bounds (processor/preprocessor_config.json); a request may only lower the
        upper one, which also keeps the serving budget on a checkpoint that allows more."""
        own = self.image_processor.size
        if request.max_pixels < own["shortest_edge"]:
            raise InvalidArgumentError("max_pixels", f"below this model's minimum of {own['shortest_edge']}")
        return {"shortest_edge": own["shortest_edge"], "longest_edge": min(own["longest_edge"], request.max_pixels)}

    def check_text(self, request: ChatRequest) -> None:
        """InvalidArgumentError naming the first text part that holds one of the tokenizer's special tokens."""
        for i, message in enumerate(request.messages):
            for j, part in enumerate(message.parts):
                found = self.specials.search(part.text) if self.specials and part.text else None
                if found:
                    raise InvalidArgumentError(
                        f"messages[{i}].content[{j}].text",
                        f"holds the special token {found.group()!r}; text may hold none of the model's special tokens",
                    )

    def encode(self, request: ChatRequest, limits: ChatLimits = DEFAULT_CHAT_LIMITS) -> ChatInputs:
        self.check_text(request)
        text = self.template(request)
        pixel_values = grid = None
        if request.images:
            # Images in the order they appear in the conversation.
            order = [p.image for m in request.messages for p in m.parts if p.image is not None]
            vision = self.image_processor(
                images=[request.images[i] for i in order], size=self.vision_size(request), return_tensors="pt"
            )
            pixel_values, grid = vision["pixel_values"], vision["image_grid_thw"]
            merge = self.image_processor.merge_size**2
            pieces = text.split(IMAGE_PAD)
            text = pieces[0] + "".join(
                IMAGE_PAD * (int(g.prod()) // merge) + piece for g, piece in zip(grid, pieces[1:], strict=True)
            )
        ids = self.tokenizer(text, return_tensors="pt")
        if ids["input_ids"].shape[1] > limits.max_prompt_tokens:
            length = ids["input_ids"].shape[1]
            raise InvalidArgumentError("messages", f"{length} prompt tokens, the limit is {limits.max_prompt_tokens}")
        return ChatInputs(ids["input_ids"], ids["attention_mask"], pixel_values, grid)


def _template_part(part: ChatPart) -> dict[str, str]:
    # A text part's text is never None once the request is validated (exactly one of text or image); "" keeps the
    # type a plain str for a caller that skipped validation, instead of the template printing "None".
    return {"type": "image"} if part.image is not None else {"type": "text", "text": part.text or ""}


class TextDeltas:
    """Token ids in, text pieces out. A piece is emitted once later tokens can no longer change it (no half
    UTF-8 character), decoding only a short window, so a long answer costs linear time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """What is still held back at the end (a trailing incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class StopStrings:
    """Holds back text that could be the start of a stop string; reports where the first stop string begins."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text now safe to send."""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._release(len(self.text))
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return piece
