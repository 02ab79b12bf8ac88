"""The ComfyUI node package (client/omnigen2_comfyui) against the served stack, loaded as ComfyUI loads a custom node
folder (ComfyUI itself is not installed): the IMAGE convention in and out, and the SDK's pixels for the same seed."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from omnigen2 import OmniGen2Client
from omnigen2.errors import InvalidArgumentError, OmniGen2Error
from omnigen2.messages import GenerationResult, SafetyFinding, WithheldImage
from omnigen2.v1 import omnigen2_pb2 as pb
from omnigen2.v1 import omnigen2_pb2_grpc as pb_grpc
from PIL import Image

from serving.frontend.process import FrontendProcess
from serving.triton.launcher import TritonServer
from tests.frontends import fake_server

PACKAGE = Path(__file__).resolve().parents[2] / "client" / "omnigen2_comfyui"
SMALL = {"width": 64, "height": 48, "steps": 3, "text_guidance_scale": 4.0, "seed": 11, "num_images": 1}
TOKEN = "comfy-node-token"


def load_custom_node(folder: Path) -> ModuleType:
    """What ComfyUI does with each folder of custom_nodes/: import its __init__.py under the folder's name."""
    spec = importlib.util.spec_from_file_location(folder.name, folder / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[folder.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def nodes() -> dict[str, Any]:
    module = load_custom_node(PACKAGE)
    return {name: cls() for name, cls in module.NODE_CLASS_MAPPINGS.items()}


@pytest.fixture(scope="module")
def client(api: FrontendProcess) -> OmniGen2Client:
    return OmniGen2Client(api.address, timeout=120)


def run(node: Any, **inputs: Any) -> tuple[Any, ...]:
    result: tuple[Any, ...] = getattr(node, node.FUNCTION)(**inputs)
    return result


def pixels(images: torch.Tensor) -> np.ndarray:
    """An IMAGE batch back to 8-bit: exact, as the node's floats are the server's bytes / 255."""
    return (images * 255.0).round().to(torch.uint8).numpy()


def as_image(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def test_nodes_follow_comfyui_conventions() -> None:
    module = load_custom_node(PACKAGE)
    assert set(module.NODE_CLASS_MAPPINGS) == set(module.NODE_DISPLAY_NAME_MAPPINGS)
    assert set(module.NODE_CLASS_MAPPINGS) == {"OmniGen2Generate", "OmniGen2EditCompose", "OmniGen2Understand"}
    for cls in module.NODE_CLASS_MAPPINGS.values():
        assert isinstance(inspect.getattr_static(cls, "INPUT_TYPES"), classmethod)
        declared = cls.INPUT_TYPES()
        assert set(declared) <= {"required", "optional"} and declared["required"]
        assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
        assert cls.CATEGORY == "OmniGen2"
        # ComfyUI calls FUNCTION with every input by name: each declared input must bind.
        names = {name: None for group in declared.values() for name in group}
        inspect.signature(getattr(cls(), cls.FUNCTION)).bind(**names)
        assert declared["required"]["server"][0] == "STRING" and "token" in declared["optional"]
    edit = module.NODE_CLASS_MAPPINGS["OmniGen2EditCompose"].INPUT_TYPES()
    images = [name for group in edit.values() for name, spec in group.items() if spec[0] == "IMAGE"]
    assert images == ["image", "image_2", "image_3", "image_4", "image_5"]


def test_every_image_withheld_is_a_clear_error() -> None:
    """The safety stage kept back every image: the node's error names them and why, not numpy's empty stack."""
    load_custom_node(PACKAGE)
    nodes = importlib.import_module(f"{PACKAGE.name}.nodes")
    withheld = [
        WithheldImage(0, [SafetyFinding("nsfw", 0.93, 0.5)]),
        WithheldImage(1, [SafetyFinding("gore", 0.8, 0.6)]),
    ]
    result = GenerationResult(images=[], seed=5, timings={}, withheld=withheld)
    with pytest.raises(
        RuntimeError, match=r"withheld every image \(image 0: nsfw 0\.93 \(threshold 0\.5\); image 1: gore"
    ):
        nodes.result_images(result)


def test_generate_gives_comfyui_images_equal_to_the_sdk(
    api: FrontendProcess, nodes: dict[str, Any], client: OmniGen2Client
) -> None:
    images, seed = run(
        nodes["OmniGen2Generate"], server=api.address, prompt="A red apple", **(SMALL | {"num_images": 2})
    )
    assert images.shape == (2, 48, 64, 3) and images.dtype == torch.float32 and seed == 11
    assert images.min().item() >= 0.0 and images.max().item() <= 1.0
    sdk = client.generate(
        "A red apple", width=64, height=48, steps=3, text_guidance_scale=4.0, seed=11, num_images_per_prompt=2
    )
    assert np.array_equal(pixels(images), np.stack([np.asarray(image) for image in sdk.images]))

    cached, _ = run(nodes["OmniGen2Generate"], server=api.address, prompt="A red apple", cache="teacache",
                    teacache_threshold=0.3, **SMALL)  # fmt: skip
    sdk = client.generate("A red apple", width=64, height=48, steps=3, text_guidance_scale=4.0, seed=11,
                          cache="teacache", teacache_threshold=0.3)  # fmt: skip
    assert sdk.cache == "teacache" and np.array_equal(pixels(cached)[0], np.asarray(sdk.images[0]))


def test_edit_and_compose_take_up_to_five_images(
    api: FrontendProcess, nodes: dict[str, Any], client: OmniGen2Client, golden: Path
) -> None:
    source = golden / "edit_one_image_input0.png"
    image = as_image(source)
    settings = SMALL | {"width": 0, "height": 0, "image_guidance_scale": 1.5, "scheduler": "dpmsolver"}
    edited, _ = run(nodes["OmniGen2EditCompose"], server=api.address, image=image, prompt="Make it night", **settings)
    with Image.open(source) as original:
        sdk = client.edit(
            original,
            "Make it night",
            steps=3,
            text_guidance_scale=4.0,
            seed=11,
            image_guidance_scale=1.5,
            scheduler="dpmsolver",
        )
        assert edited.shape == (1, original.height, original.width, 3)  # no size: the input's (processed) size
    assert np.array_equal(pixels(edited)[0], np.asarray(sdk.images[0]))

    # A batch of two on image_2 and one on image_5: four input images, in order.
    pair = torch.cat([image, 1.0 - image])
    composed, _ = run(
        nodes["OmniGen2EditCompose"],
        server=api.address,
        image=image,
        image_2=pair,
        image_5=image,
        prompt="All of them together",
        **SMALL,
    )
    frames = [Image.fromarray(frame) for frame in pixels(torch.cat([image, pair, image]))]
    sdk = client.compose(frames, "All of them together", width=64, height=48, steps=3, text_guidance_scale=4.0, seed=11)
    assert composed.shape == (1, 48, 64, 3)
    assert np.array_equal(pixels(composed)[0], np.asarray(sdk.images[0]))

    six = {f"image_{i}": image for i in range(2, 6)} | {"image": pair}
    with pytest.raises(InvalidArgumentError, match="input_images"):
        run(nodes["OmniGen2EditCompose"], server=api.address, prompt="Too many", **six, **SMALL)


def test_understand_answers_as_the_sdk(api: FrontendProcess, nodes: dict[str, Any], client: OmniGen2Client) -> None:
    image = torch.rand(2, 32, 40, 3, generator=torch.Generator().manual_seed(0))
    (answer,) = run(
        nodes["OmniGen2Understand"],
        server=api.address,
        question="What is in the pictures?",
        max_new_tokens=6,
        temperature=0.0,
        seed=0,
        image_1=image[:1],
        image_3=image[1:],
    )
    frames = [Image.fromarray(frame) for frame in pixels(image)]
    expected = client.understand("What is in the pictures?", frames, max_new_tokens=6, temperature=0.0, seed=0)
    assert isinstance(answer, str) and answer == expected.text


def test_image_tensor_of_the_wrong_shape_is_named(api: FrontendProcess, nodes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"IMAGE: a \[B, H, W, 3\] tensor, got shape \[3, 32, 32\]"):
        run(nodes["OmniGen2EditCompose"], server=api.address, image=torch.zeros(3, 32, 32), prompt="x", **SMALL)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, triton: TritonServer) -> Iterator[FrontendProcess]:
    """A front end that asks for a bearer token."""
    work = tmp_path_factory.mktemp("comfyui-token")
    tokens = work / "tokens.json"
    entry = {"name": "comfyui", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "rate_per_minute": 600}
    tokens.write_text(json.dumps({"tokens": [entry]}))
    with FrontendProcess(triton.grpc_url, work / "frontend.log", f"--auth-tokens={tokens}") as frontend:
        frontend.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield frontend


def test_token_input_reaches_the_server(guarded: FrontendProcess, nodes: dict[str, Any]) -> None:
    images, _ = run(nodes["OmniGen2Generate"], server=guarded.address, prompt="A pear", token=TOKEN, **SMALL)
    assert images.shape == (1, 48, 64, 3)
    with pytest.raises(OmniGen2Error, match="UNAUTHENTICATED"):
        run(nodes["OmniGen2Generate"], server=guarded.address, prompt="A pear", token="wrong", **SMALL)


class TokenRecorder(pb_grpc.OmniGen2Servicer):
    """A stand-in server that keeps each Understand call's authorization header."""

    def __init__(self) -> None:
        self.authorization: list[str] = []

    def Understand(self, request: pb.UnderstandRequest, context: grpc.ServicerContext) -> Iterator[pb.UnderstandEvent]:  # noqa: N802
        self.authorization += [value for key, value in context.invocation_metadata() if key == "authorization"]
        yield pb.UnderstandEvent(result=pb.UnderstandResult(text="a pear"))


def test_an_empty_token_input_takes_the_token_from_the_environment(
    nodes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """So that the token need not be a widget value, saved in the workflow and in every PNG that SaveImage writes."""
    monkeypatch.setenv("OMNIGEN2_TOKEN", "from-env")
    recorder = TokenRecorder()
    inputs = {"question": "What is it?", "max_new_tokens": 4, "temperature": 0.0, "seed": 0}
    with fake_server(recorder) as address:
        assert run(nodes["OmniGen2Understand"], server=address, **inputs) == ("a pear",)
        run(nodes["OmniGen2Understand"], server=address, token="typed", **inputs)
    assert recorder.authorization == ["Bearer from-env", "Bearer typed"]  # one typed in the node comes first


@pytest.mark.parametrize("typed", ["typed", ""])
def test_a_token_is_not_sent_in_cleartext_beyond_this_machine(
    nodes: dict[str, Any], monkeypatch: pytest.MonkeyPatch, typed: str
) -> None:
    monkeypatch.setenv("OMNIGEN2_TOKEN", "from-env")
    remote = "192.0.2.1:50051"  # TEST-NET-1: never reached, the node refuses before any connection
    with pytest.raises(ValueError, match=r"token: it would go in cleartext to 192\.0\.2\.1:50051.*`tls`"):
        run(nodes["OmniGen2Generate"], server=remote, prompt="A pear", token=typed, **SMALL)
    with pytest.raises(ValueError, match="cleartext"):
        run(nodes["OmniGen2Understand"], server=remote, question="?", max_new_tokens=4, temperature=0.0, seed=0)
    connection = importlib.import_module(f"{PACKAGE.name}.connection")
    connection.open_client(remote, typed, False, True).close()  # allowed on purpose: a client, no refusal
