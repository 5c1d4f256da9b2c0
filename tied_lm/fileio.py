"""Atomic file writes, so a kill never leaves a half-written file behind."""

import os
import tempfile
from pathlib import Path


def _new_file_mode() -> int:
  """The mode open() would give a new file: 0o666 less the umask (mkstemp gives 0o600)."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, content: str | bytes) -> None:
  """Writes `content` to `path` via a temporary file and an atomic rename.

  The file gets the permissions an ordinary write would give it.
  """
  path = Path(path)
  data = content.encode("utf-8") if isinstance(content, str) else content
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.chmod(tmp, _new_file_mode())
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
