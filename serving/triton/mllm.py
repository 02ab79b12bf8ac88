"""The `mllm` Triton model: Qwen2.5-VL answers about images, streamed (decoupled Python backend).

The one Qwen2.5-VL of a served stack: it answers `Understand` requests and encodes the `omnigen2` BLS's prompts
(the `text_encoder` graph of docs/tensor_contract.md, run on the same weights), so the language model is loaded
once, not twice.

Wire format, understanding:
  inputs   request  BYTES [1]   JSON: {"messages": [{"role", "content": [{"text": ...} | {"image": i}]}],
                                "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "max_pixels"}
           images   BYTES [-1]  optional: encoded images, referenced by index from the messages
  outputs  event    BYTES [1]   JSON: {"type": "delta", "text"} per piece of text, then {"type": "done", "text",
                                "token_ids", "prompt_tokens", "completion_tokens", "finish_reason"}
Wire format, prompt encoding (no `request`):
  inputs   input_ids, attention_mask  INT64 [batch, text_len]
  outputs  text_feats  FP32 [batch, text_len, hidden]  in one final response
Errors end the stream as in the `omnigen2` model ("CODE: [field: ]detail", serving/triton/wire.py) and are
logged with the request id as there.

Each request is served on a thread of its own (the response sender is thread-safe), so execute() returns at
once and a cancelled or finished request never waits for another's.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from serving.model.graphs import TextEncoderGraph
from serving.pipeline.chat_request import DEFAULT_CHAT_LIMITS, ChatRequest, chat_request_from_params, image_parts
from serving.pipeline.images import decode_image
from serving.pipeline.understand import ChatResult, Understander
from serving.runtime.torch_backend import run_graph
from serving.triton.cpu_lane import CpuLane
from serving.triton.log import route_to_triton
from serving.triton.memory import use_stub_mmap_threshold
from serving.triton.model_config import model_config, parameters
from serving.triton.model_names import MLLM_MODEL
from serving.triton.responses import CancelledByCallerError, encoded_images, error_response, event, request_json
from serving.triton.stops import Running, Stops
from serving.triton.tensors import from_triton, instance_placement, to_triton

# Each request has a thread of its own; decoding (hundreds of MB for a large image) is bounded across them.
DECODING = threading.BoundedSemaphore(2)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        route_to_triton()
        use_stub_mmap_threshold()
        version_dir = Path(args["model_repository"]) / args["model_version"]
        params = parameters(model_config(args))
        device, dtype = instance_placement(args, params["precision"])
        self.understander = Understander.from_dirs(version_dir / "mllm", version_dir / "processor", device, dtype)
        self.text_encoder = TextEncoderGraph(self.understander.model).eval()
        self.lane = CpuLane.for_model(Path(args["model_repository"]), params)
        self.lane.around_forward(self.understander.model)  # each token takes its turn with the image components
        self.limits = DEFAULT_CHAT_LIMITS
        self.workers: set[threading.Thread] = set()
        self.stops = Stops(MLLM_MODEL)

    def execute(self, requests: list[Any]) -> None:
        # Stop requests are served and answers registered here, in Triton's order: a stop request then always
        # finds the answer it names. Served on their workers, a stop could run before its answer's worker had
        # registered it, and be lost (the answer ran on, its caller's place held to the end of the stop grace).
        for request in requests:
            work: Callable[[], None]
            sender: Any = None  # got once, by whoever sends the final response
            running: Running | None = None
            if pb_utils.get_input_tensor_by_name(request, "input_ids") is not None:
                work = functools.partial(self._encode, request)
            elif self.stops.answer(request):  # the front end asks another request of this stream to stop
                continue
            else:
                sender, running = request.get_response_sender(), self.stops.running(request)
                work = functools.partial(self._serve, sender, running)
            worker = threading.Thread(target=work, name="mllm-request", daemon=True)
            self.workers.add(worker)
            try:
                worker.start()
            except Exception as exc:  # no thread to be had (RuntimeError): the request ends now, not never
                self.workers.discard(worker)
                if running is not None:
                    with running:  # left at once: unregistered and uncounted before its final response, as in _serve
                        pass
                sender = sender or request.get_response_sender()
                sender.send(error_response(exc, request), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _serve(self, sender: Any, running: Running) -> None:
        with running as request:  # its work ends before its final response is sent
            try:
                result: ChatResult | None = None
                for item in self.understander.stream(self._parse(request), request.is_cancelled, request.is_stopped):
                    if isinstance(item, str):
                        delta = event({"type": "delta", "text": item})
                        sender.send(pb_utils.InferenceResponse(output_tensors=[delta]))
                    else:
                        result = item
                if result is None or result.finish_reason == "cancelled":
                    raise CancelledByCallerError
                response = pb_utils.InferenceResponse(output_tensors=[event(_done(result))])
            except Exception as exc:  # the caller gets the status and the reason; the model keeps serving
                response = error_response(exc, request)
            finally:
                self.workers.discard(threading.current_thread())
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _encode(self, request: Any) -> None:
        """Prompt features for the BLS: the language model's last hidden states, float32 on the CPU side."""
        sender = request.get_response_sender()
        try:
            ids, mask = (
                from_triton(pb_utils.get_input_tensor_by_name(request, n)) for n in ("input_ids", "attention_mask")
            )
            with self.lane:
                feats = run_graph(self.text_encoder, input_ids=ids, attention_mask=mask)
            response = pb_utils.InferenceResponse(output_tensors=[to_triton("text_feats", feats)])
        except Exception as exc:  # the BLS gets the reason; the model keeps serving
            response = error_response(exc, request)
        finally:
            self.workers.discard(threading.current_thread())
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _parse(self, request: Any) -> ChatRequest:
        params = request_json(request)
        blobs = encoded_images(request, self.limits.max_images)
        with DECODING:
            if request.is_cancelled():  # the caller may have left while this request waited to decode
                raise CancelledByCallerError
            fields = image_parts(params.get("messages"))
            images = [
                decode_image(
                    blob,
                    fields.get(i, f"images[{i}]"),
                    self.limits.max_input_image_pixels,
                    self.limits.max_input_image_bytes,
                )
                for i, blob in enumerate(blobs)
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
