"""python -m tied_lm.evaluate: the run's own numbers, any batch size, one-line errors."""

import json
import shutil
import subprocess
import sys

import pytest

from tied_lm import provenance


@pytest.fixture
def evaluate_cli(run_module):
  return lambda *args: run_module("tied_lm.evaluate", *args)


@pytest.fixture
def run_copy(trained_run, tmp_path):
  """A copy of the trained run, to write evaluations into, and its results."""
  workdir, results = trained_run
  shutil.copytree(workdir, tmp_path / "run")
  return tmp_path / "run", results


def test_evaluate_reproduces_the_runs_test_perplexity(run_copy, evaluate_cli):
  workdir, results = run_copy
  result = evaluate_cli(f"--workdir={workdir}", "--split=test", "--eval_batch_size=10")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(
      f"test perplexity {results['test_perplexity']:.2f} over 82,429 tokens (eval batch 10"
  )
  saved = json.loads((workdir / "eval_test_batch10.json").read_text())
  assert saved["perplexity"] == pytest.approx(results["test_perplexity"], rel=1e-6)
  assert saved["tokens_scored"] == 82_429 == results["test_tokens_scored"]
  # What scored it, as every results file says.
  assert saved["command"] == (f"python -m tied_lm.evaluate --workdir={workdir} --split=test "
                              "--eval_batch_size=10")
  assert saved["commit"] == provenance.git_commit()
  assert saved["versions"]["jax"] and saved["hardware"]


def test_batch_one_scores_the_same_tokens(run_copy, evaluate_cli):
  workdir, results = run_copy
  result = evaluate_cli(f"--workdir={workdir}", "--split=valid", "--eval_batch_size=1")
  assert result.returncode == 0, result.stderr
  saved = json.loads((workdir / "eval_valid_batch1.json").read_text())
  assert saved["tokens_scored"] == results["valid_tokens_scored"] == 73_759
  # Full history for every token can only help a trained model a little, never by much.
  assert saved["perplexity"] == pytest.approx(results["valid_perplexity"], rel=0.05)


# tied_lm.evaluate in a run directory it cannot write into (a reader's, a full disk).
_UNWRITABLE = """
import errno, runpy, sys
from tied_lm import provenance
def write_json(path, result):
  raise OSError(errno.EROFS, "Read-only file system", str(path))
provenance.write_json = write_json
sys.argv = ["tied_lm.evaluate", *sys.argv[1:]]
runpy.run_module("tied_lm.evaluate", run_name="__main__", alter_sys=True)
"""


def test_a_result_that_cannot_be_saved_is_still_printed_then_one_line(run_copy):
  workdir, results = run_copy
  result = subprocess.run(
      [sys.executable, "-c", _UNWRITABLE, f"--workdir={workdir}", "--split=test",
       "--eval_batch_size=10"], cwd=provenance.REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stdout.startswith(f"test perplexity {results['test_perplexity']:.2f} over ")
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: could not write {workdir / 'eval_test_batch10.json'}: Read-only file system")


def test_a_folder_where_the_score_goes_is_refused_before_scoring(run_copy, evaluate_cli):
  # It was refused only after the scoring, minutes at batch 1.
  workdir, _ = run_copy
  (workdir / "eval_valid_batch1.json").mkdir()
  result = evaluate_cli(f"--workdir={workdir}", "--split=valid", "--eval_batch_size=1")
  assert (result.returncode, result.stdout, result.stderr.strip().splitlines()[-1]) == (
      2, "", f"error: {workdir / 'eval_valid_batch1.json'} is a folder, where the score goes: "
      "move it away")


def test_a_run_trained_with_cudnn_is_evaluated_with_the_scan_off_gpu(run_copy, evaluate_cli):
  workdir, results = run_copy
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["lstm_implementation"] = "cudnn"  # as a GPU run with cuDNN saves it
  (workdir / "config.json").write_text(json.dumps(config))
  result = evaluate_cli(f"--workdir={workdir}", "--split=test", "--eval_batch_size=10")
  assert result.returncode == 0, result.stderr
  saved = json.loads((workdir / "eval_test_batch10.json").read_text())
  assert saved["perplexity"] == pytest.approx(results["test_perplexity"], rel=1e-6)


def test_an_eval_batch_larger_than_the_split_is_one_line(trained_run, evaluate_cli):
  # It ran out of memory (80 GB of logits) with a traceback.
  result = evaluate_cli(f"--workdir={trained_run[0]}", "--split=valid", "--eval_batch_size=73760")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: eval_batch_size=73760 exceeds the 73,759 targets of the valid split: each row "
      "needs at least one"]


def test_a_damaged_config_json_is_one_line_naming_it(run_copy, evaluate_cli):
  workdir, _ = run_copy
  (workdir / "config.json").write_text('{"dataset": "ptb", "mod')  # cut short
  result = evaluate_cli(f"--workdir={workdir}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: {workdir / 'config.json'} is damaged: not JSON (Unterminated string starting at "
      "at line 1); restore or remove it"]


@pytest.mark.parametrize("make,message", [
    (lambda d: d.mkdir(), "is not a tied_lm run (no config.json)"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")),
     "has no checkpoint yet: training writes the first one after checkpoint_every_steps "
     "steps or one epoch"),
    # A file named as a step: "none of the 0 checkpoint(s) ... can be read".
    (lambda d: ((d / "checkpoints").mkdir(parents=True), (d / "config.json").write_text("{}"),
                (d / "checkpoints" / "180").write_text("")),
     "has no checkpoint yet: training writes the first one after checkpoint_every_steps "
     "steps or one epoch"),
])
def test_a_folder_without_a_checkpoint_is_one_line(tmp_path, make, message, evaluate_cli):
  folder = tmp_path / "run"
  make(folder)
  result = evaluate_cli(f"--workdir={folder}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f"error: {folder} {message}"]


@pytest.mark.parametrize("args", [["--help"], ["--workdir=x", "--split=dev"]])
def test_help_and_bad_flags_answer_before_jax_is_imported(args, modules_imported_by):
  status, imported = modules_imported_by("tied_lm.evaluate", *args)
  assert status == (0 if args == ["--help"] else 2)
  assert "absl.flags" in imported and "jax" not in imported
