"""Checkpoints as published: sharded safetensors with a Hugging Face index, bf16 weights, loaded without a float32
copy; the same outputs as the single-file float32 checkpoint, and clear errors for incomplete ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file

import export.make_checkpoint as maker
from serving.errors import CheckpointError, SettingError
from serving.model.checkpoint import check_layout, load_checkpoint, read_spec
from serving.model.devices import resolve_device
from serving.model.transformer import WEIGHTS_STEM, OmniGen2Transformer
from serving.pipeline.eager import OmniGen2Pipeline
from serving.pipeline.request import GenerationRequest
from tests.golden import relative_error

SHARD = "60KB"  # small enough that every tiny component is cut into several shards


def _reshard(source: Path, target: Path, dtype: torch.dtype) -> Path:
    """The golden checkpoint re-saved as published checkpoints are: `dtype` weights, sharded with an index."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    for part, stem in (("transformer", WEIGHTS_STEM), ("vae", WEIGHTS_STEM), ("mllm", "model")):
        state = {k: v.to(dtype) for k, v in load_file(source / part / f"{stem}.safetensors").items()}
        save_torch_state_dict(
            state, target / part, filename_pattern=stem + "{suffix}.safetensors", max_shard_size=SHARD
        )
        assert (target / part / f"{stem}.safetensors.index.json").is_file()
    return target


@pytest.fixture(scope="module")
def sharded_fp32(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    return _reshard(tiny_checkpoint, tmp_path_factory.mktemp("sharded") / "fp32", torch.float32)


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    return _reshard(tiny_checkpoint, tmp_path_factory.mktemp("sharded") / "bf16", torch.bfloat16)


def _generate(checkpoint: Path, dtype: torch.dtype) -> torch.Tensor:
    pipeline = OmniGen2Pipeline.from_pretrained(checkpoint, dtype=dtype)
    return pipeline(GenerationRequest(prompt="a red car", width=32, height=32, steps=2, seed=3)).latents


def _assert_same_model(checkpoint: Path, reference: Path, dtype: torch.dtype) -> None:
    """The same weights bit for bit, and so the same outputs; those only up to rounding, because CPU kernels may sum
    in another order for weights at another memory alignment (a sharded file's tensors sit at other offsets: 4e-6
    apart on an AMD EPYC, equal on other CPUs; bf16 rounds each sum, so it is held as test_gpu holds bf16 kernels)."""
    loaded, expected = load_checkpoint(checkpoint, dtype), load_checkpoint(reference, dtype)
    for part in ("transformer", "vae", "mllm"):
        got, want = getattr(loaded, part).state_dict(), getattr(expected, part).state_dict()
        assert got.keys() == want.keys()
        assert [k for k in want if not torch.equal(got[k], want[k])] == [], part
    latents, reference_latents = _generate(checkpoint, dtype), _generate(reference, dtype)
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(latents.float(), reference_latents.float()) <= bound


def test_sharded_checkpoint_gives_the_single_file_outputs(tiny_checkpoint: Path, sharded_fp32: Path) -> None:
    _assert_same_model(sharded_fp32, tiny_checkpoint, torch.float32)


def test_bf16_checkpoint_gives_the_float32_checkpoint_loaded_in_bf16(tiny_checkpoint: Path, sharded_bf16: Path) -> None:
    _assert_same_model(sharded_bf16, tiny_checkpoint, torch.bfloat16)


def test_loading_goes_straight_into_the_requested_dtype(sharded_fp32: Path) -> None:
    modules = load_checkpoint(sharded_fp32, torch.bfloat16)
    for module in (modules.transformer, modules.vae, modules.mllm):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in module.parameters()} == {"cpu"}  # nothing left on the meta device


def test_a_shard_missing_from_the_index_is_named(tmp_path: Path, sharded_fp32: Path) -> None:
    broken = shutil.copytree(sharded_fp32, tmp_path / "broken")
    index = json.loads((broken / "mllm" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (broken / "mllm" / shard).unlink()
    with pytest.raises(CheckpointError) as err:
        check_layout(broken)
    assert err.value.path.endswith("model.safetensors.index.json") and shard in err.value.description


def test_a_tensor_missing_from_the_shards_is_named(tmp_path: Path, sharded_fp32: Path) -> None:
    part = shutil.copytree(sharded_fp32 / "transformer", tmp_path / "transformer")
    index = json.loads((part / f"{WEIGHTS_STEM}.safetensors.index.json").read_text())
    key, shard = next(iter(index["weight_map"].items()))
    state = load_file(part / shard)
    del state[key]
    save_file(state, part / shard)
    with pytest.raises(CheckpointError, match=f"tensors missing, e.g. {key}"):
        OmniGen2Transformer.from_pretrained(part)


def test_a_mismatched_mllm_names_its_folder(tmp_path: Path, tiny_checkpoint: Path) -> None:
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    config = json.loads((broken / "mllm" / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (broken / "mllm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(broken)
    assert err.value.path.endswith("mllm")


def test_made_checkpoint_is_sharded_with_an_index(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The maker writes shards with the Hugging Face index once a component outgrows a shard."""
    monkeypatch.setattr(maker, "MAX_SHARD_SIZE", SHARD)
    made = maker.make_checkpoint(
        "tiny", tmp_path / "tiny", dtype=torch.bfloat16, processor=tiny_checkpoint / "processor"
    )
    index = json.loads((made / "transformer" / f"{WEIGHTS_STEM}.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (made / "mllm" / "model.safetensors.index.json").is_file()
    shard = made / "transformer" / sorted(set(index["weight_map"].values()))[0]
    assert {v.dtype for v in load_file(shard).values()} == {torch.bfloat16}
    latents = _generate(made, torch.bfloat16)
    assert torch.isfinite(latents).all()


def test_scheduler_config_is_read(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """`dynamic_time_shift` comes from scheduler/scheduler_config.json, not a constant."""
    assert read_spec(tiny_checkpoint).dynamic_time_shift
    unshifted = shutil.copytree(tiny_checkpoint, tmp_path / "unshifted")
    config = json.loads((unshifted / "scheduler" / "scheduler_config.json").read_text())
    (unshifted / "scheduler" / "scheduler_config.json").write_text(json.dumps(config | {"dynamic_time_shift": False}))
    assert not read_spec(unshifted).dynamic_time_shift
    assert not torch.equal(_generate(unshifted, torch.float32), _generate(tiny_checkpoint, torch.float32))


def test_devices_resolve_or_refuse() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SettingError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SettingError, match="no CUDA device"):
            resolve_device("cuda")


def test_a_config_that_does_not_match_the_tensors_is_refused_before_serving(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """prepare_repository checks the transformer's shapes from the file headers: nothing is written."""
    from serving.artifacts.repository import prepare_repository

    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    config = json.loads((broken / "transformer" / "config.json").read_text())
    (broken / "transformer" / "config.json").write_text(json.dumps(config | {"num_layers": config["num_layers"] + 1}))
    with pytest.raises(CheckpointError, match="tensors missing"):
        prepare_repository(broken, tmp_path / "repository", "pytorch", onnx_cache=tmp_path / "onnx")
    assert not (tmp_path / "repository").exists() and not (tmp_path / "onnx").exists()
