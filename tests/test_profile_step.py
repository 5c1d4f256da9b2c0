"""experiments/profile_step.py: a tiny run writes its blocks with their FLOP counts."""

import json
import subprocess
import sys
from pathlib import Path

from configs import default
from experiments import benchmark

REPO = Path(__file__).resolve().parents[1]


def test_profile_step_times_each_block(tmp_path):
  output = tmp_path / "profile.json"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.profile_step", "--configs=configs/default.py",
       "--repeats=2", "--steps_per_repeat=2", "--warmup=1", "--matmul_size=256",
       f"--output={output}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  results = json.loads(output.read_text())
  assert results["commit"] and results["command"].startswith("python -m experiments.profile_step")
  (row,) = results["rows"]
  blocks = row["blocks"]
  assert list(blocks) == ["lstm", "output", "step", "matmuls"]
  flops = benchmark.step_flops(default.get_config(), 10000, row["batch_size"], 10)
  assert blocks["lstm"]["flops"] + blocks["output"]["flops"] == blocks["step"]["flops"]
  assert blocks["step"]["flops"] == blocks["matmuls"]["flops"] == flops["train"]
  assert sum(2 * mm["count"] * mm["m"] * mm["k"] * mm["n"] for mm in row["matmuls"]) == (
      flops["train"])
  for stats in blocks.values():
    assert len(stats["repeat_seconds"]) == 2 and stats["ms"] > 0
    assert "torch_ms" not in stats  # torch only with --compare=torch
  assert "output" in result.stdout  # the printed table
