"""Corpora, downloads and batching, checked by hand and against the paper's counts."""

import http.client
import http.server
import io
import lzma
import os
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tied_lm import data

SHARED = data.resolve_data_dir()


@pytest.mark.parametrize(
    "dataset,counts,vocab_size",
    [
        ("ptb", (929_589, 73_760, 82_430), 10_000),
        ("wikitext2", (2_088_628, 217_646, 245_569), 33_278),
    ],
)
def test_token_counts_and_vocabulary_match_the_paper(dataset, counts, vocab_size):
  corpus = data.load_corpus(dataset, str(SHARED))
  assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == counts
  assert corpus.vocab_size == vocab_size
  assert corpus.train.dtype == np.int32
  assert corpus.vocab[corpus.train[-1]] == data.EOS
  assert corpus.train.max() == vocab_size - 1  # every vocabulary word occurs in train


def test_tokenize_adds_eos_per_line_including_empty_lines(tmp_path):
  path = tmp_path / "x.txt"
  path.write_text(" a  b\n\nc\n")
  assert data.tokenize(path) == ["a", "b", "<eos>", "<eos>", "c", "<eos>"]


def test_train_windows_by_hand():
  inputs, targets = data.train_windows(np.arange(20), batch_size=2, num_steps=4)
  # Rows 0..9 and 10..19; each row has 9 targets, so two full windows of 4.
  np.testing.assert_array_equal(inputs[0], [[0, 1, 2, 3], [10, 11, 12, 13]])
  np.testing.assert_array_equal(targets[0], [[1, 2, 3, 4], [11, 12, 13, 14]])
  np.testing.assert_array_equal(inputs[1], [[4, 5, 6, 7], [14, 15, 16, 17]])
  np.testing.assert_array_equal(targets[1], [[5, 6, 7, 8], [15, 16, 17, 18]])
  assert inputs.shape == (2, 2, 4)


def test_train_windows_need_min_train_tokens():
  assert data.min_train_tokens(batch_size=2, num_steps=4) == 10  # two rows of 4 + 1
  inputs, targets = data.train_windows(np.arange(10), batch_size=2, num_steps=4)
  np.testing.assert_array_equal(inputs[0], [[0, 1, 2, 3], [5, 6, 7, 8]])
  np.testing.assert_array_equal(targets[0], [[1, 2, 3, 4], [6, 7, 8, 9]])
  assert inputs.shape == (1, 2, 4)
  with pytest.raises(data.DataError, match=(
      "^9 training tokens are too few for batch_size=2 and num_steps=4: need at least 10$")):
    data.train_windows(np.arange(9), batch_size=2, num_steps=4)


@pytest.mark.parametrize("batch_size,num_steps,name", [(0, 4, "batch_size"), (2, 0, "num_steps"),
                                                       (2, -1, "num_steps")])
def test_windows_refuse_empty_shapes(batch_size, num_steps, name):
  # A zero batch or unroll divided by zero inside the batching.
  value = batch_size if name == "batch_size" else num_steps
  with pytest.raises(data.DataError, match=f"^{name}={value} must be positive$"):
    data.train_windows(np.arange(20), batch_size, num_steps)
  eval_name = "eval_batch_size" if name == "batch_size" else name
  with pytest.raises(data.DataError, match=f"^{eval_name}={value} must be positive$"):
    data.eval_windows(np.arange(20), batch_size, num_steps)


@pytest.mark.parametrize("ids,message", [
    # A [2, 6] array was counted as 2 tokens; float ids were truncated and ids beyond
    # int32 wrapped around to other words, silently.
    (np.arange(12).reshape(2, 6), r"1-D array of integer word ids, got shape \(2, 6\) int64"),
    (np.arange(13) + 0.7, r"1-D array of integer word ids, got shape \(13,\) float64"),
    (np.arange(13) + 2**32, r"word ids in \[0, 2\*\*31\), got values from 4294967296 to "),
    (np.arange(13) - 1, r"word ids in \[0, 2\*\*31\), got values from -1 to 11"),
])
def test_windows_refuse_what_is_not_a_stream_of_word_ids(ids, message):
  for windows in (data.train_windows, data.eval_windows):
    with pytest.raises(data.DataError, match=f"^ids must be (a )?{message}"):
      windows(ids, 2, 3)


def test_eval_windows_by_hand():
  inputs, targets, weights = data.eval_windows(np.arange(11), batch_size=3, num_steps=2)
  rows = lambda x: x.transpose(1, 0, 2).reshape(3, -1)  # noqa: E731
  np.testing.assert_array_equal(rows(inputs), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]])
  np.testing.assert_array_equal(rows(targets), [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]])
  np.testing.assert_array_equal(rows(weights), [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])


@pytest.mark.parametrize("length,batch_size,num_steps", [(2, 1, 3), (101, 1, 7), (101, 4, 7),
                                                         (1000, 10, 35), (37, 7, 5)])
def test_eval_windows_score_every_target_once(length, batch_size, num_steps):
  ids = np.random.default_rng(0).permutation(length)  # distinct ids identify positions
  inputs, targets, weights = data.eval_windows(ids, batch_size, num_steps)
  scored = weights > 0
  assert int(weights.sum()) == length - 1
  pairs = sorted(zip(inputs[scored].tolist(), targets[scored].tolist(), strict=True))
  assert pairs == sorted(zip(ids[:-1].tolist(), ids[1:].tolist(), strict=True))


def test_eval_windows_take_one_row_per_target_at_most():
  inputs, _, weights = data.eval_windows(np.arange(11), batch_size=10, num_steps=2)
  assert inputs.shape == (1, 10, 2) and weights.sum() == 10
  with pytest.raises(data.DataError, match=(
      "^eval_batch_size=11 exceeds the 10 targets of the test split: each row needs at least "
      "one$")):
    data.eval_windows(np.arange(11), batch_size=11, num_steps=2, split="test")


def test_device_windows_keep_rows_with_their_process_and_device():
  windows = np.arange(3 * 8 * 2).reshape(3, 8, 2)  # [windows, batch 8, steps 2]
  for process in range(2):
    local = data.device_windows(windows, process, process_count=2, local_device_count=2)
    assert local.shape == (3, 2, 2, 2)
    for device in range(2):
      first_row = process * 4 + device * 2
      np.testing.assert_array_equal(local[:, device], windows[:, first_row : first_row + 2])


def test_max_distinct_targets_counts_each_devices_rows_of_each_window():
  windows = np.array([[[1, 1], [2, 3], [4, 4], [4, 4]],   # device 0: {1, 2, 3}, 1: {4}
                      [[5, 6], [7, 8], [9, 9], [9, 0]]])  # device 0: 4 words, 1: {0, 9}
  assert data.max_distinct_targets(windows, num_devices=2) == 4
  assert data.max_distinct_targets(windows, num_devices=1) == 6
  split = data.device_windows(windows, 0, 1, 2)  # as the training step gets them
  assert max(len(np.unique(rows)) for window in split for rows in window) == 4


def test_text_corpus_caps_the_vocabulary_with_unk(tmp_path):
  (tmp_path / "train.txt").write_text("a a a b b c\nd a\n")
  (tmp_path / "valid.txt").write_text("a z\n")
  (tmp_path / "test.txt").write_text("b c\n")
  corpus = data.load_corpus("text", str(tmp_path), max_vocab_size=3)
  assert corpus.vocab == ("a", "b", "<unk>")
  unk = corpus.vocab.index("<unk>")
  # <eos> is rarer than a and b here, so it maps to <unk> as well.
  np.testing.assert_array_equal(corpus.valid, [0, unk, unk])
  np.testing.assert_array_equal(corpus.test, [1, unk, unk])
  full = data.load_corpus("text", str(tmp_path))
  assert full.vocab == ("a", "b", "<eos>", "c", "d", "<unk>")
  np.testing.assert_array_equal(full.valid, [0, 5, 2])  # 'z' is not in train
  with pytest.raises(data.DataError, match=r"^max_vocab_size=1 must be 0 \(every word\) or >= 2"):
    data.load_corpus("text", str(tmp_path), max_vocab_size=1)
  # A literal <unk> in the text is the one <unk>, last, not a second id of its own.
  (tmp_path / "train.txt").write_text("a <unk> <unk> <unk> b a\n")
  with_unk = data.load_corpus("text", str(tmp_path), max_vocab_size=3)
  assert with_unk.vocab == ("a", "b", "<unk>")
  np.testing.assert_array_equal(with_unk.train, [0, 2, 2, 2, 1, 0, 2])  # <eos> is rarer


def test_closed_corpora_refuse_a_vocabulary_cap(tmp_path):
  # It was ignored: a notebook asking for 5 words got PTB's 10,000.
  with pytest.raises(data.DataError, match=(
      "^max_vocab_size=5 applies to dataset='text' only; 'ptb' has its own fixed vocabulary$")):
    data.load_corpus("ptb", str(tmp_path), max_vocab_size=5)


def test_closed_vocabulary_rejects_unknown_words():
  with pytest.raises(data.DataError, match=r"valid split .* 'zebra'"):
    data.to_ids(["a", "zebra"], {"a": 0, data.UNK: 1}, "valid", closed=True)


def test_empty_split_is_an_error(tmp_path):
  for name in ("train.txt", "valid.txt", "test.txt"):
    (tmp_path / name).write_text("a b\n")
  (tmp_path / "valid.txt").write_text("")
  with pytest.raises(data.DataError, match="valid split .* fewer than 2 tokens"):
    data.load_corpus("text", str(tmp_path))


def test_a_split_of_blank_lines_alone_is_an_error(tmp_path):
  # Each blank line is an <eos>: it passed the 2-token check with nothing to model.
  for name in ("train.txt", "valid.txt", "test.txt"):
    (tmp_path / name).write_text("a b\n")
  (tmp_path / "test.txt").write_text("\n\n \n")
  with pytest.raises(data.DataError, match=(
      rf"^the test split {tmp_path / 'test.txt'} has no words, only line ends "
      r"\(3 <eos> tokens\)$")):
    data.load_corpus("text", str(tmp_path))


def test_data_dir_precedence(monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, "/from/env")
  assert data.resolve_data_dir("/explicit") == Path("/explicit")
  assert data.resolve_data_dir("") == Path("/from/env")
  monkeypatch.delenv(data.DATA_DIR_ENV)
  assert data.resolve_data_dir("") == Path("~/.cache/tied_lm").expanduser()


def test_a_data_directory_that_is_a_file_is_named_as_such(tmp_path, monkeypatch):
  # It read "missing ptb.train.txt ... in FILE/ptb and the download failed".
  monkeypatch.setattr(data, "_download", no_network)
  afile = tmp_path / "afile"
  afile.write_text("")
  monkeypatch.setenv(data.DATA_DIR_ENV, str(afile))
  for dataset, data_dir, named_by in (("ptb", "", "$TIED_LM_DATA_DIR"),
                                      ("text", str(afile), "config.data_dir")):
    with pytest.raises(data.DataError, match=(
        rf"^the data directory {afile} \({re.escape(named_by)}\) is a file, not a directory$")):
      data.load_corpus(dataset, data_dir)


def no_network(url, deadline):
  raise OSError("network is unreachable")


def serve_ptb(url, deadline):
  """A mirror that serves the verified PTB files."""
  return (SHARED / "ptb" / url.rsplit("/", 1)[1]).read_bytes()


def test_a_broken_link_or_a_fifo_where_a_data_file_should_be_is_named_as_such(
    tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_download", no_network)
  for name in ("valid.txt", "test.txt"):
    (tmp_path / name).write_text("a b\n")
  os.mkfifo(tmp_path / "train.txt")
  with pytest.raises(data.DataError, match=(
      rf"^{tmp_path / 'train.txt'} is not a regular file, where a data file should be")):
    data.load_corpus("text", str(tmp_path))
  # A broken link where the corpus folder should be: it downloaded, then failed to write.
  (tmp_path / "ptb").symlink_to(tmp_path / "moved")
  with pytest.raises(data.DataError, match=(
      rf"^{tmp_path / 'ptb'} is a broken symbolic link \(to {tmp_path / 'moved'}\); fix")):
    data.load_corpus("ptb", str(tmp_path))


def test_a_folder_where_a_data_file_should_be_is_named_as_such(tmp_path, monkeypatch):
  # It read "missing train.txt", or started a download that could not replace the folder.
  monkeypatch.setattr(data, "_download", no_network)
  for name in ("valid.txt", "test.txt"):
    (tmp_path / name).write_text("a b\n")
  (tmp_path / "train.txt").mkdir()
  shutil.copytree(SHARED / "ptb", tmp_path / "ptb")
  (tmp_path / "ptb" / "ptb.test.txt").unlink()
  (tmp_path / "ptb" / "ptb.test.txt").mkdir()
  for dataset, folder in (("text", tmp_path / "train.txt"),
                          ("ptb", tmp_path / "ptb" / "ptb.test.txt")):
    with pytest.raises(data.DataError, match=(
        rf"^{folder} is a folder, where a data file should be; move it away$")):
      data.load_corpus(dataset, str(tmp_path))


def test_a_file_where_a_corpus_folder_should_be_is_named_as_such(tmp_path, monkeypatch):
  # It read "missing ... in DIR/ptb and the download failed", or "File exists".
  monkeypatch.setattr(data, "_download", no_network)
  (tmp_path / "ptb").write_text("")
  with pytest.raises(data.DataError, match=(
      rf"^{tmp_path / 'ptb'} is a file, where the ptb files' folder should be; move it away$")):
    data.load_corpus("ptb", str(tmp_path))
  # A file above the data directory: it downloaded every file, then could not write them.
  with pytest.raises(data.DataError, match=(
      rf"^cannot use {tmp_path / 'ptb' / 'sub'}: {tmp_path / 'ptb'} is a file, not a folder$")):
    data.load_corpus("ptb", str(tmp_path / "ptb" / "sub"))


def test_missing_files_without_network_name_files_and_directory(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_download", no_network)
  with pytest.raises(data.DataError) as error:
    data.load_corpus("ptb", str(tmp_path))
  message = str(error.value)
  assert "ptb.train.txt, ptb.valid.txt, ptb.test.txt" in message
  assert str(tmp_path / "ptb") in message and "TIED_LM_DATA_DIR" in message
  assert "\n" not in message
  assert not (tmp_path / "ptb" / "ptb.train.txt").exists()


def test_text_that_is_not_utf8_is_a_data_error_naming_the_file(tmp_path):
  path = tmp_path / "train.txt"
  path.write_bytes(b"caf\xe9 latin-1\n")
  with pytest.raises(data.DataError, match=r"train\.txt is not UTF-8 text: byte 3 \(line 1\)"):
    data.tokenize(path)
  # Past the decoder's first buffer: the byte and line in the file, not in the buffer.
  path.write_bytes(b"a b c\n" * 10_000 + b"caf\xe9\n")
  with pytest.raises(data.DataError, match=r"byte 60003 \(line 10001\): invalid continuation"):
    data.tokenize(path)


def test_a_byte_order_mark_is_not_part_of_the_first_word(tmp_path):
  path = tmp_path / "train.txt"
  path.write_bytes(b"\xef\xbb\xbfthe cat\r\nsat\n")
  assert data.tokenize(path) == ["the", "cat", data.EOS, "sat", data.EOS]


def test_download_into_an_unwritable_place_is_a_data_error(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_download", serve_ptb)

  def read_only(path, content):  # root writes anywhere: the write's failure, by hand
    raise PermissionError(13, "Permission denied", str(path))

  monkeypatch.setattr(data, "atomic_write", read_only)
  with pytest.raises(data.DataError, match=(
      rf"^cannot write the downloaded files into {tmp_path / 'ptb'}: .*Permission denied")):
    data.ensure_files("ptb", tmp_path)


def test_download_writes_verified_ptb_files(tmp_path, monkeypatch):
  urls = []

  def fake_download(url, deadline):
    urls.append(url)
    return serve_ptb(url, deadline)

  monkeypatch.setattr(data, "_download", fake_download)
  files = data.ensure_files("ptb", tmp_path)
  assert urls[0] == data.SOURCES["ptb"].urls[0] + "ptb.train.txt"
  for split, path in files.items():
    assert path.read_bytes() == (SHARED / "ptb" / f"ptb.{split}.txt").read_bytes()
  assert sorted(p.name for p in (tmp_path / "ptb").iterdir()) == sorted(
      f"ptb.{s}.txt" for s in data.SPLITS
  )  # no temporary files left behind


def test_a_download_removes_only_the_stale_leftovers_of_killed_downloads(
    tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_download", serve_ptb)
  (tmp_path / "ptb").mkdir()
  stale, recent = (tmp_path / "ptb" / f".ptb.valid.txt.{tag}.tmp"
                   for tag in ("abcd1234", "efgh5678"))
  for path in (stale, recent):  # `recent` may be another process's download in flight
    path.write_text("part of a download")
  hours_ago = time.time() - 2 * data.STALE_WRITE_SECONDS
  os.utime(stale, (hours_ago, hours_ago))
  data.ensure_files("ptb", tmp_path)
  assert not stale.exists() and recent.exists()


def test_leftovers_that_cannot_be_removed_do_not_fail_the_download(
    tmp_path, monkeypatch, caplog):
  # Another user's leftover in a shared cache (sticky bit): the files are in.
  monkeypatch.setattr(data, "_download", serve_ptb)

  def not_permitted(*args, **kwargs):
    raise PermissionError(1, "Operation not permitted")

  monkeypatch.setattr(data, "remove_unfinished_writes", not_permitted)
  assert len(data.load_corpus("ptb", str(tmp_path)).valid) == 73_760
  assert "could not remove a killed download's leftovers" in caplog.text


class _Server(http.server.ThreadingHTTPServer):
  """A local HTTP server whose every answer announces `body` in its Content-Length and
  sends its first `sent` bytes (all by default), `bytes_per_write` at a time with `pause`
  seconds between writes."""

  def __init__(self, body: bytes, bytes_per_write: int, pause: float, sent: int | None = None):
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
          for start in range(0, len(body) if sent is None else sent, bytes_per_write):
            self.wfile.write(body[start:start + bytes_per_write])
            self.wfile.flush()
            time.sleep(pause)
        except OSError:  # the client gave up
          pass

      def log_message(self, *args):
        pass

    super().__init__(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{server.server_address[1]}/file"

  def __enter__(self):
    threading.Thread(target=self.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc_info):
    self.shutdown()
    self.server_close()


def test_download_reads_the_whole_body_and_stops_a_trickle_at_the_deadline():
  body = bytes(range(256)) * 1000
  with _Server(body, bytes_per_write=100_000, pause=0.01) as server:
    assert data._download(server.url, time.monotonic() + 60) == body
  # Each write within the socket timeout, the whole far past the deadline. Reading what
  # has come, it stops within a write of the deadline (read(64 KiB) would wait 3.3 s).
  with _Server(body, bytes_per_write=1_000, pause=0.05) as server:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^\d+,\d{3} bytes in 0\.\d s, not finished in time$"):
      data._download(server.url, started + 0.3)
    assert time.monotonic() - started < 1.5


def test_a_body_shorter_than_its_content_length_is_an_incomplete_read():
  # Reading what has come, an early end returns b"" like the end of the body.
  body = bytes(range(256)) * 100
  with _Server(body, bytes_per_write=5_000, pause=0, sent=10_000) as server:
    with pytest.raises(http.client.IncompleteRead, match=r"10000 bytes read, 15600 more"):
      data._download(server.url, time.monotonic() + 60)


def wikitext2_archive() -> bytes:
  """The three WikiText-2 files zipped as the public archive holds them."""
  archive = io.BytesIO()
  with zipfile.ZipFile(archive, "w") as z:
    for split in data.SPLITS:
      name = f"wiki.{split}.tokens"
      z.writestr(f"wikitext-2/{name}", (SHARED / "wikitext-2" / name).read_bytes())
  return archive.getvalue()


def test_download_unpacks_the_wikitext2_archive(tmp_path, monkeypatch):
  archive = wikitext2_archive()
  monkeypatch.setattr(data, "_download", lambda url, deadline: archive)
  corpus = data.load_corpus("wikitext2", str(tmp_path))
  assert len(corpus.valid) == 217_646


def test_a_download_cut_short_tries_the_next_mirror(tmp_path, monkeypatch):
  archive = wikitext2_archive()
  first = data.SOURCES["wikitext2"].urls[0]

  def download(url, deadline):
    if url == first:  # the server closed the connection before the end of the body
      raise http.client.IncompleteRead(b"PK", 1000)
    return archive

  monkeypatch.setattr(data, "_download", download)
  assert len(data.load_corpus("wikitext2", str(tmp_path)).valid) == 217_646
  monkeypatch.setattr(data, "_download", lambda url, deadline: download(first, deadline))
  with pytest.raises(data.DataError, match=r"IncompleteRead: IncompleteRead\(2 bytes read"):
    data.ensure_files("wikitext2", tmp_path / "again")


@pytest.mark.parametrize("damage", [
    EOFError("Compressed file ended before the end-of-stream marker was reached"),
    lzma.LZMAError("Corrupt input data"),
    NotImplementedError("That compression method is not supported"),  # deflate64
    "wrong content",  # a well-formed archive of other files
])
def test_a_damaged_or_different_archive_at_one_mirror_tries_the_next(
    tmp_path, monkeypatch, damage):
  # They were a traceback (the first three) or the end of the download (the last),
  # with the second mirror never tried.
  archive = wikitext2_archive()
  first, second = data.SOURCES["wikitext2"].urls[:2]
  other = io.BytesIO()
  with zipfile.ZipFile(other, "w") as z:
    for split in data.SPLITS:
      z.writestr(f"wikitext-2/wiki.{split}.tokens", "other text\n")

  def download(url, deadline):
    if url != first:
      return archive
    if isinstance(damage, Exception):
      raise damage
    return other.getvalue()

  monkeypatch.setattr(data, "_download", download)
  assert len(data.load_corpus("wikitext2", str(tmp_path)).valid) == 217_646
  # Every mirror damaged: one line naming each, and nothing written.
  monkeypatch.setattr(data, "_download", lambda url, deadline: download(first, deadline))
  with pytest.raises(data.DataError) as error:
    data.ensure_files("wikitext2", tmp_path / "again")
  message = str(error.value)
  assert first in message and second in message and "\n" not in message
  assert "nothing was written" in message and not (tmp_path / "again").exists()


def test_a_file_that_cannot_be_read_is_one_line_naming_it(tmp_path):
  # A folder where a file should be; an unreadable file (EACCES) takes the same path,
  # but root, who runs CI, reads any file.
  folder = tmp_path / "train.txt"
  folder.mkdir()
  for read in (data.tokenize, data.sha256_of):
    with pytest.raises(data.DataError, match=rf"^cannot read {folder}: Is a directory$"):
      read(folder)


def test_downloaded_file_with_wrong_checksum_is_not_written(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_download", lambda url, deadline: b"not ptb\n")
  with pytest.raises(data.DataError, match="expected fcea919f"):
    data.ensure_files("ptb", tmp_path)
  assert not (tmp_path / "ptb" / "ptb.train.txt").exists()


def test_checksum_mismatch_names_file_and_both_hashes(tmp_path):
  shutil.copytree(SHARED / "ptb", tmp_path / "ptb")
  corrupt = tmp_path / "ptb" / "ptb.valid.txt"
  corrupt.chmod(0o644)
  corrupt.write_bytes(corrupt.read_bytes() + b"x")
  with pytest.raises(data.DataError) as error:
    data.load_corpus("ptb", str(tmp_path))
  message = str(error.value)
  assert str(corrupt) in message
  assert data.SOURCES["ptb"].sha256["ptb.valid.txt"] in message
  assert data.sha256_of(corrupt) in message
