"""The GPU check (benchmarks/gpu_check.py) in its smoke mode, end to end on the CPU with the tiny model, so the script
cannot rot between GPU sessions; its budgeted stages and what `make gpu-check` carries to the GPU machine."""

from __future__ import annotations

import contextlib
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import gpu_carry
from benchmarks.gpu_check import BUDGETS, COMMAND_T0, DEVICE, SMOKE, diagnostic, main, stub_cpu_seconds
from benchmarks.gpu_report import SERVED_MODELS, host_cpu, write_markdown
from benchmarks.stages import StageRunner
from benchmarks.step_profile import NAME_CHARS, TOP, busy_us
from export.make_checkpoint import random_modules, save_modules
from serving.model.checkpoint import load_checkpoint, read_spec

GENERATIONS = [f"{v}_{k}" for v in ("reference", "batched", "compiled") for k in ("t2i", "edit")]


def test_the_smoke_run_leaves_every_stage_ok_with_numbers(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNIGEN2_COMPILE_BACKEND", "eager")  # what --smoke sets, kept to this test
    monkeypatch.setenv(COMMAND_T0, str(time.time() - 30))  # as the device command exports it before its install
    out = tmp_path / "out"
    main(
        [
            "--smoke",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            "--processor",
            str(tiny_checkpoint / "processor"),
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert 30 <= results["setup_s"] < 60
    stages = results["stages"]
    assert list(stages) == list(BUDGETS)
    for name, record in stages.items():
        assert record["status"] == "ok", (name, record.get("error") or record.get("reason"))
        # The limit it ran under: its budget, plus the time earlier stages left unused where it may borrow that.
        assert 0 < record["wall_s"] <= record["limit_s"]
    assert stages["probe"]["tritonserver"]["ready_s"] > 0
    assert stages["build"]["parameters_b"]["transformer"] > 0
    assert stages["checkpoint"]["gib"] > 0
    for name in GENERATIONS:
        assert stages[name]["seconds"] > 0 and len(stages[name]["step_s"]) == SMOKE.steps, name
    assert stages["compiled_load"]["fast_path"]["compile"] == "1"  # (c) compiles in the smoke run too
    for name in ("compiled_t2i", "compiled_edit"):  # warmed at load: its requests compile no new graph
        assert isinstance(stages[name]["compiled_during_warmup"], dict), name
        assert "stats.unique_graphs" not in stages[name]["compiled_during_request"], name
    assert stages["served_load"]["seconds"] > 0 and stages["served_load"]["command"].endswith(" --compile")
    points = stages["served_requests"]["points"]
    assert [p["concurrency"] for p in points] == list(SMOKE.concurrency)
    assert all(p["images_per_s"] > 0 and p["requests"] == max(SMOKE.min_requests, p["concurrency"]) for p in points)
    _check_triton_statistics(stages["served_requests"])
    for point in points:  # the model processes' host CPU over each point, main thread within all threads
        cpu = point["cpu_per_wall"]["transformer"]
        assert 0 < cpu["main_thread"] <= cpu["all_threads"], point["cpu_per_wall"]
    assert set(stages["served_requests"]["cuda_libraries"]) >= {"check", "transformer", "omnigen2"}
    _check_profile(stages["profile"])
    assert (out / "stack.log").is_file() and (out / "tritonserver.log").is_file()  # tails, for a failed device run
    served = (out / "tritonserver.log").read_text()  # the served transformer compiled its blocks and warmed them
    assert "'compile': '1'" in served and "'warmup': '64x64'" in served and "'warmup_calls': 5.0" in served
    markdown = (out / "results.md").read_text()
    assert "not judged (smoke)" in markdown and all(f"| {name} | ok |" in markdown for name in stages)
    top = stages["profile"]["top"][0]
    assert f"| `{top['name']}` | {top['total_ms']:.2f} | {top['calls']} |" in markdown
    split = points[0]["step_split"]
    assert f"| 1 | {split['bls_step_ms']:.1f} | {split['transformer_calls_per_step']:.2f} |" in markdown
    assert all(f"| {model} | " in markdown for model in SERVED_MODELS)
    cpu = points[0]["cpu_per_wall"]["transformer"]
    assert f"{cpu['main_thread']:.2f} / {cpu['all_threads']:.2f}" in markdown and "CUDA libraries mapped: " in markdown

    # results.md is rewritten after every stage: it renders whatever the stages so far have left, cut-short ones too
    for done in range(len(stages) + 1):
        write_markdown(results | {"stages": dict(list(stages.items())[:done])}, tmp_path / "partial.md")
    cut = {"status": "over budget", "budget_s": 1, "wall_s": 1, "error": "stopped", "step_s": [2, 1, 1]}
    write_markdown(
        results | {"stages": stages | {"reference_t2i": cut | {"extrapolated_s": 51.0}}}, tmp_path / "cut.md"
    )
    assert "| ~51.00 (3 steps run) |" in (tmp_path / "cut.md").read_text()

    main(["--render", str(out), "--device-reply", "one test machine"])
    assert json.loads((out / "results.json").read_text())["device_reply"] == "one test machine"
    assert "Device reply's machine: one test machine." in (out / "results.md").read_text()


def _check_triton_statistics(requests: dict[str, Any]) -> None:
    """Each point's Triton statistics are its own requests' (the warm-ups before it not counted), and its step split
    is the transformer's calls and compute over the point per denoising step."""
    steps = SMOKE.steps
    for point in requests["points"]:
        models, n = point["triton"], point["requests"]
        assert set(SERVED_MODELS) <= set(models)
        bls, transformer = models["omnigen2"], models["transformer"]
        assert bls["successes"] == bls["executions"] == n
        # Every step of every request in some call, its two CFG branches (text-to-image) as samples; the BLS's
        # batcher merges samples of a step into fewer calls, down to one a step
        samples = 2 * n * steps
        assert transformer["inferences"] == samples and steps <= transformer["executions"] <= samples
        assert transformer["compute_infer_ns"] > 0 and transformer["successes"] == transformer["executions"]
        assert models["vae_decoder"]["inferences"] == n and models["vae_encoder"]["executions"] == 0
        split = point["step_split"]
        assert split["bls_step_ms"] == point["step_ms"] > 0
        assert split["transformer_calls_per_step"] == transformer["executions"] / steps
        assert split["transformer_samples_per_call"] == samples / transformer["executions"]
        per_call = transformer["compute_infer_ns"] / transformer["executions"] / 1e6
        assert split["transformer_compute_ms_per_call"] == pytest.approx(per_call)
        assert split["transformer_compute_ms_per_step"] == pytest.approx(per_call * split["transformer_calls_per_step"])
        assert split["outside_transformer_ms_per_step"] == pytest.approx(
            split["bls_step_ms"] - split["transformer_compute_ms_per_step"]
        )
        wall_s = n / point["images_per_s"]
        assert split["transformer_busy_share"] == pytest.approx(transformer["compute_infer_ns"] / 1e9 / wall_s)
        assert 0 < split["transformer_busy_share"] <= 1.0
    # The stage's totals: every timed point together
    total = requests["triton"]["transformer"]
    assert total["executions"] == sum(p["triton"]["transformer"]["executions"] for p in requests["points"])


def _check_profile(record: dict[str, Any]) -> None:
    assert record["variant"] == "compiled" and record["steps"] == SMOKE.profiled_steps  # (c) loaded: it is profiled
    assert record["timed"] == "CPU operators (their own time)"
    rows = record["top"]
    assert 0 < len(rows) <= TOP and len(rows) == min(TOP, record["distinct"])
    assert all(0 < len(r["name"]) <= NAME_CHARS and r["calls"] >= 1 and 0 < r["share"] <= 1 for r in rows)
    totals = [r["total_ms"] for r in rows]
    assert totals == sorted(totals, reverse=True) and sum(totals) <= record["total_ms"] + 1e-6
    assert all(r["share"] == pytest.approx(r["total_ms"] / record["total_ms"]) for r in rows)
    # Busy: the time some operator ran, inside the profiled steps' wall time
    assert 0 < record["busy_ms"] <= record["wall_ms"] and record["busy_share"] == record["busy_ms"] / record["wall_ms"]


def test_busy_time_counts_overlapping_and_nested_intervals_once() -> None:
    assert busy_us([]) == 0
    assert busy_us([(0, 10), (2, 5), (8, 12), (20, 25)]) == 17  # nested (2-5), overlapping (8-12), apart (20-25)
    assert busy_us([(5, 6), (0, 1)]) == 2


def test_a_stage_over_budget_or_failing_is_recorded_and_the_run_goes_on() -> None:
    stages: dict[str, Any] = {}
    writes = []
    runner = StageRunner(stages, lambda: writes.append(len(stages)), total_s=60)

    def slow(record: dict[str, Any]) -> None:
        record["steps"] = 1  # numbers written before the budget ran out stay
        while True:
            with contextlib.suppress(Exception):  # a stage's own handlers do not swallow the timeout
                time.sleep(0.05)

    assert not runner.run("slow", 0.3, slow)

    def broken(record: dict[str, Any]) -> None:
        raise ZeroDivisionError

    assert not runner.run("broken", 5, broken)
    assert not runner.run("after", 5, lambda record: None, needs=("slow",))
    assert runner.run("fine", 5, lambda record: record.update(seconds=1.0))
    assert stages["slow"]["status"] == "over budget" and stages["slow"]["steps"] == 1
    assert stages["broken"]["status"] == "failed" and "ZeroDivisionError" in stages["broken"]["error"]
    assert stages["after"] == {"status": "skipped", "budget_s": 5, "reason": "needs slow"}
    assert stages["fine"]["status"] == "ok" and len(writes) == 4


def test_a_borrowing_stage_may_use_what_earlier_stages_left() -> None:
    stages: dict[str, Any] = {}
    runner = StageRunner(stages, lambda: None, total_s=60)
    assert runner.run("quick", 1.0, lambda record: None)
    assert runner.run("compile", 0.1, lambda record: time.sleep(0.4), borrow=True)
    assert 1.0 < stages["compile"]["limit_s"] <= 1.1
    assert not runner.run("strict", 0.1, lambda record: time.sleep(0.4))  # not borrowing: its own budget alone
    assert stages["strict"]["status"] == "over budget"


def test_no_stage_starts_past_the_total_budget() -> None:
    stages: dict[str, Any] = {}
    runner = StageRunner(stages, lambda: None, total_s=0)
    assert not runner.run("late", 5, lambda record: None)
    assert stages["late"]["reason"] == "no time left in the run's total budget"


def test_a_stage_left_out_is_skipped_and_lends_its_budget() -> None:
    stages: dict[str, Any] = {}
    runner = StageRunner(stages, lambda: None, total_s=60, skip=frozenset({"measured_before"}))
    assert not runner.run("measured_before", 5, lambda record: record.update(ran=True))
    reason = "left out by the caller (--skip)"
    assert stages["measured_before"] == {"status": "skipped", "budget_s": 5, "reason": reason}
    assert runner.run("load", 0.2, lambda record: time.sleep(0.5), borrow=True)  # its own 0.2 s and the 5 s left out


def test_a_side_reading_that_fails_on_the_device_is_recorded_not_raised() -> None:
    """A model process gone under the served stage's CPU reading (Inductor's compile workers quiesce) must not cost
    the stage its points: the reading records why, and results.md says it."""
    gone = diagnostic(stub_cpu_seconds, {"transformer": {2**22 + 12345}})  # no such pid
    assert set(gone) == {"error"} and "NoSuchProcess" in gone["error"]
    points = {1: {"cpu_per_wall": gone}, 2: {"cpu_per_wall": {"transformer": {"main_thread": 0.5, "all_threads": 1.5}}}}
    lines = host_cpu(points, {"error": "NoSuchProcess: 7"})
    assert any(line.startswith("CPU per wall not read at concurrency 1: NoSuchProcess") for line in lines)
    assert "| 2 | 0.50 / 1.50 |" in lines and lines[-1] == "CUDA libraries not read: NoSuchProcess: 7"


def test_the_plot_draws_each_variant_once_the_later_run_winning(tmp_path: Path) -> None:
    from benchmarks.gpu_plot import bars, plot

    first, second = tmp_path / "run1", tmp_path / "run2"
    stages_1 = {
        "compiled_t2i": {"extrapolated_s": 8.62, "step_s": [0.2] * 12},
        "reference_edit": {"seconds": 27.37},
        "served_load": {"same_as": "batched"},
        "served_requests": {"points": [{"concurrency": 1, "p50_s": 14.58}, {"concurrency": 2, "p50_s": 20.0}]},
    }
    stages_2 = {"compiled_t2i": {"seconds": 8.63}}
    for run, stages in ((first, stages_1), (second, stages_2)):
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"stages": stages, "machine": {"gpu": "a test GPU"}}))
    drawn = bars([first, second])
    t2i = {b.label: (b.seconds, b.extrapolated, b.run) for b in drawn["t2i"]}
    assert t2i == {
        "(c) compiled": (8.63, False, "run2"),  # measured later beats extrapolated earlier
        "served (uncompiled), concurrency 1": (14.58, False, "run1"),
    }
    assert [(b.label, b.seconds) for b in drawn["edit"]] == [("(a) reference-style", 27.37)]
    plot([first, second], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_device_runs_fit_their_limits() -> None:
    """The check's two runs measure every stage between them, each within its limit with its install, the first
    within the 8 minutes a check may take, and both within one session's device time, two machine starts included."""
    checks = [run for run in gpu_carry.RUNS if run.stages]
    assert checks == list(gpu_carry.RUNS[:2])  # first, before the later sessions' runs
    first, second = (set(run.stages) for run in checks)
    # Every stage once; the model built in each, and profiled as each run loads it ((c) in the first, (b) after)
    assert first | second == set(BUDGETS) and first & second == {"build", "profile"}
    for run in checks:
        budgets = sum(BUDGETS[name][0] for name in run.stages)
        assert budgets <= DEVICE.total_s and budgets + gpu_carry.INSTALL_S <= run.timeout_s, run.purpose
        skip = run.run.split("--skip ")[1].split()[0].split(",")
        assert sorted(skip) == sorted(set(BUDGETS) - set(run.stages))  # what gpu_check is told to leave out
    assert DEVICE.total_s + gpu_carry.INSTALL_S <= 8 * 60
    assert checks[0].timeout_s == gpu_carry.TIMEOUT_S <= 8 * 60 + 60  # the 8 minutes, and a last stage's overrun
    assert 2 * gpu_carry.START_S + sum(run.timeout_s for run in checks) <= gpu_carry.SESSION_S
    for run in gpu_carry.RUNS:
        assert len(run.command()) <= 2000 and run.timeout_s <= 600


def test_the_carried_pins_are_pyproject_s() -> None:
    versions = gpu_carry.wanted()
    assert versions["nvidia-pytriton"] == "0.7.0" and versions["diffusers"] == "0.42.1"
    assert versions["protobuf"] == gpu_carry.pins()["protobuf"]
    assert versions["numpy"] == "1.26.4"  # the Triton stub's numpy 1: the image's 2.5 kills it on a BYTES input


def test_the_device_runs_install_where_the_triton_stubs_look() -> None:
    """The stub's embedded interpreter ignores PYTHONPATH: a --target install would hide diffusers from the VAE
    models and leave them the image's numpy 2."""
    for run in gpu_carry.RUNS:
        assert "--target" not in run.command() and "/tmp/site" not in run.command()


def test_the_device_runs_clear_the_image_s_numpy_2_packages_and_name_the_checkout() -> None:
    """What the first H100 runs (2026-11-27) failed on: the image's scipy refuses numpy 1.26 when transformers imports
    scikit-learn, and the Triton stubs could not import the client package `omnigen2` (they ignore PYTHONPATH)."""
    for run in gpu_carry.RUNS:
        command = run.command()
        uninstall = command.index("pip uninstall -q -y scikit-learn scipy")
        assert uninstall < command.index("pip install"), "removed before the wheels go in"
        assert "omnigen2-checkout.pth" in command and "'/client" in command


def test_every_served_dependency_is_in_the_gpu_image_or_carried() -> None:
    carried = gpu_carry.wanted()
    assert gpu_carry.uncovered(carried) == []
    assert gpu_carry.uncovered(set(carried) - {"confusable-homoglyphs"}) == ["confusable-homoglyphs"]
    assert {"torch", "transformers", "scipy", "scikit-learn"} <= gpu_carry.image_packages()


def test_the_trimmed_pytriton_keeps_one_stub_and_its_record_lzma_compressed(tmp_path: Path) -> None:
    members = {
        "pytriton/tritonserver/bin/tritonserver": b"server",
        "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub": b"312",
        "pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub": b"311",
        "nvidia_pytriton.libs/libpython3-abc.13.so.1.0": b"lib",
        "nvidia_pytriton.libs/libtritonserver-abc.so": b"lib",
    }
    record = "".join(f"{name},sha256=x,3\n" for name in members) + "nvidia_pytriton-0.7.0.dist-info/RECORD,,\n"
    source, target = tmp_path / "in.whl", tmp_path / "out.whl"
    with zipfile.ZipFile(source, "w") as wheel:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o755 << 16
            wheel.writestr(info, data)
        wheel.writestr("nvidia_pytriton-0.7.0.dist-info/RECORD", record)
    gpu_carry.trim_pytriton(source, target)
    with zipfile.ZipFile(target) as wheel:
        kept = {info.filename: info for info in wheel.infolist()}
        assert set(kept) == {
            "pytriton/tritonserver/bin/tritonserver",
            "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub",
            "nvidia_pytriton.libs/libtritonserver-abc.so",
            "nvidia_pytriton-0.7.0.dist-info/RECORD",
        }
        assert kept["pytriton/tritonserver/bin/tritonserver"].external_attr >> 16 == 0o755
        assert {info.compress_type for info in kept.values()} == {zipfile.ZIP_LZMA}
        listed = [line.split(",")[0] for line in wheel.read("nvidia_pytriton-0.7.0.dist-info/RECORD").decode().split()]
    assert set(listed) == set(kept)


def test_random_modules_are_what_their_saved_checkpoint_loads(tmp_path: Path, tiny_checkpoint: Path) -> None:
    modules = random_modules("tiny", torch.bfloat16, "cpu", processor=tiny_checkpoint / "processor")
    save_modules(modules, tmp_path / "checkpoint")
    loaded = load_checkpoint(tmp_path / "checkpoint", torch.bfloat16)
    assert read_spec(tmp_path / "checkpoint") == modules.spec
    for part in ("transformer", "vae", "mllm"):
        saved, read = getattr(modules, part).state_dict(), getattr(loaded, part).state_dict()
        assert saved.keys() == read.keys(), part
        assert all(torch.equal(saved[k], read[k]) for k in saved), part


def test_random_modules_follow_the_seed(tiny_checkpoint: Path) -> None:
    first, second = (
        random_modules("tiny", torch.float32, "cpu", processor=tiny_checkpoint / "processor") for _ in "ab"
    )
    assert all(
        torch.equal(a, b) for a, b in zip(first.transformer.parameters(), second.transformer.parameters(), strict=True)
    )
