"""Files and directories: atomic writes, JSON reads, writability checks and a run
directory's lock."""

import errno
import fcntl
import json
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from tied_lm.errors import UserError


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
  try:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  except PermissionError as error:  # named by the file meant, not the temporary one
    raise PermissionError(error.errno, error.strerror, str(path)) from None
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


def remove_unfinished_writes(
    directory: Path, names: list[str], older_than_seconds: float = 0.0
) -> list[Path]:
  """Deletes the temporary files that `atomic_write` left for the files `names` in
  `directory` when its process was killed before the rename (`.NAME.XXXXXXXX.tmp`);
  returns them. Another process's write of one of them may be in flight: call it as
  their one writer (a run's lock holder, for the run's own files), or delete only files
  last written at least `older_than_seconds` ago (0: any, whatever its time).
  """
  # mkstemp's name for atomic_write's prefix and suffix: 8 characters between them.
  pattern = re.compile(rf"\.(?:{'|'.join(map(re.escape, names))})\.[a-z0-9_]{{8}}\.tmp")
  now = time.time()
  unfinished = []
  for path in sorted(Path(directory).iterdir()):
    if not pattern.fullmatch(path.name):
      continue
    try:
      status = path.stat()
    except FileNotFoundError:  # renamed or deleted since the listing
      continue
    old_enough = older_than_seconds <= 0 or now - status.st_mtime >= older_than_seconds
    if stat.S_ISREG(status.st_mode) and old_enough:
      path.unlink(missing_ok=True)
      unfinished.append(path)
  return unfinished


def read_json(path: Path) -> dict[str, Any]:
  """A JSON file's object; a damaged file, or one that holds no object, is a UserError
  naming it, not a traceback (or, for `null`, a run read as unfinished)."""
  try:
    content = json.loads(Path(path).read_text())
  except json.JSONDecodeError as error:
    raise UserError(f"{path} is damaged: not JSON ({error.msg} at line {error.lineno}); "
                    "restore or remove it") from None
  except UnicodeDecodeError:
    raise UserError(f"{path} is damaged: not UTF-8 text; restore or remove it") from None
  if not isinstance(content, dict):
    kind = "null" if content is None else type(content).__name__
    raise UserError(f"{path} is damaged: a JSON {kind}, not an object; restore or remove it")
  return content


def read_json_lines(path: Path, *, appended: bool = False) -> list[dict[str, Any]]:
  """The objects of a JSON-lines file, one per non-blank line.

  appended: the file grows by appends (launches.jsonl), so a process killed while
  writing may leave its last line torn; that line is skipped. Any other damaged line,
  or any in a file written whole (metrics.jsonl), is a UserError naming the file.
  """
  # Decoded line by line: a line torn inside a multi-byte character is not UTF-8.
  lines = [line for line in Path(path).read_bytes().splitlines() if line.strip()]
  objects = []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
      if appended and number == len(lines):
        break
      what = (f"not JSON ({error.msg})" if isinstance(error, json.JSONDecodeError)
              else "not UTF-8 text")
      raise UserError(f"{path} is damaged: line {number} is {what}; "
                      "restore or remove it") from None
    if not isinstance(record, dict):
      raise UserError(f"{path} is damaged: line {number} is a JSON {type(record).__name__}, "
                      "not an object; restore or remove it")
    objects.append(record)
  return objects


def check_writable_directory(directory: Path, what: str) -> None:
  """Refuses a directory that cannot be created or written, before any work.

  `what` names it in the message, e.g. "the workdir" or "--root".
  """
  existing = directory
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise UserError(f"cannot write {what} {directory}: {existing} is not a directory")
  try:  # by trying: root passes os.access even where nothing can be made (/proc, /sys)
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as error:
    # /proc and /sys answer "No such file or directory" for the folder that exists.
    reason = ("no file can be made in it" if error.errno == errno.ENOENT
              else error.strerror or error)
    where = "" if existing == directory else f": {existing} is not writable"
    raise UserError(f"cannot write {what} {directory}{where} ({reason})") from None


# What a run directory holds, by kind: a stray file or folder under one of these
# names would otherwise fail deep in training (orbax, TensorBoard, the lock).
RUN_DIRECTORY_LAYOUT = {
    "checkpoints": "folder", "tensorboard": "folder", "lock": "file", "config.json": "file",
    "metrics.jsonl": "file", "results.json": "file", "launches.jsonl": "file",
}


# The run's files a trainer appends to in place; the others it replaces (atomic_write),
# which needs only the run directory to be writable.
APPENDED_RUN_FILES = ("lock", "launches.jsonl")


def check_run_directory_writable(directory: Path) -> None:
  """Refuses, before any work, a workdir that a trainer could not write, or whose
  existing checkpoints/ or tensorboard/ folder or appended files it could not write:
  found only at the first checkpoint or log line, after an epoch of training or after
  the run's launch was recorded."""
  check_writable_directory(directory, "the workdir")
  for name, kind in RUN_DIRECTORY_LAYOUT.items():
    path = directory / name
    if kind == "folder" and path.is_dir():
      check_writable_directory(path, f"the run's {name} folder")
    elif name in APPENDED_RUN_FILES and path.is_file():
      try:  # by trying, as check_writable_directory does: root passes os.access
        with open(path, "a"):
          pass
      except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def has_checkpoint(workdir: Path) -> bool:
  """Whether the run directory holds a checkpoint (a step's folder), readable or not."""
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(d.name.isdigit() and d.is_dir() for d in folder.iterdir())


def make_run_directory(directory: Path) -> None:
  """Makes a run directory (and its parents) if need be, and refuses one whose entries are
  of the wrong kind (a folder named metrics.jsonl, a file named checkpoints), in one line."""
  if directory.is_symlink() and not directory.exists():
    raise UserError(f"the workdir {directory} is a broken symbolic link (to "
                    f"{os.readlink(directory)})")
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UserError(f"cannot make the workdir {directory}: {error.strerror or error}") from None
  check_run_directory(directory)


def check_new_run_has_its_own_folder(directory: Path) -> None:
  """Refuses a workdir that holds no run yet but holds folders: the folder of all runs,
  the home folder or a repository given by mistake, among whose entries a new run would
  put its own. (A new run's folder is missing, empty, or holds files such as a log.)"""
  if not directory.is_dir() or any((directory / name).exists() for name in RUN_DIRECTORY_LAYOUT):
    return
  # A mounted volume's lost+found and hidden folders (.ipynb_checkpoints) are not others'.
  folders = sorted(entry.name for entry in directory.iterdir()
                   if entry.is_dir() and not entry.name.startswith(".")
                   and entry.name not in ("torn_checkpoints", "lost+found"))
  if folders:
    shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
    raise UserError(f"the workdir {directory} holds no run but other folders ({shown}): "
                    f"give the run a new or empty folder, e.g. {directory / 'my_run'}")


def check_run_directory(directory: Path) -> None:
  """Refuses, in one line, a run directory whose entries are of the wrong kind: what a
  trainer would fail on deep in training, and a reader would misread (a folder named
  results.json read as a run still training, a file named checkpoints as none yet)."""
  if not directory.is_dir():
    raise UserError(f"{directory} " + ("is not a directory" if directory.exists()
                                       else "does not exist"))
  for name, kind in RUN_DIRECTORY_LAYOUT.items():
    path = directory / name
    if path.exists() and path.is_dir() != (kind == "folder"):
      raise UserError(f"{path} is a {'folder' if path.is_dir() else 'file'}, where a run "
                      f"keeps its {kind} {name}: move it away or use another --workdir")


def lock_directory(directory: Path) -> IO[str]:
  """Takes `directory`'s lock (the file `lock` in it) for as long as the returned file is open.

  Two trainers on one run directory would save the same checkpoint steps and
  interleave its logs. The kernel drops the lock when the process ends, even
  by kill -9. Raises UserError if another process holds it.
  """
  lock = open(directory / "lock", "a+")
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.seek(0)
    holder = lock.read().strip()
    lock.close()
    raise UserError(
        f"{directory} is in use by another training process"
        + (f" (pid {holder})" if holder else "")
        + ": wait for it to end, or use another --workdir"
    ) from None
  lock.truncate(0)
  lock.write(f"{os.getpid()}\n")
  lock.flush()
  return lock
