"""The GPU bench entry (`python -m bench --only gpu`) run as a CPU dry run, so it cannot rot
while no GPU is at hand: same code path, tiny sizes, no timing asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import trainer_gpu
from bench import trainer_throughput as tt


@pytest.mark.slow
def test_gpu_bench_dry_run_measures_both_sides_and_reports_our_path(tmp_path: Path) -> None:
    out, vram = tmp_path / "gpu.md", tmp_path / "vram.md"
    text = trainer_gpu.run(out, dry=True, budget=600, vram_out=vram)
    assert out.read_text() == text
    row = next(line for line in text.splitlines() if line.startswith("| dry run"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours_tok_s, recipe_tok_s = float(cells[1]), float(cells[2])  # both measured, not "missing"
    assert ours_tok_s > 0 and recipe_tok_s > 0 and cells[3].endswith("×**")
    assert "attention sdpa, loss chunked-cross-entropy" in text
    assert "Liger kernels need CUDA" in text
    assert "dry run (CPU) went through `bench.vram_accuracy.dry_run`" in text
    assert not vram.exists()  # a dry run never writes the VRAM table


def test_a_recipe_that_cannot_run_is_marked_missing_not_replaced() -> None:
    assert trainer_gpu.missing(("json", "no_such_package_for_the_recipe")) == ["no_such_package_for_the_recipe"]
    result = {"name": "GPU, 1B", "ours": {"tok_s": 1000.0, "peak_gib": 10.0, "acceleration": {
        "attention": "flex_attention", "loss": "chunked-cross-entropy", "kernels": [],
        "notes": ["liger-kernel is not installed (pip install 'lora-operator[gpu]')"]}},
        "baseline": {"missing": "trl, datasets not installed (carry the wheels)"}}
    lines = trainer_gpu.throughput_table(result, trainer_gpu.GPU_PLAN)
    assert lines[2] == ("| GPU, 1B | 1000 | missing: trl, datasets not installed (carry the wheels) | – "
                        "| 10.00 | missing: trl, datasets not installed (carry the wheels) | – |")
    assert not any("Goal" in line for line in lines)  # no verdict without the recipe
    assert "attention flex_attention, loss chunked-cross-entropy" in lines[4]


def test_goal_verdict_needs_both_speed_and_memory() -> None:
    ours = {"tokens": 900, "seconds": 1.0, "peak_gib": 6.0}
    recipe = {"tokens": 400, "seconds": 1.0, "peak_gib": 10.0}
    result = {"name": "GPU", **tt.summarize({"ours": [ours], "baseline": [recipe]})}
    assert result["ratio"] == pytest.approx(2.25) and result["memory_ratio"] == pytest.approx(0.6)
    verdict = trainer_gpu.throughput_table(result, trainer_gpu.GPU_PLAN)[-1]
    assert "**missed** (2.25×, 60%)" in verdict
    result["ours"]["peak_gib"], result["memory_ratio"] = 4.0, 0.4
    assert "**met**" in trainer_gpu.throughput_table(result, trainer_gpu.GPU_PLAN)[-1]
