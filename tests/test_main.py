"""The command line: bad input costs one line on stderr and exit status 2, and no workdir."""

import os
import subprocess
import sys
from pathlib import Path

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
