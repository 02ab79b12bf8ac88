"""What a benchmark result records and shows beside its numbers (benchmarks/machine.py, percentiles.py, report.py,
plots.py): the commit, the CPU and its bf16 instructions, the load; percentiles only where enough requests place them;
plots with the machine in the title and markers at measured points only. No timing: the inputs are made up."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest

from benchmarks.ablations import PROMPT_CACHE_ROW, Row, prompt_cache_row, rerun_row, write_results
from benchmarks.gpu_report import write_markdown as write_gpu_markdown
from benchmarks.harness import Point
from benchmarks.machine import RunStart, describe
from benchmarks.percentiles import min_samples, percentile
from benchmarks.plots import PLOTS, plot_sweep, sweep_figure
from benchmarks.report import write_markdown
from serving.model.checkpoint import read_spec
from serving.pipeline.text_cache import TextFeatureCache

# What the earliest results files hold (cpu-small, overhead-tiny, ablations-small): no CPU, ISA, load or commit.
UNRECORDED = {"cpus": 2, "platform": "Linux-6.18.44-fc-v769-x86_64-with-glibc2.36", "python": "3.11.7"}


def _point(workload: str, concurrency: int, requests: int, mode: str = "served") -> dict[str, Any]:
    return {
        "mode": mode,
        "workload": workload,
        "concurrency": concurrency,
        "requests": requests,
        "p50_s": 1.0 * concurrency,
        "p90_s": 1.2 * concurrency,
        "p99_s": 1.3 * concurrency,  # older files stored one whatever the number of requests
        "max_s": 1.4 * concurrency,
        "images_per_s": 0.8,
        "step_ms": 100.0,
        "queue_ms_p50": 10.0 if mode == "served" else None,
        "peak_rss_mb": 1000.0,
    }


def _results(machine: dict[str, Any], **extra: Any) -> dict[str, Any]:
    points = [_point("t2i", c, max(4, 4 * c)) for c in (1, 2, 4, 8)]
    points += [_point("edit", c, max(4, 4 * c)) for c in (1, 8)]
    points += [_point(w, 1, 4, mode="eager") for w in ("t2i", "edit")]
    return {"profile": "cpu-test", "settings": {}, "machine": machine, "points": points} | extra


def test_a_run_records_its_commit_cpu_bf16_isa_and_load_before_and_after() -> None:
    record = RunStart().record()
    assert re.fullmatch(r"[0-9a-f]{40}( with uncommitted changes to .+)?", record["commit"])
    machine = record["machine"]
    assert machine["cpu"] and machine["bf16_isa"] in {"AMX-BF16", "AVX512-BF16 (no AMX)", "no bf16 instructions"}
    assert set(machine["load_average"]) == {"start", "end"}
    assert all(load >= 0 for load in machine["load_average"].values())


def test_results_without_a_cpu_are_described_as_not_recorded_not_guessed() -> None:
    assert describe(UNRECORDED) == "hardware not recorded, 2 CPUs"
    recorded = UNRECORDED | {"cpu": "Intel(R) Xeon(R) Processor", "bf16_isa": "AVX512-BF16 (no AMX)"}
    assert describe(recorded) == "Intel(R) Xeon(R) Processor, AVX512-BF16 (no AMX), 2 CPUs"


@pytest.mark.parametrize(("q", "needed"), [(50, 2), (90, 10), (99, 100)])
def test_a_percentile_needs_a_sample_beyond_it(q: float, needed: int) -> None:
    assert min_samples(q) == needed
    assert percentile([1.0] * (needed - 1), q) is None
    assert percentile([float(i) for i in range(needed)], q) is not None


def test_a_point_of_four_requests_reports_p50_and_max_but_no_p90_or_p99() -> None:
    few = Point("served", "t2i", 1, 4, [1.0, 2.0, 3.0, 10.0], [0.1] * 4, [0.01] * 4, 16.0, 4, 100.0).summary()
    assert (few["requests"], few["p50_s"], few["max_s"], few["p90_s"], few["p99_s"]) == (4, 2.5, 10.0, None, None)
    latencies = [float(i) for i in range(100)]
    many = Point("served", "t2i", 8, 100, latencies, [0.1] * 100, [0.01] * 100, 50.0, 100, 100.0).summary()
    assert many["p90_s"] == pytest.approx(89.1) and many["p99_s"] == pytest.approx(98.01)


def test_the_table_names_what_was_not_recorded_and_hides_percentiles_too_few_requests_place(tmp_path: Path) -> None:
    write_markdown(_results(UNRECORDED), tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "hardware not recorded, 2 CPUs" in text and "fc-v769" in text
    assert "load average not recorded" in text and "Commit: not recorded" in text
    rows = {tuple(cell.strip() for cell in line.split("|")[1:5]): line for line in text.splitlines()}
    one = rows[("served", "t2i", "1", "4")].split("|")  # 4 requests: p50 and max only, the stored p99 is not shown
    assert [c.strip() for c in one[5:9]] == ["1.000", "-", "-", "1.400"]
    eight = rows[("served", "t2i", "8", "32")].split("|")  # 32 requests: p90 too, still no p99
    assert [c.strip() for c in eight[5:9]] == ["8.000", "9.600", "-", "11.200"]


def test_the_table_of_a_new_run_names_its_cpu_isa_load_and_commit(tmp_path: Path) -> None:
    machine = UNRECORDED | {
        "cpu": "Intel(R) Xeon(R) Processor",
        "bf16_isa": "AMX-BF16",
        "load_average": {"start": 1.25, "end": 3.5},
    }
    write_markdown(_results(machine, commit="0123abc"), tmp_path / "results.md")
    first = (tmp_path / "results.md").read_text().splitlines()[2]
    assert first.startswith("Machine: Intel(R) Xeon(R) Processor, AMX-BF16, 2 CPUs, Linux-6.18.44-fc-v769")
    assert "load average 1.2 at the start, 3.5 at the end" in first and "Commit: 0123abc." in first


def test_plots_mark_measured_points_only_and_name_the_machine(tmp_path: Path) -> None:
    machine = UNRECORDED | {"cpu": "Intel(R) Xeon(R) Processor", "bf16_isa": "AVX512-BF16 (no AMX)"}
    results = _results(machine)
    for metric, label in PLOTS.values():
        figure = sweep_figure(results, metric, label)
        axis = figure.axes[0]
        assert "Intel(R) Xeon(R) Processor, AVX512-BF16 (no AMX), 2 CPUs" in axis.get_title()
        served = {
            str(line.get_label()): line for line in axis.get_lines() if str(line.get_label()).startswith("served")
        }
        assert set(served) == {"served t2i", "served edit"}
        for line in served.values():
            assert line.get_linestyle() == "None" and line.get_marker() not in (None, "None", "")
        assert np.asarray(served["served edit"].get_xdata()).tolist() == [
            1,
            8,
        ]  # nothing drawn at 2 or 4, where edit was not run
        assert list(axis.get_xticks()) == [1, 2, 4, 8]
        plt.close(figure)
    plot_sweep(results, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PLOTS)


def test_ablation_results_record_the_run_and_name_the_machine(tmp_path: Path) -> None:
    rows = [Row("bf16 weights", "fp32", "bf16", 800.0, 320.0), Row("prompt cache", "encode", "hit", 6.5, 0.001)]
    settings = {"checkpoint": "small", "size": 256, "repeats": 5}
    write_results(rows, settings, RunStart(), tmp_path, "Ablations")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["commit"] and set(data["machine"]["load_average"]) == {"start", "end"}
    text = (tmp_path / "results.md").read_text()
    assert f"Machine: {describe(data['machine'])}" in text and "Commit: " in text and "| 2.50x |" in text
    assert (tmp_path / "ablations.png").stat().st_size > 0


def test_a_row_measured_again_replaces_its_own_and_names_its_run(tmp_path: Path) -> None:
    """An earlier run's file (no torch, load or commit recorded) keeps its other rows and its run line; the
    replaced row's run is recorded beside it, in results.json and in words in results.md."""
    settings = {"checkpoint": "small", "size": 256, "repeats": 5}
    old = [Row("bf16 weights", "fp32", "bf16", 800.0, 320.0), Row("prompt cache", "encode", "hit", 6.5, 0.001)]
    earlier = {"settings": settings, "machine": UNRECORDED, "rows": [asdict(r) | {"speedup": r.speedup} for r in old]}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    rerun_row(Row("prompt cache", "miss", "hit", 6.0, 0.003), settings | {"repeats": 7}, RunStart(), tmp_path, "A")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"][0] == earlier["rows"][0] and data["rows"][1]["speedup"] == 2000.0
    (later,) = data["reruns"]
    assert later["change"] == "prompt cache" and later["commit"] and later["settings"]["repeats"] == 7
    text = (tmp_path / "results.md").read_text()
    assert (
        "load average not recorded. Commit: not recorded. Torch not recorded; best of 5 per cell, one run but" in text
    )
    assert 'The row "prompt cache" is from a later run that measured it alone (best of 7): Machine: ' in text
    assert "| 800 | 320 | 2.50x |" in text
    # The hit's microseconds in three digits, not 0.00, and no ratio in the table: it only restates the miss.
    assert "| 6 | 0.003 | not given (below) |" in text and "the ratio (2000x) would only restate" in text
    with pytest.raises(SystemExit, match="no row 'other'"):
        rerun_row(Row("other", "a", "b", 1.0, 1.0), settings, RunStart(), tmp_path, "A")


def test_the_prompt_cache_row_times_the_served_lookup(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its two sides are TextFeatureCache.lookup itself: one that encodes the prompts (a miss), one that finds them."""
    seen: list[tuple[bool, tuple[int, ...]]] = []
    lookup = TextFeatureCache.lookup

    async def counted(self: TextFeatureCache, prompts: Any, max_length: int, encode: Any) -> Any:
        encoded: list[str] = []

        async def encode_seen(texts: list[str], length: int) -> Any:
            encoded.extend(texts)
            return await encode(texts, length)

        found = await lookup(self, prompts, max_length, encode_seen)
        seen.append((not encoded, tuple(found["prompt"].features.shape)))
        return found

    monkeypatch.setattr(TextFeatureCache, "lookup", counted)
    row = prompt_cache_row(tiny_checkpoint, read_spec(tiny_checkpoint), repeats=2)
    assert row.change == PROMPT_CACHE_ROW and row.before_ms > 0 and row.after_ms > 0
    hits = [hit for hit, _ in seen]
    assert hits.count(False) == 1 + 3 and hits.count(True) == 3  # warming, then a warm-up call and 2 timed each
    assert all(len(shape) == 2 and shape[0] > 0 for _, shape in seen)  # the unpadded (L, D) features


def test_the_gpu_report_shows_p90_only_where_ten_requests_place_it_and_the_commit(tmp_path: Path) -> None:
    points = [
        {"concurrency": 1, "requests": 4, "p50_s": 4.0, "p90_s": None, "images_per_s": 0.25},  # harness: None below 10
        {"concurrency": 4, "requests": 16, "p50_s": 9.0, "p90_s": 9.5, "images_per_s": 0.4},
    ]
    results = {
        "settings": {"size": "full", "side": 1024, "steps": 50},
        "machine": {"gpu": "NVIDIA H100"},
        "smoke": False,
        "started": "2026-11-26T20:00:00+00:00",
        "commit": "0123abc",
        "variants": {},
        "stages": {"served_requests": {"status": "ok", "wall_s": 1.0, "budget_s": 2, "points": points}},
    }
    write_gpu_markdown(results, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "commit 0123abc." in text
    assert "| 1 | 4 | 4.00 | - | 0.250 | 1.00x |" in text and "| 4 | 16 | 9.00 | 9.500 | 0.400 | 1.60x |" in text
