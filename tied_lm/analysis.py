"""The paper's analyses as pure functions: does W move towards Lᵀ, and what do models predict.

Section 5 of the paper argues that training with the augmented loss alone at
a large temperature drives the output matrix W into the column space of the
input embedding (W -> Lᵀ in its notation; here L is [V, E], one row per word,
and W is the [V, H] matrix of z = W h). `theory_objective` is its
J_tot = β·J_aug·τ²·|V| + (1−β)·J, `train_theory_model` trains an untied model
with it while keeping the rows of L at norm 1, and `subspace_distance`
measures how far the two column spaces are apart.

`average_probabilities` and `top_next_words` are the qualitative comparison:
how much probability a model gives to <unk> and frequent words, and what it
predicts after a prompt.

`target_sharpness` asks what the augmented loss teaches: how far the target
distribution ỹ = softmax(L[y] Lᵀ / τ) is from uniform for an embedding L.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tied_lm import data, losses, models, train


def normalize_rows(x: jax.Array) -> jax.Array:
  """x [N, D] with every row scaled to Euclidean norm 1 (zero rows stay zero)."""
  norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.where(norms > 0, norms, 1.0)


def subspace_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Normalized distance between the column spaces of a [N, K] and b [N, M].

  With orthonormal bases Q_a, Q_b of the two spaces,
  d = sqrt(1 - ||Q_aᵀ Q_b||_F² / min(K, M)): 0 when one space contains the
  other, 1 when they are orthogonal. Two random K-dimensional subspaces of R^N
  are at about sqrt(1 - K / N). NaN if either matrix is not finite.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
    raise ValueError(f"need [N, K] and [N, M] matrices, got {a.shape} and {b.shape}")
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    return math.nan  # a diverged W: max(0, 1 - nan) would read as distance 0, a perfect tie
  basis_a, basis_b = np.linalg.qr(a)[0], np.linalg.qr(b)[0]
  overlap = np.sum((basis_a.T @ basis_b) ** 2) / min(a.shape[1], b.shape[1])
  return float(np.sqrt(max(0.0, 1.0 - overlap)))


def output_matrix(params: Any) -> np.ndarray:
  """W [V, H] of an untied model's z = W h (the transposed output kernel)."""
  return np.asarray(params["output_kernel"]["kernel"]).T


def theory_objective(
    bias_free_logits: jax.Array, targets: jax.Array, embedding: jax.Array, tau: float,
    beta: float,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """J_tot = β·J_aug·τ²·|V| + (1−β)·J of section 5, and its (J, J_aug).

  J is the per-token mean cross-entropy of softmax(W h) and J_aug the
  per-token mean KL(ỹ ‖ softmax(W h / τ)); no output bias, as in the analysis.

  Args:
    bias_free_logits: [B, T, V] W h.
    targets: [B, T] word ids.
    embedding: [V, E] L, which defines ỹ.
  """
  cross_entropy = jnp.mean(losses.cross_entropy(bias_free_logits, targets))
  kl = jnp.mean(losses.augmented_loss(bias_free_logits, targets, embedding, tau))
  vocab_size = bias_free_logits.shape[-1]
  total = beta * kl * tau**2 * vocab_size + (1.0 - beta) * cross_entropy
  return total, (cross_entropy, kl)


class TheoryRun(NamedTuple):
  """What `train_theory_model` returns: params, and per-epoch (J, J_aug, distance)."""

  params: Any
  cross_entropy: list[float]
  kl: list[float]
  distance: list[float]


def train_theory_model(
    ids: np.ndarray, vocab_size: int, *, tau: float, beta: float, seed: int,
    hidden_size: int = 300, num_layers: int = 2, batch_size: int = 20, num_steps: int = 35,
    num_epochs: int = 20, learning_rate: float = 1.0, clip_norm: float = 5.0,
    init_scale: float = 0.1,
) -> TheoryRun:
  """Trains an untied, unregularised model on `ids` [N] with `theory_objective`.

  SGD with global-norm clipping, as in training; after every update the rows of L are put
  back at norm 1, as in the paper's analysis. The hidden state is carried
  across windows (truncated BPTT), as in training. W starts at zero, so its
  column space at the end holds only what the objective put there: from a
  random start, the directions of W that the hidden states never excite keep
  their random values, and a column-space distance counts them in full. (SGD
  keeps each update of W in the span of the softmax residuals; Adam's
  per-coordinate scaling would not.)
  """
  model = models.LSTMLanguageModel(
      vocab_size=vocab_size, embed_dim=hidden_size, hidden_size=hidden_size,
      num_layers=num_layers, tie_embeddings=False, output_bias=False, init_scale=init_scale,
  )
  inputs, targets = data.train_windows(ids, batch_size, num_steps)
  carry = model.initial_carry(batch_size)
  params = model.init(jax.random.key(seed), inputs[0], carry, deterministic=True)["params"]
  params = _with_unit_embedding(params)
  params = dict(params, output_kernel={"kernel": jnp.zeros_like(params["output_kernel"]["kernel"])})
  optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optax.sgd(learning_rate))
  opt_state = optimizer.init(params)
  step = jax.jit(functools.partial(
      _theory_step, model=model, optimizer=optimizer, tau=tau, beta=beta))
  history = TheoryRun(params, [], [], [])
  for _ in range(num_epochs):
    carry = model.initial_carry(batch_size)
    sums = jnp.zeros(2, jnp.float32)  # on device: no host sync per step
    for window in range(len(inputs)):
      params, opt_state, carry, terms = step(
          params, opt_state, carry, inputs[window], targets[window])
      sums = sums + terms
    sums = np.asarray(sums, np.float64)
    history.cross_entropy.append(float(sums[0] / len(inputs)))
    history.kl.append(float(sums[1] / len(inputs)))
    history.distance.append(
        subspace_distance(np.asarray(params["embed"]["embedding"]), output_matrix(params)))
  return history._replace(params=params)


def _with_unit_embedding(params: Any) -> Any:
  embed = dict(params["embed"], embedding=normalize_rows(params["embed"]["embedding"]))
  return dict(params, embed=embed)


def _theory_step(params, opt_state, carry, inputs, targets, *, model, optimizer, tau, beta):
  def loss_fn(params):
    out = model.apply({"params": params}, inputs, carry, deterministic=True,
                      method=models.LSTMLanguageModel.outputs)
    total, terms = theory_objective(out.bias_free_logits, targets, out.embedding, tau, beta)
    return total, (terms, out.carry)

  grads, (terms, new_carry) = jax.grad(loss_fn, has_aux=True)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = _with_unit_embedding(optax.apply_updates(params, updates))
  return params, opt_state, jax.lax.stop_gradient(new_carry), jnp.stack(terms)


def average_probabilities(
    model: models.LSTMLanguageModel, params: Any, ids: np.ndarray, word_ids: list[int],
    batch_size: int = 10, num_steps: int = 35,
) -> np.ndarray:
  """The model's mean predicted probability of each of `word_ids` over every position of ids.

  Returns:
    [len(word_ids)] mean over the len(ids) - 1 predictions (state carried
    between windows, as in `train.evaluate`).
  """
  inputs, _, weights = data.eval_windows(ids, batch_size, num_steps)
  train.check_eval_memory(batch_size, num_steps, model.vocab_size)
  model = model.for_evaluation(num_steps)
  carry = model.initial_carry(batch_size)
  selected = jnp.asarray(word_ids, jnp.int32)
  total = jnp.zeros(len(word_ids), jnp.float32)
  for window in range(len(inputs)):
    carry, window_sum = _probability_sums(
        params, carry, inputs[window], weights[window], selected, model=model)
    total += window_sum
  return np.asarray(total) / float(weights.sum())


@functools.partial(jax.jit, static_argnames="model")
def _probability_sums(params, carry, inputs, weights, selected, *, model):
  logits, carry = model.apply({"params": params}, inputs, carry, deterministic=True)
  probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., selected]
  return carry, jnp.einsum("btw,bt->w", probabilities, weights)


def top_next_words(
    model: models.LSTMLanguageModel, params: Any, vocab: tuple[str, ...], prompt_ids: list[int],
    k: int = 10,
) -> list[tuple[str, float]]:
  """The k most likely next words after the prompt, with their probabilities (float32,
  as evaluation computes them, whatever the training precision)."""
  if not len(prompt_ids):  # for_evaluation(0) would blame a field the caller never set
    raise ValueError("prompt_ids is empty: the next word needs at least one word before it")
  model = model.for_evaluation(len(prompt_ids))
  carry = model.initial_carry(1)
  logits, _ = model.apply(
      {"params": params}, jnp.asarray(prompt_ids, jnp.int32)[None], carry, deterministic=True)
  probabilities = jax.nn.softmax(logits[0, -1].astype(jnp.float32))
  values, indices = jax.lax.top_k(probabilities, k)
  return [(vocab[int(i)], float(p)) for p, i in zip(values, indices, strict=True)]


class TargetSharpness(NamedTuple):
  """Means over the given target tokens of the augmented loss's ỹ.

  entropy: nats; log V for a uniform ỹ.
  target_probability: ỹ's probability of the target word itself.
  """

  entropy: float
  target_probability: float


def target_sharpness(
    embedding: np.ndarray, targets: np.ndarray, tau: float, chunk_size: int = 4096
) -> TargetSharpness:
  """How peaked ỹ = softmax(L[y] Lᵀ / τ) is, averaged over targets.

  ỹ depends on the word alone, so each distinct word is scored once and weighted
  by its count (PTB's validation text: 6,022 distinct words in 73,760 tokens).

  Args:
    embedding: [V, E] the input embedding L.
    targets: [...] word ids y, any shape (a stretch of text weights words by frequency).
    tau: temperature τ > 0.
    chunk_size: distinct words per [chunk, V] block, to bound memory.
  """
  embedding = jnp.asarray(embedding, jnp.float32)
  words, counts = np.unique(np.asarray(targets), return_counts=True)
  totals = np.zeros(2)
  for start in range(0, len(words), chunk_size):
    chunk = slice(start, start + chunk_size)
    totals += np.asarray(_target_sharpness_sums(
        embedding, jnp.asarray(words[chunk], jnp.int32),
        jnp.asarray(counts[chunk], jnp.float32), tau), np.float64)
  entropy, target_probability = totals / counts.sum()  # every id, whatever the shape
  return TargetSharpness(float(entropy), float(target_probability))


@jax.jit
def _target_sharpness_sums(embedding, words, counts, tau):
  probabilities = losses.target_distribution(embedding, words, tau)
  entropy = jnp.sum(jax.scipy.special.entr(probabilities), axis=-1)
  own = jnp.take_along_axis(probabilities, words[:, None], axis=-1)[:, 0]
  return jnp.stack([counts @ entropy, counts @ own])
