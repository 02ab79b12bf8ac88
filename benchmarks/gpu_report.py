"""results.md of the GPU check (benchmarks/gpu_check.py), from its results.json as it stands after any stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report import tail_cell

# Issue 13's targets for an H100, 1024x1024, 50 steps, bf16, single request.
T2I_TARGET_S = 4.5
EDIT_TARGET_S = 13.0
SERVED_OVERHEAD = 1.05  # served latency / the same code in process
CONCURRENCY_GAIN = 1.2  # images/s at concurrency 4 / at concurrency 1


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
        lines.append(f"Warm-up request: {requests['warmup_s']:.2f} s.")
    points = _served_points(stages)
    if points:
        base = points.get(1, {}).get("images_per_s")
        lines += [
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
    return lines or ["not measured (see the stages below)"]


def stage_table(results: dict[str, Any]) -> list[str]:
    lines = ["| stage | status | wall s | budget s |", "| --- | --- | --- | --- |"]
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
