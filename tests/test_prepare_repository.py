"""The generated Triton model repository: files, configs, and no-op reruns."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.artifacts import model_configs
from serving.artifacts import repository as repository_module
from serving.artifacts.checkpoint_hash import HASH_MEMO
from serving.artifacts.engines import ProfileBounds, engine_max_batch, manifest_profiles
from serving.artifacts.model_configs import (
    BLS,
    COMPONENTS,
    bls_config,
    bls_settings,
    component_config,
    engine_settings,
)
from serving.artifacts.repository import SERVED_GRAPHS, bls_from_args, prepare_repository
from serving.errors import CheckpointError, SettingError
from serving.frontend.config import FrontendConfig
from serving.model.checkpoint import GRAPH_PARTS, read_spec, text_feature_dim
from serving.model.contract import dims_only, graph_contracts
from serving.runtime.fast_path import FastPath
from serving.runtime.onnx_backend import GRAPH_NAMES, read_manifest
from serving.runtime.onnx_stages import TRANSFORMER_STAGES
from serving.triton.bls_settings import BlsSettings


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_onnx: Path) -> Path:
    return prepare_repository(tiny_checkpoint, tmp_path_factory.mktemp("repo") / "r", onnx_cache=tiny_onnx.parent)


def _config(repository: Path, name: str) -> mc.ModelConfig:
    return text_format.Parse((repository / name / "config.pbtxt").read_text(), mc.ModelConfig())


def test_every_component_has_config_and_artifacts(repository: Path) -> None:
    for name in SERVED_GRAPHS:
        config = _config(repository, name)
        assert config.name == name and config.backend == "python" and config.max_batch_size > 0
        assert config.HasField("dynamic_batching")
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        files = [f"{stage}.onnx" for stage in TRANSFORMER_STAGES] if name == "transformer" else []
        for file in files or [config.parameters["onnx_file"].string_value]:
            assert (repository / name / "1" / file).is_file()
        assert "serving.triton.onnx_model" in (repository / name / "1" / "model.py").read_text()


def test_transformer_config_follows_the_contract(repository: Path) -> None:
    config = _config(repository, "transformer")
    inputs = {i.name: i for i in config.input}
    names = "img_tokens img_mask timestep text_feats text_mask ref_tokens ref_mask rope_cos rope_sin"
    assert list(inputs) == [*names.split(), "cache_control", "cache_threshold"]  # + the step-cache controls
    assert list(inputs["cache_control"].dims) == [5] and inputs["cache_threshold"].data_type == mc.TYPE_FP64
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
    with pytest.raises(SettingError, match="fp8 needs calibrated quantisation"):  # not silently built as bf16
        prepare_repository(tiny_checkpoint, tmp_path / "out", backend="tensorrt", precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(SettingError, match="device"):
            prepare_repository(tiny_checkpoint, tmp_path / "out", backend="pytorch", device="cuda")
    assert not (tmp_path / "out").exists()


def test_a_failure_midway_leaves_no_repository(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_link(source: Path, target: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("serving.artifacts.repository.link_or_copy", broken_link)
    with pytest.raises(OSError, match="disk full"):
        prepare_repository(tiny_checkpoint, tmp_path / "out", backend="pytorch", precision="fp32")
    assert list(tmp_path.iterdir()) == []


def test_one_language_model_serves_prompts_and_understanding(repository: Path) -> None:
    """The `mllm` model encodes the BLS's prompts: no `text_encoder` model holds a second Qwen2.5-VL."""
    assert not (repository / "text_encoder").exists()
    config = _config(repository, "mllm")
    assert {i.name for i in config.input} == {"request", "images", "input_ids", "attention_mask"}
    assert {o.name for o in config.output} == {"event", "text_feats"}
    assert config.model_transaction_policy.decoupled


def test_static_contract_is_the_exported_one(tiny_checkpoint: Path, tiny_onnx_whole: Path) -> None:
    """The pytorch backend's contract (from the configs) is what ONNX export traces from the graphs."""
    exported = read_manifest(tiny_onnx_whole)["graphs"]
    static = graph_contracts(read_spec(tiny_checkpoint), text_feature_dim(tiny_checkpoint))
    assert set(static) < set(GRAPH_NAMES)  # the stage graphs are ONNX Runtime's only
    for name in static:
        assert dims_only(static[name]) == dims_only(exported[name]), name


def test_pytorch_backend_links_the_checkpoint_parts(tmp_path: Path, tiny_checkpoint: Path) -> None:
    cache = tmp_path / "onnx-cache"
    out = prepare_repository(tiny_checkpoint, tmp_path / "r", "pytorch", onnx_cache=cache, precision="fp32")
    assert {p.name for p in cache.glob("*")} <= {HASH_MEMO}  # no ONNX export (a full-size checkpoint needs none)
    assert _config(out, "mllm").parameters["precision"].string_value == "fp32"
    for name in SERVED_GRAPHS:
        part = GRAPH_PARTS[name]
        config = _config(out, name)
        assert config.backend == "python" and config.parameters["precision"].string_value == "fp32"
        assert "serving.triton.torch_model" in (out / name / "1" / "model.py").read_text()
        assert (out / name / "1" / part / "config.json").is_file()
    assert _config(out, "omnigen2").parameters["backend"].string_value == "pytorch-fp32"


def test_the_folded_padding_reaches_the_transformers_parameters(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """`--padded-attention folded` is a Triton parameter the model reads back; the CPU's default (bias) writes none,
    so its repositories are what they were before the switch."""
    cache = tmp_path / "onnx-cache"
    plain = prepare_repository(tiny_checkpoint, tmp_path / "plain", "pytorch", onnx_cache=cache, precision="fp32")
    assert "padded_attention" not in _config(plain, "transformer").parameters
    fast = FastPath("sdpa", trim_padding=True, padded_attention="folded")
    folded = prepare_repository(
        tiny_checkpoint, tmp_path / "folded", "pytorch", onnx_cache=cache, precision="fp32", fast=fast
    )
    params = {key: value.string_value for key, value in _config(folded, "transformer").parameters.items()}
    assert params["padded_attention"] == "folded" and FastPath.from_params(params) == fast


def test_folded_padding_in_float32_on_cuda_is_refused_before_the_build(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SDPA's math kernel would take every folded call (flash and cuDNN take no float32): refused here, not when
    Triton loads the transformer."""
    for module in (repository_module, model_configs):
        monkeypatch.setattr(module, "resolve_device", lambda name: torch.device("cuda"))
    fast = FastPath("sdpa", trim_padding=True, padded_attention="folded")
    with pytest.raises(SettingError, match=r"^--padded-attention: folded needs --precision bf16 on cuda"):
        prepare_repository(tiny_checkpoint, tmp_path / "out", "pytorch", precision="fp32", device="cuda", fast=fast)
    assert not (tmp_path / "out").exists()


def test_a_folder_of_other_files_is_refused_and_a_readme_is_kept(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """A build takes its folder's place whole: a mistyped --model-repository would have lost every file in it, and
    `make serve` deleted the README the project tracks in model_repository/. Now the first is refused, untouched,
    and a README beside the models is carried into each build."""
    cache = tmp_path / "onnx-cache"
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    with pytest.raises(SettingError, match=r"holds files and no repository\.json"):
        prepare_repository(tiny_checkpoint, elsewhere, "pytorch", onnx_cache=cache, precision="fp32")
    assert [p.name for p in elsewhere.iterdir()] == ["notes.txt"]
    out = tmp_path / "model_repository"
    out.mkdir()
    (out / "README.md").write_text("about this folder")
    prepare_repository(tiny_checkpoint, out, "pytorch", onnx_cache=cache, precision="fp32")
    smaller_calls = bls_settings("pytorch", "fp32", max_call_tokens=4096)
    prepare_repository(tiny_checkpoint, out, "pytorch", onnx_cache=cache, precision="fp32", bls=smaller_calls)
    assert _config(out, "omnigen2").parameters["max_call_tokens"].string_value == "4096"  # rebuilt, not reused
    assert (out / "README.md").read_text() == "about this folder"


def test_the_call_token_cap_follows_the_backend_unless_the_operator_sets_it() -> None:
    assert bls_settings("pytorch", "bf16").max_call_tokens == 8192
    assert bls_settings("onnxruntime", "bf16").max_call_tokens == 17_408  # the default: precision means nothing to ORT
    assert bls_settings("pytorch", "bf16", max_call_tokens=0).max_call_tokens == 0
    assert bls_settings("pytorch", "fp32").max_call_tokens == 17_408


def test_a_negative_step_cache_budget_is_refused_naming_the_flag() -> None:
    """Before, -1 was taken: the stack started and every cached request ran uncached past "the server's -1 MiB"."""
    flags = {"backend": "onnxruntime", "precision": "fp32", "max_call_tokens": None, "device": "cpu"}
    assert bls_from_args(argparse.Namespace(**flags, max_step_cache_mib=0)).max_step_cache_mib == 0
    with pytest.raises(SettingError, match=r"--max-step-cache-mib: 0 or more .* got -1"):
        bls_from_args(argparse.Namespace(**flags, max_step_cache_mib=-1))


def test_pytorch_on_a_gpu_batches_every_admitted_step_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CUDA here: the device is what the GPU check would resolve (the cap itself is measured there)."""
    monkeypatch.setattr(model_configs, "resolve_device", lambda name: torch.device("cuda"))
    assert bls_settings("pytorch", "bf16", device="cuda").max_call_tokens == FrontendConfig().max_inflight_step_tokens
    assert bls_settings("pytorch", "bf16", max_call_tokens=4096, device="cuda").max_call_tokens == 4096
    config = bls_config({}, "sha", "pytorch-bf16", bls_settings("pytorch", "bf16", max_call_tokens=4096))
    assert config.parameters["max_call_tokens"].string_value == "4096"


def test_tensorrt_configs_promise_no_more_batch_than_their_engines_take(tiny_onnx_whole: Path) -> None:
    """Triton refuses a `tensorrt_plan` model whose max_batch_size passes its engine's profile. No engine is built
    here (that needs a GPU): the configs come from the profiles the engines would be built with."""
    manifest = read_manifest(tiny_onnx_whole)
    shapes = manifest_profiles(manifest, ProfileBounds.from_limits())
    # The profiles' batch bounds (24 samples per call, 5 references, 24 / 3 images of one request) under the
    # ONNX configs' own caps (8, 64, 16). Prompts are encoded by the `mllm` model, not a text_encoder engine.
    expected = {"vae_encoder": 5, "transformer": 24, "vae_decoder": 8}
    for name in SERVED_GRAPHS:
        config = component_config(
            name, manifest["graphs"][name], "tensorrt", engine_settings(COMPONENTS[name], shapes[name])
        )
        assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert config.max_batch_size == expected[name] == engine_max_batch(shapes[name]), name
        assert [i.name for i in config.input] == list(shapes[name]), name
    # One step of the largest request (8 images x 3 CFG branches) fits one transformer engine call.
    assert BLS.max_samples == 24
    # A TensorRT repository's export holds no text encoder: the text width then comes from the transformer.
    without = {**manifest, "graphs": {k: v for k, v in manifest["graphs"].items() if k != "text_encoder"}}
    assert "text_encoder" in manifest["graphs"] and manifest_profiles(without, ProfileBounds.from_limits()) == shapes


def test_the_bls_reads_back_every_setting_the_generator_writes() -> None:
    """One source of the BLS's defaults: what a config carries comes back whole, and an absent one is the default."""
    settings = BlsSettings(max_call_tokens=8192, call_overhead_ms=12.5, vae_tile=64, image_workers=3)
    config = bls_config({}, "sha", "pytorch-bf16", settings)
    written = {name: p.string_value for name, p in config.parameters.items()}
    assert BlsSettings.from_parameters(written) == settings
    assert BlsSettings.from_parameters({}) == BlsSettings()


def test_the_front_ends_limits_reach_the_bls_and_the_engine_profiles() -> None:
    """One source of the request limits: the operator's `--limits` (front end), handed by `make serve` to the
    repository generator, which writes them into the BLS config and sizes the engine profiles from them."""
    from serving.frontend.config import FrontendConfig

    limits = FrontendConfig.from_args(["--limits", '{"max_steps": 7, "max_pixels": 1048576}']).limits
    assert (limits.max_steps, limits.max_pixels, limits.max_input_images) == (7, 1_048_576, 5)
    config = bls_config({}, "sha", "onnxruntime", limits=limits)
    assert json.loads(config.parameters["limits"].string_value)["max_steps"] == 7
    assert ProfileBounds.from_limits(limits).max_img_tokens == 64 * 64  # 1024x1024 at most, not 2048x2048
    with pytest.raises(SystemExit):  # argparse reports the unknown field and exits
        FrontendConfig.from_args(["--limits", '{"max_stpes": 7}'])
