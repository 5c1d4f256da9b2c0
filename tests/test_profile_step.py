"""experiments/profile_step.py: a tiny run writes its blocks with their FLOP counts."""

from configs import default
from experiments import benchmark


def test_profile_step_times_each_block(run_tiny_timing):
  stdout, results = run_tiny_timing("profile_step")
  assert results["commit"] and results["command"].startswith("python -m experiments.profile_step")
  (row,) = results["rows"]
  blocks = row["blocks"]
  assert list(blocks) == ["lstm", "output", "step", "matmuls"]
  flops = benchmark.step_flops(default.get_config(), 10000, row["batch_size"], 10)
  assert blocks["lstm"]["flops"] + blocks["output"]["flops"] == blocks["step"]["flops"]
  assert blocks["step"]["flops"] == blocks["matmuls"]["flops"] == flops["train"]
  assert sum(2 * mm["count"] * mm["m"] * mm["k"] * mm["n"] for mm in row["matmuls"]) == (
      flops["train"])
  # One peak sample before the row and one at the end; every share is of the best.
  assert results["complete"] and len(results["matmul_peak_samples"]) == 2
  peak = max(results["matmul_peak_samples"])
  assert row["matmul_peak_flops"] == peak
  for stats in blocks.values():
    assert len(stats["repeat_seconds"]) == 2 and stats["ms"] > 0
    assert stats["peak_fraction"] == stats["flops"] / (stats["ms"] / 1e3) / peak
    assert "torch_ms" not in stats  # torch only with --compare=torch
  assert "output" in stdout  # the printed table
