"""The one error type for bad user input, and how every command reports it."""

import _thread
import functools
import logging as python_logging
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

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


def _interrupt_again(unraisable: "sys.UnraisableHookArgs") -> None:
  """sys.unraisablehook: a KeyboardInterrupt that Python could not raise is sent again.

  Python ignores what a gc callback raises (JAX registers one), so a Ctrl-C that
  lands in one was printed and lost, and the command carried on. Sent again from
  another thread a moment later (sent now, it would land in this hook and be lost
  too), it reaches the code that runs then; landing in a callback again, it is sent
  again.
  """
  if issubclass(unraisable.exc_type, KeyboardInterrupt):
    resend = threading.Timer(0.01, _thread.interrupt_main)
    resend.daemon = True  # a command that ends first has nothing left to interrupt
    resend.start()
  else:
    sys.__unraisablehook__(unraisable)


def command(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps a command's `main(argv)` for `app.run`: a UserError it raises is `fail`ed,
  a KeyboardInterrupt is one line and status 130.

  Other libraries' INFO lines (orbax logs several per checkpoint) are dropped, so that
  stderr holds our progress, their warnings and, on bad input, the one error line.
  """

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_ours_or_a_warning)
    previous_hook, sys.unraisablehook = sys.unraisablehook, _interrupt_again
    try:
      main(argv)
    except UserError as error:
      fail(str(error))
    except KeyboardInterrupt:
      # Ctrl-C outside a training loop (which saves and reports its own stop): one
      # line and the shell's status for SIGINT, not a traceback through JAX.
      print("stopped by SIGINT (Ctrl-C)", file=sys.stderr)
      sys.exit(130)
    finally:
      sys.unraisablehook = previous_hook

  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flags_parser for every command: a bad or missing flag is one line.

  (absl's own parser prints two lines and exits with status 1.)
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    # The message of a failing config file embeds a traceback; its last line says why.
    fail(str(error).strip().splitlines()[-1].strip())


def require_values(*names: str) -> None:
  """List flags that need a value: given (unless they have a default) and not empty.

  `--words=` (an empty list) is then refused at parse time, in one line.
  """
  for name in names:
    if flags.FLAGS[name].default is None:
      flags.mark_flag_as_required(name)
    flags.register_validator(name, bool, message="needs at least one value")


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
