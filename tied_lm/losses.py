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


def _target_log_distribution(
    embedding: jax.Array, targets: jax.Array, tau: float
) -> jax.Array:
  """log ỹ = log_softmax(L[y] Lᵀ / τ); [...] ids -> [..., V] float32."""
  embedding = _at_least_float32(embedding)
  target_vectors = jnp.take(embedding, targets, axis=0)  # [..., E]
  scores = jnp.einsum("...e,ve->...v", target_vectors, embedding)
  return jax.nn.log_softmax(scores / tau, axis=-1)


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
