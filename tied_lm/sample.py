"""Text from a run's best parameters: python -m tied_lm.sample --workdir=DIR --prompt="...".

  python -m tied_lm.sample --workdir=/tmp/ptb_small_real --prompt="the company said" \
      --num_words=50 --temperature=1.0 --top_k=0 --seed=0

Every next word comes from the model's own logits function (`model.apply`,
the one the loss trains), one word at a time with the recurrent state carried.
Prompt words outside the vocabulary become <unk>, with a warning. The same
seed gives the same text. Words print as they are drawn.
"""

import functools
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from tied_lm import data, errors, losses, models, train
from tied_lm.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that the module imports cleanly."""
  flags.DEFINE_string("workdir", None, "A run directory of tied_lm.main.")
  flags.DEFINE_string("prompt", "the", "Words to start from, separated by spaces.")
  flags.DEFINE_integer("num_words", 50, "How many words to generate.")
  flags.DEFINE_float("temperature", 1.0,
                     "Softmax temperature, in [1.18e-38, 3.4e+38]; lower is more conservative.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely words only (0: all).")
  # jax.random.key keeps a seed's low 32 bits: 2**32 would draw seed 0's words.
  flags.DEFINE_integer("seed", 0, "Random seed.", lower_bound=0, upper_bound=2**32 - 1)
  errors.require_name("workdir", "a run directory of tied_lm.main")


@functools.partial(jax.jit, static_argnames="model")
def next_word_logits(
    params: Any, token: jax.Array, carry: models.Carry, *, model: models.LSTMLanguageModel
) -> tuple[jax.Array, models.Carry]:
  """The model's logits [V] after one more word, and the new carry (batch of one)."""
  logits, carry = model.apply({"params": params}, token.reshape(1, 1), carry, deterministic=True)
  return logits[0, -1], carry


@functools.partial(jax.jit, static_argnames="top_k")
def sample_word(key: jax.Array, logits: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """A word id from softmax(logits / temperature), among the top_k most likely (0: all)."""
  # Shifted so that none overflows: at a tiny temperature the top word keeps 0 and the
  # others go to -inf, which is greedy decoding.
  logits = (logits - jnp.max(logits)) / temperature
  if top_k:
    kth_largest = jax.lax.top_k(logits, top_k)[0][-1]
    logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
  return jax.random.categorical(key, logits)


def encode_prompt(prompt: str, vocab: Sequence[str]) -> list[int]:
  """Word ids of the prompt; unknown words become <unk>, with a warning."""
  index = {word: i for i, word in enumerate(vocab)}
  words = prompt.split()
  if not words:
    raise UserError("the prompt is empty")
  unknown = [w for w in words if w not in index]
  if unknown:
    if data.UNK not in index:
      raise UserError(f"{', '.join(unknown)} not in the vocabulary, which has no {data.UNK}")
    logging.warning("not in the vocabulary, read as %s: %s", data.UNK, ", ".join(unknown))
  return [index.get(w, index.get(data.UNK)) for w in words]


def generate(
    run: train.TrainedRun, prompt: str, num_words: int, temperature: float, top_k: int, seed: int
) -> Iterator[str]:
  """The generated words (without the prompt), each as soon as it is drawn.

  The arguments are checked here, before the first word: bad ones raise UserError.
  """
  if not losses.is_temperature(temperature):  # 1e-50 was 0 in float32: word id 0 each time
    low, high = losses.TEMPERATURE_RANGE
    raise UserError(f"temperature={temperature} must be in [{low:.3g}, {high:.3g}] (float32's "
                    "positive normal numbers)")
  if num_words < 0:
    raise UserError(f"num_words={num_words} must be >= 0")
  if not 0 <= top_k <= run.corpus.vocab_size:
    raise UserError(f"top_k={top_k} must be in [0, {run.corpus.vocab_size}]")
  return _draw(run, encode_prompt(prompt, run.corpus.vocab), num_words, temperature, top_k, seed)


def _draw(run: train.TrainedRun, prompt_tokens: list[int], num_words: int, temperature: float,
          top_k: int, seed: int) -> Iterator[str]:
  # float32, as evaluation scores the model, whatever the training precision.
  model = run.model.for_evaluation(1)
  carry = model.initial_carry(1)
  for token in prompt_tokens:
    logits, carry = next_word_logits(run.params, jnp.int32(token), carry, model=model)
  key = jax.random.key(seed)
  for position in range(num_words):
    key, subkey = jax.random.split(key)
    token = sample_word(subkey, logits, temperature, top_k)
    yield run.corpus.vocab[int(token)]
    if position + 1 < num_words:  # nothing follows the last word
      logits, carry = next_word_logits(run.params, token, carry, model=model)


def print_words(words: Iterable[str]) -> None:
  """Prints words as they come, separated by spaces, with a line break for each <eos>."""
  at_line_start = True
  for word in words:
    if word == data.EOS:
      print(flush=True)
    else:
      print(word if at_line_start else f" {word}", end="", flush=True)
    at_line_start = word == data.EOS
  if not at_line_start:
    print()


@errors.command
def main(argv: list[str]) -> None:
  errors.no_positional_arguments(argv)
  run = train.load_trained(FLAGS.workdir)
  words = generate(run, FLAGS.prompt, FLAGS.num_words, FLAGS.temperature, FLAGS.top_k, FLAGS.seed)
  print_words(itertools.chain(FLAGS.prompt.split(), words))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
