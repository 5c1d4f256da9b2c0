"""The one error type for bad user input, and how every command reports it."""

import sys
from typing import NoReturn


class UserError(Exception):
  """A problem with the config, the data or the workdir that the user can fix."""


def fail(message: str) -> NoReturn:
  """Bad input costs the user one line on stderr and exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)
