"""The safety stage's own pre- and post-processing (serving/safety/) against the `nudenet` package run in process:
the letterbox bit for bit against OpenCV, the detections and class scores against the package's on benign images.
Needs the `safety` extra (installed by `make install` for the tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.errors import SettingError
from serving.runtime.ort_session import cpu_session
from serving.safety.detections import EMPTY, NUDENET_LABELS, class_scores, decode, graph_input, suppress
from serving.safety.letterbox import letterbox
from serving.safety.settings import DEFAULT_THRESHOLDS, SIDE, SafetySettings, nudenet_graph
from tests.safety_images import benign_images

cv2 = pytest.importorskip("cv2")
nudenet = pytest.importorskip("nudenet.nudenet")


@pytest.fixture(scope="module")
def detector() -> Any:
    return nudenet.NudeDetector()


def detections_of(image: np.ndarray) -> list[tuple[str, float, list[float]]]:
    """This project's processing of one RGB image: letterbox, graph, decode."""
    session = cpu_session(nudenet_graph())
    (output,) = session.run(None, {"images": graph_input(letterbox(image, SIDE)[None])})
    found = decode(output[0], image.shape[0], image.shape[1], SIDE, 32)
    return [(NUDENET_LABELS[int(row[5])], float(row[4]), row[:4].tolist()) for row in found if row[5] != EMPTY]


@pytest.mark.parametrize("size", [(17, 17), (48, 64), (256, 256), (300, 400), (320, 200), (700, 1000), (2048, 31)])
def test_letterbox_is_opencvs_bit_for_bit(size: tuple[int, int]) -> None:
    image = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    height, width = size
    side = max(size)
    padded = cv2.copyMakeBorder(image, 0, side - height, 0, side - width, cv2.BORDER_CONSTANT)
    expected = padded if side == SIDE else cv2.resize(padded, (SIDE, SIDE), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(letterbox(image, SIDE), expected)


def test_graph_input_is_the_packages(golden: Path) -> None:
    for image in benign_images(golden):
        bgr = np.ascontiguousarray(image[..., ::-1])  # the package takes OpenCV's BGR
        np.testing.assert_array_equal(graph_input(letterbox(image, SIDE)[None]), nudenet._read_image(bgr, SIDE)[0])


def test_detections_and_scores_match_the_package(detector: Any, golden: Path) -> None:
    images = benign_images(golden)
    compared = 0
    for image in images:
        bgr = np.ascontiguousarray(image[..., ::-1])
        expected = detector.detect(bgr)
        ours = detections_of(image)
        assert [d["class"] for d in expected] == [label for label, _, _ in ours]
        for reference, (_, score, box) in zip(expected, ours, strict=True):
            assert abs(reference["score"] - score) <= 1e-4
            assert np.all(np.abs(np.array(reference["box"]) - np.trunc(box)) <= 1)  # the package truncates to int
            compared += 1
        # The image-level scores the thresholds are held against, from the package's own input and session.
        raw = detector.onnx_session.run(None, {detector.input_name: nudenet._read_image(bgr, SIDE)[0]})[0]
        (output,) = cpu_session(nudenet_graph()).run(None, {"images": graph_input(letterbox(image, SIDE)[None])})
        np.testing.assert_allclose(class_scores(output), class_scores(raw), atol=1e-4, rtol=0)
    assert compared >= 1  # the smileys give the comparison a detection to check (a low-score false positive)


def test_suppression_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 5, 5], [0, 0, 10, 10]], dtype=np.float64)
    scores = np.array([0.9, 0.8, 0.3, 0.2])  # the last is under the 0.25 cut
    assert suppress(boxes, scores) == [0, 2]


def test_thresholds_decide_and_explain() -> None:
    settings = SafetySettings.with_overrides('{"BELLY_EXPOSED": 0.0, "FEET_EXPOSED": 0.7}')
    assert settings.thresholds == DEFAULT_THRESHOLDS | {"BELLY_EXPOSED": 0.0, "FEET_EXPOSED": 0.7}
    scores = [0.0] * len(NUDENET_LABELS)
    scores[NUDENET_LABELS.index("FEET_EXPOSED")] = 0.69
    found = settings.findings(scores)
    assert [(f.label, f.score, f.threshold) for f in found] == [("BELLY_EXPOSED", 0.0, 0.0)]  # 0 always withholds
    scores[NUDENET_LABELS.index("FEET_EXPOSED")] = 0.7
    assert [f.label for f in settings.findings(scores)] == ["FEET_EXPOSED", "BELLY_EXPOSED"]
    assert SafetySettings.from_json(settings.to_json()) == settings
    assert SafetySettings().findings([0.49] * len(NUDENET_LABELS)) == []


@pytest.mark.parametrize(
    ("text", "complaint"),
    [('{"NOT_A_CLASS": 0.5}', "unknown class"), ('{"FACE_MALE": 2}', r"in \[0, 1\]"), ("[1]", "JSON object")],
)
def test_bad_thresholds_are_refused(text: str, complaint: str) -> None:
    with pytest.raises(SettingError, match=complaint):
        SafetySettings.with_overrides(text)
