"""`make gpu-check`: the full-size model on one GPU, in process and served, in runs of at most 8 minutes.

    python -m benchmarks.gpu_check --out DIR [--processor DIR]   # on the GPU machine (`make gpu-check` prints how)
    python -m benchmarks.gpu_check --out DIR --smoke             # the same stages on the CPU, tiny model (CI)
    python -m benchmarks.gpu_check --render DIR --device-reply "one NVIDIA H100 GPU ..."   # name the machine

Stages, each with a wall-clock budget (BUDGETS); results.json and results.md are rewritten after every one, so a
stage that fails or runs out of time still leaves what the others measured:
  probe            GPU, driver, torch/CUDA, which SDPA kernels run the model's attention shape, tritonserver starts
  build            the full-size random model straight on the GPU in bf16 (no checkpoint read)
  checkpoint       that model written to local disk, for the served stack
  reference_*      (a) the reference's way: each CFG branch a transformer pass of its own, dense masks
  batched_*        (b) this project's: a step's branches in calls planned as the BLS plans them, SDPA unmasked
  compiled_*       (c) (b) compiled per block with CUDA graphs: the served default on a GPU (`_load` = compiling)
  profile          torch.profiler over two denoising steps of (c), or of (b) where (c) did not load: the top kernels
                   and how busy the GPU was over those steps' wall time (on the CPU: operators and CPU time)
  release          the in-process model freed, for the served stack's own copy
  served_*         `serving.stack --backend pytorch --precision bf16` on the device: text-to-image at concurrency 1, 2
                   and 4 (as many requests as the concurrency, all at once), each point with Triton's statistics of
                   every served model over it and the BLS's step against the transformer's compute
Each in-process stage runs text-to-image (`_t2i`) or a one-image edit (`_edit`) at 1024x1024, 50 steps, after a
short warm-up request, and records its seconds, its seconds per step and the peak GPU memory. `--skip` leaves
stages out: benchmarks/gpu_carry.py's RUNS split the stages between a session's two runs (the budgets do not fit one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import step_profile
from benchmarks.gpu_report import gpu_markdown
from benchmarks.harness import served_point
from benchmarks.machine import commit, machine_info
from benchmarks.memory import GpuPeakMemory
from benchmarks.report import save_results
from benchmarks.stages import Record, StageRunner
from benchmarks.triton_stats import ModelStatistics, model_statistics
from benchmarks.workloads import Workload
from export.make_checkpoint import DEFAULT_PROCESSOR, TRANSFORMERS, random_modules, save_modules
from serving import health_probe
from serving.model.checkpoint import CheckpointModules
from serving.pipeline.eager import OmniGen2Pipeline
from serving.pipeline.prompts import PromptTokenizer
from serving.runtime.fast_path import FastPath
from serving.runtime.torch_backend import TorchBackend
from serving.triton.install import TritonInstall
from serving.triton.launcher import TritonServer
from serving.triton.model_names import TRANSFORMER
from serving.triton.ports import LOOPBACK, Ports, free_port
from serving.triton.watchdog import stub_processes

GiB = 1024**3
COMMAND_T0 = "GPU_CHECK_COMMAND_T0"  # the device command's start (time.time()), which it exports before its install
LOG_BYTES = 256 * 1024
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Settings:
    size: str  # export/make_checkpoint.py's
    device: str
    side: int  # width = height, pixels
    steps: int
    warm_steps: int  # the untimed request before each timed one
    concurrency: tuple[int, ...]
    min_requests: int  # served requests per point: max(this, concurrency)
    total_s: float  # the whole run's budget; each stage also has its own (BUDGETS)
    profiled_steps: int  # the profile stage's, after a first step (it holds the prompt's encoding) left out


# One request per concurrent slot: concurrency 4 of 50-step requests already costs 40-60 s on an H100.
DEVICE = Settings("full", "cuda", 1024, 50, 2, (1, 2, 4), 1, 440, 2)
# Smoke: 2 steps, the fewest that leave a step after the first (which also holds the encodes) for the median; 4
# concurrent runs the same code as 2. CI time spared.
SMOKE = Settings("tiny", "cpu", 64, 2, 1, (1, 2), 1, 300, 2)

# Seconds per stage: (GPU machine, smoke). The GPU ones from the first H100 runs (2026-11-27,
# benchmarks/results/gpu-h100/run1-3, wall seconds in the comments) with about a quarter more; a stage measured there
# only in part (cut short: the steps it ran, extrapolated) gets the same on its extrapolation. They do not all fit
# one run's DEVICE.total_s (which, with the wheels' install and the interpreter's start, stays inside the 8 minutes the
# check may take there): benchmarks/gpu_carry.py's RUNS split them between two runs of one session.
# compiled_load, served_load and served_requests may also borrow what the stages before them left unused (their
# cost is the least predictable: compiling, loading five model processes, concurrent requests). The smoke
# generations' 45 s leave a loaded 2-core CI machine room (a 2-step tiny one took 20 s with 20 processes waiting for
# the cores); the smoke run's total stays 300 s.
BUDGETS: dict[str, tuple[float, float]] = {
    "probe": (15, 40),  # 6.3-7.2: CUDA and cuDNN start, the SDPA kernel probes, tritonserver with a GPU model
    "build": (5, 30),  # 0.6
    "checkpoint": (35, 20),  # 21.5-27.5: 16 GB off the GPU and through the page cache
    "reference_t2i": (20, 45),  # 15.8
    "reference_edit": (38, 45),  # 29.0
    "batched_t2i": (17, 45),  # 13.2
    "batched_edit": (42, 45),  # ~33: cut at 44 of 50 steps, 31.4 extrapolated and a 1.8 s warm-up
    "compiled_load": (70, 30),  # 57.6-59.7: torch.compile of the blocks and CUDA graph capture, Inductor's cache cold
    "compiled_t2i": (30, 45),  # 23.3, 13-15 of them the warm-up request (it still compiles)
    "compiled_edit": (36, 45),  # ~28: cut at 44 steps, 26.3 extrapolated and a 1.6 s warm-up
    "profile": (20, 30),  # a 3-step request, two steps profiled, and the profiler's own start and summary
    "release": (8, 10),  # 0.7-4.8
    # 60.8 uncompiled: hashing the checkpoint, five model processes; compiling again from the warm cache adds to it
    "served_load": (85, 120),
    # warm-ups 6.2, then 1 + 2 + 4 requests of 50 steps: 14.6 s each uncompiled at concurrency 1
    "served_requests": (100, 60),
}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    batch_branches: bool
    fast: Callable[[Settings, torch.device, Path], FastPath]


def _compiled(settings: Settings, device: torch.device, cache: Path) -> FastPath:
    """The GPU's default fast path, warmed at the check's one resolution only (the others cost load time). The smoke
    run on the CPU compiles too, by Dynamo alone (main): the capture, the warm-up and the served parameters."""
    fast = replace(FastPath.default_for(torch.device("cuda"), DTYPE), cuda_graphs=device.type == "cuda")
    return replace(fast, warmup=((settings.side, settings.side),), cache_dir=cache)


VARIANTS = (
    Variant("reference", "(a) each CFG branch its own pass, dense masks", False, lambda s, d, c: FastPath.off()),
    Variant(  # the padded keys as (c) has them (the GPU default, folded), so that (b) -> (c) is compiling alone
        "batched",
        "(b) branches batched as the BLS plans calls, SDPA without padding masks (padded keys folded)",
        True,
        lambda s, d, c: FastPath(attention="sdpa", trim_padding=True, padded_attention="folded"),
    ),
    Variant("compiled", "(c) (b) compiled per block, CUDA graphs", True, _compiled),
)
PROMPT = "A red apple on a wooden table"
EDIT = "Make the sky stormy"


def _versions() -> dict[str, str | None]:
    names = ("numpy", "transformers", "diffusers", "tritonclient", "grpcio", "protobuf", "nvidia-pytriton", "triton")
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def sdpa_kernels(device: torch.device, size: str) -> dict[str, str]:
    """Which SDPA kernels run the model's attention (its heads, grouped kv heads and head size, one 1024x1024
    sample's tokens, bf16), and in how many ms (the best of 3 calls after one); or why not. Also a CFG pair's padded
    call (2 rows) both ways: heads repeated with an additive bias (`--padded-attention bias`), and the mask folded
    into the head size rounded up to 8 (`folded`, serving/model/transformer.py), unmasked."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = TRANSFORMERS[size]
    tokens = 4096 + 128 if device.type == "cuda" else 256
    q = torch.randn(1, config.num_attention_heads, tokens, config.head_dim, device=device, dtype=DTYPE)
    kv = torch.randn(1, config.num_kv_heads, tokens, config.head_dim, device=device, dtype=DTYPE)
    # A padded call's way with a bias (model/transformer.py): the heads repeated and a (B, 1, 1, L) bias.
    repeated = kv.repeat_interleave(config.num_attention_heads // config.num_kv_heads, dim=1)
    bias = torch.zeros(1, 1, 1, tokens, device=device, dtype=DTYPE)
    folded = config.head_dim + 8 - config.head_dim % 8  # at least one channel more: the mask's
    pair_q = torch.randn(2, config.num_attention_heads, tokens, folded, device=device, dtype=DTYPE)
    pair_kv = torch.randn(2, config.num_kv_heads, tokens, folded, device=device, dtype=DTYPE)
    pair_bias = torch.zeros(2, 1, 1, tokens, device=device, dtype=DTYPE)
    pair_repeated = repeated.expand(2, -1, -1, -1)
    unmasked = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
    cases: list[tuple[str, Any, tuple[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, Any]]] = [
        (backend.name, backend, (q, kv, kv), {"enable_gqa": True}) for backend in unmasked
    ]
    padded = (q, repeated, repeated)
    cases.append(("EFFICIENT_ATTENTION with a bias", SDPBackend.EFFICIENT_ATTENTION, padded, {"attn_mask": bias}))
    pair = (pair_q[..., : config.head_dim], pair_repeated, pair_repeated)
    cases.append(
        ("CFG pair, bias: EFFICIENT_ATTENTION", SDPBackend.EFFICIENT_ATTENTION, pair, {"attn_mask": pair_bias})
    )
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        name = f"CFG pair, folded to {folded}: {backend.name}"
        cases.append((name, backend, (pair_q, pair_kv, pair_kv), {"enable_gqa": True, "scale": config.head_dim**-0.5}))
    found = {}
    for name, backend, tensors, kwargs in cases:
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(*tensors, **kwargs)
                times = []
                for _ in range(3):
                    _sync(device)
                    started = time.perf_counter()
                    torch.nn.functional.scaled_dot_product_attention(*tensors, **kwargs)
                    _sync(device)
                    times.append(time.perf_counter() - started)
            found[name] = f"ok, {1000 * min(times):.2f} ms"
        except Exception as exc:  # whatever a kernel refuses with, the other kernels and the probe go on
            found[name] = f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return found


def _since_command_start() -> float | None:
    """Seconds since the device command started: its wheels' install and this interpreter's start (None here)."""
    started = os.environ.get(COMMAND_T0)
    return time.time() - float(started) if started else None


def compile_counts(since: dict[str, int] | None = None) -> dict[str, int]:
    """torch.compile's own counters (Dynamo's graphs and frames, Inductor's events such as CUDA graph
    recordings), or what they grew by `since` an earlier reading, non-zero only."""
    from torch._dynamo.utils import counters

    now = {
        f"{group}.{name}": int(count)
        for group in ("stats", "frames", "inductor")
        for name, count in counters[group].items()
    }
    if since is None:
        return now
    return {name: count - since.get(name, 0) for name, count in now.items() if count != since.get(name, 0)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROBE_MODEL = """
class TritonPythonModel:
    def execute(self, requests):
        return []
"""
PROBE_CONFIG = """name: "probe"
backend: "python"
max_batch_size: 0
input [{{ name: "x", data_type: TYPE_FP32, dims: [1] }}]
output [{{ name: "y", data_type: TYPE_FP32, dims: [1] }}]
instance_group [{{ kind: {kind} }}]
"""


def tritonserver_starts(work: Path, device: torch.device) -> dict[str, Any]:
    """Start the carried tritonserver with one Python-backend model placed as the served components are (a GPU
    instance on a GPU): its stub must load this Python's libpython, and the server must take GPU instances."""
    install = TritonInstall.find()
    kind = "KIND_GPU" if device.type == "cuda" else "KIND_CPU"
    found: dict[str, Any] = {"binary": str(install.binary), "stub": str(install.stub), "instance": kind}
    with contextlib.suppress(OSError):
        ldd = subprocess.run(["ldd", str(install.stub)], capture_output=True, text=True).stdout
        found["stub_libs_missing"] = [line.split()[0] for line in ldd.splitlines() if "not found" in line]
    repository = work / "probe-repository"
    (repository / "probe" / "1").mkdir(parents=True, exist_ok=True)
    (repository / "probe" / "config.pbtxt").write_text(PROBE_CONFIG.format(kind=kind))
    (repository / "probe" / "1" / "model.py").write_text(PROBE_MODEL)
    started = time.perf_counter()
    with TritonServer(repository, Ports.free(), build_dir=work / "probe"):
        found["ready_s"] = time.perf_counter() - started
    return found


class ServedStack:
    """`python -m serving.stack` as a child process, as `make serve` runs it: the front end in it, Triton below."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.log = log
        self.command = [*command, f"--listen={self.address}", "--metrics-port=0", "--http-listen="]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

    def serving(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"serving.stack exited with {self.process.returncode}:\n{self.log_tail()}")
        return health_probe.serving(self.address, timeout_s=2.0)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.is_file() else ""

    def stop(self) -> None:
        """SIGTERM (it drains, then stops Triton); what is left after a minute is killed, Triton's tree too."""
        if self.process is None or self.process.poll() is not None:
            return
        tree = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


class Check:
    def __init__(
        self,
        settings: Settings,
        out: Path,
        work: Path,
        processor: Path,
        smoke: bool,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        self.settings, self.out, self.work, self.processor = settings, out, work, processor
        self.device = torch.device(settings.device)
        self.budgets = {name: budget[1 if smoke else 0] for name, budget in BUDGETS.items()}
        self.results: dict[str, Any] = {
            "check": "gpu-check",
            "smoke": smoke,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "settings": dataclasses.asdict(settings),
            "machine": machine_info(),
            "commit": commit(),
            "device_reply": None,
            "setup_s": _since_command_start(),
            "variants": {v.name: v.label for v in VARIANTS},
            "stages": {},
        }
        self.runner = StageRunner(self.results["stages"], self.write, settings.total_s, skip)
        side, steps = settings.side, settings.steps
        self.workloads = {
            "t2i": Workload.make("t2i", PROMPT, side, steps),
            "edit": Workload.make("edit", EDIT, side, steps, inputs=1),
        }
        self.modules: CheckpointModules | None = None
        self.tokenizer: PromptTokenizer | None = None
        self.pipe: OmniGen2Pipeline | None = None
        self.pipe_variant = ""
        self.stack: ServedStack | None = None
        self.triton_ports: Ports | None = None  # the served stack's: the served points read Triton's statistics

    def write(self) -> None:
        save_results(self.out, self.results, gpu_markdown(self.results))

    def run(self) -> None:
        stage = self.runner.run
        try:
            stage("probe", self.budgets["probe"], self.probe)
            stage("build", self.budgets["build"], self.build)
            stage("checkpoint", self.budgets["checkpoint"], self.save, needs=("build",))
            for variant in VARIANTS:
                if variant.name == "compiled":
                    load = self.loader(variant)
                    stage("compiled_load", self.budgets["compiled_load"], load, needs=("build",), borrow=True)
                    needs = ("compiled_load",)
                else:
                    needs = ("build",)
                for key in self.workloads:
                    name = f"{variant.name}_{key}"
                    stage(name, self.budgets[name], self.generation(variant, key), needs=needs)
            stage("profile", self.budgets["profile"], self.profile_steps, needs=("build",))
            stage("release", self.budgets["release"], self.release)
            stage("served_load", self.budgets["served_load"], self.serve, needs=("checkpoint",), borrow=True)
            requests = self.budgets["served_requests"]
            stage("served_requests", requests, self.requests, needs=("served_load",), borrow=True)
        finally:
            if self.stack is not None:  # this run's stack only: a second run on the warm machine finds the first's logs
                self.copy_log_tails()  # before the stop, whose wait could outlast the device command's limit
                self.stack.stop()
                self.copy_log_tails()
            self.results["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            self.write()

    def copy_log_tails(self) -> None:
        # The server's log is named for its gRPC port (tritonserver-PORT.log); its tail comes back as tritonserver.log
        servers = sorted((self.work / "stack").glob("tritonserver-*.log"), key=lambda log: log.stat().st_mtime)
        for log, name in ((self.work / "stack.log", "stack.log"), *((log, "tritonserver.log") for log in servers[-1:])):
            if log.is_file():  # the tail: what comes back from the device machine is limited
                (self.out / name).write_bytes(log.read_bytes()[-LOG_BYTES:])

    def probe(self, record: Record) -> None:
        record["torch"] = torch.__version__
        record["cuda"] = torch.version.cuda
        record["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            record["gpu"] = {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / GiB, 1),
                "multiprocessors": props.multi_processor_count,
                "driver": _driver(),
            }
        record["packages"] = _versions()
        record["libpython"] = {
            "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
            "libdir": sysconfig.get_config_var("LIBDIR"),
        }
        record["sdpa"] = sdpa_kernels(self.device, self.settings.size)
        record["flex_attention"] = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
        self.write()  # what is known so far, should the server hang
        record["tritonserver"] = tritonserver_starts(self.work, self.device)

    def build(self, record: Record) -> None:
        started = time.perf_counter()
        self.modules = random_modules(self.settings.size, DTYPE, self.device, processor=self.processor)
        _sync(self.device)
        record["seconds"] = time.perf_counter() - started
        parts = {"transformer": self.modules.transformer, "vae": self.modules.vae, "mllm": self.modules.mllm}
        record["parameters_b"] = {name: sum(p.numel() for p in part.parameters()) / 1e9 for name, part in parts.items()}
        if self.device.type == "cuda":
            record["gpu_allocated_gib"] = torch.cuda.memory_allocated(self.device) / GiB
        self.tokenizer = PromptTokenizer.from_dir(self.processor)

    def save(self, record: Record) -> None:
        assert self.modules is not None
        started = time.perf_counter()
        save_modules(self.modules, self.work / "checkpoint")
        record["seconds"] = time.perf_counter() - started
        files = [p for p in (self.work / "checkpoint").rglob("*") if p.is_file()]
        record["gib"] = sum(p.stat().st_size for p in files) / GiB

    def _pipeline(self, variant: Variant) -> OmniGen2Pipeline:
        """A variant's pipeline over the one model; made when first used, since a backend sets the model's
        attention mode (and compiling wraps its blocks) as it is made."""
        if self.pipe is None or self.pipe_variant != variant.name:
            assert self.modules is not None and self.tokenizer is not None
            self.pipe = None
            fast = variant.fast(self.settings, self.device, self.work / "torch-compile")
            backend = TorchBackend(self.modules, fast)
            self.pipe = OmniGen2Pipeline(self.tokenizer, backend, batch_branches=variant.batch_branches)
            self.pipe_variant = variant.name
        return self.pipe

    def loader(self, variant: Variant) -> Callable[[Record], None]:
        def load(record: Record) -> None:
            if self.device.type == "cuda":
                # The profile stage profiles graphs captured here: a profiler first started after a capture may miss
                # their replayed kernels or fault (pytorch#75504, #100441), so it is set up before any capture.
                from torch.profiler import _utils as profiler_utils

                profiler_utils._init_for_cuda_graphs()
            self._reset_peak()
            started = time.perf_counter()
            backend = self._pipeline(variant).backend
            record["seconds"] = time.perf_counter() - started
            assert isinstance(backend, TorchBackend)
            record["fast_path"] = backend.stages.fast.to_params()
            record["load_report"] = backend.load_report
            self._peak(record)

        return load

    def generation(self, variant: Variant, key: str) -> Callable[[Record], None]:
        def generate(record: Record) -> None:
            pipe = self._pipeline(variant)
            workload = self.workloads[key]
            self._reset_peak()
            started = time.perf_counter()
            before = compile_counts()
            warm = pipe(replace(workload, steps=self.settings.warm_steps).eager_request(seed=0))
            record["warmup_s"] = time.perf_counter() - started
            record["warmup_stages_s"] = warm.timings
            # What compiled during the warm-up request and the timed one: on the H100 (c)'s text-to-image warm-up
            # took 14.7 s after compiled_load's warm-up, so something was still compiled or recorded per request.
            record["compiled_during_warmup"] = compile_counts(since=before)
            before = compile_counts()
            step_s: list[float] = record.setdefault("step_s", [])
            last = time.perf_counter()

            def progress(step: int, total: int) -> None:
                nonlocal last
                now = time.perf_counter()
                step_s.append(now - last)  # the first also holds the prompt's and the input image's encoding
                last = now

            started = time.perf_counter()
            try:
                result = pipe(workload.eager_request(seed=0), progress)
                record["seconds"] = time.perf_counter() - started
                record["stages_s"] = result.timings
            finally:
                record["compiled_during_request"] = compile_counts(since=before)
                self._peak(record)
                if "seconds" not in record and len(step_s) > 1:  # cut short: what the whole request would take
                    left = workload.steps - len(step_s)
                    decode = warm.timings.get("vae_decode", 0.0)
                    record["extrapolated_s"] = sum(step_s) + left * statistics.median(step_s[1:]) + decode
                if len(step_s) > 1:
                    record["step_s_median"] = statistics.median(step_s[1:])

        return generate

    def profile_steps(self, record: Record) -> None:
        """torch.profiler over a few denoising steps of the fastest variant loaded here ((c), else (b)): which
        kernels take a step's device time, and how busy the device is over the steps' wall time."""
        variant = next(v for v in VARIANTS if v.name == ("compiled" if self.runner.ok("compiled_load") else "batched"))
        pipe = self._pipeline(variant)
        count = self.settings.profiled_steps
        on_gpu = self.device.type == "cuda"
        profiler = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])])
        window: dict[str, float] = {}

        def progress(step: int, total: int) -> None:
            _sync(self.device)  # the window holds these steps' work and no other's
            if step == 1:  # the first step also encodes the prompt
                profiler.start()
                window["started"] = time.perf_counter()
            elif step == 1 + count:
                window["wall_s"] = time.perf_counter() - window["started"]
                profiler.stop()

        record["variant"], record["steps"] = variant.name, count
        try:
            pipe(replace(self.workloads["t2i"], steps=1 + count).eager_request(seed=0), progress)
        finally:
            if "started" in window and "wall_s" not in window:  # cut short inside the window
                profiler.stop()
        record.update(step_profile.summary(profiler, on_gpu, window["wall_s"]))
        if not record["top"]:  # a profiler without CUPTI records no kernels: a failed stage, not an empty table
            raise RuntimeError(f"the profiler recorded no {record['timed']}")

    def release(self, record: Record) -> None:
        """Free the in-process model before the served stack loads its own copy on the same GPU (a stage of its
        own: after a compile cut short this may fail, and the served stack is still worth starting)."""
        self.pipe = None
        self.modules = None
        gc.collect()
        torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            record["gpu_reserved_gib"] = torch.cuda.memory_reserved(self.device) / GiB

    def serve(self, record: Record) -> None:
        settings = self.settings
        # Served as (c) if (c) compiled here; else as (b), so that its load fits and it still has its in-process twin.
        compiled = self.runner.ok("compiled_load")
        record["same_as"] = "compiled" if compiled else "batched"
        self.triton_ports = Ports.free()
        command = [
            sys.executable,
            *("-m", "serving.stack", "--checkpoint", str(self.work / "checkpoint")),
            *("--backend", "pytorch", "--precision", "bf16", "--device", settings.device),
            *("--model-repository", str(self.work / "model_repository"), "--build-dir", str(self.work / "stack")),
            *("--triton-ports", *(str(p) for p in dataclasses.astuple(self.triton_ports))),
            f"--warmup-resolutions={settings.side}x{settings.side}",
            # The front end's warm-up at the compiled size: a 16x16 one would be a new shape, compiled during the load.
            f"--warmup-size={settings.side}",
            f"--compile-cache-dir={self.work / 'torch-compile'}",  # the in-process compile's: its cache is warm
            "--compile" if compiled else "--no-compile",  # on the CPU (smoke) the default would be off
        ]
        self.stack = ServedStack(command, self.work / "stack.log")
        record["command"] = " ".join(command[1:])
        started = time.perf_counter()
        with GpuPeakMemory() as peak:
            self.stack.start()
            try:
                while not self.stack.serving():
                    time.sleep(0.5)
            finally:
                record["log_tail"] = self.stack.log_tail()
                record["peak_gpu_used_gib"] = None if peak.gpu_bytes is None else peak.gpu_bytes / GiB
        record["seconds"] = time.perf_counter() - started

    def requests(self, record: Record) -> None:
        assert self.stack is not None and self.stack.process is not None and self.triton_ports is not None
        pids = [self.stack.process.pid]
        workload = self.workloads["t2i"]
        # Warm-up at each concurrency, in short requests: a batch size met first (CUDA graphs record one per shape)
        # would otherwise be paid for inside the timed points.
        started = time.perf_counter()
        short = replace(workload, steps=self.settings.warm_steps)
        for concurrency in self.settings.concurrency:
            asyncio.run(served_point(self.stack.address, short, concurrency, concurrency, pids))
        record["warmup_s"] = time.perf_counter() - started
        points: list[dict[str, Any]] = record.setdefault("points", [])
        triton = f"{LOOPBACK}:{self.triton_ports.grpc}"
        first = before = model_statistics(triton)  # since the server's start: its warm-ups and the ones above
        # Diagnostics: a process that exits under them (Inductor's compile workers quiesce after a minute) records
        # an error in their place and costs no served point
        stubs = diagnostic(served_stubs, self.stack)
        record["cuda_libraries"] = diagnostic(mapped_libraries, stubs)
        cpu_before = diagnostic(stub_cpu_seconds, stubs)
        with GpuPeakMemory() as peak:
            try:
                for concurrency in self.settings.concurrency:
                    count = max(self.settings.min_requests, concurrency)
                    point = asyncio.run(served_point(self.stack.address, workload, concurrency, count, pids))
                    after = model_statistics(triton)
                    spent = _spent(after, before)
                    summary = point.summary()
                    split = step_split(summary["step_ms"], spent, workload.steps, point.wall_s)
                    points.append(summary | {"latencies_s": point.latencies_s, "triton": spent, "step_split": split})
                    cpu_after = diagnostic(stub_cpu_seconds, stubs)
                    points[-1]["cpu_per_wall"] = diagnostic(cpu_per_wall, cpu_before, cpu_after, point.wall_s)
                    cpu_before = cpu_after
                    record["triton"] = _spent(after, first)  # over every timed point so far
                    before = after
                    self.write()
            finally:
                record["peak_gpu_used_gib"] = None if peak.gpu_bytes is None else peak.gpu_bytes / GiB

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self, record: Record) -> None:
        if self.device.type == "cuda":
            record["peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.device) / GiB


def diagnostic(measure: Callable[..., Any], *args: Any) -> Any:
    """`measure(*args)`, or {"error": why} where it raised (an error reading in `args` included): a side reading
    must not end the stage that takes it."""
    try:
        return measure(*args)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def served_stubs(stack: ServedStack) -> dict[str, set[int]]:
    """Model name -> pids of the stubs of the tritonserver the stack started."""
    assert stack.process is not None
    for child in psutil.Process(stack.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # children that exited since the listing
            if "tritonserver" in child.name():
                return stub_processes(child.pid)
    raise RuntimeError("no tritonserver under the stack's process")


def cpu_per_wall(before: Any, after: Any, wall_s: float) -> dict[str, dict[str, float]]:
    """CPU seconds per wall second of each model process between two stub_cpu_seconds readings: a component
    model's main thread (its synchronous `execute`) near 1.0 is bound by Python and dispatch on the host, not by
    the GPU. The BLS's `execute` is async and runs elsewhere, so its main-thread figure says little."""
    return {
        model: {kind: round((after[model][kind] - before[model][kind]) / wall_s, 3) for kind in times}
        for model, times in after.items()
    }


def stub_cpu_seconds(stubs: dict[str, set[int]]) -> dict[str, dict[str, float]]:
    """CPU seconds (user + system) each served model's stub process has used, in all its threads and in its main
    thread (the one that runs `execute`)."""
    found: dict[str, dict[str, float]] = {}
    for model, pids in stubs.items():
        process = psutil.Process(min(pids))
        times = process.cpu_times()
        main = next((t for t in process.threads() if t.id == process.pid), None)
        found[model] = {
            "all_threads": times.user + times.system,
            "main_thread": 0.0 if main is None else main.user_time + main.system_time,
        }
    return found


def mapped_libraries(stubs: dict[str, set[int]]) -> dict[str, list[str]]:
    return {"check": cuda_libraries(os.getpid())} | {model: cuda_libraries(min(pids)) for model, pids in stubs.items()}


def cuda_libraries(pid: int) -> list[str]:
    """The CUDA math libraries a process has mapped (file names): the served transformer should load the check's."""
    names = {Path(m.path).name for m in psutil.Process(pid).memory_maps() if m.path}
    return sorted(n for n in names if any(lib in n for lib in ("cublas", "cudnn", "cudart", "nvrtc", "nvJitLink")))


def _spent(after: dict[str, ModelStatistics], before: dict[str, ModelStatistics]) -> dict[str, dict[str, int]]:
    """Each served model's statistics between two readings, as results.json records them."""
    return {name: dataclasses.asdict(stats.minus(before.get(name))) for name, stats in after.items()}


def step_split(bls_step_ms: float, spent: dict[str, dict[str, int]], steps: int, wall_s: float) -> dict[str, float]:
    """A served point's denoising step: the BLS's own (its denoise time / steps, median over the point's requests)
    against what Triton timed in the transformer model over the point. The point's requests run side by side, so
    a step of the point is one step of each of them: the transformer's calls and compute divide by `steps` (above
    concurrency 1 the requests keep only roughly in step: the transformer's busy share of the point's `wall_s` says
    the same without that assumption)."""
    transformer = spent.get(TRANSFORMER, {})
    calls = transformer.get("executions", 0)
    if not calls:
        return {}
    compute_ms = transformer["compute_infer_ns"] / 1e6
    around_ms = sum(transformer[k] for k in ("queue_ns", "compute_input_ns", "compute_output_ns")) / 1e6
    return {
        "bls_step_ms": bls_step_ms,
        "transformer_calls_per_step": calls / steps,
        "transformer_samples_per_call": transformer["inferences"] / calls,
        "transformer_compute_ms_per_call": compute_ms / calls,
        "transformer_queue_io_ms_per_call": around_ms / calls,  # queued, inputs gathered, outputs returned
        "transformer_compute_ms_per_step": compute_ms / steps,
        "outside_transformer_ms_per_step": bls_step_ms - compute_ms / steps,
        "transformer_busy_share": compute_ms / 1000 / wall_s,
    }


def render(directory: Path, device_reply: str) -> None:
    """Name the device reply's machine in a finished run's results (it is known only once the reply is back)."""
    path = directory / "results.json"
    results = json.loads(path.read_text())
    results["device_reply"] = device_reply
    save_results(directory, results, gpu_markdown(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results.json and results.md go here")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU: the stages, not the numbers")
    parser.add_argument("--work", type=Path, help="checkpoint, repository, logs (default: a folder beside --out)")
    parser.add_argument("--processor", type=Path, default=DEFAULT_PROCESSOR, help="tokenizer files (processor/)")
    parser.add_argument("--render", type=Path, help="rewrite a finished run's results naming --device-reply")
    parser.add_argument("--device-reply", help="the machine the device tool's reply names")
    parser.add_argument(
        "--skip", default="", help="comma-separated stages to leave out (a rerun measuring what an earlier one missed)"
    )
    args = parser.parse_args(argv)
    if args.render:
        if not args.device_reply:
            parser.error("--render needs --device-reply")
        render(args.render, args.device_reply)
        return
    if args.out is None:
        parser.error("--out is required")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke here, or on the GPU machine (benchmarks/README.md)")
    # Smoke: (c) and the served stack capture their blocks (fullgraph, dynamic shapes, warmed at load) and run them
    # as captured. aot_eager's passes over the blocks are tests/test_fast_path.py's to check: twice here (in process,
    # then served) they cost about 20 of the run's 100 s on 2 cores.
    if args.smoke:
        os.environ.setdefault("OMNIGEN2_COMPILE_BACKEND", "eager")
    # Not under --out: the device machine sends back only a few small files from there, and this holds 16 GB.
    work = args.work or Path(tempfile.gettempdir()) / "omnigen2-gpu-check"
    skip = frozenset(name for name in args.skip.split(",") if name)
    if skip - BUDGETS.keys():
        parser.error(f"--skip: no stage {', '.join(sorted(skip - BUDGETS.keys()))}; stages: {', '.join(BUDGETS)}")
    Check(SMOKE if args.smoke else DEVICE, args.out, work, args.processor, args.smoke, skip).run()
    print(f"results in {args.out}", flush=True)


if __name__ == "__main__":
    main()
