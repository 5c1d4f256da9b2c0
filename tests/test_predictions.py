"""experiments/predictions.py on a tiny trained run."""

import json

import numpy as np
import pytest


def np_log_softmax(x):
  return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_predictions_cli_reports_probabilities_and_top_words(trained_run, tmp_path, run_module):
  result = run_module("experiments.predictions", f"--workdirs={trained_run[0]}",
                      "--prompt=the company said", "--prompt=zzzz market",
                      f"--output={tmp_path / 'p'}")
  assert result.returncode == 0, result.stderr
  assert "read as <unk>: zzzz" in result.stderr  # unknown prompt words, with a warning
  run = json.loads((tmp_path / "p.json").read_text())["runs"][0]
  # <unk>, then PTB's five most frequent training words.
  assert list(run["average_probability"]) == ["<unk>", "the", "<eos>", "N", "of", "to"]
  assert all(0 < p < 1 for p in run["average_probability"].values())
  top = run["top_next_words"]["the company said"]
  assert len(top) == 10
  probabilities = [p for _, p in top]
  assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1
  # The same list from the run's checkpoint, by hand: softmax of the logits after the prompt.
  from tied_lm import train

  trained = train.load_trained(trained_run[0])
  vocab = trained.corpus.vocab
  prompt = np.array([[vocab.index(w) for w in ("the", "company", "said")]], np.int32)
  logits, _ = trained.model.apply({"params": trained.params}, prompt,
                                  trained.model.initial_carry(1), deterministic=True)
  expected = np.exp(np_log_softmax(np.asarray(logits[0, -1], np.float64)))
  order = np.argsort(-expected)[:10]
  assert [w for w, _ in top] == [vocab[i] for i in order]
  np.testing.assert_allclose(probabilities, expected[order], rtol=1e-5)
  assert "| run | variant | p(<unk>) |" in (tmp_path / "p.md").read_text()
  # Each word's own mean probability over the validation text (tests/test_analysis.py
  # checks average_probabilities against a direct softmax).
  from tied_lm import analysis

  words = list(run["average_probability"])
  expected = analysis.average_probabilities(
      trained.model, trained.params, trained.corpus.valid, [vocab.index(w) for w in words])
  np.testing.assert_allclose([run["average_probability"][w] for w in words], expected,
                             rtol=1e-5)


def test_predictions_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, run_module):
  result = run_module("experiments.predictions", f"--workdirs={tmp_path}")
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1
  assert result.stderr.startswith("error: ")


@pytest.mark.parametrize("flags", [["--prompt=the", "--prompt=  "],
                                   ["--workdirs={run},{run}/nowhere"]])
def test_every_run_and_prompt_is_checked_before_any_run_is_scored(
    trained_run, tmp_path, run_module_unscored, flags):
  # A bad last workdir or prompt was refused only after the earlier runs were scored
  # (minutes at the paper's sizes).
  result = run_module_unscored(
      "experiments.predictions", "average_probabilities", f"--workdirs={trained_run[0]}",
      f"--output={tmp_path / 'out'}", *(f.format(run=trained_run[0]) for f in flags))
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
  assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("flag, message", [
    ("--num_frequent=-1", "error: --num_frequent=-1 must be >= 0"),
    ("--output=", "error: --output='' must be a file prefix, e.g. experiments/results/NAME"),
])
def test_bad_flags_are_one_line_before_any_run_is_read(flag, message, tmp_path, run_module):
  result = run_module("experiments.predictions", f"--workdirs={tmp_path}", flag)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [message]


def test_the_table_shows_each_runs_own_words_and_labels_lists_by_run():
  # The columns came from the first run (a WikiText-2 run's p(<eos>) read nan and its own
  # words were left out), and the top-10 lists were labelled by variant alone.
  from experiments import predictions

  runs = [{"workdir": "/r/a/run", "variant": "real",
           "average_probability": {"<unk>": 0.05, "the": 0.04},
           "top_next_words": {"in new york": [("city", 0.5)]}},
          {"workdir": "/r/b/run", "variant": "real",
           "average_probability": {"<unk>": 0.02, ",": 0.03},
           "top_next_words": {"in new york": [("stock", 0.25)]}}]
  assert predictions.markdown(runs).splitlines() == [
      "| run | variant | p(<unk>) | p(the) | p(,) |",
      "|---|---|---|---|---|",
      "| /r/a/run | real | 0.0500 | 0.0400 | - |",
      "| /r/b/run | real | 0.0200 | - | 0.0300 |",
      "",
      "Top 10 after *in new york*:",
      "",
      "- /r/a/run (real): city 0.500",
      "- /r/b/run (real): stock 0.250"]
