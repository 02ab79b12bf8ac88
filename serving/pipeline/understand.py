"""Qwen2.5-VL answering questions about images, streamed piece by piece (transformers' own `generate`).

Used by the Triton `mllm` model, and in-process as the reference. One generation runs at a time per instance:
`generate` seeds and samples from torch's global generator, so concurrent runs would not be reproducible.
An answer waiting for its turn checks its cancellation while it waits, and stops waiting once cancelled.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from serving.model.checkpoint import load_mllm
from serving.pipeline.chat import ChatEncoder, StopStrings, TextDeltas
from serving.pipeline.chat_request import DEFAULT_CHAT_LIMITS, ChatLimits, ChatRequest


@dataclass(frozen=True)
class ChatResult:
    text: str
    token_ids: list[int]  # generated tokens, the end-of-sequence token included when one was produced
    prompt_tokens: int
    finish_reason: str  # "stop" (end of sequence), "length", "stop_string" or "cancelled"


class _TokenQueue(BaseStreamer):
    """`generate` calls put() with the prompt first, then with each new token."""

    def __init__(self, tokens: queue.Queue[Any]) -> None:
        self.tokens = tokens
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(int(token))

    def end(self) -> None:
        pass


class _Flag(StoppingCriteria):
    def __init__(self, stop: Callable[[], bool]) -> None:
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        # On the ids' device: generate combines the criteria with its own flags there (CUDA beside a GPU model).
        stop = torch.full((input_ids.shape[0],), self.stop(), dtype=torch.bool, device=input_ids.device)
        # transformers annotates the result as the legacy torch.BoolTensor class, which no factory returns; a bool
        # tensor is what it reads.
        return stop  # type: ignore[return-value]


_DONE = object()
TURN_POLL_S = 0.02  # how often an answer waiting for its turn looks at its stop (a local event: cheap)
# ... and asks whether its caller cancelled: in Triton's Python backend, a round trip to the server each time
# (15 answers waiting asked 750 times a second at every 20 ms).
TURN_CANCEL_POLL_S = 0.2


@contextlib.contextmanager
def _turn(lock: threading.Lock, stopped: Callable[[], bool], cancelled: Callable[[], bool]) -> Iterator[bool]:
    """Holds `lock` (True) unless `stopped()` or `cancelled()` turns true while waiting for it (False, the lock not
    taken): an answer waiting behind another has done no work, so once cancelled it need not wait for that one."""
    taken, ask_at = False, time.monotonic() + TURN_CANCEL_POLL_S
    while not taken and not stopped():
        if time.monotonic() >= ask_at:
            if cancelled():
                break
            ask_at = time.monotonic() + TURN_CANCEL_POLL_S
        taken = lock.acquire(timeout=TURN_POLL_S)
    try:
        yield taken
    finally:
        if taken:
            lock.release()


class Understander:
    def __init__(
        self, model: Qwen2_5_VLForConditionalGeneration, encoder: ChatEncoder, limits: ChatLimits = DEFAULT_CHAT_LIMITS
    ) -> None:
        self.model = model.eval()
        self.encoder = encoder
        self.limits = limits
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.lock = threading.Lock()

    @classmethod
    def from_dirs(
        cls, mllm_dir: Path, processor_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Understander:
        return cls(load_mllm(mllm_dir, dtype, device), ChatEncoder.from_dir(processor_dir))

    def generate_kwargs(self, request: ChatRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": request.max_new_tokens, "do_sample": not request.greedy}
        if request.greedy:
            kwargs |= {"temperature": None, "top_p": None, "top_k": None}
        else:
            kwargs |= {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k or None}
        return kwargs

    def stream(
        self,
        request: ChatRequest,
        cancelled: Callable[[], bool] = lambda: False,
        stopped: Callable[[], bool] = lambda: False,
    ) -> Iterator[str | ChatResult]:
        """Text pieces as the tokens arrive, then one ChatResult. Raises InvalidArgumentError for bad input.
        `cancelled` may be costly (asked once a token, and every TURN_CANCEL_POLL_S while waiting for the turn);
        `stopped`, cheap, is a stop already included in `cancelled`, looked at more often while waiting."""
        request.validate(self.limits)
        inputs = self.encoder.encode(request, self.limits)
        device = self.model.device
        tokens: queue.Queue[Any] = queue.Queue()
        halt = threading.Event()

        def stopping() -> bool:
            return halt.is_set() or stopped()

        def stop() -> bool:
            return stopping() or cancelled()

        def run() -> None:
            try:
                with _turn(self.lock, stopping, cancelled) as turn, torch.inference_mode():
                    if not turn or stop():  # cancelled before its turn or as it came: no tokens, no prefill
                        return
                    torch.manual_seed(request.seed)
                    self.model.generate(
                        **{k: v.to(device) for k, v in inputs.as_kwargs().items()},
                        streamer=_TokenQueue(tokens),
                        stopping_criteria=StoppingCriteriaList([_Flag(stop)]),
                        **self.generate_kwargs(request),
                    )
            except BaseException as exc:  # handed to the consumer, which re-raises it
                tokens.put(exc)
            finally:
                tokens.put(_DONE)

        worker = threading.Thread(target=run, name="mllm-generate", daemon=True)
        worker.start()
        deltas, stops, ids = TextDeltas(self.encoder.tokenizer), StopStrings(request.stop), []
        try:
            while (item := tokens.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                ids.append(item)
                piece = stops.feed(deltas.push(item))
                if piece:
                    yield piece
                if stops.stopped:
                    break
        finally:
            halt.set()
            worker.join()
        tail = stops.feed(deltas.flush()) if not stops.stopped else ""
        tail += stops.flush()
        if tail:
            yield tail
        if stops.stopped:
            reason = "stop_string"
        elif cancelled():
            reason = "cancelled"
        elif ids and ids[-1] in self.eos_ids:
            reason = "stop"
        else:
            reason = "length"
        yield ChatResult(stops.text, ids, int(inputs.input_ids.shape[1]), reason)
