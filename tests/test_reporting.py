"""TensorBoard scalars and log lines carry the same numbers as metrics.jsonl."""

import io
import json
import math
import re
import shutil
import sys
import time

import pytest

from configs import default
from tied_lm import reporting, train


def two_epoch_config():
  """configs/default.py for 2 epochs of 20 steps, a log line every 5."""
  config = default.get_config()
  config.num_epochs, config.max_steps_per_epoch, config.log_every_steps = 2, 20, 5
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(two_epoch_config(), str(workdir))
  return workdir


def tensorboard_events(workdir):
  """The run's TensorBoard events, all of them, as TensorBoard reads them."""
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator"
  )
  events = event_accumulator.EventAccumulator(
      str(workdir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}
  )
  events.Reload()
  return events


def assert_scalars_equal_records(events, records):
  """Every TensorBoard tag holds its records' values, step for step, each step once."""
  for kind, scalars in reporting.SCALARS.items():
    of_kind = [r for r in records if r["kind"] == kind]
    for key, tag in scalars.items():
      logged = events.Scalars(tag)
      assert [e.step for e in logged] == [r["step"] for r in of_kind], tag
      assert [e.value for e in logged] == pytest.approx([r[key] for r in of_kind], rel=1e-6), tag


def test_tensorboard_scalars_equal_the_records_of_metrics_jsonl(finished_run):
  events = tensorboard_events(finished_run)
  records = reporting.read_records(finished_run)
  assert [r["kind"] for r in records].count("train") == 8  # 2 epochs x 20 steps / 5
  assert [r["kind"] for r in records][-3:] == ["train", "epoch", "test"]
  assert_scalars_equal_records(events, records)
  assert "config/text_summary" in events.Tags()["tensors"]
  # The finished run's hparams, with its best validation and its test perplexity.
  test_record = records[-1]
  for key, tag in [("best_valid_perplexity", "hparam/valid_perplexity"),
                   ("test_perplexity", "hparam/test_perplexity")]:
    assert [e.value for e in events.Scalars(tag)] == [pytest.approx(test_record[key])], tag
  train_records = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train_records] == [5, 10, 15, 20, 25, 30, 35, 40]
  for r in train_records:
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["learning_rate"] == (1.0 if r["epoch"] == 1 else 0.5)


def test_a_resumed_run_replaces_the_tensorboard_steps_after_its_checkpoint(
    finished_run, tmp_path):
  # Killed after epoch 2 logged its steps but before its checkpoint: the resume logs
  # steps 25-40 again, and TensorBoard shows each step once, the checkpoint's step 20 (the
  # last log line and the end of epoch 1) included.
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "40")
  (workdir / "results.json").unlink()
  files_before = set((workdir / "tensorboard").iterdir())
  train.train_and_evaluate(two_epoch_config(), str(workdir))
  assert set((workdir / "tensorboard").iterdir()) > files_before  # the resume's own files
  records = reporting.read_records(workdir)
  assert_scalars_equal_records(tensorboard_events(workdir), records)
  assert [r["step"] for r in records if r["kind"] == "train"] == [5, 10, 15, 20, 25, 30, 35, 40]
  assert [r["step"] for r in records if r["kind"] == "epoch"] == [20, 40]


def test_the_eta_of_a_resumed_epoch_counts_only_the_steps_this_run_took(tmp_path, monkeypatch):
  # Resumed at step 50 of 100, 10 steps in 10 s: 40 steps left at 1 s each.
  clock = iter([1000.0, 1010.0])
  lines = []
  monkeypatch.setattr(reporting.logging, "info", lambda form, *args: lines.append(form % args))
  reporter = reporting.Reporter(tmp_path, [], writer=False, config=default.get_config(),
                                progress_bar=False)
  # The run's clock, which leaves out the time the process was stopped.
  reporter.start_epoch(epoch=3, num_steps=100, first_step=50, clock=lambda: next(clock))
  reporter.add({"kind": "train", "epoch": 3, "step": 260, "step_in_epoch": 60, "loss": 4.0,
                "perplexity": math.exp(4.0), "kl": 0.01, "grad_norm": 1.0,
                "learning_rate": 0.5, "tokens_per_second": 700.0, "nonfinite_steps": 0})
  assert lines == ["epoch 3 lr 0.5 step 60/100 | loss 4.000 ppl 54.60 kl 0.0100 | 700 tok/s "
                   "| eta 0m40s"]


def test_progress_in_a_non_terminal_is_plain_lines_with_the_records_numbers(tmp_path,
                                                                          run_module):
  workdir = tmp_path / "run"
  result = run_module("tied_lm.main", "--config=configs/default.py", f"--workdir={workdir}",
                      "--config.num_epochs=1", "--config.max_steps_per_epoch=12",
                      "--config.log_every_steps=4")
  assert result.returncode == 0, result.stderr[-2000:]
  output = result.stdout + result.stderr
  assert "\r" not in output
  logged = re.findall(
      r"epoch 1 lr 1 step (\d+)/12 \| loss ([\d.]+) ppl ([\d.]+) kl ([\d.]+)", output
  )
  records = reporting.read_records(workdir, "train")
  assert [int(step) for step, *_ in logged] == [4, 8, 12]
  for (_, loss, perplexity, kl), record in zip(logged, records, strict=True):
    assert (loss, perplexity, kl) == (
        f"{record['loss']:.3f}", f"{record['perplexity']:.2f}", f"{record['kl']:.4f}"
    )


def test_a_progress_bar_shows_the_interval_numbers(tmp_path, monkeypatch):
  stdout = io.StringIO()
  monkeypatch.setattr(sys, "stdout", stdout)
  reporter = reporting.Reporter(
      tmp_path, [], writer=False, config=default.get_config(), progress_bar=True
  )
  reporter.start_epoch(epoch=3, num_steps=10, first_step=4)
  for _ in range(6):
    reporter.advance()
  reporter.add({"kind": "train", "epoch": 3, "step": 30, "step_in_epoch": 10, "loss": 2.0,
                "perplexity": math.exp(2.0), "kl": 0.01, "grad_norm": 1.0,
                "learning_rate": 0.5, "tokens_per_second": 1234.0, "nonfinite_steps": 0})
  reporter.end_epoch()
  shown = stdout.getvalue()
  assert "epoch 3" in shown and "10/10" in shown
  assert "ppl=7.39" in shown and "tok_s=1234" in shown


def test_read_records_counts_records_without_a_kind_as_epochs_and_no_file_as_none(tmp_path):
  assert reporting.read_records(tmp_path, "epoch") == []
  (tmp_path / "metrics.jsonl").write_text(
      '{"epoch": 1, "valid_perplexity": 200.0}\n{"kind": "train", "step": 5}\n\n'
      '{"kind": "epoch", "epoch": 2, "valid_perplexity": 150.0}\n')
  assert [r["epoch"] for r in reporting.read_records(tmp_path, "epoch")] == [1, 2]
  assert len(reporting.read_records(tmp_path)) == 3


def test_the_running_clock_leaves_out_a_stop_and_counts_it_as_paused(run_python_that_stops):
  script = """
import json, sys
from tied_lm import reporting
with reporting.RunningClock(tick=0.05, slack=0.5) as clock:
  stop_this_process(2.0)
  with_thread = clock.read()
# Read at once after a stop, with no thread to have noticed it: the reading counts it.
without_thread = reporting.RunningClock(tick=0.05, slack=0.5)
stop_this_process(2.0)
print(json.dumps([with_thread, without_thread.read()]))
"""
  process = run_python_that_stops(script)
  assert process.returncode == 0, process.stderr
  for running, paused in json.loads(process.stdout):
    assert 1.5 < paused < 4.0
    assert running < 0.5


def test_the_running_clock_counts_busy_time_and_waits_as_running():
  with reporting.RunningClock(tick=0.05, slack=0.1) as clock:
    start = time.monotonic()
    while time.monotonic() - start < 0.3:  # Python code: the thread keeps its ticks
      sum(i for i in range(10_000))
    # One call that holds the GIL, so the thread wakes late, but the process ran.
    call_start = time.monotonic()
    sum(range(20_000_000))
    assert time.monotonic() - call_start > 0.15 + 0.05  # longer than tick + slack
    time.sleep(0.3)  # a wait, not a stop
    running, paused = clock.read()
  assert paused == 0.0
  assert running == pytest.approx(time.monotonic() - start, abs=0.05)


def test_records_match_the_file_test_records_aside_and_nan_as_itself(tmp_path):
  # A skipped interval's NaN loss is not equal to itself: every resume rewrote the file.
  records = [{"kind": "train", "step": 2, "loss": float("nan")}, {"kind": "epoch", "step": 2}]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in [*records, {"kind": "test", "step": 2}]))
  assert reporting.records_match(tmp_path, records)
  assert not reporting.records_match(tmp_path, records[:1])
  (tmp_path / "metrics.jsonl").write_text("{")  # damaged: written again
  assert not reporting.records_match(tmp_path, records)
