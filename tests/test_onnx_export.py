"""ONNX export: every graph against its PyTorch module, and the golden pipeline through ONNX Runtime."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from serving.artifacts.onnx_export import export_onnx
from serving.artifacts.repository import staged_contract
from serving.errors import CheckpointError
from serving.model.checkpoint import load_checkpoint
from serving.model.graphs import TransformerHeadGraph
from serving.pipeline.eager import OmniGen2Pipeline
from serving.pipeline.packing import pack_batch, unpack_output
from serving.pipeline.prompts import PromptTokenizer
from serving.runtime.onnx_backend import GRAPH_NAMES, MANIFEST, OnnxBackend, OnnxGraph, read_manifest
from serving.runtime.ort_session import session_options
from serving.runtime.torch_backend import TorchBackend
from tests.golden import relative_error, request_from_case, transformer_case_inputs

REPO = Path(__file__).resolve().parents[1]
GRAPH_TOLERANCE = 1e-4
LATENT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def exported(tiny_onnx: Path) -> Path:
    return tiny_onnx


@pytest.fixture(scope="module")
def ort_backend(exported: Path) -> OnnxBackend:
    return OnnxBackend(exported, threads=2)


@pytest.fixture(scope="module")
def torch_backend(tiny_checkpoint: Path) -> TorchBackend:
    return TorchBackend(load_checkpoint(tiny_checkpoint))


def test_text_encoder_matches_on_mixed_lengths(
    ort_backend: OnnxBackend, torch_backend: TorchBackend, tiny_checkpoint: Path
) -> None:
    tokenizer = PromptTokenizer.from_dir(tiny_checkpoint / "processor")
    ids, mask = tokenizer(["a", "The sun rises slightly over the garden, a high quality photo.", ""])
    ours, theirs = ort_backend.encode_text(ids, mask), torch_backend.encode_text(ids, mask)
    valid = mask.bool()
    assert relative_error(ours[valid], theirs[valid]) <= GRAPH_TOLERANCE
    single_ids, single_mask = tokenizer(["a"])  # batch 1: an axis exported from an example of 2
    assert relative_error(ort_backend.encode_text(single_ids, single_mask), theirs[:1, : single_ids.shape[1]]) <= (
        GRAPH_TOLERANCE
    )


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (3, 3, 32, 112)])
def test_vae_graphs_match(ort_backend: OnnxBackend, torch_backend: TorchBackend, shape: tuple[int, ...]) -> None:
    image = torch.rand(*shape) * 2 - 1
    latents = torch_backend.encode_image(image)
    assert relative_error(ort_backend.encode_image(image), latents) <= GRAPH_TOLERANCE
    assert relative_error(ort_backend.decode(latents), torch_backend.decode(latents)) <= GRAPH_TOLERANCE


def test_transformer_matches_golden_cases(ort_backend: OnnxBackend, cases: dict[str, Any], golden: Path) -> None:
    spec = ort_backend.spec
    for case in cases["transformer_cases"]:
        inputs = transformer_case_inputs(case, golden)
        packed = pack_batch(
            inputs["latents"],
            inputs["timestep"],
            inputs["text_feats"],
            inputs["text_mask"],
            inputs["refs"],
            patch_size=spec.patch_size,
            axes_dim=spec.axes_dim_rope,
            min_ref_slots=1,
        )
        outputs = unpack_output(ort_backend.transformer(packed.as_inputs()), packed.latent_sizes, spec.patch_size)
        for b, expected in enumerate(inputs["expected"]):
            assert relative_error(outputs[b], expected) <= GRAPH_TOLERANCE, f"{case['name']}[{b}]"


def test_transformer_matches_torch_on_a_mixed_batch(ort_backend: OnnxBackend, torch_backend: TorchBackend) -> None:
    """Three samples: different text lengths, image sizes and reference counts (0, 2, 3) in one call."""
    torch.manual_seed(3)
    c = 16
    packed = pack_batch(
        [torch.randn(c, 8, 8), torch.randn(c, 4, 12), torch.randn(c, 6, 6)],
        torch.tensor([0.0, 0.5, 0.95]),
        torch.randn(3, 13, 64),
        torch.tensor([[1] * 13, [1] * 4 + [0] * 9, [1] * 8 + [0] * 5]),
        [None, [torch.randn(c, 4, 4), torch.randn(c, 10, 6)], [torch.randn(c, 2, 2)] * 3],
        patch_size=2,
        axes_dim=ort_backend.spec.axes_dim_rope,
    )
    ours = ort_backend.transformer(packed.as_inputs())
    theirs = torch_backend.transformer(packed.as_inputs())
    valid = packed.img_mask
    assert relative_error(ours[valid], theirs[valid]) <= GRAPH_TOLERANCE


@pytest.mark.parametrize("name", ["t2i_euler", "edit_one_image", "in_context_two_images", "t2i_dpmsolver_cfgrange"])
def test_golden_pipeline_through_onnx_runtime(exported: Path, cases: dict[str, Any], golden: Path, name: str) -> None:
    case = next(c for c in cases["pipeline_cases"] if c["name"] == name)
    result = OmniGen2Pipeline.from_onnx(exported, threads=2)(request_from_case(case, golden))
    assert relative_error(result.latents, np.load(golden / case["final_latents"])) <= LATENT_TOLERANCE
    assert float(np.abs(result.images - np.load(golden / case["output"])).max()) <= 2e-3


@pytest.mark.parametrize(
    "name", ["f_five_images", "f_two_per_prompt", "f_long_prompt_truncated", "f_teacache_t2i", "f_taylorseer_edit"]
)
def test_golden_feature_case_through_onnx_runtime(
    exported: Path, cases: dict[str, Any], golden: Path, name: str
) -> None:
    case = next(c for c in cases["feature_cases"] if c["name"] == name)
    result = OmniGen2Pipeline.from_onnx(exported, threads=2)(request_from_case(case, golden))
    assert relative_error(result.latents, np.load(golden / case["final_latents"])) <= 1e-5
    assert float(np.abs(result.images - np.load(golden / case["output"])).max()) <= 1e-4


def test_a_graph_an_export_lacks_is_added_beside_the_held_ones(
    tiny_onnx: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Asking an export for a graph it lacks exports that graph alone, leaves the held ones as they were and gives
    the same graph a whole export does (how TensorRT's whole transformer joins an export made for ONNX Runtime). On
    a copy with one small graph taken out: the session's export may already hold every graph when this runs."""
    copy = tmp_path / "export"
    shutil.copytree(tiny_onnx, copy)
    manifest = read_manifest(copy)
    taken = manifest["graphs"].pop("transformer_head")
    (copy / taken["file"]).unlink()
    (copy / MANIFEST).write_text(json.dumps(manifest))
    before = {p.name: p.stat().st_mtime_ns for p in copy.glob("*.onnx")}
    wanted = [*manifest["graphs"], "transformer_head"]
    assert export_onnx(tiny_checkpoint, copy, key=manifest["checkpoint_sha256"], graphs=wanted) == copy
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("*.onnx") if p.name in before} == before
    graphs = read_manifest(copy)["graphs"]
    assert list(graphs) == [name for name in GRAPH_NAMES if name in wanted] and graphs["transformer_head"] == taken
    assert (copy / taken["file"]).read_bytes() == (tiny_onnx / taken["file"]).read_bytes()


def test_the_whole_transformer_computes_what_its_stages_do(
    tiny_onnx_whole: Path, ort_backend: OnnxBackend, torch_backend: TorchBackend
) -> None:
    """TensorRT's graph takes the first stage's inputs and gives the last one's outputs (the contract the
    `onnxruntime` repository serves its staged transformer with), and computes the same velocity."""
    graphs = read_manifest(tiny_onnx_whole)["graphs"]
    whole = {k: v for k, v in graphs["transformer"].items() if k != "file"}
    assert whole == staged_contract(graphs)
    torch.manual_seed(5)
    packed = pack_batch(
        [torch.randn(16, 8, 8), torch.randn(16, 4, 12)],
        torch.tensor([0.1, 0.8]),
        torch.randn(2, 9, 64),
        torch.tensor([[1] * 9, [1] * 3 + [0] * 6]),
        [[torch.randn(16, 4, 4)], None],
        patch_size=2,
        axes_dim=ort_backend.spec.axes_dim_rope,
    )
    session = OnnxGraph(tiny_onnx_whole / graphs["transformer"]["file"], session_options(2), ["CPUExecutionProvider"])
    ours, valid = session(packed.as_inputs()), packed.img_mask
    assert relative_error(ours[valid], ort_backend.transformer(packed.as_inputs())[valid]) <= GRAPH_TOLERANCE
    assert relative_error(ours[valid], torch_backend.transformer(packed.as_inputs())[valid]) <= GRAPH_TOLERANCE


def test_manifest_records_the_contract_and_a_rerun_is_a_no_op(tiny_onnx_whole: Path, tiny_checkpoint: Path) -> None:
    exported = tiny_onnx_whole
    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest["settings"]["opset"] == 20
    assert manifest["spec"]["text_positions"] == 512  # axes_lens[0] of the tiny checkpoint
    assert len(manifest["checkpoint_sha256"]) == 64
    transformer = {i["name"]: i for i in manifest["graphs"]["transformer"]["inputs"]}
    assert transformer["ref_tokens"]["shape"] == ["batch", "ref_slots", "ref_len", 64]
    assert transformer["img_mask"]["dtype"] == "bool"
    before = {p.name: p.stat().st_mtime_ns for p in exported.glob("*.onnx")}
    export_onnx(tiny_checkpoint, exported)
    assert {p.name: p.stat().st_mtime_ns for p in exported.glob("*.onnx")} == before


def test_tensor_contract_doc_lists_every_exported_tensor(tiny_onnx_whole: Path) -> None:
    """docs/tensor_contract.md is the users' reference: it must name every input/output with its dtype."""
    doc = (REPO / "docs" / "tensor_contract.md").read_text()
    rows = set(re.findall(r"^\| `(\w+)` \| `(\w+)` \| `(\w+)` \|", doc, flags=re.M))
    manifest = json.loads((tiny_onnx_whole / MANIFEST).read_text())
    for graph, contract in manifest["graphs"].items():
        for tensor in contract["inputs"] + contract["outputs"]:
            assert (graph, tensor["name"], tensor["dtype"]) in rows, f"{graph}.{tensor['name']} missing from the doc"


def test_bad_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        export_onnx(tmp_path, tmp_path / "out")
    assert err.value.path.endswith("transformer/config.json")


def test_large_graphs_keep_their_weights_as_external_data(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graphs over protobuf's 2 GiB limit (the full-size transformer and text encoder) are written with external
    data and load back in ONNX Runtime; the threshold is lowered so the tiny transformer head (the quickest graph to
    export) takes that path."""
    import onnxruntime as ort

    from serving.artifacts import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1024)
    modules = load_checkpoint(tiny_checkpoint)
    path = tmp_path / "transformer_head.onnx"
    onnx_export.export_graph("transformer_head", modules, path, onnx_export.OPSET, slim=True)
    data = tmp_path / "transformer_head.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    hidden, timestep = torch.randn(1, 12, modules.transformer.config.hidden_size), torch.tensor([0.4])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"hidden_img": hidden.numpy(), "timestep": timestep.numpy()})[0]
    with torch.no_grad():
        theirs = TransformerHeadGraph(modules.transformer)(hidden, timestep)
    assert relative_error(ours, theirs) <= GRAPH_TOLERANCE
