"""The command line: one-line errors for bad input, and multi-process training."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_main(*args, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "tied_lm.main", f"--workdir={workdir}", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
  )
  return result, workdir


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config=configs/ptb.py:small,tied"],
         "config argument 'small,tied' must be SIZE,VARIANT"),
        (["--config=configs/wikitext2.py:huge,real"], "SIZE in small | medium | large"),
        (["--config=configs/ptb.py:small,real", "--config.loss.tua=3"],
         "unknown config field in --config.loss.tua"),
        (["--config=configs/default.py", "--config.model.hidden_size=32"],
         "tie_embeddings needs model.hidden_size == model.embed_dim (got 32 != 64)"),
        (["--config=configs/default.py", "--config.batch_size=3"],
         "batch_size=3 is not divisible by the 2 devices"),
        (["--config=configs/default.py", "--config.dataset=text", "--config.data_dir=/no/such"],
         "missing train.txt, valid.txt, test.txt in /no/such"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(args, message, tmp_path):
  result, workdir = run_main(*args, tmp_path=tmp_path)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert message in lines[0]
  assert not workdir.exists()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _final_params(workdir: Path) -> dict:
  manager = ocp.CheckpointManager((workdir / "checkpoints").resolve())
  restored = manager.restore(
      manager.latest_step(), args=ocp.args.Composite(arrays=ocp.args.StandardRestore())
  )
  return restored["arrays"]["state"]["params"]


def test_two_processes_train_the_same_parameters_as_one_process_with_two_devices(tmp_path):
  args = ["--config=configs/default.py", "--config.num_epochs=1",
          "--config.max_steps_per_epoch=12"]
  single, single_dir = run_main(*args, tmp_path=tmp_path / "single")
  assert single.returncode == 0, single.stderr[-2000:]

  multi_dir = tmp_path / "multi" / "run"
  port = _free_port()
  processes = [
      subprocess.Popen(
          [sys.executable, "-m", "tied_lm.main", f"--workdir={multi_dir}", *args],
          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
          env=dict(
              os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
              JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
              JAX_PROCESS_ID=str(process_id),
          ),
      )
      for process_id in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (_, stderr) in zip(processes, outputs, strict=True):
    assert p.returncode == 0, stderr[-2000:]
  assert "process 0 of 2, 1 local devices of 2" in outputs[0][1]

  single_results = json.loads((single_dir / "results.json").read_text())
  multi_results = json.loads((multi_dir / "results.json").read_text())
  for key in ("valid_perplexity", "test_perplexity"):
    np.testing.assert_allclose(multi_results[key], single_results[key], rtol=1e-6)
  assert len(multi_results["devices"]) == len(single_results["devices"]) == 2
  single_params, multi_params = (
      dict(jax.tree_util.tree_leaves_with_path(_final_params(d))) for d in (single_dir, multi_dir)
  )
  assert single_params and single_params.keys() == multi_params.keys()
  for path, value in single_params.items():
    np.testing.assert_allclose(multi_params[path], value, rtol=1e-6, atol=1e-7)
