"""results.md of the GPU check (benchmarks/gpu_check.py), from its results.json as it stands after any stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report import tail_cell
from serving.triton.model_names import BLS_MODEL, MLLM_MODEL, TRANSFORMER, VAE_DECODER, VAE_ENCODER

# Issue 13's targets for an H100, 1024x1024, 50 steps, bf16, single request.
T2I_TARGET_S = 4.5
EDIT_TARGET_S = 13.0
SERVED_OVERHEAD = 1.05  # served latency / the same code in process
CONCURRENCY_GAIN = 1.2  # images/s at concurrency 4 / at concurrency 1
SERVED_MODELS = (BLS_MODEL, MLLM_MODEL, TRANSFORMER, VAE_ENCODER, VAE_DECODER)  # the table's order


def seconds(record: dict[str, Any]) -> tuple[float | None, str]:
    """A request's seconds and how to show them: measured, or extrapolated from the steps a cut-short stage ran."""
    if "seconds" in record:
        return record["seconds"], f"{record['seconds']:.2f}"
    if "extrapolated_s" in record:
        done = len(record.get("step_s", []))
        return record["extrapolated_s"], f"~{record['extrapolated_s']:.2f} ({done} steps run)"
    return None, "-"


def _gib(record: dict[str, Any], key: str = "peak_gpu_gib") -> str:
    return f"{record[key]:.1f}" if record.get(key) is not None else "-"


def _met(value: float | None, ok: bool, smoke: bool) -> str:
    if smoke:
        return "not judged (smoke)"
    return "-" if value is None else ("yes" if ok else "no")


def _show(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _served_points(stages: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {p["concurrency"]: p for p in stages.get("served_requests", {}).get("points", [])}


def targets(results: dict[str, Any]) -> list[str]:
    stages, smoke = results["stages"], results["smoke"]
    t2i, _ = seconds(stages.get("compiled_t2i", {}))
    edit, _ = seconds(stages.get("compiled_edit", {}))
    points = _served_points(stages)
    served = points[1]["p50_s"] if 1 in points else None
    twin = stages.get("served_load", {}).get("same_as", "compiled")  # the in-process variant it serves as
    twin_s, _ = seconds(stages.get(f"{twin}_t2i", {}))
    overhead = served / twin_s if served is not None and twin_s else None
    gain = points[4]["images_per_s"] / points[1]["images_per_s"] if 1 in points and 4 in points else None
    best = min((v for v in (t2i, served) if v is not None), default=None)
    return [
        "| target (H100, 1024x1024, 50 steps, bf16) | measured | met |",
        "| --- | --- | --- |",
        f"| text-to-image <= {T2I_TARGET_S} s | (c) in process {_show(t2i, '{:.2f} s')}, "
        f"served {_show(served, '{:.2f} s')} | {_met(best, best is not None and best <= T2I_TARGET_S, smoke)} |",
        f"| one-image edit <= {EDIT_TARGET_S:.0f} s | (c) in process {_show(edit, '{:.2f} s')} "
        f"| {_met(edit, edit is not None and edit <= EDIT_TARGET_S, smoke)} |",
        f"| served within 5 % of the same code in process | served p50 / {twin} = {_show(overhead, '{:.3f}')} "
        f"| {_met(overhead, overhead is not None and overhead <= SERVED_OVERHEAD, smoke)} |",
        f"| concurrency 4 >= {CONCURRENCY_GAIN}x the images/s of concurrency 1 | {_show(gain, '{:.2f}x')} "
        f"| {_met(gain, gain is not None and gain >= CONCURRENCY_GAIN, smoke)} |",
    ]


def in_process(results: dict[str, Any]) -> list[str]:
    stages = results["stages"]
    lines = [
        "| variant | text-to-image s | vs (a) | s/step | peak GPU GiB | edit s | vs (a) | s/step | peak GPU GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, label in results["variants"].items():
        cells = [label]
        for key in ("t2i", "edit"):
            record = stages.get(f"{name}_{key}", {})
            value, shown = seconds(record)
            reference, _ = seconds(stages.get(f"reference_{key}", {}))
            ratio = f"{reference / value:.2f}x" if value and reference else "-"
            step = f"{record['step_s_median']:.3f}" if "step_s_median" in record else "-"
            cells += [shown, ratio, step, _gib(record)]
        lines.append("| " + " | ".join(cells) + " |")
    load = stages.get("compiled_load", {})
    if "seconds" in load:
        report = ", ".join(f"{k} {v:.1f}" for k, v in load.get("load_report", {}).items())
        lines += [
            "",
            f"(c) made and compiled in {load['seconds']:.1f} s before its requests ({report or 'no report'}).",
        ]
    lines += ["", "Each timed request follows an untimed warm-up request of the same kind at fewer steps."]
    return lines


def served(results: dict[str, Any]) -> list[str]:
    stages = results["stages"]
    load, requests = stages.get("served_load", {}), stages.get("served_requests", {})
    lines = []
    if "seconds" in load:
        lines.append(
            f"`serving.stack` answered SERVING {load['seconds']:.1f} s after its start (peak GPU memory in use, every "
            f"process: {_gib(load, 'peak_gpu_used_gib')} GiB)."
        )
    if "warmup_s" in requests:
        lines.append(f"Warm-up requests (short, at each concurrency): {requests['warmup_s']:.2f} s.")
    points = _served_points(stages)
    if points:
        base = points.get(1, {}).get("images_per_s")
        lines += [
            "",
            "Each point sends its n requests at once (n: the table's second column).",
            "",
            "| concurrency | n (requests) | p50 s | p90 s (from 10 requests) | images/s | vs concurrency 1 |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for c, p in sorted(points.items()):
            gain = f"{p['images_per_s'] / base:.2f}x" if base else "-"
            lines.append(
                f"| {c} | {p['requests']} | {p['p50_s']:.2f} | {tail_cell(p, 'p90_s', 90)} | {p['images_per_s']:.3f} "
                f"| {gain} |"
            )
        lines += step_split(points)
        lines += host_cpu(points, requests.get("cuda_libraries", {}))
    return (lines + triton_models(requests.get("triton", {}))) or ["not measured (see the stages below)"]


def host_cpu(points: dict[int, dict[str, Any]], libraries: dict[str, Any]) -> list[str]:
    """Each model process's CPU seconds per wall second over each point: a main thread near 1.0 waits on the host
    (Python, dispatch), not on the GPU. A reading that failed on the device (gpu_check.diagnostic) says why."""
    readings = [(c, p["cpu_per_wall"]) for c, p in sorted(points.items()) if p.get("cpu_per_wall")]
    rows = [(c, cpu) for c, cpu in readings if "error" not in cpu]
    lines = [f"CPU per wall not read at concurrency {c}: {cpu['error']}" for c, cpu in readings if "error" in cpu]
    if rows:
        models = sorted({m for _, cpu in rows for m in cpu})
        lines += [
            "",
            "CPU seconds per wall second of each model process over the point, main thread / all threads:",
            "",
            "| concurrency | " + " | ".join(models) + " |",
            "| --- |" + " --- |" * len(models),
        ]
        for c, cpu in rows:
            cells = [f"{cpu[m]['main_thread']:.2f} / {cpu[m]['all_threads']:.2f}" if m in cpu else "-" for m in models]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if "error" in libraries:
        lines += ["", f"CUDA libraries not read: {libraries['error']}"]
    elif libraries:
        mapped = "; ".join(f"{process}: {', '.join(names) or 'none'}" for process, names in libraries.items())
        lines += ["", f"CUDA libraries mapped: {mapped}"]
    return ["", *lines] if lines else []


def step_split(points: dict[int, dict[str, Any]]) -> list[str]:
    """A denoising step of each point: the BLS's own against the transformer model's compute (Triton's figures)."""
    rows = [(c, p["step_split"]) for c, p in sorted(points.items()) if p.get("step_split")]
    if not rows:
        return []
    lines = [
        "",
        "A denoising step, the BLS's (its denoise time / steps) against Triton's statistics of the transformer model "
        "over the point (its requests run side by side: a step of the point is one step of each):",
        "",
        "| concurrency | BLS step ms | transformer calls per step | samples per call | compute ms per call "
        "| queue + input + output ms per call | transformer compute ms per step | rest of the step ms "
        "| transformer busy, share of the point's wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c, split in rows:
        lines.append(
            f"| {c} | {split['bls_step_ms']:.1f} | {split['transformer_calls_per_step']:.2f} "
            f"| {split['transformer_samples_per_call']:.1f} | {split['transformer_compute_ms_per_call']:.1f} "
            f"| {split['transformer_queue_io_ms_per_call']:.1f} | {split['transformer_compute_ms_per_step']:.1f} "
            f"| {split['outside_transformer_ms_per_step']:.1f} | {100 * split['transformer_busy_share']:.0f} % |"
        )
    return lines


def triton_models(spent: dict[str, dict[str, int]]) -> list[str]:
    """Triton's statistics of each served model over the timed points (not their warm-ups)."""
    if not spent:
        return []
    names = [*(m for m in SERVED_MODELS if m in spent), *sorted(set(spent) - set(SERVED_MODELS))]
    lines = [
        "",
        f"Triton's statistics over the timed points, ms in all. {BLS_MODEL} is the BLS: decoupled, so Triton times "
        f"only its execute's hand-off, not its requests (their steps are above); {MLLM_MODEL} runs only where the "
        "BLS's text cache misses (every request has the same prompt).",
        "",
        "| model | executions | inferences | requests | queue ms | compute input ms | compute infer ms "
        "| compute output ms | infer ms per execution |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        m = spent[name]
        per = f"{m['compute_infer_ns'] / m['executions'] / 1e6:.1f}" if m["executions"] else "-"
        ms = " | ".join(f"{m[k] / 1e6:.1f}" for k in ("queue_ns", "compute_input_ns", "compute_infer_ns"))
        lines.append(
            f"| {name} | {m['executions']} | {m['inferences']} | {m['successes']} | {ms} "
            f"| {m['compute_output_ns'] / 1e6:.1f} | {per} |"
        )
    return lines


def profile(results: dict[str, Any]) -> list[str]:
    record = results["stages"].get("profile", {})
    if "top" not in record:
        return ["not measured (see the stages below)"]
    share = f" ({100 * record['busy_share']:.0f} %)" if record.get("busy_share") is not None else ""
    lines = [
        f"torch.profiler over {record['steps']} denoising steps of `{record['variant']}` text-to-image (after a first "
        f"step, which also encodes the prompt): wall {record['wall_ms']:.1f} ms, busy {record['busy_ms']:.1f} ms"
        f"{share}. Timed: {record['timed']}, {record['total_ms']:.1f} ms over {record['distinct']} distinct names; "
        f"the top {len(record['top'])}:",
        "",
        "| name | total ms | calls | share |",
        "| --- | --- | --- | --- |",
    ]
    for row in record["top"]:
        name = row["name"].replace("|", "\\|")
        lines.append(f"| `{name}` | {row['total_ms']:.2f} | {row['calls']} | {100 * row['share']:.1f} % |")
    return lines


def stage_table(results: dict[str, Any]) -> list[str]:
    lines = []
    if results.get("setup_s") is not None:
        lines += [f"The device command's install and the interpreter's start: {results['setup_s']:.1f} s.", ""]
    lines += ["| stage | status | wall s | budget s |", "| --- | --- | --- | --- |"]
    errors = []
    for name, record in results["stages"].items():
        wall = f"{record['wall_s']:.1f}" if "wall_s" in record else "-"
        budget = f"{record['budget_s']:.0f}"
        if record.get("limit_s", 0) > record["budget_s"]:
            budget += f" (+{record['limit_s'] - record['budget_s']:.0f} unused by earlier stages)"
        lines.append(f"| {name} | {record['status']} | {wall} | {budget} |")
        if "error" in record or "reason" in record:
            errors += ["", f"`{name}`:", "```", (record.get("error") or record["reason"]).rstrip(), "```"]
    return lines + errors


def environment(results: dict[str, Any]) -> list[str]:
    probe = results["stages"].get("probe", {})
    lines = [f"- torch {probe.get('torch', '-')}, CUDA {probe.get('cuda', '-')}, cuDNN {probe.get('cudnn', '-')}"]
    if "gpu" in probe:
        lines.append("- GPU: " + ", ".join(f"{k} {v}" for k, v in probe["gpu"].items()))
    if "sdpa" in probe:
        lines.append(
            "- SDPA kernels on the model's attention shape: " + "; ".join(f"{k}: {v}" for k, v in probe["sdpa"].items())
        )
    if "packages" in probe:
        lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in probe["packages"].items()))
    if "tritonserver" in probe:
        lines.append(
            "- tritonserver with a Python-backend model: "
            + ", ".join(f"{k} {v}" for k, v in probe["tritonserver"].items())
        )
    return lines


def write_markdown(results: dict[str, Any], path: Path) -> None:
    path.write_text(gpu_markdown(results))


def gpu_markdown(results: dict[str, Any]) -> str:
    """results.md of a GPU check, from its results as they stand after any stage."""
    settings, machine = results["settings"], results["machine"]
    where = machine.get("gpu") or f"{machine['cpu']} (CPU)"
    title = "GPU check" + (" (smoke: tiny model on the CPU; its numbers measure nothing)" if results["smoke"] else "")
    reply = (
        results.get("device_reply")
        or "not named yet (`python -m benchmarks.gpu_check --render DIR --device-reply ...`)"
    )
    lines = [
        f"# {title}",
        "",
        f"Device reply's machine: {reply}. Seen by torch: {where}.",
        f"Model `{settings['size']}` with random weights, {settings['side']}x{settings['side']}, {settings['steps']} "
        f"steps, bf16. Run {results['started']} to {results.get('finished', '(running)')}, commit "
        f"{results.get('commit', 'not recorded')}.",
        "",
        "## Targets",
        "",
        *targets(results),
        "",
        "## In process",
        "",
        *in_process(results),
        "",
        "## Profile (in process)",
        "",
        *profile(results),
        "",
        "## Served stack (text-to-image)",
        "",
        *served(results),
        "",
        "## Stages",
        "",
        *stage_table(results),
        "",
        "## Environment",
        "",
        *environment(results),
    ]
    return "\n".join(lines) + "\n"
