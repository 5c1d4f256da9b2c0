"""tied_lm.analysis: subspace distance, the section-5 objective and its training, predictions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tied_lm import analysis, data, losses, models, train


def test_subspace_distance_known_cases():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(40, 5))
  # Same column space, other basis: 0. Orthogonal spaces: 1.
  assert analysis.subspace_distance(a, a @ rng.normal(size=(5, 5))) == pytest.approx(0, abs=1e-6)
  basis = np.linalg.qr(rng.normal(size=(40, 10)))[0]
  assert analysis.subspace_distance(basis[:, :5], basis[:, 5:]) == pytest.approx(1, abs=1e-6)
  # Half of a 2-d space shared: overlap 1 of min(2, 2) -> sqrt(1 - 1/2).
  assert analysis.subspace_distance(basis[:, :2], basis[:, 1:3]) == pytest.approx(np.sqrt(0.5))
  # A subspace of the other: 0, whatever the sizes.
  assert analysis.subspace_distance(basis[:, :2], basis[:, :6]) == pytest.approx(0, abs=1e-6)
  with pytest.raises(ValueError, match="matrices"):
    analysis.subspace_distance(a, rng.normal(size=(39, 5)))


def test_normalize_rows():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
  np.testing.assert_allclose(analysis.normalize_rows(x), [[0.6, 0.8], [0, 0], [0, -1]])


def test_theory_objective_mixes_the_two_terms_as_written():
  keys = jax.random.split(jax.random.key(0), 3)
  logits = jax.random.normal(keys[0], (2, 3, 7))
  targets = jax.random.randint(keys[1], (2, 3), 0, 7)
  embedding = jax.random.normal(keys[2], (7, 4))
  tau, beta = 5.0, 0.25
  total, (cross_entropy, kl) = analysis.theory_objective(logits, targets, embedding, tau, beta)
  expected_ce = losses.cross_entropy(logits, targets).mean()
  expected_kl = losses.augmented_loss(logits, targets, embedding, tau).mean()
  np.testing.assert_allclose(cross_entropy, expected_ce, rtol=1e-6)
  np.testing.assert_allclose(kl, expected_kl, rtol=1e-6)
  np.testing.assert_allclose(
      total, beta * expected_kl * tau**2 * 7 + (1 - beta) * expected_ce, rtol=1e-6)
  only_ce, _ = analysis.theory_objective(logits, targets, embedding, tau, 0.0)
  np.testing.assert_allclose(only_ce, expected_ce, rtol=1e-6)


def _one_step_distance(tau: float, beta: float) -> tuple[float, np.ndarray]:
  """Distance between W and the centred L after one small SGD step from W = 0; and L."""
  ids = np.asarray(np.random.default_rng(0).integers(0, 40, size=45), np.int32)  # one window
  run = analysis.train_theory_model(
      ids, 40, tau=tau, beta=beta, seed=0, hidden_size=6, batch_size=4, num_steps=10,
      num_epochs=1, learning_rate=0.01, init_scale=0.5)
  embedding = np.asarray(run.params["embed"]["embedding"])
  # Softmax ignores a constant added to every logit, so the theory puts W h in the span of
  # the centred L (L minus its mean row), not of L itself.
  centred = embedding - embedding.mean(axis=0)
  return analysis.subspace_distance(centred, analysis.output_matrix(run.params)), embedding


def test_the_augmented_loss_puts_w_in_the_span_of_l_the_more_the_larger_tau():
  """Section 5: at large τ the gradient of J_aug moves W only within L's column space."""
  distance, embedding = _one_step_distance(tau=1000.0, beta=1.0)
  assert distance < 0.01
  np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)
  # At τ = 10 the softmax is less linear; at τ = 1 far less; cross-entropy alone ignores L.
  assert 0.05 < _one_step_distance(tau=10.0, beta=1.0)[0] < 0.2
  assert _one_step_distance(tau=1.0, beta=1.0)[0] > 0.4
  assert _one_step_distance(tau=10.0, beta=0.0)[0] > 0.8


def test_the_theory_model_carries_the_state_across_windows_and_averages_their_terms():
  # Two windows, one epoch, against a loop written out here: window 2 starts from window
  # 1's final state and is scored with the params after one update.
  ids = np.asarray(np.random.default_rng(2).integers(0, 30, size=4 * 2 * 5 + 4), np.int32)
  options = dict(hidden_size=6, num_layers=1, batch_size=4, num_steps=5, learning_rate=0.5,
                 clip_norm=5.0, init_scale=0.5)
  run = analysis.train_theory_model(ids, 30, tau=2.0, beta=0.5, seed=0, num_epochs=1,
                                    **options)
  model = models.LSTMLanguageModel(
      vocab_size=30, embed_dim=6, hidden_size=6, num_layers=1, tie_embeddings=False,
      output_bias=False, init_scale=0.5)
  inputs, targets = data.train_windows(ids, 4, 5)
  assert len(inputs) == 2
  carry = model.initial_carry(4)
  params = model.init(jax.random.key(0), inputs[0], carry, deterministic=True)["params"]
  params["embed"]["embedding"] = analysis.normalize_rows(params["embed"]["embedding"])
  params["output_kernel"]["kernel"] = jnp.zeros_like(params["output_kernel"]["kernel"])
  terms = []
  for window in range(2):
    def objective(params, window=window, carry=carry):
      out = model.apply({"params": params}, inputs[window], carry, deterministic=True,
                        method=models.LSTMLanguageModel.outputs)
      total, window_terms = analysis.theory_objective(
          out.bias_free_logits, targets[window], out.embedding, 2.0, 0.5)
      return total, (window_terms, out.carry)

    grads, (window_terms, carry) = jax.grad(objective, has_aux=True)(params)
    terms.append(window_terms)
    grads = optax.clip_by_global_norm(5.0).update(grads, optax.EmptyState())[0]
    params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    params["embed"]["embedding"] = analysis.normalize_rows(params["embed"]["embedding"])
  assert terms[0][0] != terms[1][0]
  np.testing.assert_allclose(run.cross_entropy, [np.mean([t[0] for t in terms])], rtol=1e-5)
  np.testing.assert_allclose(run.kl, [np.mean([t[1] for t in terms])], rtol=1e-5)
  for got, expected in zip(jax.tree.leaves(run.params), jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_average_probabilities_and_top_next_words_match_a_direct_softmax(monkeypatch):
  model = models.LSTMLanguageModel(vocab_size=9, embed_dim=6, hidden_size=6)
  params = model.init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32), model.initial_carry(1),
                      deterministic=True)["params"]
  ids = np.asarray(np.random.default_rng(0).integers(0, 9, size=23), np.int32)
  # Reference: one row, the whole stream at once.
  logits, _ = model.apply({"params": params}, ids[None, :-1], model.initial_carry(1),
                          deterministic=True)
  probabilities = np.asarray(jax.nn.softmax(logits[0], axis=-1))
  got = analysis.average_probabilities(model, params, ids, [0, 4, 8], batch_size=1, num_steps=5)
  np.testing.assert_allclose(got, probabilities[:, [0, 4, 8]].mean(0), rtol=1e-5)
  with monkeypatch.context() as patch:  # a host one row of logits short
    patch.setattr(train.hostmem, "total_bytes", lambda: 2 * 5 * 9 * 4 - 1)
    with pytest.raises(data.DataError, match="^eval_batch_size=2 needs .* lower eval_batch_size$"):
      analysis.average_probabilities(model, params, ids, [0], batch_size=2, num_steps=5)

  vocab = tuple(f"w{i}" for i in range(9))
  top = analysis.top_next_words(model, params, vocab, list(ids[:6]), k=3)
  last = probabilities[5]
  expected = np.argsort(-last)[:3]
  assert [word for word, _ in top] == [vocab[i] for i in expected]
  np.testing.assert_allclose([p for _, p in top], last[expected], rtol=1e-5)
  # A bfloat16-trained model's lists are computed in float32, as its perplexity is.
  bfloat16_model = model.clone(compute_dtype="bfloat16")
  assert analysis.top_next_words(bfloat16_model, params, vocab, list(ids[:6]), k=3) == top
  with pytest.raises(ValueError, match="^prompt_ids is empty: the next word needs at least one"):
    analysis.top_next_words(model, params, vocab, [], k=3)


@pytest.mark.parametrize("chunk_size", [2, 4096])
def test_target_sharpness_of_orthogonal_words_by_hand(chunk_size):
  # L = c·I: each word's score is c² for itself and 0 for the two others.
  scale, tau = 2.0, 4.0
  embedding = scale * np.eye(3, dtype=np.float32)
  sharpness = analysis.target_sharpness(embedding, np.array([0, 1, 2, 2, 1]), tau, chunk_size)
  own = np.exp(scale**2 / tau) / (np.exp(scale**2 / tau) + 2)
  other = 1 / (np.exp(scale**2 / tau) + 2)
  np.testing.assert_allclose(sharpness.target_probability, own, rtol=1e-6)
  np.testing.assert_allclose(sharpness.entropy, -own * np.log(own) - 2 * other * np.log(other),
                             rtol=1e-6)
  # Words with different ỹ: the mean is over tokens, each word weighted by its count.
  embedding = np.diag([2.0, 1.0, 0.0]).astype(np.float32)
  targets = np.array([0, 1, 2, 2, 1, 2])
  log_target = embedding[targets] @ embedding.T / tau
  log_target -= np.log(np.exp(log_target).sum(1, keepdims=True))
  sharpness = analysis.target_sharpness(embedding, targets, tau, chunk_size)
  np.testing.assert_allclose(
      sharpness.entropy, -(np.exp(log_target) * log_target).sum(1).mean(), rtol=1e-6)
  np.testing.assert_allclose(
      sharpness.target_probability, np.exp(log_target[np.arange(6), targets]).mean(), rtol=1e-6)
  # A [2, 3] batch of the same ids: the same means (it divided by 2, not 6: probability > 1).
  assert analysis.target_sharpness(embedding, targets.reshape(2, 3), tau, chunk_size) == (
      pytest.approx(sharpness))
  # A zero embedding gives the uniform ỹ.
  uniform = analysis.target_sharpness(np.zeros((3, 2), np.float32), np.array([0, 1]), tau)
  np.testing.assert_allclose(uniform, (np.log(3), 1 / 3), rtol=1e-6)


def test_a_diverged_matrix_has_no_distance_not_distance_zero():
  rng = np.random.default_rng(0)
  assert np.isnan(analysis.subspace_distance(rng.normal(size=(50, 5)), np.full((50, 4), np.nan)))
