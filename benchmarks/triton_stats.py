"""What Triton's own statistics say each model has run: its calls, the samples in them, and the nanoseconds its
requests spent queued, gathering inputs, computing and returning outputs. Cumulative since the server started, so a
measurement takes the difference of two readings (`minus`)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import tritonclient.grpc as triton_grpc


@dataclass(frozen=True)
class ModelStatistics:
    executions: int  # the model's calls: one batch each
    inferences: int  # the samples in them: Triton counts each batch element as an inference
    successes: int  # requests answered
    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int

    def minus(self, before: ModelStatistics | None) -> ModelStatistics:
        """What happened since `before` (None: since the start)."""
        return self if before is None else self._combined(before, -1)

    def plus(self, other: ModelStatistics) -> ModelStatistics:
        return self._combined(other, 1)

    def _combined(self, other: ModelStatistics, sign: int) -> ModelStatistics:
        fields = dataclasses.fields(ModelStatistics)
        return ModelStatistics(*(getattr(self, f.name) + sign * getattr(other, f.name) for f in fields))


def model_statistics(url: str, model: str = "") -> dict[str, ModelStatistics]:
    """model name -> its statistics (its versions summed), for `model` or, by default, every model the server has;
    `url` is Triton's gRPC address (host:port)."""
    with contextlib.closing(triton_grpc.InferenceServerClient(url)) as client:
        reply = client.get_inference_statistics(model)
    found: dict[str, ModelStatistics] = {}
    for stats in reply.model_stats:
        inference = stats.inference_stats
        read = ModelStatistics(
            int(stats.execution_count),
            int(stats.inference_count),
            int(inference.success.count),
            int(inference.queue.ns),
            int(inference.compute_input.ns),
            int(inference.compute_infer.ns),
            int(inference.compute_output.ns),
        )
        earlier = found.get(stats.name)
        found[stats.name] = read if earlier is None else earlier.plus(read)
    return found
