"""python -m experiments.target_sharpness: ỹ's entropy in a trained run, against NumPy."""

import json

import numpy as np
import pytest


@pytest.fixture
def sharpness_cli(run_module):
  return lambda *args: run_module("experiments.target_sharpness", *args)


def test_cli_matches_numpy_on_a_trained_run(trained_run, tmp_path, sharpness_cli):
  from tied_lm import train

  workdir = str(trained_run[0])
  result = sharpness_cli(f"--workdirs={workdir}", "--taus=0.05,10",
                         f"--output={tmp_path / 'sharp'}")
  assert result.returncode == 0, result.stderr
  rows = json.loads((tmp_path / "sharp.json").read_text())["rows"]
  assert (tmp_path / "sharp.md").read_text() == result.stdout
  run = train.load_trained(workdir)
  embedding = np.asarray(run.params["embed"]["embedding"], np.float64)
  targets = np.asarray(run.corpus.valid)
  # ỹ is a function of the word: the mean over tokens weights each word's by its count.
  words, counts = np.unique(targets, return_counts=True)
  for row, tau in zip(rows, [0.05, 10.0], strict=True):
    assert row["tau"] == tau and row["tokens"] == len(targets)
    log_target = embedding[words] @ embedding.T / tau
    log_target -= log_target.max(1, keepdims=True)
    log_target -= np.log(np.exp(log_target).sum(1, keepdims=True))
    entropy = -(np.exp(log_target) * log_target).sum(1)
    own = np.exp(log_target[np.arange(len(words)), words])
    np.testing.assert_allclose(row["entropy"], counts @ entropy / len(targets), rtol=1e-4)
    np.testing.assert_allclose(row["target_probability"], counts @ own / len(targets), rtol=1e-4)
  np.testing.assert_allclose(
      rows[0]["mean_squared_norm"],
      (np.asarray(run.params["embed"]["embedding"])[run.corpus.valid] ** 2).sum(1).mean(),
      rtol=1e-5)
  # At a tiny τ ỹ puts nearly all its mass on the target; at τ = 10 it is near uniform.
  assert rows[0]["target_probability"] > rows[1]["target_probability"]
  # Tied: W = Lᵀ, so no distance between them is reported.
  assert rows[0]["embedding_classifier_distance"] is None
  assert all(line.split(" | ")[3] == "tied" for line in result.stdout.splitlines()[2:])


def test_cli_reports_how_far_an_untied_classifier_is_from_the_embedding(tmp_path, sharpness_cli):
  from configs import default
  from tied_lm import analysis, train

  config = default.get_config()
  config.model.tie_embeddings = False
  config.num_epochs, config.max_steps_per_epoch = 1, 3
  workdir = tmp_path / "untied"
  train.train_and_evaluate(config, str(workdir))
  result = sharpness_cli(f"--workdirs={workdir}", "--taus=10", f"--output={tmp_path / 'sharp'}")
  assert result.returncode == 0, result.stderr
  [row] = json.loads((tmp_path / "sharp.json").read_text())["rows"]
  params = train.load_trained(workdir).params
  embedding, classifier = np.asarray(params["embed"]["embedding"]), analysis.output_matrix(params)
  assert classifier.shape == embedding.shape
  expected = analysis.subspace_distance(embedding, classifier)
  assert 0.5 < expected < 1.0  # two nearly unrelated random 64-dimensional subspaces
  np.testing.assert_allclose(row["embedding_classifier_distance"], expected, rtol=1e-6)
  assert result.stdout.splitlines()[2].split(" | ")[3] == f"{expected:.3f}"


def test_cli_refuses_a_bad_tau_in_one_line(trained_run, sharpness_cli):
  result = sharpness_cli(f"--workdirs={trained_run[0]}", "--taus=0")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --taus=0: every τ must be in [1.18e-38, 3.4e+38] (float32's positive normal "
      "numbers)"]
  result = sharpness_cli(f"--workdirs={trained_run[0]}", "--taus=2,2.0")
  assert (result.returncode, result.stderr.strip()) == (
      2, "error: --taus repeats a value: 2, 2.0")
  result = sharpness_cli(f"--workdirs={trained_run[0]}", "--output=/dev/null/x")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: cannot write the folder of --output /dev/null: /dev/null is not a directory"]


def test_every_run_is_loaded_before_any_is_measured(trained_run, tmp_path, run_module_unscored):
  # A bad last workdir was refused only after the earlier runs were measured.
  result = run_module_unscored(
      "experiments.target_sharpness", "target_sharpness",
      f"--workdirs={trained_run[0]},{trained_run[0]}/nowhere", f"--output={tmp_path / 'out'}")
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      f"error: {trained_run[0]}/nowhere does not exist"]
  assert not list(tmp_path.glob("out*"))
