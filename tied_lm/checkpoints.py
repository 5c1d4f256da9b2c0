"""Orbax checkpoints of a run directory: save, restore the newest readable, set torn ones aside."""

import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from tied_lm.errors import UserError

# The newest checkpoints kept: the one a resume starts from, and one before it.
KEEP = 2


class Checkpoints:
  """Orbax checkpoints of the train state, the best params, the carry and the run's meta.

  Checkpoints are numbered by global step. A checkpoint that cannot be read
  (torn by a kill during a save, or damaged) while an older one can is moved
  to `torn_checkpoints/` and the older one is used; if none can be read,
  restoring fails in one line and moves nothing.
  """

  def __init__(self, workdir: Path, read_only: bool = False):
    """`read_only` for readers of a run (evaluate, sample, ...), which may be in progress."""
    self.directory = (workdir / "checkpoints").resolve()
    self._torn_directory = workdir.resolve() / "torn_checkpoints"
    self._read_only = read_only
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        # A kill during a save leaves a half-written tmp directory, which the trainer's
        # manager removes. A reader's must not: it may be the trainer's save in flight.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=KEEP, create=not self._read_only,
            cleanup_tmp_directories=not self._read_only),
    )

  def latest_step(self, other_than: int | None = None) -> int | None:
    """The newest step; `other_than`: leaving out that one (a write given up on)."""
    if other_than is None:
      return self._manager.latest_step()
    return max((s for s in self._manager.all_steps() if s != other_than), default=None)

  def save(self, step: int, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    try:
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(
              arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
          ),
      )
      self._manager.wait_until_finished()
    except OSError as error:
      previous = [s for s in self._manager.all_steps() if s != step]
      raise UserError(
          f"could not write checkpoint {step} in {self.directory}: {error}; "
          + (f"checkpoint {max(previous)} is intact" if previous else "no earlier checkpoint")
      ) from error
    if not saved:  # orbax declines steps at or below its latest one, silently
      raise UserError(
          f"checkpoint {step} was not written: {self.directory} already holds step "
          f"{self._manager.latest_step()}"
      )

  def restore_best_params(self) -> tuple[int, Any, dict]:
    """(step, best params as NumPy arrays, meta) of the newest readable checkpoint, read
    without a template. A reader moves nothing: a newer checkpoint it cannot read is skipped with
    a warning (the trainer sets it aside when it next starts).

    Raises:
      UserError: if no checkpoint can be read.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    unreadable = []
    for step in steps:
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
      except Exception as error:  # noqa: BLE001 -- reported below, whichever way it ends
        _drop_late_read_callbacks()
        unreadable.append((step, error))
        continue
      for bad_step, error in unreadable:
        logging.warning("checkpoint %d in %s cannot be read (%s); using checkpoint %d",
                        bad_step, self.directory, _describe(error), step)
      return step, restored["arrays"]["best_params"], restored["meta"]
    newest, error = unreadable[0] if unreadable else (None, None)
    raise UserError(
        f"none of the {len(steps)} checkpoint(s) in {self.directory} can be read"
        + (f" (the newest, {newest}: {_describe(error)})" if unreadable else ""))

  def restore_latest(
      self, arrays_like: dict[str, Any], check_meta: Any
  ) -> tuple[int, dict[str, Any], dict] | None:
    """(step, arrays, meta) of the newest readable checkpoint, or None if there is none.

    `check_meta(meta)` runs before the arrays are read, so that a workdir of
    another config is refused with its own message, not orbax's.

    Raises:
      UserError: if checkpoints exist but none can be read; none is moved.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    unreadable = []  # (step, error) of the newer checkpoints that failed
    for step in steps:
      try:
        meta = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )["meta"]
        check_meta(meta)
        arrays = self._manager.restore(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(arrays_like))
        )["arrays"]
      except UserError:
        raise
      except Exception as error:  # noqa: BLE001 -- judged below, once an older one reads
        _drop_late_read_callbacks()
        unreadable.append((step, error))
        continue
      # Only now, with an older checkpoint readable, are the newer ones known to be torn
      # rather than unreadable by this code (a library upgrade, a full disk, ...).
      if unreadable:
        self._set_aside(unreadable)
      self._remove_all_but_the_kept()
      return step, arrays, meta
    if unreadable:
      step, error = unreadable[0]
      raise UserError(
          f"none of the {len(steps)} checkpoint(s) in {self.directory} can be read (the "
          f"newest, {step}: {_describe(error)}); nothing was moved: fix the cause, or move "
          "the checkpoints folder aside to start over"
      )
    return None

  def _remove_all_but_the_kept(self) -> None:
    """Deletes the checkpoints older than the KEEP newest.

    A kill between a save and orbax's removal of the checkpoint it replaces leaves
    one more (half-deleted if the kill came during the removal, and then orbax warns
    of it in every command that opens the run). The next save would remove it, but
    a run killed after its last save makes none. One process only: orbax's delete
    waits for every process at a barrier, and a process that listed the steps after
    another deleted one would never reach it (several processes leave it to the next
    save). A failed tidy-up is a warning, not a failed resume.
    """
    if jax.process_count() > 1:
      return
    for step in sorted(self._manager.all_steps(), reverse=True)[KEEP:]:
      try:
        self._manager.delete(step)
      except OSError as error:
        logging.warning("could not delete checkpoint %d in %s, older than the %d kept: %s",
                        step, self.directory, KEEP, error)

  def _set_aside(self, unreadable: list[tuple[int, Exception]]) -> None:
    """Moves the unreadable checkpoints to torn_checkpoints/ and reopens the manager."""
    self._torn_directory.mkdir(exist_ok=True)
    for step, error in unreadable:
      destination = self._torn_directory / f"{step}.{int(time.time())}"
      (self.directory / str(step)).rename(destination)
      logging.warning(
          "checkpoint %d in %s cannot be read (%s); moved it to %s and used an older one",
          step, self.directory, _describe(error), destination,
      )
    self._manager = self._open()


def _describe(error: Exception) -> str:
  """The error's type and first line, short enough for a one-line message."""
  first_line = str(error).splitlines()[0][:200] if str(error) else ""
  return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def _drop_late_read_callbacks() -> None:
  """Silences the 'Event loop is closed' errors that follow a failed restore.

  When one array of a checkpoint cannot be read, orbax's restore ends while its other
  reads are in flight; their callbacks then find orbax's event loop closed and raise
  where nothing can catch it, each printed as a traceback (17 for the tiny model of the
  tests), around the one-line warning or error. Other unraisable exceptions still reach
  the hook installed before.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_late_read_callbacks", False):
    return

  def hook(unraisable) -> None:
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_late_read_callbacks = True
  sys.unraisablehook = hook
