"""The checkpoint maker's output loads back through the real loader, and bad checkpoints name the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from export.make_checkpoint import TRANSFORMERS, make_checkpoint
from serving.errors import CheckpointError
from serving.model.checkpoint import load_checkpoint
from serving.model.transformer import WEIGHTS_STEM, OmniGen2Transformer
from serving.pipeline.eager import OmniGen2Pipeline
from serving.pipeline.request import GenerationRequest


@pytest.fixture(scope="module")
def made_tiny(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", processor=tiny_checkpoint / "processor")


def _config(checkpoint: Path, part: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((checkpoint / part / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_tiny_is_the_golden_configuration(made_tiny: Path, tiny_checkpoint: Path) -> None:
    assert _config(made_tiny, "transformer") == _config(tiny_checkpoint, "transformer")
    assert _config(made_tiny, "vae") == _config(tiny_checkpoint, "vae")
    ours, theirs = _config(made_tiny, "mllm"), _config(tiny_checkpoint, "mllm")
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert ours[key] == theirs[key]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert ours["text_config"][key] == theirs["text_config"][key]
    for key in ("depth", "hidden_size", "out_hidden_size", "fullatt_block_indexes"):
        assert ours["vision_config"][key] == theirs["vision_config"][key]


def test_made_checkpoint_loads_and_generates(made_tiny: Path) -> None:
    pipeline = OmniGen2Pipeline.from_pretrained(made_tiny)
    result = pipeline(GenerationRequest(prompt="a cat", width=32, height=48, steps=2, seed=1))
    assert result.images.shape == (1, 48, 32, 3)
    assert torch.isfinite(result.latents).all()
    again = OmniGen2Pipeline.from_pretrained(made_tiny)(
        GenerationRequest(prompt="a cat", width=32, height=48, steps=2, seed=1)
    )
    assert (again.images == result.images).all()  # same seed, same pixels


def test_full_size_is_the_official_architecture() -> None:
    with torch.device("meta"):
        model = OmniGen2Transformer(TRANSFORMERS["full"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["layers.31.norm1.linear.weight"] == (4 * 2520, 1024)
    assert shapes["layers.0.feed_forward.linear_1.weight"] == (10240, 2520)
    assert shapes["layers.0.attn.to_k.weight"] == (7 * 120, 2520)
    assert shapes["time_caption_embed.caption_embedder.1.weight"] == (2520, 2048)
    params = sum(v.numel() for v in model.state_dict().values())
    assert 3.9e9 < params < 4.1e9


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "nope")


def test_missing_part_is_named(tmp_path: Path, made_tiny: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(made_tiny, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(broken)
    assert err.value.path.endswith("vae/config.json")


def test_wrong_shapes_are_named(tmp_path: Path, made_tiny: Path) -> None:
    broken = tmp_path / "transformer"
    shutil.copytree(made_tiny / "transformer", broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_kv_heads"] = 4
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        OmniGen2Transformer.from_pretrained(broken)
    assert err.value.path.endswith(f"{WEIGHTS_STEM}.safetensors") and "to_k.weight" in err.value.description


def test_unknown_config_keys_are_logged_and_ignored(
    tmp_path: Path, made_tiny: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Newer official configs carry keys this loader does not know: they do not change the architecture."""
    part = tmp_path / "transformer"
    shutil.copytree(made_tiny / "transformer", part)
    config = json.loads((part / "config.json").read_text())
    config["use_magic"] = True
    (part / "config.json").write_text(json.dumps(config))
    model = OmniGen2Transformer.from_pretrained(part)
    assert model.config.hidden_size == config["hidden_size"]
    assert "use_magic" in caplog.text
