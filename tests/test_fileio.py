"""tied_lm.fileio: atomic writes, run directories."""

import os
import stat
import tempfile
import time
from pathlib import Path

import pytest

from tied_lm import fileio
from tied_lm.errors import UserError
from tied_lm.fileio import atomic_write


def test_atomic_write_replaces_the_file_with_ordinary_permissions(tmp_path):
  path = tmp_path / "results.json"
  path.write_text("old")
  old_umask = os.umask(0o022)
  try:
    atomic_write(path, "new")
    atomic_write(tmp_path / "bytes.bin", b"\x00\x01")
  finally:
    os.umask(old_umask)
  assert path.read_text() == "new"
  assert (tmp_path / "bytes.bin").read_bytes() == b"\x00\x01"
  assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0o600
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_a_run_directory_is_made_or_refused_in_one_line(tmp_path):
  run = tmp_path / "a" / "run"
  fileio.make_run_directory(run)
  assert run.is_dir()
  fileio.make_run_directory(run)  # again: nothing to do
  (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
  with pytest.raises(UserError, match=r"the workdir .*dangling is a broken symbolic link"):
    fileio.make_run_directory(tmp_path / "dangling")
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match=r"cannot make the workdir .*file/run: "):
    fileio.make_run_directory(tmp_path / "file" / "run")
  # Entries of the wrong kind would fail later, deep in training.
  (run / "metrics.jsonl").mkdir()
  with pytest.raises(UserError, match=r"run/metrics.jsonl is a folder, where a run keeps its "
                     r"file metrics.jsonl: move it away or use another --workdir"):
    fileio.make_run_directory(run)
  (run / "metrics.jsonl").rmdir()
  (run / "checkpoints").write_text("")
  with pytest.raises(UserError, match=r"run/checkpoints is a file, where a run keeps its folder"):
    fileio.make_run_directory(run)


def test_damaged_json_is_one_line_naming_the_file_and_a_torn_append_is_skipped(tmp_path):
  path = tmp_path / "config.json"
  path.write_text('{"seed": 0')  # cut short
  with pytest.raises(UserError, match=r"config.json is damaged: not JSON \(.* at line 1\); "
                     "restore or remove it"):
    fileio.read_json(path)
  path.write_text('{"seed": 0}')
  assert fileio.read_json(path) == {"seed": 0}
  path.write_text("null\n")  # a results.json so was read as a run still training
  with pytest.raises(UserError, match=r"config.json is damaged: a JSON null, not an object; "
                     "restore or remove it"):
    fileio.read_json(path)

  lines = tmp_path / "launches.jsonl"
  lines.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, "comm')  # killed while appending
  assert fileio.read_json_lines(lines, appended=True) == [{"a": 1}, {"a": 2}]
  # A file written whole has no excuse for a torn line, nor an appended one in its middle.
  with pytest.raises(UserError, match=r"launches.jsonl is damaged: line 3 is not JSON"):
    fileio.read_json_lines(lines)
  lines.write_text('{"a": 1}\n{"a": 2, \n{"a": 3}\n')
  with pytest.raises(UserError, match=r"launches.jsonl is damaged: line 2 is not JSON"):
    fileio.read_json_lines(lines, appended=True)
  # Torn inside a multi-byte character: not UTF-8 (it was a UnicodeDecodeError traceback).
  torn = '{"command": "--prompt=é"}'.encode()[:-3]
  lines.write_bytes(b'{"a": 1}\n' + torn)
  assert fileio.read_json_lines(lines, appended=True) == [{"a": 1}]
  lines.write_bytes(torn + b'\n{"a": 1}\n')
  with pytest.raises(UserError, match=r"^\S*launches.jsonl is damaged: line 1 is not UTF-8 text; "
                                      "restore or remove it$"):
    fileio.read_json_lines(lines, appended=True)


def test_a_folder_that_cannot_be_written_is_refused_even_for_root(tmp_path):
  # os.access says yes to root under /proc and /sys, where nothing can be made; the
  # commands then failed with a traceback after their work.
  for folder, message in (
      ("/proc/tied_lm_output", ": /proc is not writable (no file can be made in it)"),
      # Not the "No such file or directory" /proc answers for a folder that exists.
      ("/proc/self", " (no file can be made in it)")):
    with pytest.raises(UserError) as refused:
      fileio.check_writable_directory(Path(folder), "--root")
    assert str(refused.value) == f"cannot write --root {folder}{message}"
  fileio.check_writable_directory(tmp_path / "new" / "runs", "--root")
  assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
  # A full disk at the fsync, or Ctrl-C there: the file keeps its old content.
  path = tmp_path / "metrics.jsonl"
  path.write_text("old")

  def full_disk(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(fileio.os, "fsync", full_disk)
  with pytest.raises(OSError, match="No space left"):
    atomic_write(path, "new")
  assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_the_temporary_files_of_killed_atomic_writes_are_removed_and_nothing_else(tmp_path):
  # What atomic_write leaves when kill -9 comes between mkstemp and the rename.
  fd, left = tempfile.mkstemp(dir=tmp_path, prefix=".metrics.jsonl.", suffix=".tmp")
  os.close(fd)
  kept = [tmp_path / name for name in (
      ".notes.tmp", "metrics.jsonl", ".config.json.tmp",
      ".eval_valid_batch10.json.abcd1234.tmp",  # another command's write, maybe in flight
  )]
  for path in kept:
    path.write_text("x")
  (tmp_path / ".results.json.abcdefgh.tmp").mkdir()
  names = ["metrics.jsonl", "config.json", "results.json"]
  assert fileio.remove_unfinished_writes(tmp_path, names) == [Path(left)]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [".results.json.abcdefgh.tmp", *(p.name for p in kept)])


def test_unfinished_writes_younger_than_the_bound_are_kept(tmp_path):
  # A cache shared by processes: only a write too old to be in flight is removed.
  old, new = (tmp_path / f".ptb.train.txt.{tag}.tmp" for tag in ("abcd1234", "efgh5678"))
  for path in (old, new):
    path.write_text("x")
  os.utime(old, (time.time() - 7200, time.time() - 7200))
  assert fileio.remove_unfinished_writes(tmp_path, ["ptb.train.txt"],
                                         older_than_seconds=3600) == [old]
  assert list(tmp_path.iterdir()) == [new]
  # Without a bound, a leftover is removed whatever its time (one copied from a host
  # whose clock runs ahead).
  os.utime(new, (time.time() + 7200, time.time() + 7200))
  assert fileio.remove_unfinished_writes(tmp_path, ["ptb.train.txt"]) == [new]
