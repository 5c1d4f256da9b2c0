"""Losses against a NumPy reference, finite differences and the paper's algebra."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tied_lm import losses

V, E = 13, 5


def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_target_distribution(embedding, targets, tau):
  scores = embedding[targets] @ embedding.T / tau
  p = np.exp(scores - scores.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def np_kl(logits, targets, embedding, tau):
  p = np_target_distribution(embedding, targets, tau)
  return (p * (np.log(p) - np_log_softmax(logits / tau))).sum(-1)


@pytest.fixture
def inputs():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, V)) * 3
  targets = rng.integers(0, V, size=(3, 4))
  embedding = rng.normal(size=(V, E))
  return logits, targets, embedding


def test_cross_entropy_matches_numpy(inputs):
  logits, targets, _ = inputs
  expected = -np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
  got = losses.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
  assert got.shape == targets.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_cross_entropy_of_uniform_logits_is_log_vocab():
  got = losses.cross_entropy(jnp.zeros((2, 3, V)), jnp.zeros((2, 3), jnp.int32))
  np.testing.assert_allclose(got, np.full((2, 3), np.log(V)), rtol=1e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 10.0])
def test_target_distribution_matches_numpy(inputs, tau):
  _, targets, embedding = inputs
  got = losses.target_distribution(jnp.asarray(embedding, jnp.float32), jnp.asarray(targets), tau)
  assert got.shape == (*targets.shape, V)
  np.testing.assert_allclose(got, np_target_distribution(embedding, targets, tau), atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("tau", [0.5, 2.0, 20.0])
def test_augmented_loss_matches_numpy(inputs, tau):
  logits, targets, embedding = inputs
  got = losses.augmented_loss(
      jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(embedding, jnp.float32),
      tau,
  )
  assert got.shape == targets.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_kl(logits, targets, embedding, tau), rtol=1e-4, atol=1e-6)


def test_augmented_loss_is_nonnegative_and_zero_at_its_target(inputs):
  logits, targets, embedding = inputs
  embedding = jnp.asarray(embedding, jnp.float32)
  kl = losses.augmented_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), embedding, 3.0)
  assert float(kl.min()) > 0
  # logits = L · L[y] make softmax(logits / tau) equal to the target distribution.
  matching_logits = embedding[targets] @ embedding.T
  kl = losses.augmented_loss(matching_logits, jnp.asarray(targets), embedding, 3.0)
  np.testing.assert_allclose(kl, 0.0, atol=1e-6)


def test_a_kl_near_zero_is_within_the_documented_rounding_of_the_exact_value():
  # PTB-sized scores: L[y] · L[y] is about E = 64, so the scores / τ reach about 20, and
  # the fused KL, a difference of terms that size, rounds to a few 1e-6 (docstrings).
  rng = np.random.default_rng(0)
  embedding = rng.normal(size=(1000, 64)).astype(np.float32)
  targets = rng.integers(0, 1000, size=300)
  logits = (embedding[targets] @ embedding.T
            + 1e-3 * rng.normal(size=(300, 1000))).astype(np.float32)
  exact = np_kl(logits.astype(np.float64), targets, embedding.astype(np.float64), 3.0)
  args = jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(embedding), 3.0
  plain = losses.augmented_loss(*args)
  _, fused = losses.cross_entropy_and_kl(*args)
  assert float(exact.max()) < 1e-8  # ŷ nearly equals ỹ: the errors below are all rounding
  np.testing.assert_allclose(plain, exact, rtol=0, atol=1e-6)
  np.testing.assert_allclose(fused, exact, rtol=0, atol=1e-5)


def test_augmented_loss_is_exact_for_huge_scores():
  # ỹ is one-hot at the target (its score / τ is 1e7, the others' 0); ŷ is uniform over
  # words 1..12 (logits / τ of 1e5), with word 0 at -1e5: KL = -log ŷ(y).
  embedding = jnp.eye(V, E) * 1e3
  logits = jnp.full((2, V), 1e4).at[:, 0].set(-1e4)
  targets = jnp.array([0, 1])
  expected_kl = [2e5 + np.log(V - 1), np.log(V - 1)]
  expected_cross_entropy = [2e4 + np.log(V - 1), np.log(V - 1)]
  np.testing.assert_allclose(losses.augmented_loss(logits, targets, embedding, 0.1),
                             expected_kl, rtol=1e-6)
  cross_entropy, kl = losses.cross_entropy_and_kl(logits, targets, embedding, 0.1)
  # The fused terms are differences of values near 1e5 (logits / τ): float32 rounds
  # them to about 1e5 * 2**-24 each.
  np.testing.assert_allclose(kl, expected_kl, rtol=1e-6, atol=1e-2)
  np.testing.assert_allclose(cross_entropy, expected_cross_entropy, rtol=1e-6, atol=1e-2)


def test_augmented_loss_of_bf16_inputs_is_float32(inputs):
  logits, targets, embedding = inputs
  logits, embedding = jnp.asarray(logits, jnp.bfloat16), jnp.asarray(embedding, jnp.bfloat16)
  # The exact KL of the bf16 values: only float32 rounding may separate ours from it.
  exact = np_kl(np.asarray(logits, np.float64), targets, np.asarray(embedding, np.float64), 2.0)
  plain = losses.augmented_loss(logits, jnp.asarray(targets), embedding, 2.0)
  _, fused = losses.cross_entropy_and_kl(logits, jnp.asarray(targets), embedding, 2.0)
  for got in plain, fused:
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, exact, rtol=1e-5)


def test_gradients_match_finite_differences(inputs):
  logits, targets, embedding = inputs
  with jax.enable_x64(True):
    logits, embedding = jnp.asarray(logits), jnp.asarray(embedding)
    targets = jnp.asarray(targets)
    check_grads(lambda z: losses.cross_entropy(z, targets).sum(), (logits,), order=2)
    check_grads(
        lambda z, emb: losses.augmented_loss(z, targets, emb, 2.0).sum(),
        (logits, embedding),
        order=1,
        modes=("rev",),
    )
    # With the target's gradient stopped, only the logits' gradient is a true
    # derivative (finite differences still see L move ỹ).
    check_grads(
        lambda z: losses.augmented_loss(
            z, targets, embedding, 2.0, stop_gradient_target=True
        ).sum(),
        (logits,),
        order=1,
        modes=("rev",),
    )


def test_logit_gradient_is_paper_formula(inputs):
  """dJ_aug/dz = (ŷ - ỹ) / tau, so alpha = gamma * tau cancels the 1/tau."""
  logits, targets, embedding = inputs
  tau = 4.0
  logits, embedding = jnp.asarray(logits, jnp.float32), jnp.asarray(embedding, jnp.float32)
  grad = jax.grad(lambda z: losses.augmented_loss(z, targets, embedding, tau).sum())(logits)
  expected = (np.exp(np_log_softmax(np.asarray(logits, np.float64) / tau))
              - np_target_distribution(np.asarray(embedding, np.float64), targets, tau))
  np.testing.assert_allclose(grad, expected / tau, atol=1e-6)


def test_stop_gradient_target_cuts_embedding_gradient(inputs):
  logits, targets, embedding = inputs
  logits, embedding = jnp.asarray(logits, jnp.float32), jnp.asarray(embedding, jnp.float32)

  def grads(stop):
    return jax.grad(
        lambda z, emb: losses.augmented_loss(
            z, targets, emb, 2.0, stop_gradient_target=stop
        ).sum(),
        argnums=(0, 1),
    )(logits, embedding)

  (logits_grad, embedding_grad), (stopped_logits_grad, stopped_embedding_grad) = (
      grads(False), grads(True)
  )
  assert float(jnp.abs(embedding_grad).max()) > 1e-3  # the paper's default: L learns through ỹ
  np.testing.assert_array_equal(stopped_embedding_grad, 0.0)
  np.testing.assert_allclose(stopped_logits_grad, logits_grad, atol=1e-7)


def test_cross_entropy_form_is_the_kl_plus_the_targets_entropy(inputs):
  logits, targets, embedding = inputs
  tau = 2.0
  p = np_target_distribution(embedding, targets, tau)
  expected = np_kl(logits, targets, embedding, tau) - (p * np.log(p)).sum(-1)
  logits32, embedding32 = jnp.asarray(logits, jnp.float32), jnp.asarray(embedding, jnp.float32)
  got = losses.augmented_loss(logits32, jnp.asarray(targets), embedding32, tau,
                              form="cross_entropy")
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)

  def grads(form):
    return jax.grad(
        lambda z, emb: losses.augmented_loss(z, targets, emb, tau, form=form).sum(),
        argnums=(0, 1))(logits32, embedding32)

  (kl_logits, kl_embedding), (ce_logits, ce_embedding) = grads("kl"), grads("cross_entropy")
  # The entropy term does not depend on the logits; it changes only L's gradient.
  np.testing.assert_allclose(ce_logits, kl_logits, atol=1e-6)
  assert float(jnp.abs(ce_embedding - kl_embedding).max()) > 1e-2
  with jax.enable_x64(True):
    check_grads(
        lambda z, emb: losses.augmented_loss(z, targets, emb, tau, form="cross_entropy").sum(),
        (jnp.asarray(logits), jnp.asarray(embedding)), order=1, modes=("rev",),
    )


@pytest.mark.parametrize("function", [losses.augmented_loss, losses.cross_entropy_and_kl])
def test_unknown_form_is_refused(inputs, function):
  logits, targets, embedding = map(jnp.asarray, inputs)
  with pytest.raises(ValueError, match=r"form must be one of \('kl', 'cross_entropy'\), got 'KL'"):
    function(logits, targets, embedding, 2.0, form="KL")


# bias: none; in the cross-entropy only (the paper's eq.); in both terms (kl_output_bias).
@pytest.mark.parametrize("bias_in", [None, "cross_entropy", "both"])
@pytest.mark.parametrize("stop_gradient_target", [False, True])
@pytest.mark.parametrize("extra_distinct", [None, 0, 3])
@pytest.mark.parametrize("form", losses.AUGMENTED_FORMS)
def test_fused_terms_equal_the_separate_losses_and_their_gradients(
    inputs, bias_in, stop_gradient_target, extra_distinct, form
):
  logits, targets, embedding = inputs
  logits, embedding = jnp.asarray(logits, jnp.float32), jnp.asarray(embedding, jnp.float32)
  targets = jnp.asarray(targets % 5)  # 12 tokens of at most 5 words: ỹ rows repeat
  # None: a ỹ row per token; else one per distinct word, padded by extra_distinct rows.
  max_distinct_targets = (
      0 if extra_distinct is None else len(np.unique(targets)) + extra_distinct)
  with_bias = bias_in is not None
  bias = jnp.linspace(-1.0, 1.0, V) if with_bias else None
  tau, alpha = jnp.float32(3.0), 0.7  # τ differentiated too: its gradient was 0
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=targets.shape), jnp.float32)

  def separate(logits, embedding, tau, bias):
    scores = logits if bias is None else logits + bias
    cross_entropy = losses.cross_entropy(scores, targets)
    kl = losses.augmented_loss(
        scores if bias_in == "both" else logits, targets, embedding, tau,
        stop_gradient_target=stop_gradient_target, form=form,
    )
    return jnp.sum(cotangent * (cross_entropy + alpha * kl)), (cross_entropy, kl)

  def fused(logits, embedding, tau, bias):
    cross_entropy, kl = losses.cross_entropy_and_kl(
        logits, targets, embedding, tau, output_bias=bias,
        stop_gradient_target=stop_gradient_target, max_distinct_targets=max_distinct_targets,
        form=form, kl_output_bias=bias_in == "both",
    )
    return jnp.sum(cotangent * (cross_entropy + alpha * kl)), (cross_entropy, kl)

  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
  (_, expected_terms), expected_grads = jax.value_and_grad(separate, argnums, has_aux=True)(
      logits, embedding, tau, bias
  )
  (_, terms), grads = jax.value_and_grad(fused, argnums, has_aux=True)(
      logits, embedding, tau, bias)
  assert abs(expected_grads[2]) > 0.1
  for got, expected in zip(terms + grads, expected_terms + expected_grads, strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  if stop_gradient_target:  # L gets no gradient through ỹ, and the logits' gradient is unchanged
    np.testing.assert_array_equal(grads[1], np.zeros_like(embedding))


def test_fused_terms_without_augmented_loss_are_cross_entropy_and_zero(inputs):
  logits, targets, embedding = inputs
  logits = jnp.asarray(logits, jnp.bfloat16)  # bf16 in, float32 out
  cross_entropy, kl = losses.cross_entropy_and_kl(
      logits, jnp.asarray(targets), jnp.asarray(embedding), 2.0, augmented=False
  )
  assert cross_entropy.dtype == jnp.float32
  np.testing.assert_allclose(
      cross_entropy, losses.cross_entropy(logits, jnp.asarray(targets)), rtol=1e-6
  )
  np.testing.assert_array_equal(kl, np.zeros(targets.shape))
  check_grads(
      lambda z: losses.cross_entropy_and_kl(
          z, jnp.asarray(targets), jnp.asarray(embedding), 2.0, augmented=False
      )[0].sum(),
      (jnp.asarray(inputs[0], jnp.float32),), order=1, modes=["rev"], atol=1e-2, rtol=1e-2,
  )


def test_fused_cross_entropy_with_a_bias_has_the_separate_gradients(inputs):
  # VD and AL train this way (untied, an output bias, the cross-entropy alone fused).
  logits, targets, embedding = inputs
  logits, targets = jnp.asarray(logits, jnp.float32), jnp.asarray(targets)
  bias = jnp.linspace(-1.0, 1.0, V)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=targets.shape), jnp.float32)

  def separate(logits, bias):
    return jnp.sum(cotangent * losses.cross_entropy(logits + bias, targets))

  def fused(logits, bias):
    cross_entropy, _ = losses.cross_entropy_and_kl(
        logits, targets, jnp.asarray(embedding), 2.0, output_bias=bias, augmented=False)
    return jnp.sum(cotangent * cross_entropy)

  expected = jax.value_and_grad(separate, (0, 1))(logits, bias)
  got = jax.value_and_grad(fused, (0, 1))(logits, bias)
  assert float(jnp.abs(expected[1][1]).max()) > 0.1  # the bias's gradient is not ~0
  for got_leaf, expected_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                                     strict=True):
    np.testing.assert_allclose(got_leaf, expected_leaf, rtol=1e-5, atol=1e-6)


def test_targets_that_do_not_match_the_logits_are_refused_not_paired_wrongly():
  logits = jnp.zeros((2, 3, 7))
  embedding = jnp.ones((7, 4))
  # cross_entropy broadcast (2, 1) targets against (2, 3, 7) logits, silently.
  for targets in (jnp.zeros((3, 2), jnp.int32), jnp.zeros((6,), jnp.int32),
                  jnp.zeros((2, 1), jnp.int32)):
    message = r"targets have shape .*; logits \(2, 3, 7\) need \(2, 3\)"
    with pytest.raises(ValueError, match=message):
      losses.cross_entropy(logits, targets)
    with pytest.raises(ValueError, match=message):
      losses.cross_entropy_and_kl(logits, targets, embedding, 2.0)
    with pytest.raises(ValueError, match=r"need \(2, 3\)"):
      losses.augmented_loss(logits, targets, embedding, 2.0)



def test_a_temperature_that_is_not_a_scalar_is_refused_not_broadcast():
  # B·T = V = 6: a [V] τ gave a KL of -5.67 in the fused loss, and a [B, T, 1] τ with
  # B = T a [B, T, T] augmented loss, silently.
  logits, targets, embedding = jnp.zeros((2, 3, 6)), jnp.zeros((2, 3), jnp.int32), jnp.ones((6, 4))
  for tau in (jnp.arange(1.0, 7.0), jnp.full((2, 3, 1), 2.0)):
    message = rf"^tau must be a scalar temperature, got shape {re.escape(str(tau.shape))}"
    with pytest.raises(ValueError, match=message):
      losses.cross_entropy_and_kl(logits, targets, embedding, tau)
    with pytest.raises(ValueError, match=message):
      losses.augmented_loss(logits, targets, embedding, tau)
    with pytest.raises(ValueError, match=message):
      losses.target_distribution(embedding, targets, tau)
  # A traced scalar, as under vmap over temperatures, is one.
  kls = jax.vmap(lambda t: losses.augmented_loss(logits, targets, embedding, t))(
      jnp.array([1.0, 2.0]))
  assert kls.shape == (2, 2, 3)


def test_logits_without_words_targets_that_are_not_ids_and_a_bad_bound_are_refused():
  targets, embedding = jnp.zeros((2, 3), jnp.int32), jnp.ones((6, 4))
  # V = 0: a "perfect" loss of 0 from cross_entropy, a ZeroDivisionError from the fused one.
  with pytest.raises(ValueError, match=r"^logits have shape \(2, 3, 0\): no word to score"):
    losses.cross_entropy(jnp.zeros((2, 3, 0)), targets)
  with pytest.raises(ValueError, match=r"^logits have shape \(2, 3, 0\): no word to score"):
    losses.cross_entropy_and_kl(jnp.zeros((2, 3, 0)), targets, jnp.ones((0, 4)), 2.0)
  with pytest.raises(ValueError, match="^targets must be integer word ids, got float32"):
    losses.cross_entropy(jnp.zeros((2, 3, 6)), targets.astype(jnp.float32))
  # -1 reached jnp.unique(size=-1): a TypeError from deep in JAX.
  with pytest.raises(ValueError, match=r"^max_distinct_targets must be >= 0"):
    losses.cross_entropy_and_kl(jnp.zeros((2, 3, 6)), targets, embedding, 2.0,
                                max_distinct_targets=-1)
  # A 1-D embedding failed in an einsum's message about subscripts.
  with pytest.raises(ValueError, match=r"^embedding has shape \(4,\); need \[V, E\]"):
    losses.target_distribution(embedding[0], targets, 2.0)


def test_the_fused_gradients_keep_their_inputs_types_as_autodiff_does():
  # With x64, float32 logits beside a float64 embedding got a float64 gradient.
  with jax.enable_x64(True):
    key = jax.random.key(0)
    logits = jax.random.normal(key, (2, 3, 6), jnp.float32)
    bias = jnp.zeros(6, jnp.float32)
    embedding = jax.random.normal(key, (6, 4), jnp.float64)
    targets = jnp.zeros((2, 3), jnp.int32)

    def fused(logits, bias, embedding):
      return sum(t.sum() for t in losses.cross_entropy_and_kl(
          logits, targets, embedding, 2.0, output_bias=bias))

    def separate(logits, bias, embedding):
      return (losses.cross_entropy(logits + bias, targets).sum()
              + losses.augmented_loss(logits, targets, embedding, 2.0).sum())

    for got, expected in zip(jax.grad(fused, (0, 1, 2))(logits, bias, embedding),
                             jax.grad(separate, (0, 1, 2))(logits, bias, embedding),
                             strict=True):
      assert got.dtype == expected.dtype
    assert [g.dtype for g in jax.grad(fused, (0, 1, 2))(logits, bias, embedding)] == [
        jnp.float32, jnp.float32, jnp.float64]


def test_an_embedding_of_another_vocabulary_or_a_kl_bias_without_a_bias_is_refused():
  logits, targets = jnp.zeros((2, 3, 7)), jnp.zeros((2, 3), jnp.int32)
  for embedding in (jnp.ones((6, 4)), jnp.ones((7,))):
    message = rf"embedding has shape \({embedding.shape[0]},.*\); logits \(2, 3, 7\) need \(7, E\)"
    with pytest.raises(ValueError, match=message):
      losses.augmented_loss(logits, targets, embedding, 2.0)
    with pytest.raises(ValueError, match=message):
      losses.cross_entropy_and_kl(logits, targets, embedding, 2.0)
  # It was ignored: the result of kl_output_bias=False, silently.
  with pytest.raises(ValueError, match="kl_output_bias=True needs an output_bias"):
    losses.cross_entropy_and_kl(logits, targets, jnp.ones((7, 4)), 2.0, kl_output_bias=True)


def test_ids_wrap_from_minus_v_and_are_nan_outside_as_documented(inputs):
  logits, targets, embedding = inputs
  wrapped = targets - V  # in [-V, 0): the same words
  np.testing.assert_array_equal(losses.cross_entropy(logits, wrapped),
                                losses.cross_entropy(logits, targets))
  np.testing.assert_allclose(losses.augmented_loss(logits, wrapped, embedding, 2.0),
                             losses.augmented_loss(logits, targets, embedding, 2.0), rtol=1e-6)
  outside = targets.copy()
  outside[0, 0], outside[1, 1] = V, -V - 1
  bad = np.zeros(targets.shape, bool)
  bad[0, 0] = bad[1, 1] = True
  assert (np.isnan(losses.cross_entropy(logits, outside)) == bad).all()
  assert (np.isnan(losses.augmented_loss(logits, outside, embedding, 2.0)) == bad).all()
  _, kl = losses.cross_entropy_and_kl(logits, outside, embedding, 2.0)
  assert (np.isnan(kl) == bad).all()
  # Masked out, the augmented term's gradient is still NaN: hence "give padding a real id".
  grad = jax.grad(lambda e: jnp.where(
      bad, 0.0, losses.augmented_loss(logits, outside, e, 2.0)).sum())(jnp.asarray(embedding))
  assert np.isnan(grad).any()


def test_the_fused_loss_at_the_smallest_training_tau_stays_near_float64():
  # Init-sized tied scores (uniform ±0.1 embeddings, E = 200, V = 10,000), against
  # augmented_loss in float64. The fused KL and its gradients are differences of terms of
  # size max |scores| / τ: they are the numbers MIN_TRAINING_TAU is chosen by.
  tau = losses.MIN_TRAINING_TAU
  rng = np.random.default_rng(0)
  embedding = rng.uniform(-0.1, 0.1, (10_000, 200))
  logits = rng.uniform(-0.1, 0.1, (64, 200)) @ embedding.T * 3
  targets = jnp.asarray(rng.integers(0, 10_000, 64))
  with jax.enable_x64():
    expected, (expected_grad_logits, expected_grad_embedding) = jax.value_and_grad(
        lambda z, e: losses.augmented_loss(z, targets, e, tau).sum(), argnums=(0, 1))(
            jnp.asarray(logits), jnp.asarray(embedding))
    expected_kl = losses.augmented_loss(jnp.asarray(logits), targets, jnp.asarray(embedding), tau)
    assert expected_kl.dtype == jnp.float64
    expected_kl, expected_grad_logits, expected_grad_embedding = map(
        np.asarray, (expected_kl, expected_grad_logits, expected_grad_embedding))
  f32 = (jnp.asarray(logits, jnp.float32), jnp.asarray(embedding, jnp.float32))
  kl = losses.cross_entropy_and_kl(*f32[:1], targets, f32[1], tau)[1]
  grad_logits, grad_embedding = jax.grad(
      lambda z, e: losses.cross_entropy_and_kl(z, targets, e, tau)[1].sum(), argnums=(0, 1))(*f32)
  np.testing.assert_allclose(kl, expected_kl, rtol=1e-5)
  for got, want in ((grad_logits, expected_grad_logits),
                    (grad_embedding, expected_grad_embedding)):
    assert np.max(np.abs(got - want)) <= 1e-3 * np.max(np.abs(want))
  # At τ / 100 the same inputs lose far more: the bound is not arbitrary.
  small_kl = losses.cross_entropy_and_kl(*f32[:1], targets, f32[1], tau / 100)[1]
  with jax.enable_x64():
    small_expected = np.asarray(losses.augmented_loss(
        jnp.asarray(logits), targets, jnp.asarray(embedding), tau / 100))
  assert np.max(np.abs(small_kl - small_expected) / small_expected) > 1e-5
  # augmented_loss, term by term, does not lose them.
  small_plain = losses.augmented_loss(*f32[:1], targets, f32[1], tau / 100)
  np.testing.assert_allclose(small_plain, small_expected, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1,), (6,), (7, 1)])
def test_an_output_bias_not_shaped_like_the_vocabulary_is_refused(shape):
  # A [1] bias broadcast to every word and gave the loss of another model.
  logits, targets, embedding = jnp.zeros((2, 3, 7)), jnp.zeros((2, 3), jnp.int32), jnp.ones((7, 4))
  with pytest.raises(ValueError, match=(
      rf"^output_bias has shape \({shape[0]},{' 1' if len(shape) > 1 else ''}\); logits "
      r"\(2, 3, 7\) need \(7,\)")):
    losses.cross_entropy_and_kl(logits, targets, embedding, 2.0, output_bias=jnp.zeros(shape))


@pytest.mark.parametrize("tau", [-2.0, 0.0, float("nan")])
def test_a_temperature_that_is_not_positive_gives_nan_not_a_plausible_number(inputs, tau):
  logits, targets, embedding = inputs
  assert np.isnan(losses.target_distribution(embedding, targets, tau)).all()
  assert np.isnan(losses.augmented_loss(logits, targets, embedding, tau)).all()
  cross_entropy, kl = losses.cross_entropy_and_kl(logits, targets, embedding, tau)
  assert np.isnan(kl).all()
  # The cross-entropy has no temperature, so it stays right.
  np.testing.assert_allclose(cross_entropy, losses.cross_entropy(logits, targets), rtol=1e-6)
  # A positive τ is untouched (the NumPy reference of the tests above).
  np.testing.assert_allclose(losses.augmented_loss(logits, targets, embedding, 2.0),
                             np_kl(logits, targets, embedding, 2.0), rtol=1e-5)


def test_too_few_distinct_target_rows_give_nan_not_a_wrong_kl(inputs):
  logits, targets, embedding = inputs  # 12 tokens
  num_words = len(np.unique(targets))
  expected = losses.augmented_loss(logits, targets, embedding, 2.0)
  for rows in (num_words, num_words + 2):
    _, kl = losses.cross_entropy_and_kl(
        logits, targets, embedding, 2.0, max_distinct_targets=rows)
    np.testing.assert_allclose(kl, expected, rtol=1e-5)
  # One row short: tokens of the missing word read another word's ỹ (a wrong, finite KL).
  cross_entropy, kl = losses.cross_entropy_and_kl(
      logits, targets, embedding, 2.0, max_distinct_targets=num_words - 1)
  assert np.isnan(kl).all()
  np.testing.assert_allclose(cross_entropy, losses.cross_entropy(logits, targets), rtol=1e-6)
  # An empty batch (jnp.unique wanted a fill_value).
  cross_entropy, kl = losses.cross_entropy_and_kl(
      jnp.zeros((0, V)), jnp.zeros((0,), jnp.int32), embedding, 2.0, max_distinct_targets=3)
  assert cross_entropy.shape == kl.shape == (0,)
