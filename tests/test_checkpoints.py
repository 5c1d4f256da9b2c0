import shutil
import time

import numpy as np
import pytest

from tied_lm.checkpoints import Checkpoints
from tied_lm.errors import UserError


def _arrays(value: float) -> dict:
  return {"state": {"w": np.full((3, 2), value, np.float32)},
          "best_params": {"w": np.full((3, 2), -value, np.float32)}}


def test_restore_latest_returns_the_newest_save_and_keeps_two(tmp_path):
  checkpoints = Checkpoints(tmp_path)
  assert checkpoints.restore_latest(_arrays(0.0), lambda meta: None) is None
  for step in (10, 20, 30):
    checkpoints.save(step, _arrays(float(step)), {"epoch": step // 10})
  assert checkpoints.latest_step() == 30
  assert sorted(int(p.name) for p in checkpoints.directory.iterdir()) == [20, 30]
  step, arrays, meta = Checkpoints(tmp_path).restore_latest(_arrays(0.0), lambda meta: None)
  assert (step, meta) == (30, {"epoch": 3})
  np.testing.assert_array_equal(arrays["state"]["w"], np.full((3, 2), 30.0))
  best_step, best, meta = Checkpoints(tmp_path).restore_best_params()
  assert (best_step, meta) == (30, {"epoch": 3})
  np.testing.assert_array_equal(best["w"], np.full((3, 2), -30.0))


def test_a_checkpoint_left_by_a_kill_during_its_removal_is_deleted_at_the_next_restore(
    tmp_path):
  checkpoints = Checkpoints(tmp_path)
  for step in (20, 30):
    checkpoints.save(step, _arrays(float(step)), {"epoch": step // 10})
  # As a kill between the save of 30 and the removal of 10 leaves it: half-deleted.
  leftover = checkpoints.directory / "10"
  shutil.copytree(checkpoints.directory / "20", leftover)
  (leftover / "_CHECKPOINT_METADATA").unlink()
  reader = Checkpoints(tmp_path, read_only=True)
  assert sorted(reader._manager.all_steps()) == [10, 20, 30]
  assert reader.restore_best_params()[0] == 30  # readers remove nothing
  assert leftover.is_dir()
  step, _, _ = Checkpoints(tmp_path).restore_latest(_arrays(0.0), lambda meta: None)
  assert step == 30
  assert sorted(p.name for p in checkpoints.directory.iterdir()) == ["20", "30"]


def _tear(checkpoints: Checkpoints, step: int) -> None:
  for path in (checkpoints.directory / str(step) / "arrays").rglob("*"):
    if path.is_file():
      path.write_bytes(b"torn")


def _two_saves_the_newest_torn(tmp_path) -> Checkpoints:
  checkpoints = Checkpoints(tmp_path)
  checkpoints.save(1, _arrays(1.0), {"epoch": 1})
  checkpoints.save(2, _arrays(2.0), {"epoch": 2})
  _tear(checkpoints, 2)
  return checkpoints


def test_an_unreadable_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path):
  checkpoints = _two_saves_the_newest_torn(tmp_path)
  step, arrays, meta = Checkpoints(tmp_path).restore_latest(_arrays(0.0), lambda meta: None)
  assert (step, meta) == (1, {"epoch": 1})
  np.testing.assert_array_equal(arrays["state"]["w"], np.full((3, 2), 1.0))
  assert [p.name.split(".")[0] for p in (tmp_path / "torn_checkpoints").iterdir()] == ["2"]
  assert sorted(p.name for p in checkpoints.directory.iterdir()) == ["1"]


def test_a_reader_skips_an_unreadable_checkpoint_moves_nothing_and_names_the_last(
    tmp_path, caplog):
  checkpoints = _two_saves_the_newest_torn(tmp_path)
  step, best, _ = Checkpoints(tmp_path, read_only=True).restore_best_params()
  assert step == 1
  np.testing.assert_array_equal(best["w"], np.full((3, 2), -1.0))
  assert "checkpoint 2 in" in caplog.text and "using checkpoint 1" in caplog.text
  assert sorted(p.name for p in checkpoints.directory.iterdir()) == ["1", "2"]
  _tear(checkpoints, 1)
  with pytest.raises(UserError, match=r"none of the 2 checkpoint\(s\) in .* can be read "
                     r"\(the newest, 2: "):
    Checkpoints(tmp_path, read_only=True).restore_best_params()


def test_if_no_checkpoint_can_be_read_restoring_fails_in_one_line_and_moves_nothing(tmp_path):
  checkpoints = Checkpoints(tmp_path)
  checkpoints.save(1, _arrays(1.0), {"epoch": 1})
  checkpoints.save(2, _arrays(2.0), {"epoch": 2})
  # As after an upgrade that reads no old checkpoint: every one fails, none is torn.
  for path in checkpoints.directory.rglob("*"):
    if path.is_file() and path.parent.name == "arrays":
      path.write_bytes(b"unreadable")
  before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
  with pytest.raises(UserError) as raised:
    Checkpoints(tmp_path).restore_latest(_arrays(0.0), lambda meta: None)
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(
      f"none of the 2 checkpoint(s) in {checkpoints.directory} can be read (the newest, 2: ")
  assert message.endswith(
      "nothing was moved: fix the cause, or move the checkpoints folder aside to start over")
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_refused_meta_is_the_callers_error_and_moves_nothing(tmp_path):
  Checkpoints(tmp_path).save(5, _arrays(5.0), {"epoch": 1, "units": 200})

  def refuse(meta):
    raise UserError(f"the workdir holds checkpoints of another model: units {meta['units']}")

  with pytest.raises(UserError, match="units 200"):
    Checkpoints(tmp_path).restore_latest(_arrays(0.0), refuse)
  assert not (tmp_path / "torn_checkpoints").exists()
  assert Checkpoints(tmp_path).latest_step() == 5


def test_a_reader_leaves_a_save_in_flight_alone_and_the_writer_cleans_it_up(tmp_path):
  Checkpoints(tmp_path).save(5, _arrays(5.0), {"epoch": 1})
  # What a trainer's save looks like while orbax writes it (or after a kill mid-save).
  in_flight = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1732760000"
  in_flight.mkdir()
  step, best, _ = Checkpoints(tmp_path, read_only=True).restore_best_params()
  assert step == 5 and in_flight.is_dir()
  np.testing.assert_array_equal(best["w"], np.full((3, 2), -5.0))
  Checkpoints(tmp_path)
  deadline = time.time() + 10  # orbax removes tmp folders in a background thread
  while in_flight.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert not in_flight.exists()


def test_a_step_at_or_below_the_latest_is_an_error_not_a_silent_skip(tmp_path):
  checkpoints = Checkpoints(tmp_path)
  checkpoints.save(10, _arrays(1.0), {"epoch": 1})
  with pytest.raises(UserError, match=r"checkpoint 7 was not written: .* holds step 10"):
    checkpoints.save(7, _arrays(2.0), {"epoch": 1})


def test_a_damaged_checkpoint_is_one_line_without_the_tracebacks_of_its_late_reads(
    trained_run, tmp_path, run_module):
  # Its data files emptied: orbax's restore failed with reads still in flight, whose
  # callbacks then printed 16 "Event loop is closed" tracebacks around the one-line error.
  run = tmp_path / "run"
  shutil.copytree(trained_run[0], run)
  for path in (run / "checkpoints").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(b"")
  result = run_module("tied_lm.evaluate", f"--workdir={run}")
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
  assert result.stderr.startswith(
      f"error: none of the 1 checkpoint(s) in {run / 'checkpoints'} can be read")
