"""The `mllm` Triton model: Qwen2.5-VL answers about images, streamed (decoupled Python backend).

Wire format:
  inputs   request  BYTES [1]   JSON: {"messages": [{"role", "content": [{"text": ...} | {"image": i}]}],
                                "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "max_pixels"}
           images   BYTES [-1]  optional: encoded images, referenced by index from the messages
  outputs  event    BYTES [1]   JSON: {"type": "delta", "text"} per piece of text, then {"type": "done", "text",
                                "token_ids", "prompt_tokens", "completion_tokens", "finish_reason"}
Errors end the stream as in the `omnigen2` model ("CODE: [field: ]detail", serving/triton/wire.py).

Each request is served on a thread of its own (the response sender is thread-safe), so execute() returns at
once and a cancelled or finished request never waits for another's.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from serving.pipeline.chat import DEFAULT_CHAT_LIMITS, ChatRequest, chat_request_from_params
from serving.pipeline.images import decode_image
from serving.pipeline.understand import ChatResult, Understander
from serving.triton.cpu_lane import CpuLane
from serving.triton.model_config import model_config, parameters
from serving.triton.responses import CancelledByCallerError, encoded_images, error_response, event, request_json


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        on_gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        device = f"cuda:{args.get('model_instance_device_id', '0')}" if on_gpu else "cpu"
        dtype = torch.bfloat16 if on_gpu else torch.float32
        self.understander = Understander.from_dirs(version_dir / "mllm", version_dir / "processor", device, dtype)
        params = parameters(model_config(args))
        lane = CpuLane.for_model(Path(args["model_repository"]), params)
        lane.around_forward(self.understander.model)  # each token takes its turn with the image components
        self.limits = DEFAULT_CHAT_LIMITS
        self.workers: set[threading.Thread] = set()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            worker = threading.Thread(target=self._serve, args=(request,), name="mllm-request", daemon=True)
            self.workers.add(worker)
            worker.start()
        return None

    def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            result: ChatResult | None = None
            for item in self.understander.stream(self._parse(request), request.is_cancelled):
                if isinstance(item, str):
                    sender.send(pb_utils.InferenceResponse(output_tensors=[event({"type": "delta", "text": item})]))
                else:
                    result = item
            if result is None or result.finish_reason == "cancelled":
                raise CancelledByCallerError
            response = pb_utils.InferenceResponse(output_tensors=[event(_done(result))])
        except Exception as exc:  # the caller gets the status and the reason; the model keeps serving
            response = error_response(exc)
        finally:
            self.workers.discard(threading.current_thread())
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _parse(self, request: Any) -> ChatRequest:
        params = request_json(request)
        images = [
            decode_image(blob, f"images[{i}]", self.limits.max_input_image_pixels, self.limits.max_input_image_bytes)
            for i, blob in enumerate(encoded_images(request, self.limits.max_images))
        ]
        return chat_request_from_params(params, images)

    def finalize(self) -> None:
        for worker in list(self.workers):
            worker.join(timeout=30)


def _done(result: ChatResult) -> dict[str, Any]:
    return {
        "type": "done",
        "text": result.text,
        "token_ids": result.token_ids,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason,
    }
