"""The one error type for bad user input, and how every command reports it."""

import _thread
import atexit
import functools
import gc
import importlib.machinery
import logging as python_logging
import os
import re
import select
import signal
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, NoReturn

from absl import flags, logging

# Where our own log lines come from: the package, and the experiments beside it in a checkout.
_OUR_SOURCES = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), folder, "")
    for folder in ("tied_lm", "experiments")
)


def _ours_or_a_warning(record: python_logging.LogRecord) -> bool:
  return record.levelno >= python_logging.WARNING or record.pathname.startswith(_OUR_SOURCES)


class UserError(Exception):
  """A problem with the config, the data or the workdir that the user can fix."""


def fail(message: str) -> NoReturn:
  """Bad input costs the user one line on stderr and exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _unsafe_to_raise(frame: types.FrameType | None) -> bool:
  """Whether a KeyboardInterrupt raised in `frame` would be lost or fatal.

  Lost in a gc callback (JAX registers one), whose exceptions Python ignores: the
  command carried on, and a run 1 s into tied_lm.main trained to the end. Fatal in a
  C extension's initialisation: jaxlib's turns it into a C++ exception nobody catches
  and the process aborts (status 134, a core dump). Both seen with Ctrl-C in the
  first second of tied_lm.main. (Lost too in a weakref callback or a __del__, which
  cannot be told from their frames: `_Interrupt.unraisable` catches those.)
  """
  waiting = {getattr(callback, "__code__", None) for callback in gc.callbacks}
  # A Ctrl-C while one is being put off.
  waiting |= {_Interrupt.__call__.__code__, _Interrupt.unraisable.__code__}
  while frame is not None:
    code = frame.f_code
    if code in waiting or (code.co_name in ("create_module", "exec_module") and isinstance(
        frame.f_locals.get("self"), importlib.machinery.ExtensionFileLoader)):
      return True
    frame = frame.f_back
  return False


class _Interrupt:
  """One command's SIGINT handler: KeyboardInterrupt, as Python's own, except where it
  would be lost or fatal (`_unsafe_to_raise`): there the signal is sent again 10 ms
  later, from another thread, until it lands where it is safe. Its `unraisable`, the
  command's sys.unraisablehook, sends again one that Python ignored all the same (in a
  weakref callback or a __del__). `cancel` drops the resends still pending, so that
  none outlives the command, and makes `unraisable` pass everything on."""

  def __init__(self, previous_hook: Callable[["sys.UnraisableHookArgs"], Any]) -> None:
    self.resends: list[threading.Timer] = []
    self.previous_hook = previous_hook
    self.cancelled = False

  def __call__(self, signum: int, frame: types.FrameType | None) -> None:
    if _unsafe_to_raise(frame):
      self.resend()
      return
    raise KeyboardInterrupt

  def unraisable(self, unraisable: "sys.UnraisableHookArgs") -> None:
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and not self.cancelled:
      self.resend()
    else:
      self.previous_hook(unraisable)

  def resend(self) -> None:
    resend = threading.Timer(0.01, _thread.interrupt_main)
    resend.daemon = True
    self.resends.append(resend)
    resend.start()

  def cancel(self) -> None:
    self.cancelled = True
    for resend in self.resends:
      resend.cancel()


def _ignore_ctrl_c_at_exit() -> None:
  """The command has ended and said how: a Ctrl-C while the process exits would only
  print a traceback from another library's exit handler (JAX clears its caches) under
  the command's last line."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stdout_reader_gone() -> bool:
  """Whether stdout is a pipe whose reading end is closed (poll reports POLLERR then)."""
  try:
    fd = sys.stdout.fileno()
  except (AttributeError, ValueError, OSError):  # None, closed, or not a file (StringIO)
    return False
  poller = select.poll()
  poller.register(fd, select.POLLOUT)
  return any(event & select.POLLERR for _, event in poller.poll(0))


def _os_error_line(error: OSError) -> str:
  """'Permission denied: /runs/a/config.json', naming the target of a rename."""
  name = error.filename2 or error.filename
  return f"{error.strerror or error}: {name}" if name else str(error)


def command(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps a command's `main(argv)` for `app.run`: a UserError it raises is `fail`ed,
  and so is a PermissionError (naming the file); a KeyboardInterrupt is one line and
  status 130; a closed output pipe (`| head`) ends it quietly with status 1.

  Other libraries' INFO lines (orbax logs several per checkpoint) are dropped, so that
  stderr holds our progress, their warnings and, on bad input, the one error line.
  """

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_ours_or_a_warning)
    # Only where Python's own handler is in place: not where SIGINT is ignored (a
    # background job of a script) or handled otherwise (IPython), nor off the main
    # thread, where signal.signal raises.
    interrupt = None
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
      interrupt = _Interrupt(sys.unraisablehook)
      signal.signal(signal.SIGINT, interrupt)
      sys.unraisablehook = interrupt.unraisable
    try:
      main(argv)
      if sys.stdout is not None:  # None: started with stdout closed
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except UserError as error:
      fail(str(error))
    except BrokenPipeError as error:
      if not _stdout_reader_gone():  # a pipe or socket the command wrote to as a file
        fail(_os_error_line(error))
      # The reader of our output stopped reading (`| head`): stop quietly, as other
      # commands do. Python would report the pipe again when it flushes at exit.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      sys.exit(1)
    except PermissionError as error:  # a file of another user, a folder made read-only
      fail(_os_error_line(error))
    except KeyboardInterrupt:
      # Ctrl-C outside a training loop (which saves and reports its own stop): one
      # line and the shell's status for SIGINT, not a traceback through JAX.
      print("stopped by SIGINT (Ctrl-C)", file=sys.stderr)
      sys.exit(130)
    finally:
      if interrupt is not None:
        interrupt.cancel()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if sys.unraisablehook == interrupt.unraisable:  # a bound method: equal, not the same
          sys.unraisablehook = interrupt.previous_hook
        # Else a hook went on top of ours during the command (checkpoints' filter of a
        # failed restore's late callbacks, which may come until the process exits): it
        # stays, and ours, cancelled, passes everything on.
        # Registered last, so run first of the exit handlers (JAX's and TensorBoard's
        # were registered during the command).
        atexit.unregister(_ignore_ctrl_c_at_exit)
        atexit.register(_ignore_ctrl_c_at_exit)

  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flags_parser for every command: a bad or missing flag is one line
  and status 2; help that was asked for is status 0.

  (absl's own parser prints two lines for a bad flag, and exits with status 1
  for both.)
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    # The message of a failing config file embeds a traceback; its last line says why,
    # and its first names the flag (`flag --config=FILE:ARGS: Error whilst ...`).
    lines = str(error).strip().splitlines()
    flag = re.match(r"flag (--.+?): Error whilst parsing", lines[0])
    fail((f"{flag[1]}: " if flag and len(lines) > 1 else "") + lines[-1].strip())
  except SystemExit as stop:
    # absl's --help, --helpshort, --helpfull and --helpxml print, then exit with 1.
    raise SystemExit(0 if stop.code == 1 else stop.code) from None


def unknown_config_field(error: Exception, overrides: list[str]) -> str:
  """What an override of a field the config lacks gets: 'unknown config field in' the
  overrides (e.g. `--config.loss.tua`, `--set=loss.tua`) whose path holds the key that
  ml_collections' AttributeError or KeyError names first, quoted; all of them when
  none does; then its "Did you mean" suggestion, if it has one.
  """
  missing = re.search(r"'(\w+)", str(error))
  named = [o for o in overrides if missing and missing[1] in re.split(r"[.=]", o)] or overrides
  suggestion = re.search(r"Did you mean .*\?", str(error))
  return f"unknown config field in {' '.join(named)}" + (f"; {suggestion[0]}" if suggestion else "")


def require_values(*names: str) -> None:
  """List flags that need a value: given (unless they have a default), not empty, and
  without an empty entry.

  `--words=` (an empty list) and `--workdirs=a,` (whose '' named the current
  folder) are then refused at parse time, in one line.
  """
  for name in names:
    if flags.FLAGS[name].default is None:
      flags.mark_flag_as_required(name)
    flags.register_validator(name, bool, message="needs at least one value")
    flags.register_validator(
        name, lambda values: values is None or all(str(v).strip() for v in values),
        message="has an empty entry (two commas in a row, or one at either end?)")


def require_distinct_folders(name: str) -> None:
  """A list flag of folders that must not name one twice (`run,run/`, `./run,run`): its
  rows would be repeated. Refused at parse time, in one line."""
  flags.register_validator(
      name, lambda values: values is None or len(
          {os.path.realpath(os.path.expanduser(v)) for v in values}) == len(values),
      message="names one folder twice")


def require_name(name: str, what: str, optional: bool = False) -> None:
  """A string flag that names something (a folder, a file): required unless it has a
  default or is `optional`, and refused at parse time, in one line, when blank."""
  if flags.FLAGS[name].default is None and not optional:
    flags.mark_flag_as_required(name)
  flags.register_validator(name, lambda value: value is None or bool(value.strip()),
                           message=f"is empty: name {what}")


def no_positional_arguments(argv: list[str]) -> None:
  """For commands driven by flags alone: anything else on the line is bad input."""
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
