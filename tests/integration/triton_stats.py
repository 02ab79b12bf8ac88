"""What Triton's own statistics say a model has run so far: the integration tests' proof that a call reached a model,
or was refused before it did."""

from __future__ import annotations

from typing import NamedTuple

from benchmarks.triton_stats import model_statistics
from serving.triton.launcher import TritonServer


class ModelCounts(NamedTuple):
    executions: int  # the model's calls: one batch each
    inferences: int  # the samples in them: Triton counts each batch element as an inference


def model_counts(triton: TritonServer, model: str) -> ModelCounts:
    stats = model_statistics(triton.grpc_url, model)[model]
    return ModelCounts(stats.executions, stats.inferences)


def executions(triton: TritonServer, model: str) -> int:
    return model_counts(triton, model).executions
