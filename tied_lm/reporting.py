"""Where a run's metrics go: metrics.jsonl, TensorBoard and the terminal, fed from one place.

A run's metrics are records, dicts with a "kind":
  train: one per logging interval: epoch, step (global, after the interval),
    step_in_epoch, loss (cross-entropy per token), perplexity, kl, grad_norm
    (mean over the interval), learning_rate, tokens_per_second, nonfinite_steps;
  epoch: one per epoch: train_perplexity, train_kl, valid_perplexity,
    valid_tokens_scored, train_tokens_per_second, epoch_seconds (its training and
    validation), wall_seconds (the run's epoch_seconds summed), paused_seconds (the
    stops longer than 5 s in its training and validation, which the times and the
    speed leave out: RunningClock; null for an epoch resumed from a checkpoint saved
    before stops were counted)...;
  test: one at the end: test_perplexity and test_tokens_scored of the best params.
`Reporter.add(record)` is the only entry point. The record list is part of
every checkpoint and is written to `metrics.jsonl` (the source of truth);
TensorBoard gets the same numbers as scalars.
"""

import json
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import tqdm
from absl import logging

from tied_lm.errors import UserError
from tied_lm.fileio import atomic_write, read_json_lines

# record kind -> {record key: TensorBoard tag}
SCALARS = {
    "train": {
        "loss": "train/loss",
        "perplexity": "train/perplexity",
        "kl": "train/kl",
        "grad_norm": "train/grad_norm",
        "learning_rate": "train/learning_rate",
        "tokens_per_second": "train/tokens_per_second",
    },
    "epoch": {
        "train_perplexity": "epoch/train_perplexity",
        "valid_perplexity": "valid/perplexity",
    },
    "test": {"test_perplexity": "test/perplexity"},
}


def flat_config(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
  """{"model.hidden_size": 200, ...}, the form TensorBoard's hparams take."""

  def flatten(prefix, node):
    for key, value in node.items():
      if isinstance(value, dict):
        yield from flatten(f"{prefix}{key}.", value)
      else:
        yield f"{prefix}{key}", value if isinstance(value, bool | int | float | str) else str(value)

  return dict(flatten("", config.to_dict()))


class Reporter:
  """Keeps the records and shows them: TensorBoard, a progress bar or plain log lines.

  Args:
    workdir: the run directory (`metrics.jsonl` and `tensorboard/` go there).
    records: the records so far (restored from a checkpoint when resuming).
    writer: True on the process that writes files (process 0).
    config: written to TensorBoard as text once, and as hparams at the end.
    resumed_step: the global step of the checkpoint resumed from; TensorBoard
      drops what an earlier attempt logged after it.
    progress_bar: a tqdm bar per epoch; default: when stdout is a terminal.
      Otherwise (CI, nohup, a log file) one plain log line per interval.
  """

  def __init__(
      self,
      workdir: Path,
      records: list[dict[str, Any]],
      *,
      writer: bool,
      config: ml_collections.ConfigDict,
      resumed_step: int | None = None,
      progress_bar: bool | None = None,
  ):
    self.records = records
    self._workdir = workdir
    self._writer = None
    self._is_writer = writer
    self._config = config
    if writer:
      # Imported here: tensorboardX loads torch and JAX when they are installed,
      # which commands that only read records (experiments.reproduce) do not need.
      import tensorboardX

      self._writer = tensorboardX.SummaryWriter(
          str(workdir / "tensorboard"), purge_step=resumed_step, flush_secs=30
      )
      if resumed_step is None:
        self._writer.add_text("config", f"```\n{config.to_json(indent=2)}\n```", 0)
      # The purge hides the checkpoint's own step too, whose records (the last log line,
      # an epoch's end) the resumed state holds: they are shown again.
      for record in records:
        if record["step"] == resumed_step:
          self._to_tensorboard(record)
    self._progress_bar = (
        writer and sys.stdout.isatty() if progress_bar is None else progress_bar
    )
    self._bar = None
    self._num_steps = self._first_step = 0
    self._clock: Callable[[], float] = time.monotonic
    self._epoch_start = 0.0

  def start_epoch(self, epoch: int, num_steps: int, first_step: int,
                  clock: Callable[[], float] = time.monotonic) -> None:
    """`clock` gives the seconds the log lines' ETA is estimated from (the run's
    RunningClock.seconds leaves out the time the process was stopped)."""
    self._num_steps, self._first_step, self._clock = num_steps, first_step, clock
    self._epoch_start = clock()
    if self._progress_bar:
      self._bar = tqdm.tqdm(
          total=num_steps, initial=first_step, desc=f"epoch {epoch}", unit="step",
          file=sys.stdout, dynamic_ncols=True,
      )

  def advance(self) -> None:
    """One step done (no device sync: only the bar moves)."""
    if self._bar is not None:
      self._bar.update(1)

  def end_epoch(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def add(self, record: dict[str, Any]) -> None:
    """The one way a metric enters the run: kept, sent to TensorBoard, shown."""
    self.records.append(record)
    if self._writer is not None:
      self._to_tensorboard(record)
    self._show(record)

  def _to_tensorboard(self, record: dict[str, Any]) -> None:
    for key, tag in SCALARS[record["kind"]].items():
      self._writer.add_scalar(tag, record[key], record["step"])

  def _show(self, record: dict[str, Any]) -> None:
    kind = record["kind"]
    if kind == "train" and self._bar is not None:
      self._bar.set_postfix(
          ppl=f"{record['perplexity']:.2f}", kl=f"{record['kl']:.4f}",
          tok_s=f"{record['tokens_per_second']:.0f}", refresh=False,
      )
    elif kind == "train":
      done = record["step_in_epoch"] - self._first_step
      seconds_per_step = (self._clock() - self._epoch_start) / max(done, 1)
      logging.info(
          "epoch %d lr %.4g step %d/%d | loss %.3f ppl %.2f kl %.4f | %.0f tok/s | eta %s",
          record["epoch"], record["learning_rate"], record["step_in_epoch"], self._num_steps,
          record["loss"], record["perplexity"], record["kl"], record["tokens_per_second"],
          format_seconds((self._num_steps - record["step_in_epoch"]) * seconds_per_step),
      )
    elif kind == "epoch":
      logging.info(
          "epoch %d done | train ppl %.2f | valid ppl %.2f (%d tokens) | best %.2f (epoch %d)",
          record["epoch"], record["train_perplexity"], record["valid_perplexity"],
          record["valid_tokens_scored"], record["best_valid_perplexity"], record["best_epoch"],
      )
    elif kind == "test":
      logging.info(
          "best valid ppl %.2f (epoch %d), test ppl %.2f over %d tokens (eval batch %d)",
          record["best_valid_perplexity"], record["best_epoch"], record["test_perplexity"],
          record["test_tokens_scored"], self._config.eval_batch_size,
      )

  def write_metrics(self) -> None:
    """Rewrites `metrics.jsonl` from the records, atomically (writer process only)."""
    if self._is_writer:
      atomic_write(
          self._workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records)
      )

  def close(self, final_metrics: dict[str, float] | None = None) -> None:
    """Flushes TensorBoard; with `final_metrics`, records the config as hparams with them."""
    self.end_epoch()
    if self._writer is not None:
      if final_metrics:
        self._writer.add_hparams(flat_config(self._config), final_metrics, name=".")
      self._writer.close()


class RunningClock:
  """Seconds the process has run, leaving out the stretches it was stopped.

  A run paused with SIGSTOP (to free the CPU for a benchmark, say) must not count the
  pause as training time. A thread wakes every `tick` seconds; a wake-up more than
  `slack` seconds late, in which the process used less CPU time than the lateness, means
  it was stopped, and the lateness less that CPU time is counted as paused. (A thread
  kept from running by a long call that holds the GIL is late too, but the call uses
  CPU time.) Each reading checks the same, so one taken just after a stop, before the
  thread woke, already leaves it out. Stops shorter than `tick + slack` count as
  running. Time the machine spent suspended is in no reading: the monotonic clock
  stops then.

  Use as a context manager: the thread runs inside the `with` block.
  """

  def __init__(self, tick: float = 1.0, slack: float = 4.0):
    self._tick, self._slack = tick, slack
    self._lock = threading.Lock()
    self._stopped = threading.Event()
    self._thread: threading.Thread | None = None
    self._start = self._last_seen = time.monotonic()
    self._last_cpu = time.process_time()
    self._paused = 0.0

  def read(self) -> tuple[float, float]:
    """(seconds run, seconds stopped) since the `with` block began, after counting any
    stop since the last look."""
    with self._lock:
      now, cpu = time.monotonic(), time.process_time()
      late = now - self._last_seen - self._tick
      if late > self._slack:
        self._paused += max(late - (cpu - self._last_cpu), 0.0)
      self._last_seen, self._last_cpu = now, cpu
      return now - self._start - self._paused, self._paused

  def _watch(self) -> None:
    while not self._stopped.wait(self._tick):
      self.read()

  def __enter__(self) -> "RunningClock":
    self._start = self._last_seen = time.monotonic()
    self._last_cpu = time.process_time()
    self._paused = 0.0
    self._stopped.clear()
    self._thread = threading.Thread(target=self._watch, name="running-clock", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stopped.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def seconds(self) -> float:
    """Seconds run since the `with` block began: read()'s first number."""
    return self.read()[0]


def format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def read_records(workdir: Path, kind: str | None = None) -> list[dict[str, Any]]:
  """The records of `workdir/metrics.jsonl`, all or those of one kind; [] without the file.

  Runs from before records had a kind hold one record per epoch: those count as "epoch".
  """
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  if not path.is_file():
    raise UserError(f"{path} is not a file")
  records = read_json_lines(path)
  return [r for r in records if kind is None or r.get("kind", "epoch") == kind]


def records_match(workdir: Path, records: list[dict[str, Any]]) -> bool:
  """Whether `workdir/metrics.jsonl` holds `records`, test records aside (a finished
  run's test is in the file and not in its last checkpoint); False if it cannot be read."""
  try:
    on_disk = read_records(workdir)
  except UserError:
    return False
  # As JSON text: a skipped interval's NaN loss is not equal to itself.
  return ([json.dumps(r, sort_keys=True) for r in on_disk if r.get("kind") != "test"]
          == [json.dumps(r, sort_keys=True) for r in records if r.get("kind") != "test"])


def check_nothing_to_lose(workdir: Path) -> None:
  """Raises UserError if `workdir`, which has no checkpoint, holds a trained run's results.

  Training from scratch there would replace them. (Records of a run stopped before its
  first checkpoint, which ends epoch 1 at the latest, are no loss.)
  """
  trained = [name for name, present in (
      ("results.json", (workdir / "results.json").exists()),
      ("epoch records in metrics.jsonl", bool(read_records(workdir, "epoch"))),
  ) if present]
  if trained:
    raise UserError(
        f"{workdir} holds a trained run ({' and '.join(trained)}) but no checkpoint to resume "
        "from: training from scratch would replace its results. Move them away, or use a "
        "new --workdir")
