"""The output-image safety stage on the real stack: one extra Triton (this module's) whose repository has the
`safety_classifier` component and a threshold of 0, so every image is withheld. The component itself is held
against the `nudenet` package run in process, on benign images."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2
from omnigen2 import GenerationResult, OmniGen2Client, Progress

from serving.artifacts.repository import prepare_repository
from serving.frontend.process import FrontendProcess
from serving.safety.detections import NUDENET_LABELS
from serving.safety.letterbox import letterbox
from serving.safety.settings import SIDE, SafetySettings
from serving.triton.launcher import TritonServer
from serving.triton.model_names import SAFETY_CLASSIFIER
from tests.safety_images import benign_images

nudenet = pytest.importorskip("nudenet.nudenet")  # the `safety` extra, which `make install` puts in the test env

# A threshold of 0 withholds every image (its score is at least 0); the other classes keep their defaults.
FORCED = SafetySettings.with_overrides('{"BELLY_EXPOSED": 0}')


@pytest.fixture(scope="module")
def safety_triton(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_onnx: Path
) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("safety")
    repository = prepare_repository(
        tiny_checkpoint, work / "model_repository", onnx_cache=tiny_onnx.parent, safety=FORCED
    )
    with TritonServer(repository, build_dir=work / "triton") as server:
        yield server


@pytest.fixture(scope="module")
def safety_api(tmp_path_factory: pytest.TempPathFactory, safety_triton: TritonServer) -> Iterator[FrontendProcess]:
    log = tmp_path_factory.mktemp("safety-frontend") / "frontend.log"
    with FrontendProcess(safety_triton.grpc_url, log, http=True) as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield frontend


def _classify(
    server: TritonServer, images: list[np.ndarray], outputs: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The served component on letterboxed images, straight through Triton's gRPC API."""
    boxed = np.stack([letterbox(image, SIDE) for image in images])
    sizes = np.array([image.shape[:2] for image in images], dtype=np.int32)
    inputs = [
        triton_grpc.InferInput("image", list(boxed.shape), "UINT8"),
        triton_grpc.InferInput("image_size", [len(images), 2], "INT32"),
    ]
    inputs[0].set_data_from_numpy(boxed)
    inputs[1].set_data_from_numpy(sizes)
    wanted = None if outputs is None else [triton_grpc.InferRequestedOutput(name) for name in outputs]
    result = triton_grpc.InferenceServerClient(server.grpc_url).infer(SAFETY_CLASSIFIER, inputs, outputs=wanted)
    return result.as_numpy("class_scores"), result.as_numpy("detections")


def test_served_classifier_equals_the_package_in_process(safety_triton: TritonServer, golden: Path) -> None:
    detector = nudenet.NudeDetector()
    images = benign_images(golden)
    scores, detections = _classify(safety_triton, images)  # one batch of differently sized images
    compared = 0
    for image, image_scores, found in zip(images, scores, detections, strict=True):
        bgr = np.ascontiguousarray(image[..., ::-1])
        raw = detector.onnx_session.run(None, {detector.input_name: nudenet._read_image(bgr, SIDE)[0]})[0]
        np.testing.assert_allclose(image_scores, raw[0, 4:].max(axis=1), atol=1e-4, rtol=0)
        expected = detector.detect(bgr)
        rows = [row for row in found if row[5] >= 0]
        assert [d["class"] for d in expected] == [NUDENET_LABELS[int(row[5])] for row in rows]
        for reference, row in zip(expected, rows, strict=True):
            assert abs(reference["score"] - row[4]) <= 1e-4
            assert np.all(np.abs(np.array(reference["box"]) - np.trunc(row[:4])) <= 1)
            compared += 1
    assert compared >= 1


def test_scores_alone_skip_the_detections(safety_triton: TritonServer, golden: Path) -> None:
    """The BLS asks for class_scores only: the same scores, and no detections decoded or sent."""
    images = benign_images(golden)
    scores, detections = _classify(safety_triton, images)
    alone, none = _classify(safety_triton, images, ["class_scores"])
    assert detections is not None and none is None
    np.testing.assert_array_equal(alone, scores)


def _assert_withheld(result: GenerationResult, count: int) -> None:
    assert result.images == [] and [w.index for w in result.withheld] == list(range(count))
    for withheld in result.withheld:
        (finding,) = withheld.findings  # only the forced class: benign images stay under the default thresholds
        assert finding.label == "BELLY_EXPOSED" and finding.threshold == 0 and 0 <= finding.score < 0.5


def test_images_over_a_threshold_are_withheld_with_the_reason(safety_api: FrontendProcess) -> None:
    with OmniGen2Client(safety_api.address, timeout=120) as client:
        safety = client.info().safety  # what a caller can know before an image goes missing
        assert (safety.output_classifier, safety.prompt_policy) == (True, False)
        assert safety.output_thresholds["BELLY_EXPOSED"] == 0 and safety.output_thresholds["ANUS_EXPOSED"] == 0.5
        result = client.generate(
            "A red apple", width=48, height=32, steps=2, num_images_per_prompt=2, seed=3, return_latents=True
        )
    _assert_withheld(result, 2)
    assert result.latents is not None and not result.latents.numpy().any()  # nothing of a withheld image leaves
    assert result.timings["safety"] > 0
    assert result.usage.output_tokens == 2 * (48 // 16) * (32 // 16)  # generated, then withheld: still counted


def test_stream_previews_are_withheld_too(safety_api: FrontendProcess) -> None:
    with OmniGen2Client(safety_api.address, timeout=120) as client:
        events: list[Any] = list(client.stream("A red apple", previews=True, width=32, height=32, steps=3, seed=4))
    *progress, result = events
    assert len(progress) == 3 and all(isinstance(p, Progress) for p in progress)
    assert all(p.preview is None and p.preview_withheld for p in progress)
    _assert_withheld(result, 1)


def test_openai_answers_say_which_images_were_withheld(safety_api: FrontendProcess) -> None:
    """Unstreamed: `data` lacks them and `withheld` lists them. Streamed, with no image left to complete: an `error`
    event (content_policy_violation, the `withheld` list beside it), which the openai package raises. (A stream
    with only some images withheld, which a threshold of 0 cannot give, is in tests/test_openai_translation.py.)"""
    http_client = openai.OpenAI(base_url=safety_api.http_url, api_key="unused", max_retries=0, timeout=120)
    extra = {"steps": 2, "seed": 3}
    answer = http_client.images.generate(prompt="A red apple", n=2, size="32x32", extra_body=extra)
    assert answer.data == [] and answer.model_extra is not None
    assert [w["index"] for w in answer.model_extra["withheld"]] == [0, 1]
    assert answer.usage is not None and answer.usage.output_tokens == 2 * 2 * 2
    body = json.dumps({"prompt": "A red apple", "size": "32x32", "stream": True, **extra}).encode()
    request = urllib.request.Request(
        f"{safety_api.http_url}/images/generations", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        name, data = response.read().decode().strip().split("\n")
    event = json.loads(data.removeprefix("data: "))
    assert name == "event: error" and event["type"] == "error"
    assert event["error"]["code"] == "content_policy_violation"
    (withheld,) = event["withheld"]
    assert withheld["index"] == 0 and withheld["findings"][0]["label"] == "BELLY_EXPOSED"
    with pytest.raises(openai.APIError) as raised:
        list(http_client.images.generate(prompt="A red apple", size="32x32", stream=True, extra_body=extra))
    assert isinstance(raised.value.body, dict) and raised.value.body["code"] == "content_policy_violation"
