"""The command line: one-line errors for bad input, and multi-process training."""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tied_lm import provenance, reporting

REPO = Path(__file__).resolve().parents[1]


ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def run_main(*args, tmp_path, env: dict[str, str] | None = None):
  """Runs tied_lm.main on tmp_path/run with the session's 2 host devices (conftest)."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "tied_lm.main", f"--workdir={workdir}", *args],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {})),
  )
  return result, workdir


# One case per way bad input reaches main: the config file, an override, the flags, the
# config's checks (tests/test_train.py has each of those in-process), the device count,
# the data.
@pytest.mark.parametrize(
    "args,message",
    [
        (["--config=configs/ptb.py:small,tied"],
         "--config=configs/ptb.py:small,tied: ValueError: config argument 'small,tied' must be "
         "SIZE,VARIANT"),
        (["--config=configs/ptb.py:small, tied"],  # a space, which the config accepts
         "--config=configs/ptb.py:small, tied: ValueError: config argument 'small, tied' must "
         "be SIZE,VARIANT"),
        (["--config=configs/default.py:small,real"],
         "--config=configs/default.py:small,real: TypeError: get_config() takes 0 positional "
         "arguments but 1 was given"),
        (["--config=configs/ptb.py:small,real", "--config.num_epochs=2", "--config.loss.tua=3"],
         "unknown config field in --config.loss.tua"),
        (["--config=configs/default.py", "--workdir="], "--workdir=: is empty: name the run"),
        (["--config=configs/default.py", "extra"], "unexpected arguments: extra"),
        (["--config=configs/default.py", "--config.batch_size=3"],
         "batch_size=3 is not divisible by the 2 devices"),
        (["--config=configs/default.py", "--config.dataset=text", "--config.data_dir=/no/such"],
         "missing train.txt, valid.txt, test.txt in /no/such"),
        (["--config=configs/default.py", "--config.loss.tau=0"],
         "loss.tau=0.0 must be in [1.18e-38, 3.4e+38] (float32's positive normal numbers)"),
        (["--config=configs/ptbb.py:small,real"],
         "--config: No such file or directory: 'configs/ptbb.py'"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(args, message, tmp_path):
  result, workdir = run_main(*args, tmp_path=tmp_path)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert message in lines[0]
  assert not workdir.exists()
  if "tua" in message:  # only the misspelt override is named
    assert lines[0] == "error: " + message


@pytest.mark.parametrize("source,message", [
    ("def get_config():\n  return undefined_name\n",
     "line 2: NameError: name 'undefined_name' is not defined"),
    ("def get_config(:\n", "line 1: SyntaxError: invalid syntax"),
    ("x = 1\n", "the file defines no get_config()"),
    ("def get_config():\n  return {'seed': 0}\n",
     "get_config() returned a dict, not an ml_collections.ConfigDict"),
    # The line that raised, not the call in get_config that led to it.
    ("def units():\n  return 650 // 0\n\n\ndef get_config():\n  return units()\n",
     "line 2: ZeroDivisionError: integer division or modulo by zero"),
    # A misspelt field, on configs/default.py's locked config: it was silently a new field.
    ("from configs import default\n\ndef get_config():\n  config = default.get_config()\n"
     "  config.loss.temprature = 5.0\n  return config\n",
     "line 5: the config has no field 'temprature' (a misspelling?): configs/default.py "
     "defines every field"),
])
@pytest.mark.parametrize("spelling", ["--config=FILE", "--config FILE"])
def test_a_broken_config_file_is_one_line_naming_it(source, message, spelling, tmp_path):
  config_file = tmp_path / "my_config.py"
  config_file.write_text(source)
  flag = ([f"--config={config_file}"] if spelling == "--config=FILE"
          else ["--config", str(config_file)])
  assert_refused_in_one_line(*flag, tmp_path=tmp_path,
                             error=f"--config={config_file}: {message}")


def assert_refused_in_one_line(*args: str, tmp_path: Path, error: str) -> None:
  """tied_lm.main ARGS prints exactly `error: ERROR`, exits 2 and makes no workdir."""
  result, workdir = run_main(*args, tmp_path=tmp_path)
  assert (result.returncode, result.stderr.strip()) == (2, f"error: {error}"), result.stderr
  assert not workdir.exists()


def test_a_config_file_without_a_field_is_one_line_naming_it(tmp_path):
  # It was an AttributeError traceback from the config's checks.
  config_file = tmp_path / "my_config.py"
  config_file.write_text("from configs import default\n\ndef get_config():\n"
                         "  config = default.get_config()\n  with config.unlocked():\n"
                         "    del config.loss['tau']\n"
                         "  return config\n")
  assert_refused_in_one_line(
      f"--config={config_file}", tmp_path=tmp_path,
      error="the config has no field 'tau': build it on configs/default.py's get_config(), "
      "which defines every field")


def test_a_broken_config_file_with_arguments_is_one_line_naming_it(tmp_path):
  config_file = tmp_path / "my_config.py"
  config_file.write_text("def get_config(size):\n  return undefined_name\n")
  assert_refused_in_one_line(
      f"--config={config_file}:small", tmp_path=tmp_path,
      error=f"--config={config_file}:small: line 2: NameError: name 'undefined_name' is "
      "not defined")


def test_a_syntax_error_in_a_module_the_config_imports_is_named_at_the_import(tmp_path):
  # The config file's line is the import, not the helper's line 5.
  config_file = tmp_path / "my_config.py"
  config_file.write_text("import os, sys\nsys.path.insert(0, os.path.dirname(__file__))\n"
                         "import my_helper\n\ndef get_config():\n  return my_helper.config()\n")
  (tmp_path / "my_helper.py").write_text("\n\n\n\ndef config(:\n")
  assert_refused_in_one_line(
      f"--config={config_file}", tmp_path=tmp_path,
      error=f"--config={config_file}: line 3: SyntaxError: invalid syntax (my_helper.py, "
      "line 5)")


def test_a_missing_config_is_one_line(tmp_path):
  assert_refused_in_one_line(
      tmp_path=tmp_path,
      error="flag --config=None: Flag --config must have a value other than None.")


def test_a_runtime_error_of_the_multihost_start_is_one_line(monkeypatch):
  # What jax.distributed.initialize raises (XlaRuntimeError, a RuntimeError) where process 0
  # cannot serve on the coordinator's port. Run for real, that case crashes inside JAX
  # 0.10 now and then, hence the stand-in.
  from tied_lm import main
  from tied_lm.errors import UserError

  def initialize(**kwargs):
    raise RuntimeError("UNKNOWN: Failed to start RPC server.")

  for variable in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(variable, raising=False)
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  with pytest.raises(UserError) as raised:
    main.initialize_multihost(timeout=300)
  assert str(raised.value) == (
      "cannot start the multi-host runtime: UNKNOWN: Failed to start RPC server (set "
      "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under a cluster "
      "manager JAX detects)")


@pytest.mark.parametrize("args,env,message", [
    (["--multihost"], {}, "cannot start the multi-host runtime: coordinator_address should be "
     "defined (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run "
     "under a cluster manager JAX detects)"),
    ([], {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two"},
     "JAX_NUM_PROCESSES='two' must be an integer"),
    ([], {"JAX_COORDINATOR_ADDRESS": "localhost"}, "JAX_COORDINATOR_ADDRESS='localhost' must "
     "be HOST:PORT, with a port from 1 to 65535 (e.g. 10.0.0.1:1234)"),
    (["--multihost"], {"JAX_COORDINATOR_ADDRESS": "[::1]:65536"}, "JAX_COORDINATOR_ADDRESS="
     "'[::1]:65536' must be HOST:PORT, with a port from 1 to 65535 (e.g. 10.0.0.1:1234)"),
    # Process 1 without a process 0: JAX aborted it after 5 minutes with a C++ stack trace.
    (["--multihost_timeout=2"], {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                                 "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     "no coordinator at 127.0.0.1:1 after 2 s (--multihost_timeout; last: Connection "
     "refused): is process 0 running, with the same JAX_COORDINATOR_ADDRESS?"),
    # It waited for the coordinator, then was named as missing.
    ([], {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
          "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 must be in [0, JAX_NUM_PROCESSES=2)"),
])
def test_a_multihost_start_without_its_settings_is_one_line(args, env, message, tmp_path,
                                                            monkeypatch):
  # They were tracebacks (ValueError, IndexError) with status 1.
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  result, workdir = run_main("--config=configs/default.py", *args, tmp_path=tmp_path, env=env)
  assert (result.returncode, result.stderr.strip()) == (2, f"error: {message}")
  assert not workdir.exists()


@pytest.mark.parametrize("args", [["--help"], ["--config=configs/default.py", "--workdir=x", "y"],
                                  ["--config=configs/ptbb.py:small,real", "--workdir=x"]])
def test_help_and_bad_flags_answer_before_jax_is_imported(args, modules_imported_by):
  status, imported = modules_imported_by("tied_lm.main", *args)
  assert status == (0 if args == ["--help"] else 2)
  assert "ml_collections" in imported and "jax" not in imported


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
  """A generated `text` corpus: lines of 20 words from a 20-word Markov chain, 1,500 lines
  to train on (78 windows of batch 20 by 20 steps), 100 each to validate and test.

  The runs here test checkpoints, signals and processes; a small vocabulary and short
  evaluation texts spend their time on those rather than on PTB's 10,000-way softmax.
  """
  rng = np.random.default_rng(0)
  transitions = rng.dirichlet(np.full(20, 0.2), size=20)
  directory = tmp_path_factory.mktemp("corpus")
  word = 0
  for split, num_lines in (("train", 1500), ("valid", 100), ("test", 100)):
    lines = []
    for _ in range(num_lines):
      line = []
      for _ in range(20):
        word = rng.choice(20, p=transitions[word])
        line.append(f"w{word}")
      lines.append(" ".join(line))
    (directory / f"{split}.txt").write_text("\n".join(lines) + "\n")
  return directory


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two_processes(workdir: Path, args: list[str]) -> list[subprocess.Popen]:
  """Two local processes with one CPU device each, training one model on `workdir`."""
  port = _free_port()
  return [
      subprocess.Popen(
          [sys.executable, "-m", "tied_lm.main", f"--workdir={workdir}", *args],
          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
          env=dict(
              os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
              JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
              JAX_PROCESS_ID=str(process_id),
          ),
      )
      for process_id in range(2)
  ]


def _final_params(workdir: Path) -> dict:
  manager = ocp.CheckpointManager((workdir / "checkpoints").resolve())
  restored = manager.restore(
      manager.latest_step(), args=ocp.args.Composite(arrays=ocp.args.StandardRestore())
  )
  return restored["arrays"]["state"]["params"]


def test_two_processes_train_the_same_parameters_as_one_process_with_two_devices(
    corpus, tmp_path):
  args = ["--config=configs/default.py", "--config.dataset=text", f"--config.data_dir={corpus}",
          "--config.num_epochs=1", "--config.max_steps_per_epoch=12"]
  single, single_dir = run_main(*args, tmp_path=tmp_path / "single")
  assert single.returncode == 0, single.stderr[-2000:]

  multi_dir = tmp_path / "multi" / "run"
  processes = _start_two_processes(multi_dir, args)
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (_, stderr) in zip(processes, outputs, strict=True):
    assert p.returncode == 0, stderr[-2000:]
  assert "process 0 of 2, 1 local devices of 2" in outputs[0][1]
  # One copy of the progress: process 1 says who it is, then only warnings.
  assert "process 1 of 2, 1 local devices of 2" in outputs[1][1]
  assert "epoch 1 done" in outputs[0][1] and "epoch 1 done" not in outputs[1][1]
  assert "step 12/12" in outputs[0][1] and "step 12/12" not in outputs[1][1]

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


@pytest.fixture(scope="module")
def resumable(corpus) -> list[str]:
  """A run long enough to be interrupted: 2 epochs of 60 steps, a checkpoint every 25.

  Width 256 makes a step take about 15 ms on 2 cores, so that the run goes on for
  seconds after its first checkpoint, the moment the tests interrupt it.
  """
  return ["--config=configs/default.py", "--config.dataset=text", f"--config.data_dir={corpus}",
          "--config.model.embed_dim=256", "--config.model.hidden_size=256",
          "--config.max_steps_per_epoch=60", "--config.checkpoint_every_steps=25",
          "--config.log_every_steps=5"]


def _curve(workdir: Path, kinds: tuple[str, ...] = ("epoch", "test")) -> list[dict]:
  """metrics.jsonl's records of these kinds, without their timings.

  Train records are left out by default: a run stopped between two logging
  intervals logs one more (shorter) interval than one that was not.
  """
  return [{k: v for k, v in record.items() if "second" not in k}
          for record in reporting.read_records(workdir) if record["kind"] in kinds]


@pytest.fixture(scope="module")
def reference_runs(resumable, tmp_path_factory):
  """Two uninterrupted runs of `resumable` with the same seed."""
  runs = []
  for name in ("first", "second"):
    result, workdir = run_main(*resumable, tmp_path=tmp_path_factory.mktemp(name))
    assert result.returncode == 0, result.stderr[-2000:]
    runs.append(workdir)
  return runs


def test_same_seed_and_config_give_bit_identical_metrics(reference_runs):
  first, second = reference_runs
  kinds = ("train", "epoch", "test")
  assert _curve(first, kinds) == _curve(second, kinds) and len(_curve(first)) == 3
  results = [json.loads((d / "results.json").read_text()) for d in reference_runs]
  assert results[0]["test_perplexity"] == results[1]["test_perplexity"]


def _start(workdir: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "tied_lm.main", f"--workdir={workdir}", *args],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, **(env or {})),
  )


def _wait_for_checkpoint(process: subprocess.Popen, workdir: Path) -> None:
  """Returns once a checkpoint has been committed, with the run still going."""
  deadline = time.time() + 240
  while time.time() < deadline:
    checkpoints = workdir / "checkpoints"
    if checkpoints.is_dir() and any(d.name.isdigit() for d in checkpoints.iterdir()):
      assert process.poll() is None and not (workdir / "results.json").exists()
      return
    time.sleep(0.05)
  raise AssertionError("no checkpoint appeared")


def _assert_same_run(workdir: Path, reference: Path) -> None:
  assert _curve(workdir) == _curve(reference)
  results, expected = (json.loads((d / "results.json").read_text()) for d in (workdir, reference))
  for key in ("valid_perplexity", "test_perplexity", "best_epoch", "epochs_completed"):
    assert results[key] == expected[key]
  params, expected_params = (
      dict(jax.tree_util.tree_leaves_with_path(_final_params(d))) for d in (workdir, reference)
  )
  for path, value in expected_params.items():
    np.testing.assert_array_equal(params[path], value)


def test_kill_9_then_the_same_command_ends_like_an_uninterrupted_run(
    reference_runs, resumable, tmp_path):
  workdir = tmp_path / "run"
  process = _start(workdir, resumable)
  _wait_for_checkpoint(process, workdir)
  process.kill()
  process.communicate()
  assert process.returncode == -signal.SIGKILL
  # What a kill inside fileio.atomic_write leaves (mkstemp's name); the next run removes it.
  unfinished = workdir / ".metrics.jsonl.k9x_2ab7.tmp"
  unfinished.write_text('{"kind": "epoch"')
  result, _ = run_main(*resumable, tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "resumed from checkpoint" in result.stderr
  assert not unfinished.exists()
  _assert_same_run(workdir, reference_runs[0])
  # The checkpoint fell on a logging interval, so even the train records continue exactly.
  assert _curve(workdir, ("train",)) == _curve(reference_runs[0], ("train",))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(reference_runs, resumable, tmp_path):
  # SIGINT takes the same path (tests/test_train.py checks StopSignals for both).
  signum = signal.SIGTERM
  workdir = tmp_path / "run"
  process = _start(workdir, resumable)
  _wait_for_checkpoint(process, workdir)
  sent = time.time()
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=60)
  assert time.time() - sent < 30
  assert process.returncode == 128 + signum
  last_line = stderr.strip().splitlines()[-1]
  assert re.fullmatch(
      rf"stopped by {signum.name}: checkpoint (\d+) saved in .*checkpoints; run the same "
      r"command again to resume", last_line), last_line
  step = re.search(r"checkpoint (\d+)", last_line)[1]
  assert (workdir / "checkpoints" / step).is_dir()
  result, _ = run_main(*resumable, tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  _assert_same_run(workdir, reference_runs[0])
  # Each start is on record, the resume with the step it resumed from.
  launches = [json.loads(line) for line in (workdir / "launches.jsonl").read_text().splitlines()]
  assert [launch["resumed_step"] for launch in launches] == [None, int(step)]
  command = shlex.join(["python", "-m", "tied_lm.main", f"--workdir={workdir}", *resumable])
  assert [launch["command"] for launch in launches] == [command, command]
  assert {launch["commit"] for launch in launches} == {provenance.git_commit()}
  assert launches[0]["host_cpu"] == provenance.cpu_model() and launches[0]["device_kind"] == "cpu"
  assert launches[0]["host_cpu_details"] == provenance.cpu_details()
  assert launches[0]["versions"] == provenance.versions()
  results = json.loads((workdir / "results.json").read_text())
  assert launches[0]["devices"] == results["devices"] and len(results["devices"]) == 2
  assert [launch["num_params"] for launch in launches] == [results["num_params"]] * 2


def test_a_run_stopped_mid_epoch_on_one_device_resumes_on_two(resumable, tmp_path):
  straight, straight_dir = run_main(*resumable, tmp_path=tmp_path / "straight", env=ONE_DEVICE)
  assert straight.returncode == 0, straight.stderr[-2000:]
  workdir = tmp_path / "run"
  process = _start(workdir, resumable, env=ONE_DEVICE)
  _wait_for_checkpoint(process, workdir)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  newest = max((workdir / "checkpoints").glob("[0-9]*"), key=lambda d: int(d.name))
  meta = json.loads((newest / "meta" / "metadata").read_text())
  assert 0 < meta["step_in_epoch"] < 60  # mid-epoch: the saved carry is used
  result, _ = run_main(*resumable, tmp_path=tmp_path)  # on the session's 2 devices
  assert result.returncode == 0, result.stderr[-2000:]
  assert "resumed from checkpoint" in result.stderr
  # Two devices take one device's steps up to float summation order. (Not compared with
  # a 2-device run throughout: this run's first steps amplify those differences to 1%.)
  results, expected = (json.loads((d / "results.json").read_text())
                       for d in (workdir, straight_dir))
  for key in ("valid_perplexity", "test_perplexity"):
    np.testing.assert_allclose(results[key], expected[key], rtol=1e-5)


def test_a_one_line_corpus_is_one_line_and_no_workdir(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for split in ("train", "valid", "test"):
    (corpus / f"{split}.txt").write_text("the cat sat on the mat\n")
  result, workdir = run_main(
      "--config=configs/default.py", "--config.dataset=text", f"--config.data_dir={corpus}",
      tmp_path=tmp_path,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: 7 training tokens are too few for batch_size=20 and num_steps=20: need at least 420"
  ]
  assert not workdir.exists()


def test_resuming_with_another_config_is_one_line_and_changes_no_run_file(trained_run, tmp_path):
  # A log line of the corpus and the model came before the error.
  workdir = tmp_path / "run"
  shutil.copytree(trained_run[0], workdir)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != "lock"}
  result, _ = run_main("--config=configs/default.py", "--config.num_epochs=1",
                       "--config.max_steps_per_epoch=40", "--config.num_steps=7",
                       tmp_path=tmp_path)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: the workdir holds checkpoints of another run: num_steps=7 (checkpoint: 20); use "
      "a new --workdir or the checkpoint's values"]
  assert {p: p.read_bytes() for p in before} == before


def test_an_unwritable_workdir_is_one_line(tmp_path, run_module):
  (tmp_path / "file").write_text("")
  result = run_module("tied_lm.main", "--config=configs/default.py",
                      f"--workdir={tmp_path / 'file' / 'run'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: cannot write the workdir {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is not "
      "a directory"
  ]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_checkpoint(
    reference_runs, resumable, tmp_path):
  workdir = tmp_path / "run"
  processes = _start_two_processes(workdir, resumable)
  _wait_for_checkpoint(processes[0], workdir)
  processes[1].send_signal(signal.SIGTERM)  # the scheduler preempts one host
  outputs = [p.communicate(timeout=120) for p in processes]
  assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2, outputs[0][1][-2000:]
  saved = {re.search(r"checkpoint (\d+) saved", stderr.strip().splitlines()[-1])[1]
           for _, stderr in outputs}
  assert len(saved) == 1 and (workdir / "checkpoints" / saved.pop()).is_dir()
  processes = _start_two_processes(workdir, resumable)
  for p in processes:
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-2000:]
  _assert_same_run(workdir, reference_runs[0])


def test_a_second_ctrl_c_ends_the_process_without_the_interpreters_teardown(tmp_path):
  # Its KeyboardInterrupt may cut through JAX mid-compile, and the teardown then crashed
  # under the line (a segfault, status 139; Ctrl-C twice in the first step's compile).
  # Here the two come before the first step, deterministically; an exit handler shows
  # whether the teardown ran.
  driver = f"""
import atexit, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
from absl import app
from tied_lm import main, train
real_train_epoch = train.train_epoch
def train_epoch(*args, **kwargs):
  signal.raise_signal(signal.SIGINT)
  signal.raise_signal(signal.SIGINT)
  return real_train_epoch(*args, **kwargs)
train.train_epoch = train_epoch
atexit.register(lambda: print("teardown ran", file=sys.stderr))
sys.argv = ["tied_lm.main", "--config=configs/default.py", "--workdir={tmp_path / 'run'}"]
app.run(main.main, flags_parser=main.parse_flags)
"""
  result = subprocess.run([sys.executable, "-c", driver], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 130, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "stopped by SIGINT at once: no checkpoint was written yet")
  assert "teardown ran" not in result.stderr
