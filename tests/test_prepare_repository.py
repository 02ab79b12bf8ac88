"""The generated Triton model repository: files, configs, and no-op reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.build_engines import ProfileBounds, engine_max_batch, manifest_profiles
from export.prepare_repository import (
    BLS,
    COMPONENTS,
    bls_config,
    bls_settings,
    component_config,
    engine_settings,
    prepare_repository,
)
from serving.errors import CheckpointError
from serving.model.checkpoint import GRAPH_PARTS
from serving.runtime.onnx_backend import GRAPH_NAMES, read_manifest


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_onnx: Path) -> Path:
    return prepare_repository(tiny_checkpoint, tmp_path_factory.mktemp("repo") / "r", onnx_cache=tiny_onnx.parent)


def _config(repository: Path, name: str) -> mc.ModelConfig:
    return text_format.Parse((repository / name / "config.pbtxt").read_text(), mc.ModelConfig())


def test_every_component_has_config_and_artifacts(repository: Path) -> None:
    for name in GRAPH_NAMES:
        config = _config(repository, name)
        assert config.name == name and config.backend == "python" and config.max_batch_size > 0
        assert config.HasField("dynamic_batching")
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert (repository / name / "1" / config.parameters["onnx_file"].string_value).is_file()
        assert "serving.triton.onnx_model" in (repository / name / "1" / "model.py").read_text()


def test_transformer_config_follows_the_contract(repository: Path) -> None:
    config = _config(repository, "transformer")
    inputs = {i.name: i for i in config.input}
    names = "img_tokens img_mask timestep text_feats text_mask ref_tokens ref_mask rope_cos rope_sin"
    assert list(inputs) == names.split()
    assert inputs["img_mask"].data_type == mc.TYPE_BOOL
    assert list(inputs["ref_tokens"].dims) == [-1, -1, 64]
    assert list(inputs["timestep"].dims) == [1] and inputs["timestep"].HasField("reshape")
    assert [o.name for o in config.output] == ["velocity"]


def test_second_run_is_a_no_op(repository: Path, tiny_checkpoint: Path, tiny_onnx: Path) -> None:
    files = {p: p.stat().st_mtime_ns for p in repository.rglob("*") if p.is_file()}
    prepare_repository(tiny_checkpoint, repository, onnx_cache=tiny_onnx.parent)
    assert {p: p.stat().st_mtime_ns for p in repository.rglob("*") if p.is_file()} == files
    assert json.loads((repository / "repository.json").read_text())["backend"] == "onnxruntime"


def test_bad_inputs_are_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError):
        prepare_repository(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="backend"):
        prepare_repository(tiny_checkpoint, tmp_path / "out", backend="tflite")
    with pytest.raises(ValueError, match="precision"):
        prepare_repository(tiny_checkpoint, tmp_path / "out", backend="pytorch", precision="fp8")


def test_pytorch_backend_links_the_checkpoint_parts(tmp_path: Path, tiny_checkpoint: Path, tiny_onnx: Path) -> None:
    out = prepare_repository(tiny_checkpoint, tmp_path / "r", "pytorch", onnx_cache=tiny_onnx.parent, precision="fp32")
    for name, part in GRAPH_PARTS.items():
        config = _config(out, name)
        assert config.backend == "python" and config.parameters["precision"].string_value == "fp32"
        assert "serving.triton.torch_model" in (out / name / "1" / "model.py").read_text()
        assert (out / name / "1" / part / "config.json").is_file()
    assert _config(out, "omnigen2").parameters["backend"].string_value == "pytorch-fp32"


def test_the_call_token_cap_follows_the_backend_unless_the_operator_sets_it() -> None:
    assert bls_settings("pytorch", "bf16").max_call_tokens == 8192
    assert bls_settings("onnxruntime", "bf16").max_call_tokens == 0  # precision means nothing to ORT: no cap
    assert bls_settings("pytorch", "bf16", max_call_tokens=0).max_call_tokens == 0
    config = bls_config({}, "sha", "pytorch-bf16", bls_settings("pytorch", "bf16", max_call_tokens=4096))
    assert config.parameters["max_call_tokens"].string_value == "4096"


def test_tensorrt_configs_promise_no_more_batch_than_their_engines_take(tiny_onnx: Path) -> None:
    """Triton refuses a `tensorrt_plan` model whose max_batch_size passes its engine's profile. No engine is built
    here (that needs a GPU): the configs come from the profiles the engines would be built with."""
    manifest = read_manifest(tiny_onnx)
    shapes = manifest_profiles(manifest, ProfileBounds.from_limits())
    # The profiles' batch bounds (24 samples per call, 5 references, 24 / 3 images of one request) under the
    # ONNX configs' own caps (64, 8, 64, 16).
    expected = {"text_encoder": 24, "vae_encoder": 5, "transformer": 24, "vae_decoder": 8}
    for name in GRAPH_NAMES:
        config = component_config(
            name, manifest["graphs"][name], "tensorrt", engine_settings(COMPONENTS[name], shapes[name])
        )
        assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert config.max_batch_size == expected[name] == engine_max_batch(shapes[name]), name
        assert [i.name for i in config.input] == list(shapes[name]), name
    # One step of the largest request (8 images x 3 CFG branches) fits one transformer engine call.
    assert BLS.max_samples == 24
