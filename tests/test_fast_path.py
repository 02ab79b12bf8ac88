"""The PyTorch fast path (serving/runtime/fast_path.py) on the CPU: every switch against the golden transformer
outputs, packed as the BLS packs (text rounded up to 16 tokens, an empty reference slot for text-to-image), in
batched calls and in single-row calls, where the mask-free path must be the one taken. Compiled blocks run here
with Inductor's CPU code; CUDA graphs and the GPU kernels run only on a GPU (tests/test_gpu.py, make gpu-check)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from serving.errors import SettingError
from serving.model import transformer
from serving.model.transformer import OmniGen2Transformer
from serving.pipeline.eager import OmniGen2Pipeline
from serving.pipeline.grouping import CallCost
from serving.pipeline.packing import pack_batch, unpack_output
from serving.pipeline.step_cache import UNCACHED, CacheStore, CallStats, Control, Mode
from serving.runtime import fast_path as fp
from serving.runtime.fast_path import DEFAULT_WARMUP, FastPath, trim_padding
from serving.runtime.torch_backend import transformer_call
from serving.runtime.torch_stages import WARMUP_CALLS, TorchStages, warm_up
from tests.golden import relative_error, request_from_case, transformer_case_inputs

TOLERANCE = 1e-4  # as tests/test_transformer_parity.py
TEXT_MULTIPLE = 16  # as the BLS pads text


@pytest.fixture
def model(tiny_checkpoint: Path) -> Iterator[OmniGen2Transformer]:
    """A model of its own: the fast path changes its attention mode and may compile its blocks."""
    yield OmniGen2Transformer.from_pretrained(tiny_checkpoint / "transformer")


def _calls(case: dict[str, Any], golden: Path) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """The case's samples in one call, then each alone."""
    inputs = transformer_case_inputs(case, golden)
    count = len(inputs["latents"])
    for rows in [list(range(count))] + [[i] for i in range(count)]:
        yield rows, inputs


def _outputs(stages: TorchStages, cases: dict[str, Any], golden: Path) -> Iterator[tuple[torch.Tensor, Any]]:
    """(velocity, golden velocity) of every sample of every golden case, called batched and row by row."""
    model = stages.model
    for case in cases["transformer_cases"]:
        for rows, inputs in _calls(case, golden):
            refs = inputs["refs"]
            text_mask = inputs["text_mask"][rows]
            padded = -(-text_mask.shape[1] // TEXT_MULTIPLE) * TEXT_MULTIPLE
            pad = padded - text_mask.shape[1]
            packed = pack_batch(
                [inputs["latents"][i] for i in rows],
                inputs["timestep"][rows],
                F.pad(inputs["text_feats"][rows], (0, 0, 0, pad)),
                F.pad(text_mask, (0, pad)),
                [refs[i] for i in rows],
                patch_size=model.config.patch_size,
                axes_dim=model.config.axes_dim_rope,
                min_ref_slots=1,
            )
            velocity, _ = transformer_call(stages, packed.as_inputs(), [UNCACHED] * len(rows), CacheStore())
            outputs = unpack_output(velocity, packed.latent_sizes, model.config.patch_size)
            for out, i in zip(outputs, rows, strict=True):
                yield out, inputs["expected"][i]


def _worst_error(stages: TorchStages, cases: dict[str, Any], golden: Path) -> float:
    return max(relative_error(out, expected) for out, expected in _outputs(stages, cases, golden))


class AttentionSpy:
    """Records what each attention call was given: a bias, a block mask or nothing."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.masks: list[str] = []
        sdpa, real_flex = F.scaled_dot_product_attention, transformer.flex_attention

        def spy_sdpa(*args: Any, attn_mask: Any = None, **kwargs: Any) -> Any:
            self.masks.append("none" if attn_mask is None else "bias")
            return sdpa(*args, attn_mask=attn_mask, **kwargs)

        def spy_flex(*args: Any, **kwargs: Any) -> Any:
            self.masks.append("block")
            return real_flex(*args, **kwargs)

        monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", spy_sdpa)
        monkeypatch.setattr(transformer, "flex_attention", spy_flex)


FOLDED = FastPath("sdpa", padded_attention="folded")


@pytest.mark.parametrize(
    "fast",
    [
        FastPath.off(),
        FastPath("sdpa"),
        FastPath("sdpa", trim_padding=True),
        FastPath("flex", trim_padding=True),
        FOLDED,
        FastPath("sdpa", trim_padding=True, padded_attention="folded"),
    ],
    ids=["dense", "sdpa", "sdpa-trim", "flex-trim", "sdpa-folded", "sdpa-trim-folded"],
)
def test_every_attention_mode_matches_the_golden_outputs(
    model: OmniGen2Transformer, cases: dict[str, Any], golden: Path, fast: FastPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = AttentionSpy(monkeypatch)
    assert _worst_error(TorchStages(model, fast), cases, golden) <= TOLERANCE
    kinds = set(spy.masks)
    if fast.attention == "dense":
        assert kinds == {"bias"}
    elif fast.padded_attention == "folded":  # padded calls too: their mask rides in the heads
        assert kinds == {"none"}
    elif fast.trim_padding:  # single rows lose every mask; batches with padding keep theirs
        assert "none" in kinds and ("block" if fast.attention == "flex" else "bias") in kinds
    else:  # untrimmed, text padding to 16 and the empty reference slot leave few calls unmasked
        assert "bias" in kinds


def test_folded_padding_is_the_bias_paths_arithmetic(
    model: OmniGen2Transformer, cases: dict[str, Any], golden: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`padded_attention="folded"` against the bias it replaces, call for call over every golden case untrimmed
    (prompts padded to 16, the empty reference slot, CFG branches of different prompt lengths, edits with
    references of other sizes, several samples per call, and each row alone): every SDPA call goes unmasked with
    the grouped heads, and the outputs are the bias path's to float32 rounding (exp(-1e4) is 0 either way)."""
    bias = [out for out, _ in _outputs(TorchStages(model, FastPath("sdpa")), cases, golden)]
    spy = AttentionSpy(monkeypatch)
    folded = list(_outputs(TorchStages(model, FOLDED), cases, golden))
    assert set(spy.masks) == {"none"} and len(folded) == len(bias)
    assert max(relative_error(out, same) for (out, _), same in zip(folded, bias, strict=True)) <= 1e-6
    assert max(relative_error(out, expected) for out, expected in folded) <= TOLERANCE
    # Negative control: without the bias the folded channel attends the padding and misses the golden outputs
    monkeypatch.setattr(transformer, "MASK_BIAS", 0.0)
    assert _worst_error(TorchStages(model, FOLDED), cases, golden) > 10 * TOLERANCE


def test_a_folded_key_mask_refuses_a_dtype_its_bias_overflows() -> None:
    """MASK_BIAS * sqrt(head_dim) is past fp16's 65504 at the model's 120 channels: the key channel would be -inf, and
    an all-padding row (an empty reference slot) NaN. fp16 is not offered; the rule stays where the mask is built."""
    mask = torch.tensor([[True, False]])
    with pytest.raises(ValueError, match=r"overflows torch\.float16"):
        transformer.folded_key_mask(mask, 120, torch.float16)
    key = transformer.folded_key_mask(mask, 120, torch.bfloat16).key
    assert key.shape == (1, 1, 2, 8) and key.isfinite().all() and key[0, 0, 1, 0] < -1e5


def test_compiled_blocks_give_sdpa_folded_heads_of_a_fixed_size(model: OmniGen2Transformer) -> None:
    """With dynamic shapes every size of a compiled block's inputs is symbolic, the folded mask's too: a fold width
    read from the mask made SDPA's heads `s + head_dim` channels in the traced block (flash and cuDNN are chosen by
    the head size), where eager calls had head_dim + width. The SDPA call's q, k and v must have a plain int."""
    model.set_attention("sdpa")
    model.set_padded_attention("folded")
    attn = model.layers[0].attn
    head_dim = attn.head_dim
    sizes: list[object] = []

    def capture(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        for node in graph.graph.nodes:
            if node.target is F.scaled_dot_product_attention:
                sizes.extend(arg.meta["example_value"].shape[-1] for arg in node.args[:3])
        return graph.forward

    compiled = torch.compile(attn, **fp.compile_options(FastPath(compile=True)) | {"backend": capture})
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    x, cos, sin = (
        torch.randn(2, 40, model.config.hidden_size),
        torch.randn(1, 40, head_dim // 2),
        torch.zeros(1, 40, head_dim // 2),
    )
    eager = attn(x, model.key_mask(mask, x.dtype), cos, sin)
    torch.testing.assert_close(compiled(x, model.key_mask(mask, x.dtype), cos, sin), eager)
    assert all(type(size) is int for size in sizes) and len(sizes) == 3, sizes  # before: s0 + head_dim
    assert sizes == [8 * (head_dim // 8 + 1)] * 3  # the next multiple of 8 above head_dim, as eager calls have


def test_parity_fails_when_padding_is_attended(
    model: OmniGen2Transformer, cases: dict[str, Any], golden: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: dropping the mask of a padded call must miss the tolerance, or the test above proves
    nothing about the masks it drops."""
    monkeypatch.setattr(TorchStages, "_unpadded", lambda self, mask: True)
    assert _worst_error(TorchStages(model, FastPath("sdpa")), cases, golden) > 10 * TOLERANCE


# (prompt tokens, reference latent sizes, latent size) of each row: the CPU rehearsal's 64x64 is an 8x8 latent
Row = tuple[int, list[tuple[int, int]], tuple[int, int]]
LATENT = (8, 8)


def _request_call(stages: TorchStages, rows: list[Row], controls: list[Control], store: CacheStore) -> CallStats:
    """One transformer call packed as the BLS packs it (text to a multiple of 16, at least one reference slot)."""
    text_len = -(-max(tokens for tokens, _, _ in rows) // TEXT_MULTIPLE) * TEXT_MULTIPLE
    text_mask = torch.zeros(len(rows), text_len, dtype=torch.bool)
    for i, (tokens, _, _) in enumerate(rows):
        text_mask[i, :tokens] = True
    config = stages.model.config
    packed = pack_batch(
        [torch.randn(config.in_channels, *size) for _, _, size in rows],
        torch.full((len(rows),), 0.5),
        torch.randn(len(rows), text_len, config.text_feat_dim),
        text_mask,
        [[torch.randn(config.in_channels, *size) for size in refs] or None for _, refs, _ in rows],
        patch_size=config.patch_size,
        axes_dim=config.axes_dim_rope,
        min_ref_slots=1,
    )
    return transformer_call(stages, packed.as_inputs(), controls, store)[1]


@pytest.mark.parametrize(
    ("attention", "padded", "graphs"),
    [("sdpa", "bias", 8), ("sdpa", "folded", 8), ("flex", "bias", 12)],
    ids=["sdpa-bias", "sdpa-folded", "flex"],
)
def test_requests_compile_nothing_after_the_warm_up(
    model: OmniGen2Transformer,
    cases: dict[str, Any],
    golden: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    attention: str,
    padded: str,
    graphs: int,
) -> None:
    """The load-time warm-up compiles every graph the blocks need (block kind x one row or more x masked or not),
    so calls shaped like every request the server sends compile nothing: on a GPU each graph is an Inductor
    compile of seconds to a minute inside a user's request. Before: one row with several references (a stride-0
    conditioning), one row of a padded call (step caching), the images of one prompt, each compiled at request
    time. Every block is captured whole (fullgraph) with dynamic shapes; Inductor's CPU code takes a minute per
    test here and is not what a GPU runs (Triton kernels), so the blocks go through aot_eager: the capture and
    dynamo's guards, which decide what compiles, are checked, not the generated code. A folded mask (padded calls
    unmasked) takes the bias's place: as many graphs, and new prompt lengths compile nothing. `flex` block masks
    count 128-token blocks, and one block is a graph of its own against several (dynamo specializes a size of 1):
    its warm-up adds a pass with every sequence in one block and one with a prompt of several (12 graphs).
    Before: with flex, a call that fits one block (CFG pair, or one row) and a prompt past 128 tokens compiled."""
    assert fp.compile_options(FastPath.off())["backend"] == "inductor"
    monkeypatch.setenv("OMNIGEN2_COMPILE_BACKEND", "aot_eager")
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))  # `configure` sets it; restored after the test
    torch._dynamo.reset()  # graphs of earlier tests in this process would hide what this warm-up misses
    torch._dynamo.utils.counters.clear()
    fast = FastPath(
        attention, trim_padding=True, compile=True, warmup=((64, 64),), cache_dir=cache, padded_attention=padded
    )
    stages = TorchStages(model, fast)
    report = warm_up(stages)
    passes = 3 if attention == "flex" else 1  # flex: its one-block and several-block passes too
    assert report["warmup_calls"] == passes * len(WARMUP_CALLS) and report["warmup_seconds"] > 0 and cache.is_dir()
    compiled = torch._dynamo.utils.counters["stats"]
    warmed = compiled["unique_graphs"]
    assert warmed == graphs, "plain and modulated blocks, one row or several, masked or not (flex: in 1 block or more)"

    small, wide = (6, 6), (6, 10)
    calls: list[list[Row]] = [
        [(20, [], LATENT)],  # text to image, one branch (no CFG, or one branch per call)
        [(20, [], LATENT), (9, [], LATENT)],  # two CFG branches
        [(20, [LATENT], LATENT)],  # an edit's branch with one reference
        [(20, [LATENT, small], LATENT)],  # one row with references of two sizes
        [(20, [LATENT] * 5, LATENT)],  # five references
        [(20, [LATENT] * 5, LATENT), (9, [], LATENT), (12, [LATENT] * 5, LATENT)],  # an edit's three branches
        [(20, [], LATENT)] * 3,  # three images of one prompt
        [(20, [LATENT], LATENT), (9, [], wide), (30, [small, LATENT], (10, 6))],  # callers of different sizes
        [(300, [], LATENT), (9, [], LATENT)],  # a long prompt: text of several 128-token blocks
        [(150, [LATENT], LATENT), (9, [], LATENT), (40, [LATENT], LATENT)],  # block counts unlike the rows'
    ]
    for rows in calls:
        _request_call(stages, rows, [UNCACHED] * len(rows), CacheStore())
    # Step caching next to an uncached caller: the cached row skips (TeaCache) or extrapolates (TaylorSeer), and
    # the other row, padded to the call's longest prompt, runs alone; a short and a long prompt.
    store, alone = CacheStore(), []
    for tokens, first_key in ((30, 1), (200, 3)):
        for step in range(8):
            for key, mode in ((first_key, Mode.TAYLORSEER), (first_key + 1, Mode.TEACACHE)):
                cached = Control(key=key, mode=mode, step=step, force=step in (0, 7), threshold=100.0)
                controls = [cached, Control(key=key + 10, step=step)]
                stats = _request_call(stages, [(tokens, [LATENT], LATENT), (9, [], LATENT)], controls, store)
                alone.append(stats.main_layer_rows == 1)
    assert sum(alone) >= 8  # the one-row calls did happen
    assert _worst_error(stages, cases, golden) <= TOLERANCE  # every golden case, batched and row by row
    assert compiled["unique_graphs"] == warmed


CPU_FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_sdpa_kernel_order_reaches_the_unmasked_calls(
    model: OmniGen2Transformer, cases: dict[str, Any], golden: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """`sdpa_kernels` limits the unmasked SDPA calls to its kernels, eagerly and in the compiled blocks (fullgraph:
    torch.compile traces the `sdpa_kernel` context and builds each block with the kernel it allows), and leaves
    the outputs within the golden tolerance. The order is refused on the CPU (it picks among CUDA's kernels), so
    that check stands aside here: torch's CPU SDPA has a fused flash kernel and the math one and honours which are
    allowed, which is what is watched (the math kernel's softmax instead of the flash kernel). The CFG pair's
    padded calls, folded, are unmasked calls too and follow the order (a bias would keep SDPA's choice)."""
    monkeypatch.setattr(fp, "check_device", lambda kernels, device: None)
    monkeypatch.setenv("OMNIGEN2_COMPILE_BACKEND", "aot_eager")

    def kernels_run(order: tuple[str, ...]) -> tuple[TorchStages, set[str]]:
        fast = FastPath("sdpa", trim_padding=True, compile=compiled, sdpa_kernels=order, padded_attention="folded")
        stages = TorchStages(model, fast)

        def calls() -> None:
            _request_call(stages, [(20, [LATENT], LATENT)], [UNCACHED], CacheStore())  # one row: nothing masked
            _request_call(stages, [(20, [], LATENT), (9, [], LATENT)], [UNCACHED] * 2, CacheStore())  # padded

        # Compiles the graphs these calls take (5 of the load-time warm-up's 8: a third less compiling), so that
        # only compiled code runs in the profiled calls.
        calls()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            calls()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled in the window
        return stages, {event.name for event in profile.events()}

    _, default = kernels_run(())
    assert CPU_FLASH in default and "aten::_softmax" not in default  # SDPA's own choice, unchanged
    stages, math_only = kernels_run(("math",))
    assert CPU_FLASH not in math_only and "aten::_softmax" in math_only
    assert _worst_error(stages, cases, golden) <= TOLERANCE


def test_trimming_keeps_the_valid_tokens_and_their_positions() -> None:
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    ref_mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    ref_mask[0, 0, :2] = True  # one reference of 2 tokens in row 0; slot 1 unused
    total = 4 + 2 * 3 + 5
    rope = torch.arange(total, dtype=torch.float32)[None, :, None].expand(2, total, 1)
    inputs = {
        "text_feats": torch.zeros(2, 4, 8),
        "text_mask": text_mask,
        "ref_tokens": torch.zeros(2, 2, 3, 4),
        "ref_mask": ref_mask,
        "rope_cos": rope,
        "rope_sin": rope,
        "img_tokens": torch.zeros(2, 5, 4),
    }
    out = trim_padding(inputs)
    assert out["text_feats"].shape == (2, 3, 8) and out["ref_tokens"].shape == (2, 1, 2, 4)
    assert out["rope_cos"][0, :, 0].tolist() == [0, 1, 2, 4, 5, 10, 11, 12, 13, 14]
    assert out["img_tokens"] is inputs["img_tokens"]
    no_refs = trim_padding(inputs | {"ref_mask": torch.zeros(2, 2, 3, dtype=torch.bool)})
    assert no_refs["ref_tokens"].shape == (2, 0, 0, 4) and no_refs["rope_cos"].shape[1] == 3 + 5


@pytest.mark.parametrize("padded", ["bias", "folded"])
def test_batched_branches_in_the_eager_pipeline_match_the_golden_case(
    tiny_checkpoint: Path, cases: dict[str, Any], golden: Path, padded: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All CFG branches of a step in one call, on the fast path: the same pixels as the reference's call per branch.
    The branches' prompts differ in length, so the main layers' keys are padded (bias, or folded): every pipeline
    case (text to image, edits, two input images, CFG range) and feature case (TeaCache, TaylorSeer, five input
    images, two images per prompt, a truncated long prompt), the latter at test_step_cache's tolerance."""
    import numpy as np

    fast = FastPath("sdpa", trim_padding=True, padded_attention=padded)
    pipeline = OmniGen2Pipeline.from_pretrained(tiny_checkpoint, fast=fast, batch_branches=True)
    named = [(c, 1e-4) for c in cases["pipeline_cases"]] + [(c, 1e-5) for c in cases["feature_cases"]]
    spy = AttentionSpy(monkeypatch)
    for case, tolerance in named:
        result = pipeline(request_from_case(case, golden))
        assert relative_error(result.latents, np.load(golden / case["final_latents"])) <= tolerance, case["name"]
    assert set(spy.masks) == ({"none"} if padded == "folded" else {"none", "bias"})


def test_the_batched_eager_pipeline_groups_branches_as_the_bls_does(
    tiny_checkpoint: Path, cases: dict[str, Any], golden: Path
) -> None:
    """The batched pipeline plans its calls as the BLS does (grouping.plan_calls, from what calls have cost): an
    edit's branch without the reference image pads to the others' tokens in a shared call, which on an H100 costs
    4096 tokens against about 550 for a call's fixed cost, so there it gets its own call. Before, the batched
    pipeline put every branch in one call whatever it cost (its edits ran 14 % slower per step than a call per
    branch). Here the tiny model's calls say nothing either way, so the cost is set: every shape its own call when a
    call costs next to nothing beside its tokens, one call when it costs more than any padding."""
    import numpy as np

    fast = FastPath("sdpa", trim_padding=True)
    pipeline = OmniGen2Pipeline.from_pretrained(tiny_checkpoint, fast=fast, batch_branches=True)
    case = next(c for c in cases["pipeline_cases"] if c["name"] == "edit_one_image")  # 3 branches of 3 shapes
    calls: list[int] = []
    transformer = pipeline.backend.transformer_cached

    def counted(inputs: Any, caches: Any) -> Any:
        calls.append(len(caches))
        return transformer(inputs, caches)

    pipeline.backend.transformer_cached = counted  # type: ignore[method-assign]
    pipeline.call_cost.seconds_per_token = 1.0  # a call's fixed 10 ms is worth 0.01 tokens: no padding is worth it
    result = pipeline(request_from_case(case, golden))
    assert calls == [1, 1, 1] * case["steps"]
    assert relative_error(result.latents, np.load(golden / case["final_latents"])) <= 1e-4
    calls.clear()
    pipeline.call_cost = CallCost(fixed_s=1.0)  # every call within its fixed cost: nothing learnt, one call a step
    pipeline(request_from_case(case, golden))
    assert calls == [3] * case["steps"]


def _args(**flags: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fp.add_fast_path_arguments(parser)
    argv = []
    for key, value in flags.items():
        name = "--" + key.replace("_", "-")
        argv += [name] if value is True else [f"--no-{name[2:]}"] if value is False else [name, str(value)]
    return parser.parse_args(argv)


def test_flags_on_top_of_the_devices_defaults(tmp_path: Path) -> None:
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    on_gpu = fp.fast_path_from_args(_args(), cuda, bf16, tmp_path)
    assert (on_gpu.attention, on_gpu.trim_padding, on_gpu.compile, on_gpu.cuda_graphs) == ("sdpa", True, True, True)
    assert on_gpu.warmup == DEFAULT_WARMUP and on_gpu.cache_dir == (tmp_path / "torch-compile").resolve()
    assert fp.fast_path_from_args(_args(), cpu, bf16, tmp_path) == FastPath.off()
    assert fp.fast_path_from_args(_args(), cuda, torch.float32, tmp_path) == FastPath.off()
    no_compile = fp.fast_path_from_args(_args(compile=False), cuda, bf16, tmp_path)
    assert (no_compile.compile, no_compile.cuda_graphs, no_compile.attention) == (False, False, "sdpa")
    chosen = fp.fast_path_from_args(_args(attention="flex", warmup_resolutions="1344x768"), cuda, bf16, tmp_path)
    assert (chosen.attention, chosen.warmup) == ("flex", ((1344, 768),))
    assert FastPath.from_params(chosen.to_params()) == chosen
    assert FastPath.from_params({}) == FastPath.off()


def test_the_sdpa_kernel_order_goes_from_its_flag_to_the_models_parameters(tmp_path: Path) -> None:
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert fp.fast_path_from_args(_args(), cuda, bf16, tmp_path).sdpa_kernels == ()  # SDPA's own order by default
    chosen = fp.fast_path_from_args(_args(sdpa_kernels="cudnn,flash"), cuda, bf16, tmp_path)
    assert chosen.sdpa_kernels == ("cudnn", "flash") and chosen.to_params()["sdpa_kernels"] == "cudnn,flash"
    assert FastPath.from_params(chosen.to_params()) == chosen
    assert FastPath.from_params(FastPath.off().to_params()).sdpa_kernels == ()


def test_padded_attention_goes_from_its_flag_to_the_models_parameters(tmp_path: Path) -> None:
    """Folded by default where the default attention is sdpa (CUDA); bias otherwise, and when another mode is
    chosen; the parameter is written only where it is not bias, so the CPU's repositories stay as they were."""
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    on_gpu = fp.fast_path_from_args(_args(), cuda, bf16, tmp_path)
    assert on_gpu.padded_attention == "folded" and on_gpu.to_params()["padded_attention"] == "folded"
    assert FastPath.from_params(on_gpu.to_params()) == on_gpu
    assert fp.fast_path_from_args(_args(attention="flex"), cuda, bf16, tmp_path).padded_attention == "bias"
    assert fp.fast_path_from_args(_args(padded_attention="bias"), cuda, bf16, tmp_path).padded_attention == "bias"
    chosen = fp.fast_path_from_args(_args(attention="sdpa", padded_attention="folded"), cpu, bf16, tmp_path)
    assert chosen.padded_attention == "folded" and FastPath.from_params(chosen.to_params()) == chosen
    assert "padded_attention" not in fp.fast_path_from_args(_args(attention="sdpa"), cpu, bf16, tmp_path).to_params()
    with pytest.raises(SettingError, match="padded_attention: folded is for --attention sdpa"):
        fp.fast_path_from_args(_args(padded_attention="folded"), cpu, bf16, tmp_path)  # the CPU's default is dense


def test_folded_padding_is_refused_where_no_fused_kernel_takes_it(tmp_path: Path) -> None:
    """On CUDA only flash and cuDNN take a folded call: refused in float32 (SDPA's math kernel would hold every
    score, 11.6 GB for the CFG pair at 8320 tokens) and with a kernel order naming neither ("No available kernel"
    at the first padded call); the default then follows the order, as it follows the mode. The CPU's flash kernel
    takes float32 (the golden tests above)."""
    cuda, bf16, fp32 = torch.device("cuda"), torch.bfloat16, torch.float32
    with pytest.raises(SettingError, match=r"^--padded-attention: folded needs --precision bf16 on cuda"):
        fp.fast_path_from_args(_args(attention="sdpa", padded_attention="folded"), cuda, fp32, tmp_path)
    for order in ("efficient", "math", "efficient,math"):
        with pytest.raises(SettingError, match=rf"^--padded-attention: folded needs cudnn or flash .*\({order}\)"):
            fp.fast_path_from_args(_args(sdpa_kernels=order, padded_attention="folded"), cuda, bf16, tmp_path)
        assert fp.fast_path_from_args(_args(sdpa_kernels=order), cuda, bf16, tmp_path).padded_attention == "bias"
    for order in ("flash", "efficient,cudnn"):
        chosen = fp.fast_path_from_args(_args(sdpa_kernels=order), cuda, bf16, tmp_path)
        assert chosen.padded_attention == "folded"
    assert fp.fast_path_from_args(_args(attention="sdpa"), cuda, fp32, tmp_path).padded_attention == "bias"


def test_the_sdpa_kernel_order_is_refused_where_it_cannot_act(model: OmniGen2Transformer, tmp_path: Path) -> None:
    """On the CPU (CUDA's kernels), from the flags and on a model there; and with dense attention (no call unmasked)."""
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    with pytest.raises(SettingError) as refused:
        fp.fast_path_from_args(_args(sdpa_kernels="cudnn,flash"), cpu, bf16, tmp_path)
    assert refused.value.setting == "--sdpa-kernels" and "leave it out on the cpu" in refused.value.description
    with pytest.raises(SettingError, match="--sdpa-kernels"):
        TorchStages(model, FastPath("sdpa", sdpa_kernels=("cudnn",)))
    with pytest.raises(SettingError, match="sdpa_kernels: dense attention masks every call"):
        fp.fast_path_from_args(_args(sdpa_kernels="cudnn", attention="dense"), torch.device("cuda"), bf16, tmp_path)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"attention": "fast"}, "attention"),
        ({"cuda_graphs": True}, "cuda_graphs"),
        ({"attention": "sdpa", "sdpa_kernels": ("cudnn", "fast")}, "sdpa_kernels"),
        ({"attention": "sdpa", "sdpa_kernels": ("flash", "flash")}, "sdpa_kernels"),
        ({"attention": "sdpa", "padded_attention": "split"}, "padded_attention"),
        ({"attention": "flex", "padded_attention": "folded"}, "padded_attention"),
        ({"padded_attention": "folded"}, "padded_attention"),
    ],
)
def test_inconsistent_settings_are_refused_naming_the_setting(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(SettingError, match=field):
        FastPath(**settings)


@pytest.mark.parametrize("text", ["1024", "1024x", "0x512", "axb"])
def test_bad_warmup_resolutions_are_refused(text: str) -> None:
    with pytest.raises(SettingError, match="warmup_resolutions"):
        fp.parse_resolutions(text)
