"""Pure loss functions for tied LSTM language models (Inan et al., ICLR 2017).

Every function here is a pure, jit-compatible function of its arguments: no
Flax state, no globals. Shapes use `...` for any leading batch/time axes and
`V` for the vocabulary size, `E` for the embedding size.

The training objective (assembled in `train.py`) is

    J_tot = sum_t [ cross_entropy + gamma * tau * augmented_loss ]

summed over the unroll and averaged over the batch (Zaremba's convention, which
learning rate 1.0 assumes).
"""

import functools

import jax
import jax.numpy as jnp


def _at_least_float32(x: jax.Array) -> jax.Array:
  """bf16/fp16 inputs are upcast so that losses are always computed in >= fp32."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@jax.jit
def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood.

  Args:
    logits: [..., V] unnormalised scores (any float dtype; computed in >= float32).
    targets: [...] integer word ids.

  Returns:
    [...] NLL (float32, or float64 for float64 inputs) of each target, shaped like `targets`.
  """
  log_probs = jax.nn.log_softmax(_at_least_float32(logits), axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _target_scores(embedding: jax.Array, targets: jax.Array) -> jax.Array:
  """L[y] Lᵀ in >= float32; [...] ids -> [..., V]."""
  embedding = _at_least_float32(embedding)
  return jnp.einsum("...e,ve->...v", jnp.take(embedding, targets, axis=0), embedding)


def _target_log_distribution(
    embedding: jax.Array, targets: jax.Array, tau: float
) -> jax.Array:
  """log ỹ = log_softmax(L[y] Lᵀ / τ); [...] ids -> [..., V] float32."""
  return jax.nn.log_softmax(_target_scores(embedding, targets) / tau, axis=-1)


@jax.jit
def target_distribution(
    embedding: jax.Array, targets: jax.Array, tau: float
) -> jax.Array:
  """The estimated target distribution ỹ = softmax(L[y] · Lᵀ / τ).

  Args:
    embedding: [V, E] the input embedding matrix L.
    targets: [...] integer word ids y.
    tau: temperature τ > 0.

  Returns:
    [..., V] float32 probabilities; each row sums to one.
  """
  return jnp.exp(_target_log_distribution(embedding, targets, tau))


@functools.partial(jax.jit, static_argnames="stop_gradient_target")
def augmented_loss(
    logits: jax.Array,
    targets: jax.Array,
    embedding: jax.Array,
    tau: float,
    *,
    stop_gradient_target: bool = False,
) -> jax.Array:
  """Per-token KL(ỹ ‖ ŷ) with ŷ = softmax(logits / τ), the paper's J_aug.

  Computed from log-softmaxes in float32, so it is stable for large scores and
  for bf16 inputs.

  Args:
    logits: [..., V] bias-free logits z = W h (eq. 3.1 uses no output bias).
    targets: [...] integer word ids y.
    embedding: [V, E] the input embedding matrix L that defines ỹ.
    tau: temperature τ > 0.
    stop_gradient_target: if True, ỹ is a constant and L gets no gradient
      through it. The paper's default (False) lets gradient flow into L.

  Returns:
    [...] float32 KL divergence of each token, >= 0.
  """
  log_target = _target_log_distribution(embedding, targets, tau)
  if stop_gradient_target:
    log_target = jax.lax.stop_gradient(log_target)
  log_model = jax.nn.log_softmax(_at_least_float32(logits) / tau, axis=-1)
  return jnp.sum(jnp.exp(log_target) * (log_target - log_model), axis=-1)


@functools.partial(jax.jit, static_argnames=("augmented", "stop_gradient_target"))
def cross_entropy_and_kl(
    logits: jax.Array,
    targets: jax.Array,
    embedding: jax.Array,
    tau: float,
    *,
    output_bias: jax.Array | None = None,
    augmented: bool = True,
    stop_gradient_target: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Both terms of the objective in fused passes, with a hand-written gradient.

  Equal to `cross_entropy(logits + output_bias, targets)` and
  `augmented_loss(logits, targets, embedding, tau)` and to their gradients
  (tests check both); the training step uses this form because it reads each
  [N, V] array a few times instead of materialising every intermediate
  softmax that autodiff of the separate functions keeps.

  Args:
    logits: [..., V] bias-free logits W h.
    targets: [...] integer word ids.
    embedding: [V, E] the input embedding L (ignored unless `augmented`).
    tau: temperature τ > 0.
    output_bias: [V] or None; enters the cross-entropy only (eq. 3.1).
    augmented: if False the KL is zeros and costs nothing.
    stop_gradient_target: if True, ỹ is a constant.

  Returns:
    (cross_entropy, kl), each [...] float32.
  """
  batch_shape, vocab_size = targets.shape, logits.shape[-1]
  logits = _at_least_float32(logits).reshape(-1, vocab_size)
  bias = (
      jnp.zeros((vocab_size,), logits.dtype) if output_bias is None
      else _at_least_float32(output_bias)
  )
  targets = targets.reshape(-1)
  if not augmented:
    cross_entropy = _fused_cross_entropy(logits, bias, targets)
    return cross_entropy.reshape(batch_shape), jnp.zeros(batch_shape, cross_entropy.dtype)
  target_scores = _target_scores(embedding, targets)  # [N, V]
  if stop_gradient_target:
    target_scores = jax.lax.stop_gradient(target_scores)
  cross_entropy, kl = _fused_cross_entropy_and_kl(logits, bias, target_scores, targets, tau)
  return cross_entropy.reshape(batch_shape), kl.reshape(batch_shape)


def _logsumexp(x: jax.Array, scale: float | jax.Array = 1.0) -> jax.Array:
  """logsumexp(scale * x) over the last axis of [N, V], for scale > 0.

  The scale is applied inside the fused passes (max(scale * x) = scale * max(x)),
  so no scaled copy of x is materialised. No autodiff passes through it: its
  callers are custom_vjp functions.
  """
  row_max = jnp.max(x, axis=-1)
  return scale * row_max + jnp.log(jnp.sum(jnp.exp((x - row_max[:, None]) * scale), axis=-1))


def _one_hot_mask(targets: jax.Array, vocab_size: int) -> jax.Array:
  # A compare against iota fuses into the elementwise pass; a scatter would not.
  return targets[:, None] == jnp.arange(vocab_size, dtype=targets.dtype)


@jax.custom_vjp
def _fused_cross_entropy(logits, bias, targets):
  return _fused_cross_entropy_fwd(logits, bias, targets)[0]


def _fused_cross_entropy_fwd(logits, bias, targets):
  scores = logits + bias
  log_normalizer = _logsumexp(scores)
  cross_entropy = log_normalizer - jnp.take_along_axis(scores, targets[:, None], -1)[:, 0]
  return cross_entropy, (logits, bias, targets, log_normalizer)


def _cross_entropy_grad(logits, bias, targets, log_normalizer, grad_cross_entropy):
  """d(sum g * CE)/d logits = g * (softmax(logits + bias) - onehot(targets))."""
  probs = jnp.exp(logits + bias - log_normalizer[:, None])
  return grad_cross_entropy[:, None] * (probs - _one_hot_mask(targets, logits.shape[-1]))


def _fused_cross_entropy_bwd(residuals, grad_cross_entropy):
  logits, bias, targets, log_normalizer = residuals
  grad_logits = _cross_entropy_grad(logits, bias, targets, log_normalizer, grad_cross_entropy)
  return grad_logits, grad_logits.sum(0), None


_fused_cross_entropy.defvjp(_fused_cross_entropy_fwd, _fused_cross_entropy_bwd)


@jax.custom_vjp
def _fused_cross_entropy_and_kl(logits, bias, target_scores, targets, tau):
  return _fused_cross_entropy_and_kl_fwd(logits, bias, target_scores, targets, tau)[0]


def _fused_cross_entropy_and_kl_fwd(logits, bias, target_scores, targets, tau):
  cross_entropy, (_, _, _, log_normalizer) = _fused_cross_entropy_fwd(logits, bias, targets)
  model_log_normalizer = _logsumexp(logits, 1.0 / tau)
  target_log_normalizer = _logsumexp(target_scores, 1.0 / tau)
  target_probs = jnp.exp(target_scores / tau - target_log_normalizer[:, None])
  # KL = sum ỹ (log ỹ - log ŷ), with log ỹ - log ŷ = (s - z) / τ - lse(s/τ) + lse(z/τ).
  kl = (
      jnp.sum(target_probs * (target_scores - logits), axis=-1) / tau
      - target_log_normalizer + model_log_normalizer
  )
  residuals = (
      logits, bias, target_scores, targets, tau, log_normalizer, model_log_normalizer,
      target_log_normalizer, kl,
  )
  return (cross_entropy, kl), residuals


def _fused_cross_entropy_and_kl_bwd(residuals, grads):
  (logits, bias, target_scores, targets, tau, log_normalizer, model_log_normalizer,
   target_log_normalizer, kl) = residuals
  grad_cross_entropy, grad_kl = grads
  grad_scores = _cross_entropy_grad(logits, bias, targets, log_normalizer, grad_cross_entropy)
  model_probs = jnp.exp(logits / tau - model_log_normalizer[:, None])
  target_probs = jnp.exp(target_scores / tau - target_log_normalizer[:, None])
  kl_weight = (grad_kl / tau)[:, None]
  # dKL/dz = (ŷ - ỹ) / τ; dKL/ds = ỹ (log ỹ - log ŷ - KL) / τ.
  grad_logits = grad_scores + kl_weight * (model_probs - target_probs)
  log_ratio_minus_kl = (target_scores - logits) / tau - (
      target_log_normalizer - model_log_normalizer + kl
  )[:, None]
  grad_target_scores = kl_weight * target_probs * log_ratio_minus_kl
  return grad_logits, grad_scores.sum(0), grad_target_scores, None, jnp.zeros_like(tau)


_fused_cross_entropy_and_kl.defvjp(_fused_cross_entropy_and_kl_fwd, _fused_cross_entropy_and_kl_bwd)
