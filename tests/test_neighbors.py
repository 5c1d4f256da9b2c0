"""python -m tied_lm.neighbors: cosine neighbours, checked against NumPy."""

import numpy as np
import pytest

from tied_lm import neighbors
from tied_lm.errors import UserError


def test_neighbors_by_hand():
  vocab = ("a", "b", "c", "d")
  embedding = np.array([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
  found = neighbors.nearest_neighbors(embedding, vocab, ["a", "c"], k=2)
  assert [w for w, _ in found["a"]] == ["b", "c"]
  assert found["a"][0][1] == pytest.approx(2.0 / np.hypot(2.0, 0.1))
  assert found["a"][1][1] == pytest.approx(0.0, abs=1e-7)
  assert [w for w, _ in found["c"]] == ["b", "a"]
  with pytest.raises(UserError, match="not in the vocabulary: e"):
    neighbors.nearest_neighbors(embedding, vocab, ["e"], k=2)
  # Every other word, and no more: the word itself is never its own neighbour.
  assert [w for w, _ in neighbors.nearest_neighbors(embedding, vocab, ["a"], k=3)["a"]] == [
      "b", "c", "d"]
  for k in (0, 4):
    with pytest.raises(UserError, match=rf"^k={k} must be in \[1, 3\]$"):
      neighbors.nearest_neighbors(embedding, vocab, ["a"], k=k)


def test_neighbors_cli_matches_numpy(trained_run, run_module):
  from tied_lm import train

  run = train.load_trained(trained_run[0])
  result = run_module("tied_lm.neighbors", f"--workdir={trained_run[0]}", "--words=money,the",
                      "--k=5")
  assert result.returncode == 0, result.stderr
  embedding = np.asarray(run.params["embed"]["embedding"])
  unit = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
  vocab = run.corpus.vocab
  for line, word in zip(result.stdout.splitlines(), ["money", "the"], strict=True):
    similarity = unit @ unit[vocab.index(word)]
    similarity[vocab.index(word)] = -np.inf
    expected = [vocab[i] for i in np.argsort(-similarity)[:5]]
    assert line.startswith(f"{word}: ")
    assert [item.split(" (")[0] for item in line[len(word) + 2:].split(", ")] == expected


def test_neighbors_of_a_word_outside_the_vocabulary_is_one_line(trained_run, run_module):
  result = run_module("tied_lm.neighbors", f"--workdir={trained_run[0]}", "--words=the,notaword")
  assert result.returncode == 2
  assert result.stderr == "error: not in the vocabulary: notaword\n"
  result = run_module("tied_lm.neighbors", f"--workdir={trained_run[0]}", "--words=the,,a")
  assert result.returncode == 2
  assert result.stderr == ("error: flag --words=['the', '', 'a']: has an empty entry (two "
                           "commas in a row, or one at either end?)\n")
