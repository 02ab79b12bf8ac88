"""Checkpoint (official layout) -> ONNX graphs + manifest.json, ready for ONNX Runtime or TensorRT.

The four component graphs, and the transformer once more in stages (`transformer_embed`, `_modulate`,
`_layers`, `_head`) for step caching, which runs the main layers on only some samples of a call: ONNX Runtime
serves the stages; TensorRT engines are built from the whole `transformer`.

    python -m export.onnx_export --checkpoint checkpoints/small --out build/onnx/small

Each graph has named inputs/outputs and dynamic axes (docs/tensor_contract.md). The manifest records the
opset, the checkpoint hash, the graph contracts and the few model facts the pipeline needs; a second run on
an unchanged checkpoint with the same settings is a no-op. A caller may ask for some graphs only (a backend's
repository asks for those it serves): the manifest lists what the folder holds, and a later request for more adds
them. Pods may share the folder: one exports while the others wait (`export_onnx`).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.export import Dim

from serving.artifacts.cache_lock import exclusive_lock
from serving.artifacts.checkpoint_hash import checkpoint_hash
from serving.artifacts.folders import replaceable
from serving.model.checkpoint import CheckpointModules, check_layout, copy_processor, load_checkpoint
from serving.model.graphs import (
    TextEncoderGraph,
    TransformerEmbedGraph,
    TransformerHeadGraph,
    TransformerLayersGraph,
    TransformerModulateGraph,
    VaeDecoderGraph,
    VaeEncoderGraph,
)
from serving.model.transformer import joint_mask
from serving.pipeline.packing import pack_batch
from serving.runtime.onnx_backend import GRAPH_NAMES, MANIFEST

OPSET = 20
FORMAT_VERSION = 3  # 2: the manifest's spec carries text_positions; 3: the transformer stage graphs
log = logging.getLogger("export.onnx")
# How long a pod waits for another one's export before giving up: a full-size checkpoint takes many minutes, and a
# dead builder frees its lock at once (a vanished node: within the NFS lease).
EXPORT_WAIT_S = 3600.0

# Upper bounds of the dynamic axes. They bound what the graphs accept, not what a request may ask: the
# serving limits (serving/pipeline/request.py) are tighter. Minimums of 2 keep torch.export from
# specialising an axis to 0/1; the exported graphs still run with 1.
MAX_BATCH = 64
MAX_TEXT = 4096
MAX_TOKENS = 16384  # 2048x2048 pixels -> 256x256 latent -> 128x128 patches
MAX_REF_SLOTS = 5


@dataclass(frozen=True)
class GraphExport:
    build: Callable[[CheckpointModules], nn.Module]
    example: Callable[[CheckpointModules], dict[str, torch.Tensor]]
    dynamic_shapes: Callable[[], dict[str, dict[int, Any]]]
    outputs: tuple[str, ...]


def _text_example(modules: CheckpointModules) -> dict[str, torch.Tensor]:
    ids = torch.randint(7, int(modules.mllm.config.get_text_config().vocab_size), (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _transformer_example(modules: CheckpointModules) -> dict[str, torch.Tensor]:
    config = modules.transformer.config
    c = config.in_channels
    text_mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    packed = pack_batch(
        [torch.randn(c, 8, 8), torch.randn(c, 6, 10)],
        torch.tensor([0.2, 0.7]),
        torch.randn(2, 9, config.text_feat_dim),
        text_mask,
        [[torch.randn(c, 4, 6), torch.randn(c, 8, 4)], [torch.randn(c, 2, 2)]],
        patch_size=config.patch_size,
        axes_dim=config.axes_dim_rope,
    )
    return packed.as_inputs()


def _stage_example(modules: CheckpointModules) -> dict[str, torch.Tensor]:
    """What the main layers take, from the transformer example's first stage."""
    inputs = _transformer_example(modules)
    with torch.no_grad():
        hidden, temb = TransformerEmbedGraph(modules.transformer)(**inputs)
    mask = joint_mask(inputs["text_mask"], inputs["ref_mask"], inputs["img_mask"])
    rope = {"rope_cos": inputs["rope_cos"], "rope_sin": inputs["rope_sin"]}
    return {"hidden": hidden, "temb": temb, "joint_mask": mask, **rope}


def _head_example(modules: CheckpointModules) -> dict[str, torch.Tensor]:
    inputs = _transformer_example(modules)
    width = inputs["img_tokens"].shape[1]
    hidden = torch.randn(2, width, modules.transformer.config.hidden_size)
    return {"hidden_img": hidden, "timestep": inputs["timestep"]}


def _batch() -> Any:
    return Dim("batch", min=1, max=MAX_BATCH)


def _seq(least: int = 3) -> Any:
    return Dim("seq_len", min=least, max=MAX_TEXT + (MAX_REF_SLOTS + 1) * MAX_TOKENS)


def _layers_dims() -> dict[str, dict[int, Any]]:
    batch, seq = _batch(), _seq()
    return {
        "hidden": {0: batch, 1: seq},
        "temb": {0: batch},
        "joint_mask": {0: batch, 1: seq},
        "rope_cos": {0: batch, 1: seq},
        "rope_sin": {0: batch, 1: seq},
    }


def _transformer_dims(least_seq: int = 3) -> dict[str, dict[int, Any]]:
    batch = _batch()
    img, text = Dim("img_len", min=1, max=MAX_TOKENS), Dim("text_len", min=1, max=MAX_TEXT)
    slots, ref = Dim("ref_slots", min=1, max=MAX_REF_SLOTS), Dim("ref_len", min=1, max=MAX_TOKENS)
    seq = _seq(least_seq)
    return {
        "img_tokens": {0: batch, 1: img},
        "img_mask": {0: batch, 1: img},
        "timestep": {0: batch},
        "text_feats": {0: batch, 1: text},
        "text_mask": {0: batch, 1: text},
        "ref_tokens": {0: batch, 1: slots, 2: ref},
        "ref_mask": {0: batch, 1: slots, 2: ref},
        "rope_cos": {0: batch, 1: seq},
        "rope_sin": {0: batch, 1: seq},
    }


def _image_dims(name: str, multiple: int, max_batch: int = MAX_BATCH) -> Callable[[], dict[str, dict[int, Any]]]:
    limit = 2 * MAX_TOKENS**0.5 * 8 // multiple  # pixel or latent side / multiple, at the largest size

    def dims() -> dict[str, dict[int, Any]]:
        side = int(limit)
        height = multiple * Dim(f"{name}_h", min=1, max=side)
        width = multiple * Dim(f"{name}_w", min=1, max=side)
        return {name: {0: Dim("batch", min=1, max=max_batch), 2: height, 3: width}}

    return dims


GRAPHS: dict[str, GraphExport] = {
    "text_encoder": GraphExport(
        build=lambda m: TextEncoderGraph(m.mllm),
        example=_text_example,
        dynamic_shapes=lambda: {
            "input_ids": {0: Dim("batch", min=1, max=MAX_BATCH), 1: Dim("text_len", min=2, max=MAX_TEXT)},
            "attention_mask": {0: Dim("batch", min=1, max=MAX_BATCH), 1: Dim("text_len", min=2, max=MAX_TEXT)},
        },
        outputs=("text_feats",),
    ),
    "vae_encoder": GraphExport(
        build=lambda m: VaeEncoderGraph(m.vae),
        example=lambda m: {"image": torch.rand(2, 3, 48, 80) * 2 - 1},
        dynamic_shapes=_image_dims("image", 16),
        outputs=("latents",),
    ),
    "transformer": GraphExport(
        build=lambda m: m.transformer,
        example=_transformer_example,
        # torch.export proves the whole transformer needs 6 tokens at least (a smaller declared minimum fails the
        # export, which torch.onnx then retries with this one: the same graph, one whole trace later)
        dynamic_shapes=lambda: _transformer_dims(least_seq=6),
        outputs=("velocity",),
    ),
    "transformer_embed": GraphExport(
        build=lambda m: TransformerEmbedGraph(m.transformer),
        example=_transformer_example,
        dynamic_shapes=_transformer_dims,
        outputs=("hidden", "temb"),
    ),
    "transformer_modulate": GraphExport(
        build=lambda m: TransformerModulateGraph(m.transformer),
        example=lambda m: {k: v for k, v in _stage_example(m).items() if k in ("hidden", "temb")},
        dynamic_shapes=lambda: {"hidden": {0: _batch(), 1: _seq()}, "temb": {0: _batch()}},
        outputs=("modulated",),
    ),
    "transformer_layers": GraphExport(
        build=lambda m: TransformerLayersGraph(m.transformer),
        example=_stage_example,
        dynamic_shapes=_layers_dims,
        outputs=("hidden_out",),
    ),
    "transformer_head": GraphExport(
        build=lambda m: TransformerHeadGraph(m.transformer),
        example=_head_example,
        dynamic_shapes=lambda: {
            "hidden_img": {0: _batch(), 1: Dim("img_len", min=1, max=MAX_TOKENS)},
            "timestep": {0: _batch()},
        },
        outputs=("velocity",),
    ),
    "vae_decoder": GraphExport(
        build=lambda m: VaeDecoderGraph(m.vae),
        example=lambda m: {"latents": torch.randn(2, 16, 6, 10)},
        # the decoder's trace guards the batch below 64: declared as such, not found by a failed first export
        dynamic_shapes=_image_dims("latents", 2, max_batch=MAX_BATCH - 1),
        outputs=("image",),
    ),
}


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}


# A protobuf message cannot pass 2 GiB: graphs whose weights come near it keep them in `<graph>.onnx.data` beside
# the graph (ONNX external data; ONNX Runtime and TensorRT read it from the graph's folder).
EXTERNAL_DATA_BYTES = 1 << 30


def _weights_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def save_graph(model: onnx.ModelProto, path: Path, weights_bytes: int) -> None:
    """Save a graph, with its initializers as external data when they are large."""
    for stale in path.parent.glob(f"{path.name}.data"):
        stale.unlink()
    if weights_bytes <= EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path))
        return
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data")


def export_graph(name: str, modules: CheckpointModules, path: Path, opset: int, slim: bool) -> dict[str, Any]:
    spec = GRAPHS[name]
    module = spec.build(modules).eval()
    example = spec.example(modules)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (),
            kwargs=example,
            dynamo=True,
            dynamic_shapes=spec.dynamic_shapes(),
            input_names=list(example),
            output_names=list(spec.outputs),
            opset_version=opset,
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=_weights_bytes(module) > EXTERNAL_DATA_BYTES)
    if slim:
        import onnxslim

        save_graph(onnxslim.slim(onnx.load(str(path))), path, _weights_bytes(module))
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        "file": path.name,
        "inputs": [_value_info(v) for v in graph.input],
        "outputs": [_value_info(v) for v in graph.output],
    }


def export_settings(opset: int, slim: bool, dtype: torch.dtype) -> dict[str, Any]:
    """What, besides the checkpoint, decides the graphs' bytes (and so TensorRT engines built from them)."""
    return {
        "format_version": FORMAT_VERSION,
        "opset": opset,
        "slim": slim,
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _held(out: Path, key: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of the export in `out` when it is of this checkpoint with these settings, else None. The
    folders are listed first: an NFS client may keep a name's stale lookup until its folder is read again."""
    try:
        if out.name not in os.listdir(out.parent) or MANIFEST not in os.listdir(out):
            return None
        manifest: dict[str, Any] = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    same = manifest.get("checkpoint_sha256") == key and manifest.get("settings") == settings
    return manifest if same else None


def _install(partial: Path, out: Path, held: dict[str, Any] | None, builder: str) -> None:
    """Make the export in `partial` what readers of `out` see. A whole export takes `out`'s name by rename; graphs
    added to a held one move in beside it under names its manifest does not list, then the manifest that lists them
    replaces the old one: a reader of either manifest finds every graph it lists, and none of them changes."""
    if held is not None:
        for path in partial.iterdir():
            if path.name != MANIFEST:
                path.replace(out / path.name)
        (partial / MANIFEST).replace(out / MANIFEST)
        partial.rmdir()
    elif out.exists():  # another checkpoint's or settings' export (a fixed --out), or --force
        stale = out.with_name(f"{out.name}.stale.{builder}")
        out.rename(stale)
        partial.rename(out)
        shutil.rmtree(stale)
    else:
        partial.rename(out)


def export_onnx(
    checkpoint: Path,
    out: Path,
    opset: int = OPSET,
    slim: bool = True,
    force: bool = False,
    dtype: torch.dtype = torch.float32,
    key: str | None = None,
    graphs: Sequence[str] = GRAPH_NAMES,
    wait_s: float = EXPORT_WAIT_S,
) -> Path:
    """Export `graphs` unless `out` already holds them for this checkpoint and settings; graphs it lacks are added.

    The weights are loaded, and exported, in `dtype` (bf16 for a full-size checkpoint: no float32 copy); the
    graphs' inputs and outputs stay float32 either way (the tensor contract). `key`: the checkpoint's hash when the
    caller has it (otherwise read from every byte of the checkpoint).

    `out` may be shared by pods (a ReadWriteMany volume): one exports under an exclusive lock on `<out>.lock` while
    the others wait for it, at most `wait_s` seconds (serving/artifacts/cache_lock.py). The export is written into
    `<out>.partial.<host>.<pid>` and moved into place whole; a dead builder's leftovers are removed by the next one.
    """
    check_layout(checkpoint)
    unknown = sorted(set(graphs) - set(GRAPHS))
    if unknown:
        raise ValueError(f"unknown graphs {unknown}; known: {', '.join(GRAPH_NAMES)}")
    settings = export_settings(opset, slim, dtype)
    key = key or checkpoint_hash(checkpoint)
    held = None if force else _held(out, key, settings)
    if held is not None and set(graphs) <= held["graphs"].keys():
        log.info("%s is up to date for checkpoint %s", out, key[:12])
        return out
    with exclusive_lock(out.with_name(out.name + ".lock"), wait_s, f"ONNX export {out.name}"):
        held = None if force else _held(out, key, settings)  # another builder may have exported meanwhile
        missing = [name for name in GRAPH_NAMES if name in graphs and (held is None or name not in held["graphs"])]
        if not missing:
            log.info("%s: exported by another builder meanwhile, reused", out)
            return out
        # Leftovers of builders that lost the lock (dead, or cut off past the NFS lease); this builder's own names
        # mean such a builder, still running, can never move its files into this one's export.
        for aside in ("partial", "stale"):
            for leftover in out.parent.glob(f"{glob.escape(out.name)}.{aside}.*"):
                shutil.rmtree(leftover, ignore_errors=True)
        if held is None and not replaceable(out, MANIFEST):
            raise FileExistsError(f"{out} is not an export folder (no {MANIFEST}): not replaced")
        builder = f"{socket.gethostname()}.{os.getpid()}"
        partial = out.with_name(f"{out.name}.partial.{builder}")
        try:
            partial.mkdir(parents=True)
            modules = load_checkpoint(checkpoint, dtype)
            exported = {}
            for name in missing:
                started = time.perf_counter()
                exported[name] = export_graph(name, modules, partial / f"{name}.onnx", opset, slim)
                log.info("exported %s in %.1f s", name, time.perf_counter() - started)
            if held is None:
                copy_processor(checkpoint / "processor", partial / "processor")
                spec = modules.spec.to_dict()
                manifest = {"checkpoint_sha256": key, "settings": settings, "spec": spec, "graphs": exported}
            else:
                every = held["graphs"] | exported
                manifest = held | {"graphs": {name: every[name] for name in GRAPH_NAMES if name in every}}
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
            _install(partial, out, held, builder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return out


def cached_export(
    checkpoint: Path, cache_root: Path, key: str | None = None, graphs: Sequence[str] = GRAPH_NAMES
) -> Path:
    """Export into `cache_root/<checkpoint hash prefix>-<settings hash prefix>`, reusing (or adding to) an export
    there: pods of different images may share the cache, and each keeps its own. `key`: the checkpoint's hash when
    the caller has it; otherwise taken with its memo in `cache_root` (checkpoint_hash.HASH_MEMO)."""
    check_layout(checkpoint)
    key = key or checkpoint_hash(checkpoint, cache_root)
    opset, slim, dtype = OPSET, True, torch.float32
    settings = json.dumps(export_settings(opset, slim, dtype), sort_keys=True)
    folder = f"{key[:16]}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"
    return export_onnx(checkpoint, cache_root / folder, opset=opset, slim=slim, dtype=dtype, key=key, graphs=graphs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint in the official layout")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--no-slim", action="store_true", help="skip the onnxslim clean-up")
    parser.add_argument("--force", action="store_true", help="export even if the output is up to date")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights in the graphs")
    parser.add_argument(
        "--graphs", nargs="+", choices=GRAPH_NAMES, default=GRAPH_NAMES, help="graphs to export (default: all)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    export_onnx(
        args.checkpoint,
        args.out,
        opset=args.opset,
        slim=not args.no_slim,
        force=args.force,
        dtype=dtype,
        graphs=tuple(args.graphs),
    )
    print(f"ONNX graphs in {args.out}")


if __name__ == "__main__":
    main()
