"""The operator's settings of the output-image safety stage, and the decision they make on an image.

Off unless asked for (`--safety`) and the `nudenet` package is installed (`pip install '.[safety]'`: its wheel
carries the AGPL-3.0 although its metadata says MIT, so it is an optional extra). An image is withheld when any
class's score (its highest anywhere in the image) reaches that class's threshold; classes without a threshold
never withhold.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.errors import SettingError
from serving.safety.detections import NUDENET_LABELS

NUDENET_GRAPH = "320n.onnx"
SIDE = 320  # the graph's input: letterboxed to 320 x 320
DEFAULT_THRESHOLDS = {
    "FEMALE_GENITALIA_EXPOSED": 0.5,
    "MALE_GENITALIA_EXPOSED": 0.5,
    "FEMALE_BREAST_EXPOSED": 0.5,
    "BUTTOCKS_EXPOSED": 0.5,
    "ANUS_EXPOSED": 0.5,
}


@dataclass(frozen=True)
class Finding:
    """Why an image was withheld: a class whose score reached its threshold."""

    label: str
    score: float
    threshold: float


@dataclass(frozen=True)
class SafetySettings:
    thresholds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    labels: tuple[str, ...] = NUDENET_LABELS
    side: int = SIDE

    def __post_init__(self) -> None:
        for label, threshold in self.thresholds.items():
            if label not in self.labels:
                raise SettingError("--safety-thresholds", f"unknown class {label!r}; one of {', '.join(self.labels)}")
            if not 0.0 <= threshold <= 1.0:
                raise SettingError("--safety-thresholds", f"{label}: a threshold is a score in [0, 1], got {threshold}")

    @classmethod
    def with_overrides(cls, text: str) -> SafetySettings:
        """The defaults with the thresholds a JSON object changes (e.g. '{"BELLY_EXPOSED": 0.8}')."""
        try:
            changes = json.loads(text) if text else {}
        except ValueError as exc:
            raise SettingError("--safety-thresholds", f"not JSON: {exc}") from exc
        if not isinstance(changes, dict) or not all(isinstance(v, int | float) for v in changes.values()):
            raise SettingError("--safety-thresholds", "a JSON object of class name -> threshold")
        return cls(thresholds=DEFAULT_THRESHOLDS | {str(k): float(v) for k, v in changes.items()})

    def to_json(self) -> str:
        return json.dumps({"thresholds": self.thresholds, "labels": list(self.labels), "side": self.side})

    @classmethod
    def from_json(cls, text: str) -> SafetySettings:
        values: dict[str, Any] = json.loads(text)
        return cls(thresholds=values["thresholds"], labels=tuple(values["labels"]), side=int(values["side"]))

    def findings(self, scores: Sequence[float]) -> list[Finding]:
        """One image's class scores (in `labels` order) -> the classes that withhold it, highest score first."""
        found = [
            Finding(label, float(score), self.thresholds[label])
            for label, score in zip(self.labels, scores, strict=True)
            if label in self.thresholds and score >= self.thresholds[label]
        ]
        return sorted(found, key=lambda f: -f.score)


def nudenet_graph() -> Path:
    """The detector graph inside the installed `nudenet` wheel (found without importing the package, whose module
    imports OpenCV, which the served stack does not need)."""
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        raise SettingError("safety", "the safety stage needs the `nudenet` package: pip install '.[safety]'")
    path = Path(next(iter(spec.submodule_search_locations))) / NUDENET_GRAPH
    if not path.is_file():
        raise SettingError("safety", f"{path}: not found in the installed nudenet package")
    return path
