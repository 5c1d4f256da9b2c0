"""Command line: python -m tied_lm.main --config=configs/ptb.py:medium,real --workdir=DIR.

Any config field can be overridden, e.g. --config.loss.tau=5; unknown fields
are rejected.

Several processes (hosts) train one model with JAX's own multi-host runtime:
pass --multihost, or set JAX_COORDINATOR_ADDRESS (JAX_NUM_PROCESSES and
JAX_PROCESS_ID, when set, override what a cluster manager says). Every process runs the
same command on the same workdir; each feeds its own rows of the batch, and
only process 0 writes metrics and checkpoints.
"""

import os
import re
import socket
import sys
import time
import traceback

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from tied_lm import errors, hostmem

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics; rerun to resume.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ptb.py:small,real.")
flags.DEFINE_bool(
    "multihost", False,
    "Call jax.distributed.initialize() (implied by JAX_COORDINATOR_ADDRESS in the environment).",
)
flags.DEFINE_integer(
    "multihost_timeout", 300,
    "Seconds a process waits for the others to join the multi-host runtime.", lower_bound=1)
flags.mark_flag_as_required("config")
errors.require_name("workdir", "the run's directory")


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config in argv (either spelling), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_file_error(argv: list[str], error: Exception) -> str | None:
  """One line for an error that the --config file itself raised, else None."""
  spec = _config_spec(argv)
  if spec is None:
    return None
  path = os.path.realpath(spec.split(":")[0])
  if isinstance(error, AttributeError) and "get_config" in str(error):
    return f"--config={spec}: the file defines no get_config()"
  if isinstance(error, SyntaxError) and os.path.realpath(error.filename or "") == path:
    return f"--config={spec}: line {error.lineno}: SyntaxError: {error.msg}"
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.realpath(frame.filename) == path]
  if not lines:
    return None
  # configs/default.py's config is locked: setting a field it lacks raises this.
  unknown = re.search(r'Key "(\w+)" does not exist and cannot be added since the config is '
                      "locked", str(error))
  if unknown:
    return (f"--config={spec}: line {lines[-1]}: the config has no field {unknown[1]!r} (a "
            "misspelling?): configs/default.py defines every field")
  return f"--config={spec}: line {lines[-1]}: {type(error).__name__}: {error}"


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags, turning config-file and override errors into one line."""
  try:
    remaining = errors.parse_flags(argv)
  except Exception as e:  # noqa: BLE001 -- a config file can raise anything; others re-raised
    message = _config_file_error(argv, e)
    if message:
      errors.fail(message)
    if not isinstance(e, (AttributeError, KeyError)):
      raise
    # ml_collections raises these for an override of a field the config lacks.
    errors.fail(errors.unknown_config_field(
        e, [a.split("=")[0] for a in argv if a.startswith("--config.")]))
  try:
    FLAGS.config.keys()
  except OSError as e:
    # ml_collections defers a config file it cannot read (a mistyped path) to the
    # first use of the config, which would come after JAX loads, as a traceback.
    reason = re.sub(r"^\[Errno \d+\] ", "", str(e).strip().splitlines()[-1].strip())
    errors.fail(f"--config: {reason}")
  if not isinstance(FLAGS.config, ml_collections.ConfigDict):
    errors.fail(f"--config={_config_spec(argv)}: get_config() returned a "
                f"{type(FLAGS.config).__name__}, not an ml_collections.ConfigDict")
  return remaining


def initialize_multihost(timeout: int) -> None:
  """jax.distributed.initialize(), with CPU collectives over gloo; `timeout` seconds for
  the processes to join.

  The coordinator address comes from JAX_COORDINATOR_ADDRESS or the cluster
  manager (SLURM, TPU, ...), which JAX detects; JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, when set, override what it says (e.g. several local processes).
  """
  import jax

  # Cross-process collectives of CPU devices need gloo; GPUs and TPUs ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  host, port = None, None
  if address is not None:
    host, _, port = address.rpartition(":")
    # JAX splits off the port itself: without one, an IndexError.
    if not (host and port.isdigit() and 0 < int(port) < 2**16):
      raise errors.UserError(f"JAX_COORDINATOR_ADDRESS={address!r} must be HOST:PORT, with a "
                             "port from 1 to 65535 (e.g. 10.0.0.1:1234)")
  env = {}
  for name, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if var in os.environ:
      try:
        env[name] = int(os.environ[var])
      except ValueError:
        raise errors.UserError(f"{var}={os.environ[var]!r} must be an integer") from None
  process_id, num_processes = env.get("process_id"), env.get("num_processes")
  if process_id is not None and (
      process_id < 0 or (num_processes is not None and process_id >= num_processes)):
    raise errors.UserError(
        f"JAX_PROCESS_ID={process_id} must be in [0, JAX_NUM_PROCESSES"
        + (f"={num_processes})" if num_processes is not None else ")"))
  waited = 0.0
  if address is not None and process_id:
    waited = wait_for_coordinator(host, int(port), timeout)
  try:
    # The wait counts against JAX's own, so that --multihost_timeout bounds both.
    jax.distributed.initialize(**env, initialization_timeout=max(1, round(timeout - waited)))
  # No coordinator found, or bad ids. (One that cannot be reached, which JAX finds itself
  # from a cluster manager, aborts inside JAX after the timeout, as a C++ fatal error.)
  except (ValueError, RuntimeError) as error:
    raise errors.UserError(
        f"cannot start the multi-host runtime: {str(error).rstrip('.')} (set "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under a "
        "cluster manager JAX detects)"
    ) from None
  logging.info(
      "process %d of %d, %d local devices of %d",
      jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
  )
  if jax.process_index() != 0:  # one copy of the progress lines is enough
    logging.set_verbosity(logging.WARNING)


def wait_for_coordinator(host: str, port: int, timeout: float) -> float:
  """Waits until the coordinator (process 0) at `host`:`port` (JAX_COORDINATOR_ADDRESS, a
  bracketed IPv6 host as written there) accepts connections; returns the seconds waited.

  Raises UserError after `timeout` seconds, with the last connection error. JAX would abort
  the process there with a C++ stack trace, after the same wait, and with no word while it
  waits.
  """
  address = f"{host}:{port}"
  start = last_log = time.monotonic()
  while True:
    try:
      with socket.create_connection((host.strip("[]"), port), timeout=5):
        return time.monotonic() - start
    except OSError as error:
      reason = error.strerror or str(error)
    now = time.monotonic()
    if now - start >= timeout:
      raise errors.UserError(
          f"no coordinator at {address} after {timeout:g} s (--multihost_timeout; last: "
          f"{reason}): is process 0 running, with the same JAX_COORDINATOR_ADDRESS?")
    if now - last_log >= 30:
      logging.info("waiting for the coordinator (process 0) at %s, %.0f s so far", address,
                   now - start)
      last_log = now
    time.sleep(1)


@errors.command
def main(argv: list[str]) -> None:
  errors.no_positional_arguments(argv)
  # JAX loads here, after the flags are parsed and checked: --help and a bad flag or
  # config file answer in well under a second, not the 4 s that importing JAX takes.
  from tied_lm import provenance, train

  hostmem.reuse_freed_memory()
  if FLAGS.multihost or "JAX_COORDINATOR_ADDRESS" in os.environ:
    initialize_multihost(FLAGS.multihost_timeout)
  try:
    train.train_and_evaluate(
        FLAGS.config, FLAGS.workdir, provenance.command_line("tied_lm.main"))
  except train.Interrupted as e:
    # Preemption or Ctrl-C, after the checkpoint: one line, and the shell's
    # "killed by signal" status so that schedulers know the run is not done.
    print(str(e), file=sys.stderr)
    if e.at_once and train.jax.process_count() == 1:
      # Cut through JAX mid-compile, the interpreter's teardown crashed (a segfault,
      # status 139, under the line above). Nothing is left to write: leave without it.
      # (Several processes need JAX's exit handler, which leaves the multi-host runtime.)
      logging.flush()
      for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None: started with the descriptor closed
          stream.flush()
      os._exit(128 + e.signum)
    sys.exit(128 + e.signum)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
