"""Admission by cost (issue 19) on the real stack, with budgets scaled down so that limits trigger at megabytes."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2
from omnigen2 import DeadlineExceededError, InvalidArgumentError, OmniGen2Client, Progress, ResourceExhaustedError
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc
from PIL import Image

from benchmarks.proc_memory import proc_status_kib, reset_peak
from serving.artifacts.repository import prepare_repository
from serving.frontend.process import FrontendProcess
from serving.triton.bls_settings import BlsSettings
from serving.triton.launcher import MMAP_THRESHOLD, MMAP_THRESHOLD_ENV, TritonServer
from serving.triton.memory import STUB_MMAP_THRESHOLD_ENV
from serving.triton.watchdog import stub_processes
from serving.triton.wire import WireError
from tests.integration.triton_stats import assert_generation_stopped, executions, requests_running
from tests.integration.triton_stream import GenerationStream
from tests.tiff_bombs import TILE_BOMB, tiff

MiB = 1024 * 1024


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
    before = executions(triton, "mllm"), executions(triton, "transformer")
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError) as raised:
        OmniGen2Client(small_responses.address, timeout=60).generate("Too big", steps=1, seed=1, **options)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2
    assert [v.field for v in raised.value.violations] == [field]
    assert f"over the budget of {MiB} (--max-response-bytes)" in raised.value.violations[0].description
    assert (executions(triton, "mllm"), executions(triton, "transformer")) == before  # nothing ran, not even the prompt


def test_sides_under_16_pixels_are_generated_and_resized(small_responses: FrontendProcess) -> None:
    result = OmniGen2Client(small_responses.address, timeout=60).generate("A dot", width=1, height=15, steps=1)
    assert result.images[0].size == (1, 15)


def test_triton_never_polls_the_repository(triton: TritonServer) -> None:
    mode = next(line for line in triton.log_path.read_text().splitlines() if "model_control_mode" in line)
    assert "MODE_POLL" not in mode and "MODE_EXPLICIT" in mode  # explicit: the watchdog reloads, nothing polls


def test_triton_loads_the_configs_as_generated(triton: TritonServer) -> None:
    """No auto-complete: it started an extra Python stub per model (importing its module) before the real one."""
    strict = next(line for line in triton.log_path.read_text().splitlines() if "strict_model_config" in line)
    assert strict.split("|")[2].strip() == "1"


# Budgets scaled down for the tests (text counts as its UTF-8 bytes + 64 template tokens, an image as its 16x16
# patches). The runner below: an edit of a 256x256 image, 3 CFG branches of about 580 tokens: 1476 a step.
BUDGETS = (
    "--max-request-input-pixels=90000",
    "--max-inflight-input-pixels=100000",
    "--max-sample-tokens=1200",
    "--max-step-tokens=2500",
    "--max-inflight-step-tokens=3000",
    "--max-request-tokens=400000",
    # Output pixels: the runner's 256x256 and a 1024x1024 (1 048 576) fit alone, not together.
    "--max-inflight-output-pixels=1100000",
    # Understand: "Talk for a long time" with 240 new tokens is 20 + 8 + 32 + 240 = 300.
    "--max-chat-tokens=300",
    "--max-inflight-chat-tokens=400",
)


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 90).save(buffer, format="PNG")
    return buffer.getvalue()


def _peak_rss_mb(process: FrontendProcess) -> float:
    assert process.process is not None
    return proc_status_kib(process.process.pid, "VmHWM") / 1024


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
        # Generated at 256x256 (256 tokens), delivered at 1088x1024: 1 114 112 output pixels.
        ([], {"width": 1088, "height": 1024, "max_pixels": 65536, "steps": 1}, "width", "max-inflight-output-pixels"),
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
    before = executions(triton, "vae_encoder"), executions(triton, "transformer")
    with pytest.raises(InvalidArgumentError) as raised:
        prompt = str(options.pop("prompt", "Too much"))  # text counts as its UTF-8 bytes + 64, at most 1024
        OmniGen2Client(budgeted.address, timeout=60).compose(images, prompt, seed=1, **options)  # type: ignore[arg-type]
    assert [v.field for v in raised.value.violations] == [field]
    assert f"(--{flag})" in raised.value.violations[0].description
    after = executions(triton, "vae_encoder"), executions(triton, "transformer")
    assert after == before  # nothing ran, nothing decoded


def test_admitted_work_is_bounded_by_cost_not_only_by_count(budgeted: FrontendProcess, triton: TritonServer) -> None:
    client = OmniGen2Client(budgeted.address, timeout=60, retries=0)
    runner = client.stream("Busy", [_png(256, 256)], steps=200, seed=1)  # 65 536 pixels, 1476 tokens a step
    assert isinstance(next(runner), Progress)
    for images, options, budget in [
        ([_png(256, 256)], {}, "decoded input pixels"),  # 131 072 pixels in flight: over 100 000
        ([], {"width": 512, "height": 512}, "transformer tokens per step"),  # 1476 + 2180: over 3000
        # 648 tokens a step, but 65 536 + 1 048 576 output pixels: over 1 100 000
        ([], {"width": 1024, "height": 1024, "max_pixels": 65536}, "output pixels"),
    ]:
        with pytest.raises(ResourceExhaustedError) as raised:
            client.compose(images, "One more", steps=2, seed=1, **options)  # type: ignore[arg-type]
        assert budget in str(raised.value) and raised.value.retry_after == 1.0
    assert client.generate("Small", width=64, height=64, steps=1, text_guidance_scale=1.0).images  # 84 tokens fit
    runner.close()
    # The cancelled runner gives its reservation back once its handler has ended: milliseconds on a quiet machine,
    # longer on a loaded one, so the check waits for it (a reservation never given back fails at the deadline).
    deadline = time.monotonic() + 10
    while True:
        try:
            assert client.compose([_png(256, 256)], "Room again", steps=1, seed=1).images
            break
        except ResourceExhaustedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_model_info_reports_the_budgets(budgeted: FrontendProcess) -> None:
    budgets = OmniGen2Client(budgeted.address, timeout=10).info().budgets
    assert (budgets.max_request_input_pixels, budgets.max_sample_tokens, budgets.max_inflight_step_tokens) == (
        90000,
        1200,
        3000,
    )
    assert budgets.max_output_bytes == 512 * MiB and budgets.max_run_seconds == 600
    assert (budgets.max_chat_tokens, budgets.max_inflight_chat_tokens) == (300, 400)
    assert budgets.max_buffered_stream_bytes == 64 * MiB and budgets.stop_grace_seconds == 10
    assert budgets.max_inflight_output_pixels == 1_100_000


@pytest.mark.parametrize(
    ("prompt", "max_new_tokens", "field"),
    [
        ("Describe", 290, "max_new_tokens"),  # 8 + 8 + 32 of prompt, 290 new: 338
        ("word " * 100, 8, "messages"),  # 500 + 8 + 32 of prompt, 8 new: 548
    ],
)
def test_an_answer_over_the_token_budget_is_refused_naming_the_field(
    budgeted: FrontendProcess, triton: TritonServer, prompt: str, max_new_tokens: int, field: str
) -> None:
    """Understand used to be costed by its pixels only: an answer's tokens (prompt, images, new) were unbounded."""
    before = executions(triton, "mllm")
    with pytest.raises(InvalidArgumentError) as raised:
        OmniGen2Client(budgeted.address, timeout=60).understand(prompt, max_new_tokens=max_new_tokens)
    assert [v.field for v in raised.value.violations] == [field]
    assert "answer tokens" in raised.value.violations[0].description
    assert "over the budget of 300 (--max-chat-tokens)" in raised.value.violations[0].description
    assert executions(triton, "mllm") == before  # the model saw nothing


def test_an_answer_over_the_pixel_budget_is_refused_before_decoding(
    budgeted: FrontendProcess, triton: TritonServer
) -> None:
    """The issue's four Understand calls with 6324x6324 PNGs took the `mllm` stub to 6.8 GB; here a 400x400 image
    passes a 90 000-pixel budget, read from its header (its 276 tokens fit the token budget)."""
    before = executions(triton, "mllm")
    with pytest.raises(InvalidArgumentError) as raised:
        OmniGen2Client(budgeted.address, timeout=60).understand("Compare", [_png(400, 400)], max_new_tokens=2)
    assert [v.field for v in raised.value.violations] == ["messages"]
    assert "(--max-request-input-pixels)" in raised.value.violations[0].description
    assert executions(triton, "mllm") == before


def test_answers_in_flight_are_bounded_by_their_tokens(budgeted: FrontendProcess, triton: TritonServer) -> None:
    client = OmniGen2Client(budgeted.address, timeout=60, retries=0)
    talk = client.understand_stream("Talk for a long time", max_new_tokens=240)  # 300 tokens; about 4 s here
    next(talk)
    with pytest.raises(ResourceExhaustedError) as raised:
        client.understand("Another", max_new_tokens=200)  # 247 more: over 400
    assert "answer tokens in flight" in str(raised.value) and raised.value.retry_after == 1.0
    talk.close()
    deadline = time.monotonic() + 10
    while _frontend_metric(budgeted, "omnigen2_admitted_chat_tokens") > 0:
        assert time.monotonic() < deadline, "the cancelled answer kept its tokens"
        time.sleep(0.05)
    assert requests_running(triton, "mllm") == 0  # the tokens came back once the model had stopped
    assert client.understand("Another", max_new_tokens=200).completion_tokens >= 1


def test_the_front_end_reads_image_headers_and_never_decodes(api: FrontendProcess) -> None:
    """A 16-bit grey 4000x4000 PNG is 60 KB on the wire and 16 M pixels; the front end used to decode it (to
    check it) before the BLS decoded it again, and its peak memory grew by the decoded size."""
    grey = _png(4000, 4000, "I;16")
    before = _peak_rss_mb(api)
    result = OmniGen2Client(api.address, timeout=120).compose([grey], "Grey", width=64, height=64, steps=1, seed=1)
    assert result.images[0].size == (64, 64)
    assert _peak_rss_mb(api) - before < 40


def test_a_tiff_whose_tile_outgrows_its_image_costs_no_model_memory(api: FrontendProcess, triton: TritonServer) -> None:
    """The attack's 16x16 TIFF declaring 8192x8192 tiles: the decoder allocated the 192 MiB tile (and failed), and
    the model kept it after answering (its idle memory grew by about that much a request). Now the front end
    refuses it from its header, and a request sent to a model directly is refused by the model's same check."""
    with pytest.raises(InvalidArgumentError) as raised:
        OmniGen2Client(api.address, timeout=60, retries=0).compose([TILE_BOMB], "Grey", width=64, height=64, steps=1)
    assert [v.field for v in raised.value.violations] == ["input_images[0].data"]
    assert "TIFF tiles of 8192x8192 pixels" in raised.value.violations[0].description
    assert triton.process is not None
    stubs = stub_processes(triton.process.pid)
    calls: list[tuple[str, dict[str, Any], str]] = [
        ("omnigen2", {"prompt": "Grey", "width": 64, "height": 64, "steps": 1}, "images[0]"),
        ("mllm", {"messages": [{"role": "user", "content": [{"image": 0}]}]}, "messages[0].content[0].image"),
    ]
    for model, params, field in calls:
        for pid in stubs[model]:
            reset_peak(pid)
        before = {pid: proc_status_kib(pid, "VmRSS") for pid in stubs[model]}
        for _ in range(3):
            out = GenerationStream(triton.grpc_url, params, [TILE_BOMB], model=model).wait()
            assert out.error is not None and "TIFF tiles of 8192x8192 pixels" in out.error.message()
            assert WireError.parse(out.error.message()).field == field
        grown = max((proc_status_kib(pid, "VmHWM") - kib) / 1024 for pid, kib in before.items())
        assert grown < 64, f"{model}: its peak grew {grown:.0f} MiB"


def test_images_that_fail_to_decode_leave_no_memory_in_the_model(triton: TritonServer) -> None:
    """Five 4096x4096 TIFFs a request, each one tile (within the bound) of corrupt data: the error of each failed
    decode chained Pillow's, whose traceback held the decoded image and the decoder in the BLS's futures, and the
    idle stub kept 64 MiB more after each such request (275 MiB after 4)."""
    broken = tiff(4096, 4096, tile=(4096, 4096), block=b"not deflate")
    params = {"prompt": "Grey", "width": 64, "height": 64, "steps": 1}
    assert triton.process is not None
    pids = stub_processes(triton.process.pid)["omnigen2"]
    baseline = {pid: _anon_mb(pid) for pid in pids}
    for _ in range(3):
        out = GenerationStream(triton.grpc_url, params, [broken] * 5).wait()
        assert out.error is not None and "its compressed pixel data is corrupt" in out.error.message()
    grown = _grown_at_idle(lambda: {str(pid): _anon_mb(pid) - baseline[pid] for pid in pids}, 32)
    assert all(mb < 32 for mb in grown.values()), f"the idle BLS kept (MB): {grown}"


def test_runaway_requests_end_at_the_maximum_run_time(tmp_path: Path, triton: TritonServer) -> None:
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", "--max-run-s=1") as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        before = executions(triton, "transformer")
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            OmniGen2Client(frontend.address, timeout=60).generate("Runaway", width=256, height=256, steps=200, seed=1)
        assert time.monotonic() - started < 5
        assert_generation_stopped(triton, before, 200)


def _fixed_window_channel(address: str) -> grpc.Channel:
    """Without bandwidth probing the caller's receive window stays at 64 KiB, so writes to a caller that reads
    nothing stall after one preview (with it, grpc grows the window to megabytes)."""
    return grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])


def test_a_stream_nobody_reads_is_cancelled_and_gives_its_slot_back(tmp_path: Path, triton: TritonServer) -> None:
    """Previews nobody reads: the writes stall once the flow-control window is full; the slot used to stay taken
    (and Triton to buffer the output) for as long as the caller kept the stream open."""
    # A stalled write waits the timeout plus its message's time at the minimum rate (outbox.py): a 196 KB preview
    # is 6 s at the default 32 KiB/s, 0.75 s at 256 KiB/s. Nothing is ever read, so any cut is the right one.
    flags = ("--max-in-flight=1", "--stream-write-timeout-s=1", "--stream-min-write-rate=262144")
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", *flags) as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        stub = pb_grpc.OmniGen2Stub(_fixed_window_channel(frontend.address))
        request = pb.GenerateRequest(prompt="Never read", width=256, height=256, steps=200, seed=1, previews=True)
        unread = stub.GenerateStream(request, timeout=120)
        while _frontend_metric(frontend, "omnigen2_in_flight_requests") < 1:
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
    before = executions(tiled_triton, "vae_decoder")
    tiled = GenerationStream(tiled_triton.grpc_url, params).wait()
    assert executions(tiled_triton, "vae_decoder") - before == 9  # 8x8 cells in tiles of 4 overlapping by 2: 3x3
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
        pid = server.process.pid  # its stubs trim a second after their last call
        grown = _grown_at_idle(lambda: {"stack": _tree_rss_mb(pid) - baseline}, 200)["stack"]
        assert grown < 200, f"the idle stack kept {grown:.0f} MB after the burst"


def test_memory_comes_back_after_large_outputs(tmp_path: Path, triton: TritonServer) -> None:
    """glibc kept what large answers freed (8 x 4096x4096 answers: the front end +435 MB, +412 more with the next;
    Triton +189 MB with the next), and each of Triton's pooled responses kept its largest output's buffer (+385 MB)."""
    assert triton.process is not None
    # Triton cannot be told to trim: a fixed mmap threshold and no pool of responses.
    assert f"{MMAP_THRESHOLD_ENV}={MMAP_THRESHOLD}".encode() in _proc(triton.process.pid, "environ")
    assert b"--grpc-infer-allocation-pool-size=0" in _proc(triton.process.pid, "cmdline")
    # Its stubs inherit that threshold and are told to take glibc's ceiling (tests/test_stub_mmap.py).
    stubs = [pid for pids in stub_processes(triton.process.pid).values() for pid in pids]
    assert stubs and all(f"{STUB_MMAP_THRESHOLD_ENV}=".encode() in b"\0".join(_proc(pid, "environ")) for pid in stubs)
    large = pb.GenerateRequest(
        prompt="Noise", width=2048, height=2048, max_pixels=65536, num_images_per_prompt=8, steps=1, seed=1
    )
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log") as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        assert frontend.process is not None
        processes = {"front end": frontend.process.pid, "tritonserver": triton.process.pid}
        stub = pb_grpc.OmniGen2Stub(
            grpc.insecure_channel(frontend.address, [("grpc.max_receive_message_length", 256 * MiB)])
        )
        start = _anon_mb(frontend.process.pid)
        stub.Generate(large, timeout=120)  # 96 MiB of pixels
        time.sleep(3)  # the front end trims a second after its last call
        # Its first answer's one-time costs (imports, encoder tables) were 16 MB here; it idled 55 MB up before.
        first = _anon_mb(frontend.process.pid) - start
        assert first < 32, f"the idle front end kept {first:.0f} MB after a large output"
        baseline = {name: _anon_mb(pid) for name, pid in processes.items()}
        stub.Generate(large, timeout=120)
        grown = _grown_at_idle(lambda: {name: _anon_mb(pid) - baseline[name] for name, pid in processes.items()}, 32)
        assert all(mb < 32 for mb in grown.values()), f"idle after a large output, grown (MB): {grown}"


def _grown_at_idle(read: Callable[[], dict[str, float]], limit_mb: float, within_s: float = 3) -> dict[str, float]:
    """What `read` says each process grew by (MB), read until all are under `limit_mb` or for `within_s` (the caller
    asserts on the last reading): memory comes back a second after the last call, and a passing run need not wait
    out the rest of the time a failing one is given."""
    deadline, grown = time.monotonic() + within_s, read()
    while max(grown.values()) >= limit_mb and time.monotonic() < deadline:
        time.sleep(0.2)
        grown = read()
    return grown


def _proc(pid: int, name: str) -> list[bytes]:
    return Path(f"/proc/{pid}/{name}").read_bytes().split(b"\0")


def _anon_mb(pid: int) -> float:
    """Anonymous memory only: Triton maps its stubs' shared-memory regions, whose pages its RSS counts too."""
    return proc_status_kib(pid, "RssAnon") / 1024


def _tree_rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def _frontend_metric(frontend: FrontendProcess, name: str, **labels: str) -> float:
    """One sample of the front end's /metrics (0 when it has none yet: a labelled series appears on first use)."""
    return frontend.metric(name, **labels) or 0.0


def _step_tokens(frontend: FrontendProcess) -> float:
    return _frontend_metric(frontend, "omnigen2_admitted_step_tokens")


def _released_after_the_bls_stopped(frontend: FrontendProcess, triton: TritonServer, timeout_s: float = 20) -> int:
    """Waits for the front end to give the call's slot back; the BLS must have stopped by then. Returns the samples
    in which the front end still held the call while the BLS worked on it."""
    held_while_running = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held = _frontend_metric(frontend, "omnigen2_in_flight_requests"), _step_tokens(frontend)
        running = requests_running(triton)  # read after the front end: a release it saw happened before this read
        if held == (0, 0):
            assert running == 0, "the front end gave the slot back while the BLS still worked on the request"
            return held_while_running
        held_while_running += running > 0
        time.sleep(0.01)
    raise AssertionError("the slot was never given back")


def _stream_until_step(frontend: FrontendProcess, request: pb.GenerateRequest, step: int) -> grpc.Future:
    stub = pb_grpc.OmniGen2Stub(grpc.insecure_channel(frontend.address))
    call = stub.GenerateStream(request, timeout=120)
    for event in call:
        if event.progress.step >= step:
            return call
    raise AssertionError("the generation ended before it was cancelled")


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[FrontendProcess]:
    log = tmp_path_factory.mktemp("one-slot") / "frontend.log"
    with FrontendProcess(triton.grpc_url, log, "--max-in-flight=1") as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield frontend


def test_a_cancelled_call_holds_its_slot_until_the_bls_has_stopped(
    one_slot: FrontendProcess, triton: TritonServer
) -> None:
    """Cancelled mid-denoise, with a preview (a VAE decode) in every step: the front end used to give the slot and
    the reservation back when it cancelled the Triton stream, while the BLS finished the step it was in."""
    request = pb.GenerateRequest(prompt="Cancel me", width=384, height=384, steps=200, seed=1, previews=True)
    call = _stream_until_step(one_slot, request, 2)
    assert requests_running(triton) == 1 and _step_tokens(one_slot) > 0
    call.cancel()
    _released_after_the_bls_stopped(one_slot, triton)
    settled = executions(triton, "transformer")
    time.sleep(1.0)
    assert executions(triton, "transformer") == settled, "a step ran after the slot was given back"
    assert _frontend_metric(one_slot, "omnigen2_stop_grace_expired_total") == 0  # the BLS confirmed the stop
    assert OmniGen2Client(one_slot.address, timeout=60, retries=0).generate("Next", width=64, height=64, steps=1)


def test_a_stop_not_confirmed_within_the_grace_period_ends_the_stream(tmp_path: Path, triton: TritonServer) -> None:
    """No grace at all: the front end cannot wait for the BLS, so it cancels the Triton stream (counted), and the
    BLS stops on Triton's cancellation instead."""
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", "--stop-grace-s=0") as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        request = pb.GenerateRequest(prompt="Cancel me", width=256, height=256, steps=200, seed=1)
        _stream_until_step(frontend, request, 2).cancel()
        deadline = time.monotonic() + 10
        while _frontend_metric(frontend, "omnigen2_stop_grace_expired_total") < 1:
            assert time.monotonic() < deadline, "the expired grace period was not counted"
            time.sleep(0.05)
        while requests_running(triton) > 0:
            assert time.monotonic() < deadline, "the BLS kept running"
            time.sleep(0.05)
        settled = executions(triton, "transformer")
        time.sleep(1.0)
        assert executions(triton, "transformer") == settled


def test_a_stream_whose_output_piles_up_is_ended_at_the_byte_cap(tmp_path: Path, triton: TritonServer) -> None:
    """Previews nobody reads, a write timeout far away: the output waiting behind the stalled write reaches the
    cap (each 256x256 preview is 196 KB) and the call ends RESOURCE_EXHAUSTED, its slot back once the BLS stopped."""
    flags = ("--max-in-flight=1", "--stream-write-timeout-s=100", "--max-buffered-stream-bytes=400000")
    with FrontendProcess(triton.grpc_url, tmp_path / "frontend.log", *flags) as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        stub = pb_grpc.OmniGen2Stub(_fixed_window_channel(frontend.address))
        request = pb.GenerateRequest(prompt="Never read", width=256, height=256, steps=200, seed=1, previews=True)
        started = time.monotonic()
        unread = stub.GenerateStream(request, timeout=120)
        while _frontend_metric(frontend, "omnigen2_in_flight_requests") < 1:
            time.sleep(0.01)
        _released_after_the_bls_stopped(frontend, triton, timeout_s=60)
        assert time.monotonic() - started < 60, "ended by something other than the byte cap"
        assert OmniGen2Client(frontend.address, timeout=60, retries=0).generate("Next", width=64, height=64, steps=1)
        with pytest.raises(grpc.RpcError) as raised:
            list(unread)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-buffered-stream-bytes" in (raised.value.details() or "")


def test_calls_past_their_deadline_hold_their_slots_until_the_bls_stops(
    api: FrontendProcess, triton: TritonServer
) -> None:
    """The issue's 40 calls with a 0.5 s deadline: the front end gave their slots back at the deadline while the
    BLS went on decoding their images for 18 s. Now each image waits its turn to decode where cancellation is seen,
    and the slots come back only once the BLS has let go of every call."""
    grey = _png(4000, 4000, "I;16")  # 60 KB on the wire, 16 M pixels to decode

    def call() -> None:
        with pytest.raises(DeadlineExceededError):
            OmniGen2Client(api.address, timeout=0.5, retries=0).compose(
                [grey], "Late", width=64, height=64, steps=1, max_pixels=65536, seed=1
            )

    with ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(call) for _ in range(6)]:
            future.result()
    ended = time.monotonic()
    _released_after_the_bls_stopped(api, triton)
    assert time.monotonic() - ended < 10, "the BLS went on with calls whose callers had left"
