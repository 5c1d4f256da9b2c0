"""experiments/gpu_session.sh: it parses, bad arguments get a one-line error, every command
it runs passes its module's own flag parsing, and a failed step fails the session.

Its two parts train and benchmark for minutes, so they are not run here: a stand-in
`python` records their commands. Each part was dry-run on a CPU with tiny EXTRA_FLAGS
when written (see the commit messages).
"""

import os
import subprocess
import sys
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


FAKE_PYTHON = """#!/usr/bin/env bash
# Records each command (one line of arguments, NUL-separated) and exits with $FAKE_RC for
# the commands whose arguments contain $FAKE_FAIL, 0 for the others.
printf '%s\\0' "$@" >> "$FAKE_LOG"; echo >> "$FAKE_LOG"
if [[ -n "${FAKE_FAIL:-}" && "$*" == *"$FAKE_FAIL"* ]]; then exit 3; fi
"""

# Each module as the script runs it, with its own flag definitions.
CHECK_FLAGS = """
import importlib, sys
module = importlib.import_module(sys.argv[1])
getattr(module, "define_flags", lambda: None)()
module.FLAGS(["prog", *sys.argv[2:]])
"""


def run_with_fake_python(part: str, tmp_path: Path, fail: str = "") -> tuple:
  """Runs a part with `python` replaced by a recorder; returns the result and the commands."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / "python").write_text(FAKE_PYTHON)
  (bin_dir / "python").chmod(0o755)
  log = tmp_path / f"{part}.commands"
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
         "FAKE_FAIL": fail, "TIED_LM_DATA_DIR": str(tmp_path), "RUN_ROOT": str(tmp_path / "runs")}
  result = run(part, str(tmp_path / f"out_{part}"), env=env)
  commands = [line.split("\0")[:-1] for line in log.read_text().splitlines() if line]
  return result, commands


@pytest.mark.parametrize("part", ["checks", "runs"])
def test_every_command_of_a_part_passes_its_modules_own_flag_parsing(part, tmp_path):
  # A misspelt flag would only show on the GPU, and waste its lease.
  result, commands = run_with_fake_python(part, tmp_path)
  assert result.returncode == 0, result.stderr
  # (The runs part starts its three training steps at once: in any order.)
  assert sorted(command[1] for command in commands) == {
      "checks": ["experiments.benchmark", "experiments.benchmark", "experiments.profile_step",
                 "pytest"],
      "runs": ["experiments.reproduce"] * 4}[part]
  for command in commands:
    if command[1] != "pytest":
      check = subprocess.run([sys.executable, "-c", CHECK_FLAGS, *command[1:]], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
      assert check.returncode == 0, f"{command}: {check.stderr[-1500:]}"


def test_a_failed_step_makes_the_session_fail_and_names_it(tmp_path):
  # Every step logged its exit status, and the script still ended with status 0.
  result, _ = run_with_fake_python("checks", tmp_path, fail="--set=model.lstm_implementation")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: 1 step(s) failed: benchmark_cudnn (exit 3)")
