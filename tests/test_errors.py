"""How every command reports bad input: one line on stderr, exit status 2."""

import functools
import gc
import importlib.machinery
import logging
import signal
import subprocess
import sys
import threading
import time
import types
import weakref
from pathlib import Path

import pytest

from tied_lm import errors, fileio
from tied_lm.errors import UserError


def test_command_turns_a_user_error_into_one_line_and_status_2(capsys):
  @errors.command
  def main(argv):
    raise UserError(f"bad input in {argv[1]}")

  with pytest.raises(SystemExit) as exit_info:
    main(["prog", "x.txt"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: bad input in x.txt\n"


def test_command_turns_ctrl_c_into_one_line_and_status_130(capsys):
  @errors.command
  def main(argv):
    raise KeyboardInterrupt  # e.g. while JAX compiles, before any step

  with pytest.raises(SystemExit) as exit_info:
    main(["prog"])
  assert exit_info.value.code == 130
  assert capsys.readouterr().err == "stopped by SIGINT (Ctrl-C)\n"


def test_a_ctrl_c_while_the_process_exits_after_a_command_prints_nothing(tmp_path):
  # JAX's exit handler clearing its caches took a Ctrl-C pressed just after a run's last
  # line, and Python printed it under that line as a traceback.
  script = tmp_path / "command.py"
  script.write_text(
      "import atexit, signal\n"
      "from absl import app\n"
      "from tied_lm import errors\n"
      "signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal\n"
      "@errors.command\n"
      "def main(argv):\n"
      "  atexit.register(lambda: (signal.raise_signal(signal.SIGINT), print('cleaned up')))\n"
      "  print('done')\n"
      "app.run(main, flags_parser=errors.parse_flags)\n")
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=60)
  assert (result.returncode, result.stdout, result.stderr) == (0, "done\ncleaned up\n", "")


def _ctrl_c_in_a_gc_callback(sent: list[bool]) -> None:
  """Sends SIGINT from a gc callback: handled there, where Python ignores what the
  handler raises. Appends True to `sent` first: the put-off Ctrl-C may land as soon
  as the callback returns, on a loaded machine before its caller's next line."""

  def callback(phase, info):
    if phase == "start" and not sent:
      sent.append(True)
      signal.raise_signal(signal.SIGINT)  # handled before the callback returns

  gc.callbacks.append(callback)
  try:
    gc.collect()
  finally:
    gc.callbacks.remove(callback)


def test_a_ctrl_c_during_a_gc_callback_still_stops_the_command(capsys, terminal_sigint):
  # Python ignores what a gc callback raises: a Ctrl-C landing in JAX's let the
  # command carry on (seen 1 s into tied_lm.main, which then trained to the end).
  @errors.command
  def main(argv):
    _ctrl_c_in_a_gc_callback(sent)
    for _ in range(200):
      time.sleep(0.01)
    finished.append(True)

  sent, finished = [], []
  with pytest.raises(SystemExit) as exit_:
    main([])
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
  assert sent == [True] and not finished and exit_.value.code == 130
  assert capsys.readouterr().err == "stopped by SIGINT (Ctrl-C)\n"


def test_a_ctrl_c_lost_in_a_weakref_callback_still_stops_the_command(capsys, terminal_sigint):
  # Seen in CI: the Ctrl-C landed in a WeakSet's callback, which Python ignores too.
  class Thing:
    pass

  def callback(reference):
    signal.raise_signal(signal.SIGINT)  # handled here, then ignored by Python

  @errors.command
  def main(argv):
    thing = Thing()
    reference = weakref.ref(thing, callback)
    del thing  # runs the callback
    for _ in range(200):
      time.sleep(0.01)
    finished.append(reference)

  finished, hook = [], sys.unraisablehook
  with pytest.raises(SystemExit) as exit_:
    main([])
  assert not finished and exit_.value.code == 130
  assert capsys.readouterr().err == "stopped by SIGINT (Ctrl-C)\n"
  assert sys.unraisablehook is hook  # put back


def test_a_put_off_ctrl_c_does_not_outlive_its_command_and_threads_may_run_commands(
    terminal_sigint):
  # A resend still pending when the command returned raised KeyboardInterrupt in
  # whatever ran next; and a command run off the main thread failed in signal.signal.
  @errors.command
  def main(argv):
    _ctrl_c_in_a_gc_callback(sent)  # put off: it lands in a gc callback
    # Returns before the resend is due.

  sent = []
  main([])
  try:
    time.sleep(0.1)  # the resend would land here
  except KeyboardInterrupt:
    pytest.fail("a put-off Ctrl-C outlived its command")
  assert sent == [True]

  ran = []
  thread = threading.Thread(target=errors.command(ran.append), args=(["x"],))
  thread.start()
  thread.join()
  assert ran == [["x"]]


def test_a_ctrl_c_waits_while_a_c_extension_initialises():
  # Raised inside jaxlib's initialisation, it aborted the process (status 134).
  def exec_module(self):  # the name and `self` of importlib's loader method
    return sys._getframe()

  extension = importlib.machinery.ExtensionFileLoader("ext", "/nowhere/ext.so")
  source = importlib.machinery.SourceFileLoader("mod", "/nowhere/mod.py")
  assert errors._unsafe_to_raise(exec_module(extension))
  assert not errors._unsafe_to_raise(exec_module(source))
  assert not errors._unsafe_to_raise(sys._getframe())


@pytest.mark.parametrize("error, line", [
    (PermissionError(13, "Permission denied", "/runs/a/config.json"),
     "Permission denied: /runs/a/config.json"),
    # A rename: the file meant, not the temporary one.
    (PermissionError(13, "Permission denied", "/runs/a/.results.json.x.tmp", None,
                     "/runs/a/results.json"), "Permission denied: /runs/a/results.json"),
    # A pipe given as an output file, not our stdout: said, not swallowed.
    (BrokenPipeError(32, "Broken pipe", "/tmp/fifo"), "Broken pipe: /tmp/fifo"),
])
def test_command_turns_a_permission_error_into_one_line_naming_the_file(capsys, error, line):
  # A file of another user, or a folder made read-only: a traceback before.
  @errors.command
  def main(argv):
    raise error

  with pytest.raises(SystemExit) as exit_info:
    main(["prog"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == f"error: {line}\n"


def test_atomic_write_names_the_file_meant_when_its_folder_refuses_it(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied", str(tmp_path / ".results.json.abc.tmp"))

  monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
  with pytest.raises(PermissionError) as raised:
    fileio.atomic_write(tmp_path / "results.json", "{}")
  assert raised.value.filename == str(tmp_path / "results.json")


def test_a_command_started_with_stdout_closed_still_succeeds():
  # The flush that catches a closed pipe raised AttributeError on sys.stdout = None.
  script = "from tied_lm import errors\nerrors.command(lambda argv: None)(['prog'])\n"
  # The shell closes it (`>&-`): a preexec_fn would fork this multithreaded process.
  process = subprocess.run(["sh", "-c", 'exec "$0" -c "$1" >&-', sys.executable, script],
                           stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1],
                           timeout=60)
  assert (process.returncode, process.stderr) == (0, b"")


@pytest.mark.parametrize("lines", [100_000, 1])  # a write fails, or only the flush at exit
def test_a_command_whose_reader_stops_reading_stops_quietly(lines):
  # `tied_lm.sample ... | head -c 5` ended in a BrokenPipeError traceback.
  script = ("import sys\nfrom tied_lm import errors\n"
            f"errors.command(lambda argv: print('word\\n' * {lines}, end=''))(['prog'])\n"
            "print('not reached', file=sys.stderr)\n")
  process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
  process.stdout.close()  # the reader is gone before the command writes
  assert process.stderr.read() == b""
  assert process.wait(timeout=60) == 1


def test_command_leaves_other_errors_and_normal_returns_alone(capsys):
  calls = []

  @errors.command
  def main(argv):
    calls.append(argv)
    if len(argv) > 1:
      raise ValueError("a bug keeps its traceback")

  main(["prog"])
  assert calls == [["prog"]] and capsys.readouterr().err == ""
  with pytest.raises(ValueError, match="a bug"):
    main(["prog", "x"])


@pytest.mark.parametrize("path,message", [
    ("loss.tua", "unknown config field in --config.loss.tua"),
    ("losss.tau", 'unknown config field in --set=losss.tau; Did you mean "loss" instead of '
     '"losss"?'),
    # Through a field that is not a section, ml_collections names no field: every override.
    ("loss.tau.x",
     "unknown config field in --config.loss.tua --config.model.unroll --set=losss.tau"),
])
def test_an_unknown_config_field_names_the_overrides_that_hold_it(path, message):
  from configs import ptb

  config = ptb.get_config("small,real")
  with pytest.raises((AttributeError, KeyError)) as error:
    functools.reduce(getattr, path.split("."), config)
  overrides = ["--config.loss.tua", "--config.model.unroll", "--set=losss.tau"]
  assert errors.unknown_config_field(error.value, overrides) == message


def test_no_positional_arguments():
  errors.no_positional_arguments(["prog"])
  with pytest.raises(UserError, match="unexpected arguments: a b"):
    errors.no_positional_arguments(["prog", "a", "b"])


def test_commands_keep_our_info_lines_and_other_libraries_warnings_only():
  def record(path, level):
    return logging.LogRecord("absl", level, path, 1, "message", None, None)

  ours = [Path(errors.__file__), Path(errors.__file__).parents[1] / "experiments" / "x.py"]
  theirs = Path(logging.__file__)  # any library outside this checkout
  keep = errors._ours_or_a_warning
  assert all(keep(record(str(path), logging.INFO)) for path in ours)
  assert not keep(record(str(theirs), logging.INFO))
  assert keep(record(str(theirs), logging.WARNING))


@pytest.mark.parametrize("command", [
    ["tied_lm.evaluate", "--workdir=/nonexistent", "--split=bogus"],
    ["tied_lm.sample"],
    ["tied_lm.summarize", "--workdirs=/nonexistent", "stray"],
    ["experiments.reproduce", "--parallel=two"],
    ["experiments.benchmark", "--no_such_flag"],
    ["tied_lm.evaluate", "--workdir=/nonexistent", "--eval_batch_size=0"],
    ["tied_lm.neighbors", "--workdir=/nonexistent", "--words="],
    ["tied_lm.summarize"],
    ["tied_lm.summarize", "/nonexistent", "--plot=/nonexistent/curves.png"],
    ["experiments.target_sharpness", "--workdirs=", "--output=/nonexistent/out"],
])
def test_every_command_reports_bad_flags_in_one_line_with_status_2(command, run_module):
  result = run_module(*command, timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


@pytest.mark.parametrize("module", ["experiments.target_sharpness", "experiments.predictions"])
def test_a_run_named_twice_is_refused_before_any_work(module, run_module, tmp_path):
  # target_sharpness --workdirs=run,run/ printed each of the run's rows twice.
  result = run_module(module, f"--workdirs={tmp_path},{tmp_path}/.",
                      f"--output={tmp_path}/out", timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == (
      f"error: flag --workdirs={[str(tmp_path), f'{tmp_path}/.']}: names one folder twice")


@pytest.mark.parametrize("module, extra", [
    ("tied_lm.evaluate", []), ("tied_lm.sample", []), ("tied_lm.neighbors", ["--words=a"]),
])
def test_a_blank_workdir_is_named_as_such(module, extra, run_module):
  # Without the check, " " read as the current folder: "is not a tied_lm run".
  result = run_module(module, "--workdir= ", *extra, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == (
      "error: flag --workdir= : is empty: name a run directory of tied_lm.main")


@pytest.mark.parametrize("command", [
    ["experiments.target_sharpness", "--help"],
    ["experiments.predictions", "--help"],
    ["experiments.subspace_distance", "--help"],
    ["experiments.subspace_distance", "--betas=2"],
])
def test_analysis_commands_answer_help_and_bad_flags_before_jax_is_imported(
    command, modules_imported_by):
  # They import JAX only once the flags are good, as tied_lm.main and tied_lm.evaluate do.
  status, imported = modules_imported_by(*command)
  assert status == (0 if "--help" in command else 2)
  assert "absl.flags" in imported and "jax" not in imported


def test_a_hook_put_on_top_during_a_command_outlives_it(monkeypatch, capsys):
  # checkpoints' filter of a failed restore's late "Event loop is closed" callbacks was
  # dropped when the command put its own predecessor back, and those that came after
  # printed their tracebacks again.
  reached = []
  monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reached.append(unraisable))

  @errors.command
  def main(argv):
    below = sys.unraisablehook

    def drop_closed_loop(unraisable):
      if str(unraisable.exc_value) != "Event loop is closed":
        below(unraisable)

    sys.unraisablehook = drop_closed_loop
    raise UserError("none of the 1 checkpoint(s) can be read")

  with pytest.raises(SystemExit):
    main([])
  capsys.readouterr()
  for error in (RuntimeError("Event loop is closed"), RuntimeError("other"),
                KeyboardInterrupt()):
    sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error))
  assert [str(u.exc_value) for u in reached] == ["other", ""]  # none resent as a Ctrl-C
