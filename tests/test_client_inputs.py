"""What the clients send: the SDK's encoding of PIL images of any mode, and the ComfyUI nodes' input bounds, which
are the server's own (no server needed)."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omnigen2.limits import RANDOM_SEEDS
from omnigen2.messages import encode_image
from PIL import Image

from serving.pipeline.chat_request import DEFAULT_CHAT_LIMITS
from serving.pipeline.request import DEFAULT_LIMITS, MAX_SEED

COMFY = Path(__file__).resolve().parents[1] / "client" / "omnigen2_comfyui"


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "LAB", "HSV"])
def test_colour_spaces_png_cannot_hold_are_sent_as_rgb(mode: str) -> None:
    original = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    image = original.convert(mode) if mode != "LAB" else Image.new("LAB", (32, 24), (50, 10, 20))
    sent = Image.open(io.BytesIO(encode_image(image).data))
    assert (sent.format, sent.mode, sent.size) == ("PNG", "RGB", (32, 24))
    np.testing.assert_array_equal(np.asarray(sent), np.asarray(image.convert("RGB")))


def test_float_images_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"floating-point \(mode F\)"):
        encode_image(Image.fromarray(np.zeros((8, 8), dtype=np.float32)))


def _inputs(node: Any) -> dict[str, Any]:
    declared = node.INPUT_TYPES()
    return {name: spec for group in declared.values() for name, spec in group.items()}


def _comfy() -> Any:
    spec = importlib.util.spec_from_file_location(COMFY.name, COMFY / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[COMFY.name] = module  # as ComfyUI loads a custom-node folder
    spec.loader.exec_module(module)
    return module


def test_comfyui_node_bounds_are_the_servers() -> None:
    module = _comfy()
    generate = _inputs(module.NODE_CLASS_MAPPINGS["OmniGen2Generate"])
    understand = _inputs(module.NODE_CLASS_MAPPINGS["OmniGen2Understand"])
    assert generate["max_sequence_length"][1]["max"] == DEFAULT_LIMITS.max_sequence_length
    assert understand["max_new_tokens"][1]["max"] == DEFAULT_CHAT_LIMITS.max_new_tokens
    # Every seed the server draws (below RANDOM_SEEDS), not all it takes (MAX_SEED): the test below says why.
    assert generate["seed"][1]["max"] == understand["seed"][1]["max"] == RANDOM_SEEDS - 1 < MAX_SEED


def test_comfyui_seed_widgets_stop_where_a_json_workflow_keeps_every_seed() -> None:
    """ComfyUI's front end reads a workflow's numbers as doubles: every seed up to the widget's max comes back from
    its JSON as written, and past it integers start to merge (2^53 + 1 reads as 2^53)."""
    nodes = _comfy().NODE_CLASS_MAPPINGS
    for name in ("OmniGen2Generate", "OmniGen2Understand"):
        top = _inputs(nodes[name])["seed"][1]["max"]
        for seed in (0, 1, 2**52 + 1, top - 1, top):
            workflow = json.dumps({"widgets_values": [seed]})
            assert int(json.loads(workflow, parse_int=float)["widgets_values"][0]) == seed
        assert float(top + 2) == float(top + 1)
