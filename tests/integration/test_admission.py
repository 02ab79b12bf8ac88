"""Admission by cost (issue 19) on the real stack, with budgets scaled down so that limits trigger at megabytes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2
from omnigen2 import InvalidArgumentError, OmniGen2Client

from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer

MiB = 1024 * 1024


def _executions(triton: TritonServer, model: str = "transformer") -> int:
    stats = triton_grpc.InferenceServerClient(triton.grpc_url).get_inference_statistics(model)
    return int(stats.model_stats[0].execution_count)


@pytest.fixture(scope="module")
def small_responses(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[FrontendProcess]:
    log = tmp_path_factory.mktemp("small-responses") / "frontend.log"
    with FrontendProcess(triton.grpc_url, log, f"--max-response-bytes={MiB}") as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield frontend


def test_images_leave_the_bls_as_uint8_so_outputs_near_the_limit_fit(small_responses: FrontendProcess) -> None:
    """Two 256x256 images: 393 KB as uint8, 1.5 MB as the float32 the BLS used to send (over the 1 MiB limit)."""
    result = OmniGen2Client(small_responses.address, timeout=60).generate(
        "Two cats", width=256, height=256, steps=1, num_images_per_prompt=2, seed=1
    )
    assert [image.size for image in result.images] == [(256, 256), (256, 256)]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"width": 1024, "height": 1024}, "width"),  # one image of 3 MiB
        ({"width": 512, "height": 512, "num_images_per_prompt": 8}, "num_images_per_prompt"),  # 8 x 768 KiB
        ({"width": 512, "height": 512, "return_latents": True}, "width"),  # 768 KiB fit, not with 256 KiB latents
    ],
)
def test_output_over_the_message_limit_is_refused_before_it_runs(
    small_responses: FrontendProcess, triton: TritonServer, options: dict[str, object], field: str
) -> None:
    before = _executions(triton, "text_encoder"), _executions(triton)
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError) as raised:
        OmniGen2Client(small_responses.address, timeout=60).generate("Too big", steps=1, seed=1, **options)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2
    assert [v.field for v in raised.value.violations] == [field]
    assert f"{MiB}-byte response budget" in raised.value.violations[0].description
    assert (_executions(triton, "text_encoder"), _executions(triton)) == before  # nothing ran


def test_sides_under_16_pixels_are_generated_and_resized(small_responses: FrontendProcess) -> None:
    result = OmniGen2Client(small_responses.address, timeout=60).generate("A dot", width=1, height=15, steps=1)
    assert result.images[0].size == (1, 15)


def test_triton_never_polls_the_repository(triton: TritonServer) -> None:
    mode = next(line for line in triton.log_path.read_text().splitlines() if "model_control_mode" in line)
    assert "MODE_NONE" in mode
