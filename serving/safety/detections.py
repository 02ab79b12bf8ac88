"""Decoding the NudeNet detector (a YOLOv8 graph, `320n.onnx` in the `nudenet` wheel) into the stage's contract.

The graph takes float32 [N, 3, S, S] (BGR planes, 0..1, the letterboxed image) and returns [N, 4 + C, A]: per
anchor a box (centre x, centre y, width, height, in input pixels) and C class scores. The stage reports, per
image, each class's highest score over all anchors (`class_scores`, what thresholds are held against) and the
detections the package itself would report: candidates scoring >= 0.2, boxes scaled to the original image and
clipped to it, then greedy non-maximum suppression across classes (score > 0.25, IoU > 0.45 suppresses), as
OpenCV's `dnn.NMSBoxes` does. Only numpy.
"""

from __future__ import annotations

import numpy as np

# The graph's class order (its training labels).
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
CANDIDATE_SCORE = 0.2
NMS_SCORE = 0.25
NMS_IOU = 0.45
EMPTY = -1.0  # the class of an unused detection row


def graph_input(letterboxed: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] RGB -> float32 [N, 3, S, S] BGR in 0..1, as the package feeds the graph."""
    planes = letterboxed[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)
    return planes * np.float32(1 / 255.0)


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over union of one (x, y, w, h) box with each of `others`."""
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[0] + box[2], others[:, 0] + others[:, 2])
    y2 = np.minimum(box[1] + box[3], others[:, 1] + others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = box[2] * box[3] + others[:, 2] * others[:, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def suppress(boxes: np.ndarray, scores: np.ndarray) -> list[int]:
    """Greedy NMS: indices kept, best first (a stable sort, so ties keep anchor order)."""
    order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > NMS_SCORE]
    kept: list[int] = []
    for index in order:
        if not kept or np.all(iou(boxes[index], boxes[kept]) <= NMS_IOU):
            kept.append(index)
    return kept


def decode(output: np.ndarray, height: int, width: int, side: int, max_detections: int) -> np.ndarray:
    """One image's graph output [4 + C, A] -> detections float32 [max_detections, 6]: x, y, w, h (original
    pixels), score, class; unused rows have class EMPTY and score 0."""
    rows = output.T.astype(np.float64)
    scores = rows[:, 4:].max(axis=1)
    candidates = np.flatnonzero(scores >= CANDIDATE_SCORE)
    scale = max(height, width) / side
    cx, cy, w, h = (rows[candidates, k] for k in range(4))
    x = np.clip((cx - w / 2) * scale, 0, width)
    y = np.clip((cy - h / 2) * scale, 0, height)
    boxes = np.stack([x, y, np.minimum(w * scale, width - x), np.minimum(h * scale, height - y)], axis=1)
    kept = suppress(boxes, scores[candidates])[:max_detections]
    found = np.zeros((max_detections, 6), dtype=np.float32)
    found[:, 5] = EMPTY
    for row, index in enumerate(kept):
        anchor = candidates[index]
        found[row, :4] = boxes[index]
        found[row, 4] = scores[anchor]
        found[row, 5] = rows[anchor, 4:].argmax()
    return found


def class_scores(output: np.ndarray) -> np.ndarray:
    """[N, 4 + C, A] -> float32 [N, C]: each class's highest score anywhere in the image."""
    scores: np.ndarray = output[:, 4:, :].max(axis=2).astype(np.float32)
    return scores
