"""python -m experiments.subspace_distance: bad flags are one-line errors, before any training;
the slice, the table and a tiny sweep."""

import json

import numpy as np
import pytest

from experiments import subspace_distance
from tied_lm.errors import UserError

TAU_ERROR = "error: every τ must be in [1.18e-38, 3.4e+38] (float32's positive normal numbers): "


@pytest.mark.parametrize(("flag", "message"), [
    ("--betas=x", "error: --betas, --taus and --seeds take numbers: "
                  "could not convert string to float: 'x'\n"),
    ("--betas=1.5", "error: every β must be in [0, 1]: 1.5\n"),
    ("--taus=nan", TAU_ERROR + "nan\n"),
    ("--taus=1e-39", TAU_ERROR + "1e-39\n"),
    ("--learning_rate=0", "error: --learning_rate=0.0 must be finite and > 0\n"),
    ("--hidden_size=0", "error: --hidden_size=0 must be at least 1\n"),
    ("--batch_size=0", "error: --batch_size=0 must be at least 1\n"),
    ("--num_steps=-1", "error: --num_steps=-1 must be at least 1\n"),
    # The range said [2, ...] while fewer than one batch, 720 words, failed later.
    ("--num_words=719", "error: --num_words=719 must be in [720, 929,589] (one batch of "
     "--batch_size rows of --num_steps + 1 words; PTB train's length)\n"),
    ("--num_words=2000000", "error: --num_words=2000000 must be in [720, 929,589] (one batch "
     "of --batch_size rows of --num_steps + 1 words; PTB train's length)\n"),
    ("--output=", "error: --output='' must be a file prefix, e.g. experiments/results/NAME\n"),
    # A repeated seed was trained again and counted twice in mean ± std.
    ("--seeds=0,0", "error: --seeds repeats a value: 0, 0\n"),
    ("--seeds=99999999999999999999", "error: every seed must be in [0, 2**32): "
     "99999999999999999999\n"),
])
def test_bad_flags_are_one_line_errors(flag, message, tmp_path, run_module):
  result = run_module("experiments.subspace_distance", f"--output={tmp_path / 'out'}", flag)
  assert result.returncode == 2
  assert result.stderr == message
  assert list(tmp_path.iterdir()) == []


def test_slice_ids_renumbers_the_words_of_the_slice():
  ids, vocab_size = subspace_distance.slice_ids(np.array([5, 3, 5, 9, 3, 7]), 5, minimum=2)
  assert ids.tolist() == [1, 0, 1, 2, 0] and vocab_size == 3


def test_a_batch_longer_than_the_text_blames_the_batch_not_num_words():
  # --batch_size=100000 said "--num_words=20000 must be in [3,600,000, 929,589]".
  with pytest.raises(UserError, match=r"^one batch of --batch_size rows of --num_steps \+ 1 "
                     r"words, 7 words, is more than PTB train's 6: lower --batch_size"):
    subspace_distance.slice_ids(np.arange(6), 5, minimum=7)
  with pytest.raises(UserError, match=r"^--num_words=1 must be in \[2, 6\]"):
    subspace_distance.slice_ids(np.arange(6), 1, minimum=2)


def test_the_table_takes_each_seeds_final_distance_and_beta_zero_for_every_tau():
  runs = [{"beta": 0.0, "tau": None, "seed": 0, "distance": [0.5, 0.9]},
          {"beta": 0.0, "tau": None, "seed": 1, "distance": [0.5, 1.0]},
          {"beta": 1.0, "tau": 2.0, "seed": 0, "distance": [0.8, 0.5]},
          {"beta": 1.0, "tau": 2.0, "seed": 1, "distance": [0.7, 0.3]},
          {"beta": 1.0, "tau": 10.0, "seed": 0, "distance": [0.9, 0.1]},
          {"beta": 1.0, "tau": 10.0, "seed": 1, "distance": [0.9, 0.2]}]
  results = {"betas": [0.0, 1.0], "taus": [2.0, 10.0], "runs": runs}
  assert subspace_distance.table(results).splitlines() == [
      "| β | τ = 2 | τ = 10 |", "|---|---|---|",
      "| 0 | 0.950 ± 0.050 | 0.950 ± 0.050 |", "| 1 | 0.400 ± 0.100 | 0.150 ± 0.050 |"]


def test_a_tiny_sweep_writes_every_runs_curves_the_table_and_the_plot(tmp_path, run_module):
  result = run_module("experiments.subspace_distance", f"--output={tmp_path / 'out'}",
                      "--betas=0,1", "--taus=10", "--seeds=0", "--num_words=200",
                      "--hidden_size=4", "--batch_size=2", "--num_steps=5", "--num_epochs=2")
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads((tmp_path / "out.json").read_text())
  assert [(r["beta"], r["tau"], r["seed"]) for r in results["runs"]] == [
      (0.0, None, 0), (1.0, 10.0, 0)]
  for run in results["runs"]:
    assert len(run["distance"]) == len(run["cross_entropy"]) == len(run["kl"]) == 2
    assert all(0 <= d <= 1 for d in run["distance"])
  table = subspace_distance.table(results)
  assert table in (tmp_path / "out.md").read_text() and table in result.stdout
  assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"

