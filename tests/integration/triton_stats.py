"""What Triton's own statistics say a model has run so far: the integration tests' proof that a call reached a model,
or was refused before it did."""

from __future__ import annotations

from typing import NamedTuple

import tritonclient.grpc as triton_grpc

from serving.triton.launcher import TritonServer


class ModelCounts(NamedTuple):
    executions: int  # the model's calls: one batch each
    inferences: int  # the samples in them: Triton counts each batch element as an inference


def model_counts(triton: TritonServer, model: str) -> ModelCounts:
    stats = triton_grpc.InferenceServerClient(triton.grpc_url).get_inference_statistics(model).model_stats[0]
    return ModelCounts(int(stats.execution_count), int(stats.inference_count))


def executions(triton: TritonServer, model: str) -> int:
    return model_counts(triton, model).executions
