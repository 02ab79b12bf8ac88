"""One PNG of the GPU check's runs: seconds per request for each variant, text-to-image and the one-image edit, the
served stack at concurrency 1 beside them, and issue 13's targets as lines. A device session may split the check
over several runs (`--skip`), so the plot reads several run folders; where two measured the same thing the later
folder's value is drawn. Values extrapolated from a cut-short stage are hatched.

    python -m benchmarks.gpu_plot benchmarks/results/gpu-h100/plot.png benchmarks/results/gpu-h100/run*/
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from benchmarks.gpu_report import EDIT_TARGET_S, T2I_TARGET_S

VARIANTS = {"reference": "(a) reference-style", "batched": "(b) batched", "compiled": "(c) compiled"}
WORKLOADS = {"t2i": ("text-to-image", T2I_TARGET_S), "edit": ("one-image edit", EDIT_TARGET_S)}


@dataclass(frozen=True)
class Bar:
    label: str
    seconds: float
    extrapolated: bool
    run: str  # the folder it came from


def bars(runs: list[Path]) -> dict[str, list[Bar]]:
    """Workload -> its bars, in VARIANTS' order then the served stack (text-to-image), from the runs' results.json."""
    found: dict[str, dict[str, Bar]] = {key: {} for key in WORKLOADS}
    for run in runs:
        stages: dict[str, Any] = json.loads((run / "results.json").read_text())["stages"]
        for variant, label in VARIANTS.items():
            for key in WORKLOADS:
                record = stages.get(f"{variant}_{key}", {})
                value = record.get("seconds", record.get("extrapolated_s"))
                if value is not None:
                    found[key][variant] = Bar(label, value, "seconds" not in record, run.name)
        points = [p for p in stages.get("served_requests", {}).get("points", []) if p.get("concurrency") == 1]
        if points:
            # `same_as`: the in-process variant the served stack ran as (batched: it was not compiled)
            compiled = stages.get("served_load", {}).get("same_as", "compiled") == "compiled"
            label = f"served ({'compiled' if compiled else 'uncompiled'}), concurrency 1"
            found["t2i"]["served"] = Bar(label, points[0]["p50_s"], False, run.name)
    return {key: list(by_variant.values()) for key, by_variant in found.items()}


def plot(runs: list[Path], out: Path) -> None:
    measured = bars(runs)
    machine = json.loads((runs[-1] / "results.json").read_text())["machine"].get("gpu", "?")
    figure, axes = plt.subplots(1, len(WORKLOADS), figsize=(11, 3.8))
    for axis, (key, (title, target)) in zip(axes, WORKLOADS.items(), strict=True):
        drawn = measured[key]
        y = range(len(drawn))
        axis.barh(
            list(y),
            [b.seconds for b in drawn],
            hatch=["//" if b.extrapolated else "" for b in drawn],
            color=["tab:gray" if b.label.startswith("served") else "tab:blue" for b in drawn],
        )
        for i, b in zip(y, drawn, strict=True):
            axis.text(b.seconds, i, f" {'~' if b.extrapolated else ''}{b.seconds:.2f} s", va="center", fontsize=8)
        axis.axvline(target, color="tab:red", linestyle="--", label=f"target {target:g} s")
        axis.set_yticks(list(y), [b.label for b in drawn], fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("seconds per request (1024x1024, 50 steps, bf16)")
        axis.set_xlim(0, max([target, *(b.seconds for b in drawn)]) * 1.25)
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle(f"OmniGen2 on {machine}: full size, random weights (hatched: extrapolated from a cut-short run)")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("runs", type=Path, nargs="+", help="run folders holding results.json, earliest first")
    args = parser.parse_args()
    plot([run for run in args.runs if (run / "results.json").is_file()], args.out)


if __name__ == "__main__":
    main()
