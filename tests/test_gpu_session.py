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
# Records each command in a file of its own (its arguments, NUL-separated: the runs part
# starts three at once) and exits with 3 where the arguments contain $FAKE_FAIL.
printf '%s\\0' "$@" > "$(mktemp "$FAKE_LOGS/command.XXXXXX")"
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
  logs = tmp_path / f"{part}_commands"
  logs.mkdir()
  env = {key: value for key, value in os.environ.items()
         if key not in ("EXTRA_FLAGS", "RUNS_SECONDS")}  # the caller's dry-run settings
  env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOGS=str(logs), FAKE_FAIL=fail,
             TIED_LM_DATA_DIR=str(tmp_path), RUN_ROOT=str(tmp_path / "runs"))
  result = run(part, str(tmp_path / f"out_{part}"), env=env)
  commands = [log.read_text().split("\0")[:-1] for log in sorted(logs.iterdir())]
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


# One step in the foreground (checks), one of the runs started in the background.
@pytest.mark.parametrize("part,fail,step", [
    ("checks", "--set=model.lstm_implementation", "benchmark_cudnn"),
    ("runs", "--variants=re ", "re_bias_dropout0.2_seed2")])  # not real
def test_a_failed_step_makes_the_session_fail_and_names_it(tmp_path, part, fail, step):
  # Every step logged its exit status, and the script still ended with status 0.
  result, _ = run_with_fake_python(part, tmp_path, fail=fail)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f"error: 1 step(s) failed: {step} (exit 3)"
