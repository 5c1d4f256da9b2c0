"""Atomic file writes, so a kill never leaves a half-written file behind."""

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, content: str | bytes) -> None:
  """Writes `content` to `path` via a temporary file and an atomic rename."""
  path = Path(path)
  data = content.encode("utf-8") if isinstance(content, str) else content
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
