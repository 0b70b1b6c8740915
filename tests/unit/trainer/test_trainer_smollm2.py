"""The real model: SmolLM2-135M-Instruct (GGUF from PyPI) learns the example task on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
MIN_IMPROVEMENT = 0.20


@pytest.mark.slow
def test_smollm2_lora_cuts_held_out_loss(tmp_path: Path) -> None:
    """`lora-trainer run --job examples/local-smollm2.yaml`, as the quickstart runs it."""
    out = tmp_path / "adapter"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "LORA_TRAINER_LOG": "WARNING",
           "LORA_TERMINATION_MESSAGE_PATH": str(tmp_path / "result.json")}
    proc = subprocess.run([sys.executable, "-m", "lora_trainer", "run", "--job",
                           str(REPO / "examples/local-smollm2.yaml"), "--output", f"file://{out}",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=1800,
                          check=False)
    result = json.loads((tmp_path / "result.json").read_text())
    assert proc.returncode == 0, (result, proc.stderr[-2000:])
    assert result["improvement"] >= MIN_IMPROVEMENT, result
    assert result["adapterTestLoss"] < result["baseTestLoss"]
    assert (out / "manifest.json").is_file()
