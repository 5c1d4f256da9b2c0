"""Nearest words in a run's embedding: python -m tied_lm.neighbors --workdir=DIR --words=a,b.

  python -m tied_lm.neighbors --workdir=/tmp/ptb_small_real --words=money,july,the --k=10

Neighbours by cosine similarity between rows of the input embedding L (with
tying, also the output classifier's rows).
"""


import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from tied_lm import analysis, errors, train
from tied_lm.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that the module imports cleanly."""
  flags.DEFINE_string("workdir", None, "A run directory of tied_lm.main.")
  flags.DEFINE_list("words", None, "Words to look up, comma-separated.")
  flags.DEFINE_integer("k", 10, "Neighbours per word.")
  errors.require_name("workdir", "a run directory of tied_lm.main")
  errors.require_values("words")


def nearest_neighbors(
    embedding: np.ndarray, vocab: tuple[str, ...], words: list[str], k: int
) -> dict[str, list[tuple[str, float]]]:
  """For each word, its k nearest other words by cosine similarity of [V, E] embedding rows."""
  if not all(words):
    raise UserError("an empty word in the list (two commas in a row?)")
  index = {word: i for i, word in enumerate(vocab)}
  unknown = [w for w in words if w not in index]
  if unknown:
    raise UserError(f"not in the vocabulary: {', '.join(unknown)}")
  if not 0 < k < len(vocab):
    raise UserError(f"k={k} must be in [1, {len(vocab) - 1}]")
  unit = analysis.normalize_rows(jnp.asarray(embedding))
  result = {}
  for word in words:
    similarity = unit @ unit[index[word]]
    similarity = similarity.at[index[word]].set(-jnp.inf)  # not its own neighbour
    values, ids = (np.asarray(x) for x in jax.lax.top_k(similarity, k))
    result[word] = [(vocab[i], float(v)) for i, v in zip(ids, values, strict=True)]
  return result


@errors.command
def main(argv: list[str]) -> None:
  errors.no_positional_arguments(argv)
  run = train.load_trained(FLAGS.workdir)
  neighbors = nearest_neighbors(
      run.params["embed"]["embedding"], run.corpus.vocab, FLAGS.words, FLAGS.k
  )
  for word, found in neighbors.items():
    print(f"{word}: " + ", ".join(f"{w} ({s:.3f})" for w, s in found))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
