"""Pure loss functions for tied LSTM language models (Inan et al., ICLR 2017).

Every function here is a pure, jit-compatible function of its arguments: no
Flax state, no globals. Shapes use `...` for any leading batch/time axes and
`V` for the vocabulary size, `E` for the embedding size. They differentiate in
reverse mode (jax.grad, jax.vjp); the products with the embedding have
hand-written gradients (custom_vjp), which forward mode (jax.jvp, jax.jacfwd,
jax.hessian) refuses for any derivative through the embedding.

The training objective (assembled in `train.py`) is

    J_tot = sum_t [ cross_entropy + gamma * tau * augmented_loss ]

summed over the unroll and averaged over the batch (Zaremba's convention, which
learning rate 1.0 assumes).
"""

import functools

import jax
import jax.numpy as jnp

from tied_lm.models import FLOAT32_MAX, output_scores

# Temperatures the float32 losses can divide by: float32's normal numbers > 0. A
# smaller one is 0 or subnormal there (logits / tau then inf or NaN), a larger one inf.
TEMPERATURE_RANGE = (float(jnp.finfo(jnp.float32).tiny), FLOAT32_MAX)


# The smallest τ a training config may use. The fused loss of the train step computes
# the KL and its gradient as differences of terms the size of the scores / τ; at
# τ = 0.1 with init-sized embeddings its float32 results stay within 1e-5 (KL) and
# 1e-3 (gradients) of float64, and at τ = 0.001 the KL no longer does
# (tests/test_losses.py): the rounding grows as max |L[y] Lᵀ| / τ, so larger (trained)
# embeddings lose more at the same τ. The paper's τ are 2 to 10.
MIN_TRAINING_TAU = 0.1


def is_temperature(value: float) -> bool:
  """Whether `value` lies in TEMPERATURE_RANGE (NaN does not)."""
  return TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1]


def _at_least_float32(x: jax.Array) -> jax.Array:
  """bf16/fp16 inputs are upcast so that losses are always computed in >= fp32."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@jax.jit
def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood.

  Args:
    logits: [..., V] unnormalised scores (any float dtype; computed in >= float32).
    targets: [...] integer word ids in [0, V) (a negative id is not padding: one in
      [-V, 0) wraps around to a word; one outside [-V, V) gives NaN): give padding a
      real id and mask the per-token result.

  Returns:
    [...] NLL (float32, or float64 for float64 inputs) of each target, shaped like `targets`.
  """
  _check_targets(logits, targets)
  log_probs = jax.nn.log_softmax(_at_least_float32(logits), axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _target_scores(embedding: jax.Array, targets: jax.Array) -> jax.Array:
  """L[y] Lᵀ in >= float32; [...] ids -> [..., V]."""
  embedding = _at_least_float32(embedding)
  return output_scores(jnp.take(embedding, targets, axis=0), embedding)


def _target_log_distribution(
    embedding: jax.Array, targets: jax.Array, tau: float
) -> jax.Array:
  """log ỹ = log_softmax(L[y] Lᵀ / τ); [...] ids -> [..., V] float32."""
  return jax.nn.log_softmax(_target_scores(embedding, targets) / tau, axis=-1)


def _nan_unless_positive(values: jax.Array, tau: float | jax.Array) -> jax.Array:
  # τ is traced, so a bad one cannot raise inside jit. A negative τ would flip both
  # distributions and give a plausible number; NaN says the input was bad instead.
  return jnp.where(jnp.asarray(tau) > 0, values, jnp.nan)


@jax.jit
def target_distribution(
    embedding: jax.Array, targets: jax.Array, tau: float
) -> jax.Array:
  """The estimated target distribution ỹ = softmax(L[y] · Lᵀ / τ).

  Args:
    embedding: [V, E] the input embedding matrix L.
    targets: [...] integer word ids y in [0, V) (a negative id in [-V, 0) wraps
      around to a word; one outside [-V, V) gives NaN).
    tau: scalar temperature τ > 0 (otherwise every value is NaN).

  Returns:
    [..., V] probabilities in float32 (float64 for float64 inputs); each row sums to one.
  """
  if embedding.ndim != 2:
    raise ValueError(f"embedding has shape {embedding.shape}; need [V, E]")
  _check_tau(tau)
  return _nan_unless_positive(jnp.exp(_target_log_distribution(embedding, targets, tau)), tau)


AUGMENTED_FORMS = ("kl", "cross_entropy")


def _check_targets(logits: jax.Array, targets: jax.Array) -> None:
  # Shapes are static, so this runs once per trace. Without it a transposed or
  # broadcast targets array pairs tokens with the wrong logits, silently.
  if targets.shape != logits.shape[:-1]:
    raise ValueError(f"targets have shape {targets.shape}; logits {logits.shape} need "
                     f"{logits.shape[:-1]}")
  if not logits.shape[-1]:  # a loss of 0 for every token, or a ZeroDivisionError
    raise ValueError(f"logits have shape {logits.shape}: no word to score (V = 0)")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be integer word ids, got {targets.dtype}")


def _check_tau(tau: float | jax.Array) -> None:
  # A [V] or [B, T, 1] τ broadcast against intermediates of other shapes: a negative KL,
  # a [B, T, T] loss, or an error naming neither.
  if jnp.ndim(tau) != 0:
    raise ValueError(f"tau must be a scalar temperature, got shape {jnp.shape(tau)}")


def _check_embedding(logits: jax.Array, embedding: jax.Array) -> None:
  # Static shapes again: ỹ over another vocabulary would fail later in a broadcast.
  if embedding.ndim != 2 or embedding.shape[0] != logits.shape[-1]:
    raise ValueError(f"embedding has shape {embedding.shape}; logits {logits.shape} need "
                     f"({logits.shape[-1]}, E)")


def _check_form(form: str) -> None:
  # `form` is static, so this runs once per trace, not per call.
  if form not in AUGMENTED_FORMS:
    raise ValueError(f"form must be one of {AUGMENTED_FORMS}, got {form!r}")


@functools.partial(jax.jit, static_argnames=("stop_gradient_target", "form"))
def augmented_loss(
    bias_free_logits: jax.Array,
    targets: jax.Array,
    embedding: jax.Array,
    tau: float,
    *,
    stop_gradient_target: bool = False,
    form: str = "kl",
) -> jax.Array:
  """Per-token KL(ỹ ‖ ŷ) with ŷ = softmax(logits / τ), the paper's J_aug.

  Computed from log-softmaxes in float32, so it is stable for large scores and
  for bf16 inputs.

  Args:
    bias_free_logits: [..., V] z = W h without any output bias (eq. 3.1 uses none):
      `LMOutputs.bias_free_logits`.
    targets: [...] integer word ids y in [0, V) (a negative id is not padding: one in
      [-V, 0) wraps around to a word; one outside [-V, V) gives NaN, and NaN gradients
      even where the result is masked out): give padding a real id and mask the
      per-token result.
    embedding: [V, E] the input embedding matrix L that defines ỹ.
    tau: scalar temperature τ > 0 (otherwise every value is NaN).
    stop_gradient_target: if True, ỹ is a constant and L gets no gradient
      through it. The paper's default (False) lets gradient flow into L.
    form: "kl", the paper's KL(ỹ ‖ ŷ); or "cross_entropy", H(ỹ, ŷ) =
      KL(ỹ ‖ ŷ) + H(ỹ), what a soft-label cross-entropy computes. The two
      differ by ỹ's entropy, so only in L's gradient through ỹ, which the
      cross-entropy also pushes towards a sharper ỹ.

  Returns:
    [...] KL divergence (or cross-entropy) of each token, in float32 (float64 for float64
    inputs). A KL is >= 0 up to rounding: where ŷ nearly equals ỹ, float32 can give a few
    1e-7 below 0 (a few 1e-6 from `cross_entropy_and_kl`, whose KL is a difference of
    terms the size of the scores / τ).
  """
  _check_form(form)
  _check_targets(bias_free_logits, targets)
  _check_embedding(bias_free_logits, embedding)
  _check_tau(tau)
  log_target = _target_log_distribution(embedding, targets, tau)
  if stop_gradient_target:
    log_target = jax.lax.stop_gradient(log_target)
  log_model = jax.nn.log_softmax(_at_least_float32(bias_free_logits) / tau, axis=-1)
  if form == "cross_entropy":
    loss = -jnp.sum(jnp.exp(log_target) * log_model, axis=-1)
  else:
    loss = jnp.sum(jnp.exp(log_target) * (log_target - log_model), axis=-1)
  return _nan_unless_positive(loss, tau)


@functools.partial(
    jax.jit,
    static_argnames=(
        "augmented", "stop_gradient_target", "max_distinct_targets", "form", "kl_output_bias"))
def cross_entropy_and_kl(
    bias_free_logits: jax.Array,
    targets: jax.Array,
    embedding: jax.Array,
    tau: float,
    *,
    output_bias: jax.Array | None = None,
    augmented: bool = True,
    stop_gradient_target: bool = False,
    max_distinct_targets: int = 0,
    form: str = "kl",
    kl_output_bias: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Both terms of the objective in fused passes, with a hand-written gradient.

  Equal to `cross_entropy(bias_free_logits + output_bias, targets)` and
  `augmented_loss(bias_free_logits, targets, embedding, tau)` and to their gradients,
  τ's included (tests check both); the training step uses this form because it reads each
  [N, V] array a few times instead of materialising every intermediate
  softmax that autodiff of the separate functions keeps (it keeps the logits
  and each token's row of ỹ for the backward pass).

  Args:
    bias_free_logits: [..., V] W h without the output bias, which is added here:
      `LMOutputs.bias_free_logits` (not `.logits`, which holds the bias already).
    targets: [...] integer word ids in [0, V) (a negative id is not padding: one in
      [-V, 0) wraps around to a word; one outside [-V, V) gives NaN, and NaN gradients
      even where the result is masked out): give padding a real id and mask the
      per-token result.
    embedding: [V, E] the input embedding L (ignored unless `augmented`).
    tau: scalar temperature τ > 0 (otherwise every kl is NaN).
    output_bias: [V] or None; enters the cross-entropy only (eq. 3.1).
    augmented: if False the KL is zeros and costs nothing.
    stop_gradient_target: if True, ỹ is a constant.
    max_distinct_targets: if > 0, at least the number of distinct ids in
      `targets` (fewer: every kl is NaN): the target scores L[y] Lᵀ and ỹ, which depend on the word
      alone, are computed once per distinct word ([U, V] for U of these) and
      each token takes its word's row of ỹ. Same numbers up to float
      summation order; a text repeats words, so the products and the
      exponentials shrink (PTB batch 20 by 35: U = 397 for N = 700). 0: one
      row per token.
    form: the augmented term, "kl" or "cross_entropy" (see `augmented_loss`).
    kl_output_bias: if True, ŷ in the augmented term is softmax((bias_free_logits +
      output_bias) / τ), i.e. `augmented_loss(bias_free_logits + output_bias, ...)`,
      and the bias gets gradient from both terms (needs an `output_bias`). False
      (the paper's eq.): the bias enters the cross-entropy only.

  Returns:
    (cross_entropy, kl), each [...] float32 (float64 for float64 inputs); kl is the
    augmented term in `form`. The KL and its gradient are differences of terms the size
    of the scores / τ, so their float32 rounding grows as max |L[y] Lᵀ| / τ: where ŷ
    nearly equals ỹ the KL can be a few 1e-6 below 0, and at small τ (max |scores| / τ
    in the hundreds) it and the embedding's gradient through ỹ lose digits that
    `augmented_loss` keeps; the training config refuses τ below MIN_TRAINING_TAU.
  """
  _check_form(form)
  _check_targets(bias_free_logits, targets)
  if augmented:
    _check_embedding(bias_free_logits, embedding)
    _check_tau(tau)
  if max_distinct_targets < 0:
    raise ValueError(f"max_distinct_targets must be >= 0 (0: one row per token), got "
                     f"{max_distinct_targets}")
  if kl_output_bias and output_bias is None:
    raise ValueError("kl_output_bias=True needs an output_bias")
  logits = bias_free_logits
  batch_shape, vocab_size = targets.shape, logits.shape[-1]
  if output_bias is not None and output_bias.shape != (vocab_size,):
    # A [1] bias would broadcast to every word: a plausible loss of another model.
    raise ValueError(f"output_bias has shape {output_bias.shape}; logits {logits.shape} need "
                     f"({vocab_size},)")
  logits = _at_least_float32(logits).reshape(-1, vocab_size)
  bias = None if output_bias is None else _at_least_float32(output_bias)
  targets = targets.reshape(-1)
  if not augmented:
    cross_entropy = _fused_cross_entropy(logits, bias, targets)
    return cross_entropy.reshape(batch_shape), jnp.zeros(batch_shape, cross_entropy.dtype)
  if kl_output_bias:
    # Both terms then read the same biased logits; autodiff of this add carries
    # the bias's share of the KL's gradient. One extra [N, V] pass.
    logits, bias = logits + bias, None
  fits = True
  if max_distinct_targets:
    words, word_of_token = jnp.unique(
        targets, return_inverse=True, size=max_distinct_targets, fill_value=0)
    word_scores = _target_scores(embedding, words)  # [U, V]
    # More distinct words than rows would pair tokens with the wrong ỹ: NaN says so.
    sorted_targets = jnp.sort(targets)
    fits = jnp.sum(sorted_targets[1:] != sorted_targets[:-1]) < max_distinct_targets
  else:
    word_of_token, word_scores = None, _target_scores(embedding, targets)  # [N, V]
  if stop_gradient_target:
    word_scores = jax.lax.stop_gradient(word_scores)
  cross_entropy, kl = _fused_cross_entropy_and_kl(
      logits, bias, word_scores, word_of_token, targets, tau, form, stop_gradient_target)
  kl = jnp.where(fits, _nan_unless_positive(kl, tau), jnp.nan)
  return cross_entropy.reshape(batch_shape), kl.reshape(batch_shape)


# How the fused passes are written for XLA:CPU. Each row reduction over an [N, V]
# array runs as one YNNPACK pass with its elementwise producers fused in, as long
# as nothing in it is shared with another pass: a shared expression, or even a
# shared broadcast of a scalar or of a row vector, is written out as a whole
# [N, V] array first, an extra write and read of the largest arrays of the step.
# Every pass therefore takes its inputs through `_unshared`, and the backward
# pass puts the target rows in with a scatter, which runs in place, rather than
# a compare against iota, which made the elementwise loop markedly slower.


def _unshared(*arrays):
  """The arrays behind an optimization barrier: aliases (no copy) that XLA cannot merge
  with other uses of the same values, so the pass reading them fuses on its own."""
  return jax.lax.optimization_barrier(arrays)


def _logsumexp(
    x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None
) -> jax.Array:
  """logsumexp(scale * (x + bias)) over the last axis of [N, V], for scale > 0.

  scale None means 1, bias ([V]) None means 0. The scale is applied inside the
  fused pass (max(scale * y) = scale * max(y)), so no scaled copy of x is
  materialised. No autodiff passes through it: its callers are custom_vjp
  functions.
  """
  x_for_max, bias_for_max = _unshared(x, bias)
  row_max = jnp.max(x_for_max if bias is None else x_for_max + bias_for_max, axis=-1)
  x, bias, row_max, scale = _unshared(x, bias, row_max, scale)
  shifted = (x if bias is None else x + bias) - row_max[:, None]
  if scale is None:
    return row_max + jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
  return scale * row_max + jnp.log(jnp.sum(jnp.exp(shifted * scale), axis=-1))


def _target_logits(logits: jax.Array, bias: jax.Array | None, targets: jax.Array) -> jax.Array:
  """(logits + bias)[n, targets[n]] for each row n: [N]."""
  target_logits = jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]
  return target_logits if bias is None else target_logits + bias[targets]


def _inverse(tau: float | jax.Array, dtype) -> jax.Array:
  return (1.0 / jnp.asarray(tau, dtype)).astype(dtype)


@jax.custom_vjp
def _fused_cross_entropy(logits, bias, targets):
  return _fused_cross_entropy_fwd(logits, bias, targets)[0]


def _fused_cross_entropy_fwd(logits, bias, targets):
  log_normalizer = _logsumexp(logits, bias=bias)
  cross_entropy = log_normalizer - _target_logits(logits, bias, targets)
  return cross_entropy, (logits, bias, targets, log_normalizer)


def _weighted_softmax(logits, bias, log_normalizer, weight):
  """weight[:, None] * softmax(logits + bias), [N, V], in a pass of its own."""
  logits, bias, log_normalizer, weight = _unshared(logits, bias, log_normalizer, weight)
  scores = logits if bias is None else logits + bias
  return weight[:, None] * jnp.exp(scores - log_normalizer[:, None])


def _cross_entropy_grad(logits, bias, targets, log_normalizer, grad_cross_entropy, extra=None):
  """d(sum g * CE)/d logits = g * (softmax(logits + bias) - onehot(targets)), plus `extra`.

  `extra(logits)` adds further [N, V] terms inside the same elementwise pass.
  """
  grad = _weighted_softmax(logits, bias, log_normalizer, grad_cross_entropy)
  if extra is not None:
    grad = grad + extra(_unshared(logits)[0])
  return grad.at[jnp.arange(targets.shape[0]), targets].add(-grad_cross_entropy)


def _cross_entropy_bias_grad(logits, bias, targets, log_normalizer, grad_cross_entropy):
  """d(sum g * CE)/d bias: [V], the column sums of `_cross_entropy_grad` without `extra`."""
  softmax_sum = _weighted_softmax(logits, bias, log_normalizer, grad_cross_entropy).sum(0)
  return softmax_sum.at[targets].add(-grad_cross_entropy)


def _fused_cross_entropy_bwd(residuals, grad_cross_entropy):
  logits, bias, targets, log_normalizer = residuals
  grad_logits = _cross_entropy_grad(logits, bias, targets, log_normalizer, grad_cross_entropy)
  return grad_logits, None if bias is None else grad_logits.sum(0), None


_fused_cross_entropy.defvjp(_fused_cross_entropy_fwd, _fused_cross_entropy_bwd)


def _by_token(word_values: jax.Array, word_of_token: jax.Array | None) -> jax.Array:
  """Each token's row of a per-word array: [U, ...] -> [N, ...]; None: one word per token."""
  return word_values if word_of_token is None else word_values[word_of_token]


def _word_sums(token_values: jax.Array, word_of_token: jax.Array | None, num_words: int):
  """The sum over each word's tokens: [N, ...] -> [U, ...], the transpose of `_by_token`."""
  if word_of_token is None:
    return token_values
  return jax.ops.segment_sum(token_values, word_of_token, num_segments=num_words)


# ỹ depends on the target word alone, so it is computed once per distinct word
# ([U, V]) and each token reads its word's row. The KL then needs no
# exponential of its own over [N, V]: KL = (Σ ỹ s − Σ ỹ z) / τ − lse(s/τ) + lse(z/τ),
# with Σ ỹ s and lse(s/τ) per word, and s's gradient summed over each word's
# tokens is ỹ ⊙ (W s / τ − Σ w z / τ − C) (see the backward pass) with per-word
# W, C and the one [N, V] -> [U, V] sum Σ w z.


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fused_cross_entropy_and_kl(
    logits, bias, word_scores, word_of_token, targets, tau, form, constant_target):
  """(cross_entropy, kl), each [N], of logits [N, V] against ỹ = softmax(word_scores / τ).

  word_scores: [U, V], one row per word; token n's word is `word_of_token[n]`
  ([N] ints), or token n's is row n where `word_of_token` is None. kl is
  H(ỹ, ŷ) where `form` is "cross_entropy". constant_target: ỹ gets no gradient,
  not even through τ (word_scores come in behind a stop_gradient then).
  """
  return _fused_cross_entropy_and_kl_fwd(
      logits, bias, word_scores, word_of_token, targets, tau, form, constant_target)[0]


def _fused_cross_entropy_and_kl_fwd(
    logits, bias, word_scores, word_of_token, targets, tau, form, constant_target):
  cross_entropy, (_, _, _, log_normalizer) = _fused_cross_entropy_fwd(logits, bias, targets)
  inverse_tau = _inverse(tau, logits.dtype)
  model_log_normalizer = _logsumexp(logits, inverse_tau)  # [N]
  word_log_normalizer = _logsumexp(word_scores, inverse_tau)  # [U]
  scores, scale, normalizer = _unshared(word_scores, inverse_tau, word_log_normalizer)
  word_probs = jnp.exp(scores * scale - normalizer[:, None])  # ỹ, [U, V]
  target_probs = _by_token(word_probs, word_of_token)  # [N, V]
  probs, kl_logits = _unshared(target_probs, logits)
  expected_logit = jnp.sum(probs * kl_logits, axis=-1)  # Σ ỹ z, [N]
  if form == "cross_entropy":  # H(ỹ, ŷ) = -Σ ỹ log ŷ = lse(z/τ) - Σ ỹ z / τ
    kl = model_log_normalizer - inverse_tau * expected_logit
  else:  # KL = Σ ỹ (log ỹ - log ŷ), log ỹ - log ŷ = (s - z) / τ - lse(s/τ) + lse(z/τ)
    probs, scores = _unshared(word_probs, word_scores)
    expected_score = jnp.sum(probs * scores, axis=-1)  # Σ ỹ s, [U]
    kl = (
        inverse_tau * (_by_token(expected_score, word_of_token) - expected_logit)
        - _by_token(word_log_normalizer, word_of_token) + model_log_normalizer
    )
  residuals = (
      logits, bias, word_scores, word_of_token, targets, tau, log_normalizer,
      model_log_normalizer, word_log_normalizer, word_probs, target_probs, kl, expected_logit,
  )
  return (cross_entropy, kl), residuals


def _fused_cross_entropy_and_kl_bwd(form, constant_target, residuals, grads):
  (logits, bias, word_scores, word_of_token, targets, tau, log_normalizer, model_log_normalizer,
   word_log_normalizer, word_probs, target_probs, kl, expected_logit) = residuals
  grad_cross_entropy, grad_kl = grads
  inverse_tau = _inverse(tau, logits.dtype)
  kl_weight = grad_kl * inverse_tau  # w, [N]

  def kl_grad_logits(logits):  # dKL/dz = (ŷ - ỹ) / τ
    probs, scale, model_normalizer, weight = _unshared(
        target_probs, inverse_tau, model_log_normalizer, kl_weight
    )
    return weight[:, None] * (jnp.exp(logits * scale - model_normalizer[:, None]) - probs)

  grad_logits = _cross_entropy_grad(
      logits, bias, targets, log_normalizer, grad_cross_entropy, kl_grad_logits
  )
  # Token n's gradient on its word's scores s: dKL/ds = ỹ ((s - z) / τ - c) / τ with
  # c = lse(s/τ) - lse(z/τ) + KL, and dH(ỹ, ŷ)/ds = ỹ (-z / τ - c) / τ with
  # c = H - lse(z/τ). Summed over the word's tokens, with w = g / τ:
  # ỹ ⊙ (W s / τ - Σ w z / τ - C), W = Σ w (0 for the cross-entropy), C = Σ w c.
  num_words = word_scores.shape[0]
  weights, weighted_logits = _unshared(kl_weight, logits)
  logit_sums = _word_sums(weights[:, None] * weighted_logits, word_of_token, num_words)
  offsets = kl - model_log_normalizer  # c, [N]
  if form == "kl":
    offsets = offsets + _by_token(word_log_normalizer, word_of_token)
  offset_sums = _word_sums(kl_weight * offsets, word_of_token, num_words)
  if form == "cross_entropy":
    probs, sums, scale, offset_sums = _unshared(word_probs, logit_sums, inverse_tau, offset_sums)
    grad_word_scores = -probs * (sums * scale + offset_sums[:, None])
  else:
    weight_sums = _word_sums(kl_weight, word_of_token, num_words)
    probs, scores, sums, scale, weight_sums, offset_sums = _unshared(
        word_probs, word_scores, logit_sums, inverse_tau, weight_sums, offset_sums
    )
    grad_word_scores = probs * (
        (weight_sums[:, None] * scores - sums) * scale - offset_sums[:, None]
    )
  grad_bias = (  # the bias enters the cross-entropy only
      None if bias is None
      else _cross_entropy_bias_grad(logits, bias, targets, log_normalizer, grad_cross_entropy)
  )
  # τ enters as z / τ and s / τ only, so d/dτ = -(Σ z ∂/∂z + Σ s ∂/∂s) / τ over the augmented
  # term, with Σ z ∂/∂z = Σ w (Σ ŷ z - Σ ỹ z). Two more passes, which XLA drops when τ
  # takes no gradient (training).
  scaled_logits, scale, model_normalizer = _unshared(logits, inverse_tau, model_log_normalizer)
  model_expected_logit = jnp.sum(  # Σ ŷ z, [N]
      jnp.exp(scaled_logits * scale - model_normalizer[:, None]) * scaled_logits, axis=-1)
  scaled_sum = jnp.sum(kl_weight * (model_expected_logit - expected_logit))
  if not constant_target:
    scores, grads_of_scores = _unshared(word_scores, grad_word_scores)
    scaled_sum = scaled_sum + jnp.sum(scores * grads_of_scores)
  grad_tau = jnp.full(jnp.shape(tau), -scaled_sum * inverse_tau, jnp.result_type(tau))
  # Each in its input's type: float32 logits beside a float64 embedding (x64) promoted
  # theirs to float64, where autodiff gives float32.
  return (grad_logits.astype(logits.dtype),
          None if grad_bias is None else grad_bias.astype(bias.dtype),
          grad_word_scores.astype(word_scores.dtype), None, None, grad_tau)


_fused_cross_entropy_and_kl.defvjp(_fused_cross_entropy_and_kl_fwd, _fused_cross_entropy_and_kl_bwd)
