"""Test setup: two host CPU devices for the pmap tests, a compilation cache, the shared data,
a trained tiny run, and runners for the commands."""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
)
# Many tests, and the commands they start, compile the same tiny steps: JAX's persistent
# compilation cache, private to this session, lets each process after the first load them
# (the environment variables reach the subprocesses too). Every program, not only those
# that compile for over a second (the default): a tiny run's many short compiles took a
# quarter of a command's time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="tied_lm_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "TIED_LM_DATA_DIR" not in os.environ and _SHARED_DATA.is_dir():
  os.environ["TIED_LM_DATA_DIR"] = str(_SHARED_DATA)


import pytest  # noqa: E402 -- after the XLA flags above

from tied_lm import hostmem  # noqa: E402

hostmem.reuse_freed_memory()  # as the commands do: before the first JAX computation

# The checkout under test, where the commands run (not provenance.REPO: the installed
# package may come from another checkout).
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def run_module():
  """`run_module(MODULE, *ARGS, timeout=300)` runs `python -m MODULE ARGS` in the checkout
  under test, with this session's environment and a timeout in seconds (None: none), and
  returns the finished process, its output as text."""

  def run(module: str, *args: str, timeout: float | None = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)

  return run


@pytest.fixture(scope="session")
def run_module_unscored():
  """`run_module_unscored(MODULE, SCORER, *ARGS)`: as `run_module`, with
  `tied_lm.analysis.SCORER` replaced by a function that exits with 'scored first': what
  tells a command that checks all its inputs before it scores any run."""

  def run(module: str, scorer: str, *args: str) -> subprocess.CompletedProcess:
    script = (f"import runpy, sys\nfrom tied_lm import analysis\n"
              f"def scored(*args, **kwargs):\n  raise SystemExit('scored first')\n"
              f"analysis.{scorer} = scored\n"
              f"sys.argv = ['{module}', *sys.argv[1:]]\n"
              f"runpy.run_module('{module}', run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)

  return run


@pytest.fixture(scope="session")
def modules_imported_by():
  """`modules_imported_by(MODULE, *ARGS)` runs `python -X importtime -m MODULE ARGS` in the
  checkout under test and returns (its exit status, the names of the modules it imported):
  what tells a command's --help and flag errors that never load JAX."""

  def run(module: str, *args: str) -> tuple[int, set[str]]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    return result.returncode, {line.split("|")[-1].strip()
                               for line in result.stderr.splitlines()
                               if line.startswith("import time:")}

  return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A finished tiny PTB run (1 epoch of 40 steps): its workdir and results. Shared by the
  whole session, so tests only read it: one that writes into a run copies it first."""
  from configs import default
  from tied_lm import train

  config = default.get_config()
  config.num_epochs, config.max_steps_per_epoch = 1, 40
  workdir = tmp_path_factory.mktemp("trained") / "run"
  return workdir, train.train_and_evaluate(config, str(workdir))


@pytest.fixture
def set_signal_handler():
  """signal.signal for one test: the handlers the tests inherited come back at its end."""
  inherited = {}

  def set_handler(signum: int, handler) -> None:
    previous = signal.signal(signum, handler)
    inherited.setdefault(signum, previous)

  yield set_handler
  for signum, handler in inherited.items():
    signal.signal(signum, handler)


@pytest.fixture
def terminal_sigint(set_signal_handler):
  """SIGINT as from a terminal (Python's KeyboardInterrupt) for one test: started in the
  background by a script (CI), the tests inherit SIGINT ignored, which the commands and
  train.StopSignals leave alone."""
  set_signal_handler(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def run_tiny_timing(tmp_path, run_module):
  """Runs `python -m experiments.<module> [FLAGS]` (the benchmark, or profile_step, which
  shares its flags) on configs/default.py with the fewest, shortest repeats and no warm-up;
  checks that it exits 0 and returns (its stdout, the JSON it wrote)."""

  def run(module: str, *flags: str) -> tuple[str, dict]:
    output = tmp_path / f"{module}.json"
    result = run_module(f"experiments.{module}", "--configs=configs/default.py",
                        "--repeats=2", "--steps_per_repeat=2", "--warmup=0",
                        "--matmul_size=256", f"--output={output}", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, json.loads(output.read_text())

  return run


@pytest.fixture(scope="session")
def run_python_that_stops():
  """`run_python_that_stops(SCRIPT, *ARGS)` runs SCRIPT with ARGS in a child Python in
  the checkout under test, where `stop_this_process(SECONDS)` stops that process with
  SIGSTOP, as `kill -STOP` from outside would, and has a process of its own continue it
  (SIGCONT) about SECONDS later; returns the finished process, its output as text. A
  child, because a shell running pytest in a terminal takes the terminal back from a
  job it sees stop, and then Ctrl-C no longer reaches the tests."""
  prelude = (
      "import os, signal, subprocess\n"
      "def stop_this_process(seconds):\n"
      "  waker = subprocess.Popen(['sh', '-c', f'sleep {seconds}; kill -CONT {os.getpid()}'])\n"
      "  os.kill(os.getpid(), signal.SIGSTOP)\n"
      "  waker.wait()\n")

  def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", prelude + script, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)

  return run
