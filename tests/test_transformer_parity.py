"""The transformer against the reference's outputs on the golden checkpoint (float32, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from serving.model.transformer import OmniGen2Transformer
from tests.golden import relative_error, run_transformer, transformer_case_inputs

TOLERANCE = 1e-4


def _run(model: OmniGen2Transformer, inputs: dict[str, Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        return run_transformer(
            model, inputs["latents"], inputs["timestep"], inputs["text_feats"], inputs["text_mask"], inputs["refs"]
        )


def test_every_golden_transformer_case_matches(
    golden_transformer: OmniGen2Transformer, cases: dict[str, Any], golden: Path
) -> None:
    assert len(cases["transformer_cases"]) == 4
    for case in cases["transformer_cases"]:
        inputs = transformer_case_inputs(case, golden)
        outputs = _run(golden_transformer, inputs)
        for b, (out, expected) in enumerate(zip(outputs, inputs["expected"], strict=True)):
            assert out.shape == expected.shape
            err = relative_error(out, expected)
            assert err <= TOLERANCE, f"{case['name']}[{b}]: relative error {err:.2e}"


def test_state_dict_names_and_shapes_are_the_official_ones(
    golden_transformer: OmniGen2Transformer, golden: Path
) -> None:
    expected = {}
    for line in (golden / "transformer_state_dict_keys.txt").read_text().splitlines():
        name, shape = line.split("\t")
        expected[name] = [int(x) for x in shape.strip("[]").split(",") if x.strip()]
    actual = {k: list(v.shape) for k, v in golden_transformer.state_dict().items()}
    assert actual == expected


@pytest.mark.parametrize("tamper", ["image_index_embedding", "rope_half_split"])
def test_parity_check_detects_a_wrong_model(
    golden_transformer: OmniGen2Transformer,
    cases: dict[str, Any],
    golden: Path,
    tamper: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Negative control: small, plausible mistakes must fail the tolerance, or the parity test proves nothing."""
    case = next(c for c in cases["transformer_cases"] if c["name"] == "batch_mixed_refs")
    inputs = transformer_case_inputs(case, golden)
    if tamper == "image_index_embedding":
        saved = golden_transformer.image_index_embedding.data.clone()
        golden_transformer.image_index_embedding.data[1] = saved[0]
        try:
            outputs = _run(golden_transformer, inputs)
        finally:
            golden_transformer.image_index_embedding.data.copy_(saved)
    else:
        import serving.model.transformer as module

        def half_split_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            real, imag = x.float().chunk(2, dim=-1)
            cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
            return torch.cat((real * cos - imag * sin, real * sin + imag * cos), dim=-1).type_as(x)

        monkeypatch.setattr(module, "apply_rope", half_split_rope)
        outputs = _run(golden_transformer, inputs)
    assert relative_error(outputs[0], inputs["expected"][0]) > TOLERANCE * 10
