"""Admission by cost (issue 19) on the real stack, with budgets scaled down so that limits trigger at megabytes."""

from __future__ import annotations

import io
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2
from omnigen2 import DeadlineExceededError, InvalidArgumentError, OmniGen2Client, Progress, ResourceExhaustedError
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc
from PIL import Image

from serving.build.repository import prepare_repository
from serving.frontend.process import FrontendProcess
from serving.triton.bls_settings import BlsSettings
from serving.triton.launcher import TritonServer
from tests.integration.triton_stream import GenerationStream

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
    before = _executions(triton, "mllm"), _executions(triton)
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError) as raised:
        OmniGen2Client(small_responses.address, timeout=60).generate("Too big", steps=1, seed=1, **options)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2
    assert [v.field for v in raised.value.violations] == [field]
    assert f"over the budget of {MiB} (--max-response-bytes)" in raised.value.violations[0].description
    assert (_executions(triton, "mllm"), _executions(triton)) == before  # nothing ran, not even the prompt


def test_sides_under_16_pixels_are_generated_and_resized(small_responses: FrontendProcess) -> None:
    result = OmniGen2Client(small_responses.address, timeout=60).generate("A dot", width=1, height=15, steps=1)
    assert result.images[0].size == (1, 15)


def test_triton_never_polls_the_repository(triton: TritonServer) -> None:
    mode = next(line for line in triton.log_path.read_text().splitlines() if "model_control_mode" in line)
    assert "MODE_POLL" not in mode and "MODE_EXPLICIT" in mode  # explicit: the watchdog reloads, nothing polls


# Budgets scaled down for the tests (text counts as its UTF-8 bytes + 64 template tokens, an image as its 16x16
# patches). The runner below: an edit of a 256x256 image, 3 CFG branches of about 580 tokens: 1476 a step.
BUDGETS = (
    "--max-request-input-pixels=90000",
    "--max-inflight-input-pixels=100000",
    "--max-sample-tokens=1200",
    "--max-step-tokens=2500",
    "--max-inflight-step-tokens=3000",
    "--max-request-tokens=400000",
)


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 90).save(buffer, format="PNG")
    return buffer.getvalue()


def _peak_rss_mb(process: FrontendProcess) -> float:
    assert process.process is not None
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[FrontendProcess]:
    log = tmp_path_factory.mktemp("budgeted") / "frontend.log"
    with FrontendProcess(triton.grpc_url, log, *BUDGETS) as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield frontend


@pytest.mark.parametrize(
    ("images", "options", "field", "flag"),
    [
        ([_png(320, 320)] * 2, {"width": 64, "height": 64}, "input_images", "max-request-input-pixels"),
        ([], {"width": 1024, "height": 1024, "steps": 1}, "width", "max-sample-tokens"),
        ([], {"width": 256, "height": 256, "num_images_per_prompt": 4}, "num_images_per_prompt", "max-step-tokens"),
        ([], {"width": 512, "height": 512, "steps": 200}, "steps", "max-request-tokens"),
        ([], {"prompt": "many words " * 200, "width": 256, "height": 256, "steps": 1}, "prompt", "max-sample-tokens"),
    ],
)
def test_a_request_over_a_budget_is_refused_naming_the_field_and_the_budget(
    budgeted: FrontendProcess,
    triton: TritonServer,
    images: list[bytes],
    options: dict[str, object],
    field: str,
    flag: str,
) -> None:
    before = _executions(triton, "vae_encoder"), _executions(triton)
    with pytest.raises(InvalidArgumentError) as raised:
        prompt = str(options.pop("prompt", "Too much"))  # text counts as its UTF-8 bytes + 64, at most 1024
        OmniGen2Client(budgeted.address, timeout=60).compose(images, prompt, seed=1, **options)  # type: ignore[arg-type]
    assert [v.field for v in raised.value.violations] == [field]
    assert f"(--{flag})" in raised.value.violations[0].description
    assert (_executions(triton, "vae_encoder"), _executions(triton)) == before  # nothing ran, nothing decoded


def test_admitted_work_is_bounded_by_cost_not_only_by_count(budgeted: FrontendProcess, triton: TritonServer) -> None:
    client = OmniGen2Client(budgeted.address, timeout=60, retries=0)
    runner = client.stream("Busy", [_png(256, 256)], steps=200, seed=1)  # 65 536 pixels, 1476 tokens a step
    assert isinstance(next(runner), Progress)
    for images, options, budget in [
        ([_png(256, 256)], {}, "decoded input pixels"),  # 131 072 pixels in flight: over 100 000
        ([], {"width": 512, "height": 512}, "transformer tokens per step"),  # 1476 + 2180: over 3000
    ]:
        with pytest.raises(ResourceExhaustedError) as raised:
            client.compose(images, "One more", steps=2, seed=1, **options)  # type: ignore[arg-type]
        assert budget in str(raised.value) and raised.value.retry_after == 1.0
    assert client.generate("Small", width=64, height=64, steps=1, text_guidance_scale=1.0).images  # 84 tokens fit
    runner.close()
    time.sleep(0.5)  # the cancelled runner gives its reservation back
    assert client.compose([_png(256, 256)], "Room again", steps=1, seed=1).images


def test_model_info_reports_the_budgets(budgeted: FrontendProcess) -> None:
    budgets = OmniGen2Client(budgeted.address, timeout=10).info().budgets
    assert (budgets.max_request_input_pixels, budgets.max_sample_tokens, budgets.max_inflight_step_tokens) == (
        90000,
        1200,
        3000,
    )
    assert budgets.max_output_bytes == 512 * MiB and budgets.max_run_seconds == 600


def test_the_front_end_reads_image_headers_and_never_decodes(api: FrontendProcess) -> None:
    """A 16-bit grey 4000x4000 PNG is 60 KB on the wire and 16 M pixels; the front end used to decode it (to
    check it) before the BLS decoded it again, and its peak memory grew by the decoded size."""
    grey = _png(4000, 4000, "I;16")
    before = _peak_rss_mb(api)
    result = OmniGen2Client(api.address, timeout=120).compose([grey], "Grey", width=64, height=64, steps=1, seed=1)
    assert result.images[0].size == (64, 64)
    assert _peak_rss_mb(api) - before < 40


def test_runaway_requests_end_at_the_maximum_run_time(tmp_path: Path, triton: TritonServer) -> None:
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", "--max-run-s=1") as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            OmniGen2Client(frontend.address, timeout=60).generate("Runaway", width=256, height=256, steps=200, seed=1)
        assert time.monotonic() - started < 5
        time.sleep(0.5)
        settled = _executions(triton)
        time.sleep(1.0)
        assert _executions(triton) == settled, "the runaway generation kept running"


def _in_flight(frontend: FrontendProcess) -> float:
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{frontend.metrics_port}/metrics", timeout=5).read().decode()
    return float(
        next(line for line in metrics.splitlines() if line.startswith("omnigen2_in_flight_requests ")).split()[1]
    )


def test_a_stream_nobody_reads_is_cancelled_and_gives_its_slot_back(tmp_path: Path, triton: TritonServer) -> None:
    """Previews nobody reads: the writes stall once the flow-control window is full; the slot used to stay taken
    (and Triton to buffer the output) for as long as the caller kept the stream open."""
    flags = ("--max-in-flight=1", "--stream-write-timeout-s=1")
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", *flags) as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        stub = pb_grpc.OmniGen2Stub(grpc.insecure_channel(frontend.address))
        request = pb.GenerateRequest(prompt="Never read", width=256, height=256, steps=200, seed=1, previews=True)
        unread = stub.GenerateStream(request, timeout=120)
        while _in_flight(frontend) < 1:
            time.sleep(0.05)
        client = OmniGen2Client(frontend.address, timeout=60, retries=0)
        started = time.monotonic()
        while True:
            try:
                assert client.generate("Next", width=64, height=64, steps=1).images
                break
            except ResourceExhaustedError:
                assert time.monotonic() - started < 20, "the unread stream kept its slot"
                time.sleep(0.25)
        with pytest.raises(grpc.RpcError) as raised:
            list(unread)
        assert raised.value.code() == grpc.StatusCode.CANCELLED
        assert "read nothing" in (raised.value.details() or "")


@pytest.fixture(scope="module")
def tiled_triton(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_onnx: Path
) -> Iterator[TritonServer]:
    """A stack whose VAE decoder takes tiles of 4 latent cells (32 px), so that a 64x64 output is tiled."""
    work = tmp_path_factory.mktemp("tiled")
    settings = BlsSettings(vae_tile=4, vae_tile_overlap=2)
    repository = prepare_repository(
        tiny_checkpoint, work / "model_repository", onnx_cache=tiny_onnx.parent, bls=settings
    )
    with TritonServer(repository, build_dir=work) as server:
        yield server


def test_outputs_larger_than_a_tile_are_vae_decoded_in_tiles(tiled_triton: TritonServer, triton: TritonServer) -> None:
    params = {"prompt": "A cat", "width": 64, "height": 64, "steps": 2, "seed": 1, "text_guidance_scale": 1.0}
    whole = GenerationStream(triton.grpc_url, params).wait()
    before = _executions(tiled_triton, "vae_decoder")
    tiled = GenerationStream(tiled_triton.grpc_url, params).wait()
    assert _executions(tiled_triton, "vae_decoder") - before == 9  # 8x8 cells in tiles of 4 overlapping by 2: 3x3
    assert whole.images is not None and tiled.images is not None and tiled.images.shape == whole.images.shape
    np.testing.assert_array_equal(tiled.latents, whole.latents)  # the same generation, decoded another way
    # No bound on the pixels: the tiny VAE's mid-block attends over the whole image, so 32-px tiles differ from one
    # whole decode (22.8 levels on average); tests/test_tiling.py holds the tiling itself to the untiled result.


def test_idle_memory_comes_back_after_a_burst(tmp_path: Path, model_repository: Path) -> None:
    """A fresh server (its baseline is its start-up): each stub used to keep its peak, the ONNX Runtime arena and
    the freed heap alike (4 x two 512x512 images left the stack 2.3 GB above its start-up, 144 MB now)."""
    burst = {"prompt": "A burst", "width": 384, "height": 384, "steps": 2, "seed": 1, "num_images_per_prompt": 2}
    with TritonServer(model_repository, build_dir=tmp_path) as server:
        assert server.process is not None
        assert GenerationStream(server.grpc_url, {**burst, "width": 64, "height": 64}).wait().error is None
        time.sleep(2)
        baseline = _tree_rss_mb(server.process.pid)
        streams = [GenerationStream(server.grpc_url, burst) for _ in range(4)]
        assert all(stream.wait().error is None for stream in streams)
        time.sleep(3)  # the stubs trim a second after their last call
        grown = _tree_rss_mb(server.process.pid) - baseline
        assert grown < 200, f"the idle stack kept {grown:.0f} MB after the burst"


def _tree_rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20
