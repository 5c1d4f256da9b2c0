"""tied_lm.fileio: atomic writes."""

import os
import stat

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
