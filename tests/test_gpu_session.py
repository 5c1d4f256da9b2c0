"""experiments/gpu_session.sh: it parses, and bad arguments get a one-line error.

Its two parts train and benchmark for minutes, so they are not run here; each was
dry-run on a CPU with tiny EXTRA_FLAGS when written (see the commit messages).
"""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments/gpu_session.sh"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=60, env=os.environ if env is None else env)


def test_script_parses():
  assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_unknown_part_is_refused(tmp_path):
  result = run("nope", str(tmp_path / "out"), env={**os.environ, "TIED_LM_DATA_DIR": str(tmp_path)})
  assert result.returncode == 2
  assert result.stderr == "error: unknown part nope: use checks or runs\n"
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [(), ("runs",)])
def test_missing_arguments_name_the_usage(args):
  result = run(*args)
  assert result.returncode == 2
  assert result.stderr == "error: usage: gpu_session.sh checks|runs OUT_DIR\n"


def test_missing_data_dir_is_refused(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "TIED_LM_DATA_DIR"}
  result = run("runs", str(tmp_path / "out"), env=env)
  assert result.returncode == 2
  assert result.stderr == "error: set TIED_LM_DATA_DIR to the directory holding the corpora\n"
  assert not (tmp_path / "out").exists()
