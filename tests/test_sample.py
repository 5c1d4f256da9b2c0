"""python -m tied_lm.sample: the model's own logits, top-k, <unk> prompts, determinism."""

import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tied_lm import losses, sample, train
from tied_lm.errors import UserError

FLOAT32_RANGE = "[1.18e-38, 3.4e+38] (float32's positive normal numbers)"


@pytest.fixture
def sample_cli(run_module):
  return lambda workdir, *args: run_module("tied_lm.sample", f"--workdir={workdir}", *args)


def test_word_by_word_logits_are_the_models_logits_over_the_window(trained_run):
  run = train.load_trained(trained_run[0])
  tokens = sample.encode_prompt("the company said it expects", run.corpus.vocab)
  window_logits, _ = run.model.apply(
      {"params": run.params}, jnp.asarray([tokens]), run.model.initial_carry(1),
      deterministic=True,
  )
  carry = run.model.initial_carry(1)
  for position, token in enumerate(tokens):
    logits, carry = sample.next_word_logits(run.params, jnp.int32(token), carry, model=run.model)
    np.testing.assert_allclose(logits, window_logits[0, position], rtol=1e-5, atol=1e-5)


def test_top_k_samples_only_among_the_k_largest():
  logits = jnp.asarray([0.0, 3.0, 1.0, 2.5, -1.0])
  drawn = {int(sample.sample_word(jax.random.key(i), logits, 1.0, 2)) for i in range(200)}
  assert drawn == {1, 3}
  assert {int(sample.sample_word(jax.random.key(i), logits, 1.0, 1)) for i in range(20)} == {1}
  # Without top-k every word can come up.
  assert len({int(sample.sample_word(jax.random.key(i), logits, 5.0, 0))
              for i in range(400)}) == 5


@pytest.mark.parametrize("temperature,top_k", [(2.0, 0), (0.5, 0), (2.0, 2)])
def test_words_come_with_the_frequencies_of_the_tempered_softmax(temperature, top_k):
  logits = jnp.asarray([0.0, 1.0, 2.0, -1.0])
  draws = jax.vmap(lambda key: sample.sample_word(key, logits, temperature, top_k))(
      jax.random.split(jax.random.key(0), 20_000))
  kept = logits if not top_k else jnp.where(logits >= jnp.sort(logits)[-top_k], logits, -jnp.inf)
  expected = jax.nn.softmax(kept / temperature)
  frequencies = np.bincount(np.asarray(draws), minlength=4) / 20_000
  np.testing.assert_allclose(frequencies, expected, atol=0.012)  # 3.5 standard errors


def test_each_word_is_drawn_from_the_logits_after_the_prompt_and_all_words_before_it(
    trained_run, monkeypatch):
  # The carry goes from word to word: the logits of each draw are the model's over the
  # whole text so far.
  run = train.load_trained(trained_run[0])
  drawn_from = []
  original = sample.sample_word

  def spy(key, logits, temperature, top_k):
    drawn_from.append(np.asarray(logits))
    return original(key, logits, temperature, top_k)

  monkeypatch.setattr(sample, "sample_word", spy)
  prompt = sample.encode_prompt("the company said", run.corpus.vocab)
  words = list(sample.generate(run, "the company said", 6, 1.0, 0, 5))
  index = {word: i for i, word in enumerate(run.corpus.vocab)}
  text = prompt + [index[word] for word in words]
  text_logits, _ = run.model.apply({"params": run.params}, jnp.asarray([text[:-1]]),
                                   run.model.initial_carry(1), deterministic=True)
  assert len(drawn_from) == 6
  for position, logits in enumerate(drawn_from):
    np.testing.assert_allclose(logits, text_logits[0, len(prompt) - 1 + position],
                               rtol=1e-5, atol=1e-5)


def test_sampling_is_deterministic_per_seed_and_maps_unknown_words(trained_run, sample_cli,
                                                                    capsys):
  workdir, _ = trained_run
  args = ["--prompt=the zzyzx company", "--num_words=20", "--seed=3"]
  first, second = sample_cli(workdir, *args), sample_cli(workdir, *args)
  assert first.returncode == 0, first.stderr
  assert first.stdout == second.stdout
  assert "not in the vocabulary, read as <unk>: zzyzx" in first.stderr
  words = list(sample.generate(train.load_trained(workdir), "the zzyzx company", 20, 1.0, 0, 3))
  assert len(words) == 20
  sample.print_words(["the", "zzyzx", "company", *words])  # the prompt as typed, then words
  assert first.stdout == capsys.readouterr().out
  other_seed = sample_cli(workdir, *args[:-1], "--seed=4")
  assert other_seed.stdout != first.stdout


def test_words_print_as_they_come_with_a_line_break_for_each_eos(capsys):
  def words():
    yield from ["the", "company"]
    assert capsys.readouterr().out == "the company"  # printed before the next word is drawn
    yield from ["<eos>", "<eos>", "it", "said", "<eos>"]

  sample.print_words(words())
  assert capsys.readouterr().out == "\n\nit said\n"
  sample.print_words(["a", "<eos>", "b"])
  assert capsys.readouterr().out == "a\nb\n"
  sample.print_words([])
  assert capsys.readouterr().out == ""


@pytest.mark.parametrize("args,message", [
    (["--temperature=0"], f"temperature=0.0 must be in {FLOAT32_RANGE}"),
    # 0 in float32: every word was id 0.
    (["--temperature=1e-50"], f"temperature=1e-50 must be in {FLOAT32_RANGE}"),
    (["--top_k=-1"], "top_k=-1 must be in [0, 10000]"),
    (["--prompt= "], "the prompt is empty"),
    # jax.random.key keeps the low 32 bits: 2**32 drew seed 0's words.
    (["--seed=4294967296"],
     "flag --seed=4294967296: 4294967296 is not an integer in the range [0, 4294967295]"),
])
def test_bad_sampling_arguments_are_one_line(trained_run, args, message, sample_cli):
  result = sample_cli(trained_run[0], *args)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == f"error: {message}"


def test_a_nan_temperature_and_a_negative_length_are_refused(trained_run):
  run = train.load_trained(trained_run[0])
  with pytest.raises(UserError, match=r"temperature=nan must be in \[1.18e-38, 3.4e\+38\]"):
    sample.generate(run, "the", 5, float("nan"), 0, 0)
  with pytest.raises(UserError, match="num_words=-3 must be >= 0"):
    sample.generate(run, "the", -3, 1.0, 0, 0)


def test_the_smallest_temperature_samples_the_most_likely_word():
  # Unshifted, 4.5 / 1.18e-38 and 5.0 / 1.18e-38 both overflowed to inf: a tie.
  logits = jnp.array([4.5, 5.0, -2.0])
  temperature = losses.TEMPERATURE_RANGE[0]
  words = [int(sample.sample_word(jax.random.key(seed), logits, temperature, 0))
           for seed in range(20)]
  assert words == [1] * 20


def test_a_bfloat16_trained_run_samples_from_its_float32_logits(trained_run, monkeypatch):
  run = train.load_trained(trained_run[0])
  bfloat16_run = run._replace(model=run.model.clone(compute_dtype="bfloat16"))
  dtypes = []
  original = sample.next_word_logits

  def spy(params, token, carry, *, model):
    dtypes.append(model.compute_dtype)
    return original(params, token, carry, model=model)

  monkeypatch.setattr(sample, "next_word_logits", spy)
  words = list(sample.generate(bfloat16_run, "the company", 5, 1.0, 0, 3))
  # One step per prompt word and per drawn word but the last, which nothing follows.
  assert dtypes == ["float32"] * (2 + 5 - 1)
  assert words == list(sample.generate(run, "the company", 5, 1.0, 0, 3))


def test_prompt_words_map_to_their_ids_and_unknown_ones_to_unk_with_one_warning(
    trained_run, caplog):
  vocab = train.load_trained(trained_run[0]).corpus.vocab
  index = {word: i for i, word in enumerate(vocab)}
  prompt = "the zzyzx company said it qq expects"
  assert sample.encode_prompt(prompt, vocab) == [
      index[w] if w in index else index["<unk>"] for w in prompt.split()]
  assert index["<unk>"] != 0 and sample.encode_prompt("zzyzx", vocab) == [index["<unk>"]]
  assert "not in the vocabulary, read as <unk>: zzyzx, qq" in caplog.text
  # Case matters: the vocabulary is lower case, and "The" is not in it.
  assert sample.encode_prompt("The", vocab) == [index["<unk>"]]


def test_a_vocabulary_without_unk_refuses_unknown_words():
  with pytest.raises(UserError, match="^zzyzx, qq not in the vocabulary, which has no <unk>$"):
    sample.encode_prompt("the zzyzx qq", ("the", "a"))


def test_generate_checks_every_argument_before_the_first_word(trained_run):
  # generate is not a generator: each error comes from the call itself.
  run = train.load_trained(trained_run[0])
  with pytest.raises(UserError, match="the prompt is empty"):
    sample.generate(run, "  ", 5, 1.0, 0, 0)
  with pytest.raises(UserError, match=r"^top_k=10001 must be in \[0, 10000\]$"):
    sample.generate(run, "the", 5, 1.0, 10_001, 0)


def test_top_k_of_the_whole_vocabulary_and_zero_words_are_allowed(trained_run):
  run = train.load_trained(trained_run[0])
  assert list(sample.generate(run, "the", 8, 1.0, run.corpus.vocab_size, 1)) == list(
      sample.generate(run, "the", 8, 1.0, 0, 1))
  assert list(sample.generate(run, "the", 0, 1.0, 0, 1)) == []


def test_each_draw_has_its_own_key_and_every_seed_its_own_words(trained_run):
  # At the top temperature every word is about equally likely: 20 draws with one key
  # each are 20 different words, and so are the texts of different seeds.
  run = train.load_trained(trained_run[0])
  hottest = losses.TEMPERATURE_RANGE[1]
  words = list(sample.generate(run, "the", 20, hottest, 0, 0))
  assert len(set(words)) >= 15
  texts = {tuple(sample.generate(run, "the", 5, hottest, 0, seed))
           for seed in (0, 1, 4, 2**31 - 1)}
  assert len(texts) == 4


def test_each_word_is_flushed_as_it_is_printed(monkeypatch):
  class Stdout(io.StringIO):
    flushed = ""

    def flush(self):
      self.flushed = self.getvalue()

  stdout = Stdout()
  monkeypatch.setattr(sys, "stdout", stdout)

  def words():
    yield "the"
    assert stdout.flushed == "the"
    yield "<eos>"
    assert stdout.flushed == "the\n"
    yield "company"
    assert stdout.flushed == "the\ncompany"

  sample.print_words(words())
  assert stdout.getvalue() == "the\ncompany\n"


def test_the_defaults_are_50_words_after_the_at_temperature_1_seed_0(trained_run, sample_cli,
                                                                        capsys):
  workdir, _ = trained_run
  result = sample_cli(workdir)
  assert result.returncode == 0, result.stderr
  words = list(sample.generate(train.load_trained(workdir), "the", 50, 1.0, 0, 0))
  sample.print_words(["the", *words])
  assert result.stdout == capsys.readouterr().out


def test_stray_arguments_are_one_line(trained_run, sample_cli):
  result = sample_cli(trained_run[0], "stray")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == "error: unexpected arguments: stray"
