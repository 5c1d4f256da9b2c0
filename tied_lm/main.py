"""Command line: python -m tied_lm.main --config=configs/ptb.py:medium,real --workdir=DIR.

Any config field can be overridden, e.g. --config.loss.tau=5; unknown fields
are rejected.
"""

import logging as python_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tied_lm import train
from tied_lm.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics; rerun to resume.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ptb.py:small,real.")
flags.mark_flags_as_required(["config", "workdir"])


def fail(message: str) -> None:
  """Bad input costs the user one line on stderr and exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags, turning config-file and override errors into one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # The message of a failing get_config() embeds a traceback; its last line says why.
    fail(str(e).strip().splitlines()[-1].strip())
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an override of a field the config lacks.
    overrides = " ".join(a.split("=")[0] for a in argv if a.startswith("--config."))
    suggestion = re.search(r"Did you mean .*\?", str(e))
    fail(f"unknown config field in {overrides}" + (f"; {suggestion[0]}" if suggestion else ""))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Keep INFO lines of our own; other libraries (orbax, jax) only warn and worse.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= python_logging.WARNING
      or f"{os.sep}tied_lm{os.sep}" in record.pathname
  )
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
