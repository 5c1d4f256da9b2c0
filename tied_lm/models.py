"""Flax modules: a multi-layer LSTM language model with optional tied embeddings.

Shapes: B batch, T time steps (`num_steps`), V vocabulary, E embedding size,
H hidden size. Internally the recurrent layers run time-major ([T, B, ...])
because `lax.scan` iterates over the leading axis.
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import rnn

# One (c, h) pair of [B, H] arrays per layer.
Carry = tuple[tuple[jax.Array, jax.Array], ...]

COMPUTE_DTYPES = ("float32", "bfloat16")
LSTM_IMPLEMENTATIONS = ("scan", "cudnn")
FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


def fits_float32(value: float) -> bool:
  """Whether `value` is finite in float32, where parameters and losses live (NaN is not).

  A float64 setting can be finite and still be inf once the step casts it (1e39, say).
  """
  return abs(value) <= FLOAT32_MAX


def field_problems(fields: Mapping[str, Any], prefix: str = "") -> list[str]:
  """What is wrong with `LSTMLanguageModel` fields (a config's `model` section), one line each.

  Args:
    fields: the module's fields by name; `vocab_size` is checked where present
      (configs take it from the corpus).
    prefix: put before each field's name in the messages, e.g. "model.".
  """
  f = fields
  checks = [
      (f.get("vocab_size", 1) > 0, f"{prefix}vocab_size={f.get('vocab_size')} must be positive"),
      (f["num_layers"] > 0, f"{prefix}num_layers={f['num_layers']} must be positive"),
      (f["embed_dim"] > 0, f"{prefix}embed_dim={f['embed_dim']} must be positive"),
      (f["hidden_size"] > 0, f"{prefix}hidden_size={f['hidden_size']} must be positive"),
      (f["init_scale"] > 0, f"{prefix}init_scale={f['init_scale']} must be > 0"),
      # inf passes "> 0" and gives infinite weights, and so does a scale whose uniform range,
      # 2 * init_scale, is inf in float32.
      (fits_float32(2 * f["init_scale"]),
       f"{prefix}init_scale={f['init_scale']} must be finite and at most "
       f"{FLOAT32_MAX / 2:.3g} (the initial weights' range, 2 * init_scale, is float32)"),
      (f["unroll"] > 0, f"{prefix}unroll={f['unroll']} must be positive"),
      (f["compute_dtype"] in COMPUTE_DTYPES,
       f"{prefix}compute_dtype={f['compute_dtype']!r} must be 'float32' or 'bfloat16' (a "
       "name, not a dtype)"),
      (f["lstm_implementation"] in LSTM_IMPLEMENTATIONS,
       f"{prefix}lstm_implementation={f['lstm_implementation']!r} must be 'scan' or 'cudnn'"),
      (f["lstm_implementation"] != "cudnn" or f["compute_dtype"] == "float32",
       f"{prefix}lstm_implementation='cudnn' runs in float32 only; set "
       f"{prefix}compute_dtype=float32"),
  ]
  for name in ("input_dropout", "hidden_dropout", "output_dropout"):
    checks.append((0 <= f[name] < 1, f"{prefix}{name}={f[name]} is a drop probability in [0, 1)"))
  checks.append((
      not f["tie_embeddings"] or f["hidden_size"] == f["embed_dim"] or f["output_projection"],
      f"tie_embeddings needs {prefix}hidden_size == {prefix}embed_dim (got {f['hidden_size']} "
      f"!= {f['embed_dim']}); set {prefix}output_projection=True to add a projection",
  ))
  return [message for ok, message in checks if not ok]


def uniform_init(scale: float) -> nn.initializers.Initializer:
  """Uniform(-scale, scale), the initialisation of Zaremba et al. (2014)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


class LMOutputs(NamedTuple):
  """What one forward pass produces.

  logits: [B, T, V] scores including the output bias (if any).
  bias_free_logits: [B, T, V] W h without the bias, the input of the
    augmented loss (the same array as `logits` when there is no bias).
  output_bias: [V] the bias in `logits`, or None.
  embedding: [V, E] the input embedding L, which defines the target
    distribution of the augmented loss.
  carry: the recurrent state after the last time step.
  """

  logits: jax.Array
  bias_free_logits: jax.Array
  output_bias: jax.Array | None
  embedding: jax.Array
  carry: Carry


class DropoutMasks(NamedTuple):
  """Variational dropout masks, one per window, each without a time axis.

  input: [B, E] on the embedding output (the first layer's input).
  hidden: per layer [B, H] on h, shared by its recurrent use and its use as
    the next layer's input.
  output: [B, H] on the last layer's output, before the logits.
  Any entry may be None (nothing dropped).
  """

  input: jax.Array | None
  hidden: tuple[jax.Array | None, ...]
  output: jax.Array | None


def _apply_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  return x if mask is None else x * mask.astype(x.dtype)


def _lstm_cell(gates: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pre-activations [B, 4H] (order i, f, g, o) and c [B, H] -> (activations, new c, new h)."""
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  activations = jnp.concatenate(
      [jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)], axis=-1
  )
  i, f, g, o = jnp.split(activations, 4, axis=-1)
  c = f * c + i * g
  return activations, c, o * jnp.tanh(c)


def _matmul(x: jax.Array, y: jax.Array, dtype: str) -> jax.Array:
  """x @ y with inputs in `dtype` and a float32 result (no gradient rule of its own)."""
  return jnp.matmul(x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)


@jax.custom_vjp
def output_scores(x: jax.Array, table: jax.Array) -> jax.Array:
  """x [..., E] · table [V, E]ᵀ -> [..., V], with a gradient written for XLA:CPU.

  The output layer's logits (table: the embedding L when tied, the output
  kernel's transpose otherwise) and the augmented loss's target scores L[y] Lᵀ.
  The gradient equals autodiff's, but x's is written as (table contracted
  with g over V) [E, N], then transposed: autodiff's [N, V] x [V, E] form,
  K = V, ran about 1.4x slower on XLA:CPU, and for the tied table XLA also
  copied g into a transposed layout for the table's gradient.
  """
  return jnp.einsum("...e,ve->...v", x, table)


def _output_scores_fwd(x, table):
  return output_scores(x, table), (x, table)


def _output_scores_bwd(residuals, grad):
  x, table = residuals
  flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, table.shape[0])
  # The barrier keeps XLA from folding the transpose back into the product.
  grad_x = jax.lax.optimization_barrier(jnp.einsum("ve,nv->en", table, flat_grad)).T
  return grad_x.reshape(x.shape), jnp.einsum("nv,ne->ve", flat_grad, flat_x)


output_scores.defvjp(_output_scores_fwd, _output_scores_bwd)


class TiedEmbed(nn.Embed):
  """`nn.Embed` whose `attend`, the tied output layer, is `output_scores`."""

  def attend(self, query: jax.Array) -> jax.Array:
    query, embedding = self.promote_dtype(query, self.embedding, dtype=self.dtype)
    return output_scores(query, embedding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_matmul(x: jax.Array, y: jax.Array, dtype: str) -> jax.Array:
  """x [..., K] @ y [K, N] for the bf16 mode: `dtype` inputs, float32 results.

  Its gradient's two matmuls also take `dtype` inputs (the float32 cotangent
  is rounded), which autodiff of a mixed-type matmul would run in float32.
  """
  return _matmul(x, y, dtype)


def _mixed_matmul_fwd(x, y, dtype):
  x, y = x.astype(dtype), y.astype(dtype)  # kept in `dtype`: half the memory
  return _matmul(x, y, dtype), (x, y)


def _mixed_matmul_bwd(dtype, residuals, grad):
  x, y = residuals
  grad = grad.astype(dtype)
  grad_x = _matmul(grad, y.T, dtype)
  grad_y = _matmul(x.reshape(-1, x.shape[-1]).T, grad.reshape(-1, grad.shape[-1]), dtype)
  return grad_x, grad_y


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def _dense(x: jax.Array, kernel: jax.Array, dtype: str) -> jax.Array:
  """x [..., K] @ kernel [K, N]: plain in float32, `mixed_matmul` otherwise.

  Flattened to one [rows, K] matmul: with x's leading axes kept, XLA:CPU
  contracts both of them in the kernel's gradient and copies the [T, B, N]
  cotangent into a transposed layout first.
  """
  flat = x.reshape(-1, x.shape[-1])
  out = flat @ kernel if dtype == "float32" else mixed_matmul(flat, kernel, dtype)
  return out.reshape(*x.shape[:-1], kernel.shape[-1])


def _scan_prefetched(step, carry, xs, *, reverse: bool = False, unroll: int = 1):
  """`lax.scan(step, carry, xs, reverse=reverse, unroll=unroll)`, with each slice of xs
  copied into the loop state one iteration ahead.

  Reading xs[t] inside the step makes XLA:CPU fuse that dynamic slice into the
  step's elementwise fusions, which then run several times slower than on a
  plain [B, ...] operand (a fifth to a third of a small LSTM's time step).
  Here the step gets its slice from the loop state, and the copy of the next
  slice is a fusion of its own.
  """
  num_steps = jax.tree.leaves(xs)[0].shape[0]
  first = num_steps - 1 if reverse else 0

  def body(state, t):
    carry, x = state
    carry, y = step(carry, x)
    following = jnp.clip(t - 1 if reverse else t + 1, 0, num_steps - 1)
    x = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, following, keepdims=False), xs)
    return (carry, x), y

  (carry, _), ys = jax.lax.scan(
      body, (carry, jax.tree.map(lambda a: a[first], xs)), jnp.arange(num_steps),
      reverse=reverse, unroll=unroll,
  )
  return carry, ys


def _lstm_recurrence_fwd(
    projected_inputs, recurrent_kernel, carry, recurrent_mask, unroll, compute_dtype
):
  kernel = recurrent_kernel.astype(compute_dtype)

  def step(state, projected_input):
    c, h = state
    gates = projected_input + _matmul(_apply_mask(h, recurrent_mask), kernel, compute_dtype)
    activations, c, h = _lstm_cell(gates, c)
    return (c, h), (h, c, activations)

  final_carry, (outputs, cells, activations) = _scan_prefetched(
      step, carry, projected_inputs, unroll=unroll
  )
  residuals = (recurrent_kernel, carry, recurrent_mask, outputs, cells, activations)
  return (outputs, final_carry), residuals


def _lstm_recurrence_bwd(unroll, compute_dtype, residuals, grads):
  recurrent_kernel, (initial_c, initial_h), recurrent_mask, outputs, cells, activations = (
      residuals
  )
  grad_outputs, (grad_final_c, grad_final_h) = grads
  previous_cells = jnp.concatenate([initial_c[None], cells[:-1]])
  previous_h = _apply_mask(jnp.concatenate([initial_h[None], outputs[:-1]]), recurrent_mask)
  # The kernel transposed to [4H, H] once, outside the loop: XLA:CPU runs the loop's
  # [B, 4H] x [4H, H] product faster in this plain form than by contracting the
  # kernel's last axis in place. The barrier keeps XLA from folding the transpose
  # back into the product.
  kernel_transposed = jax.lax.optimization_barrier(recurrent_kernel.astype(compute_dtype).T)

  def step(state, inputs):
    grad_c, grad_h_recurrent = state
    grad_h, c, previous_c, activations = inputs
    i, f, g, o = jnp.split(activations, 4, axis=-1)
    grad_h = grad_h + grad_h_recurrent
    tanh_c = jnp.tanh(c)
    grad_c = grad_c + grad_h * o * (1 - tanh_c**2)
    grad_gates = jnp.concatenate([
        grad_c * g * i * (1 - i),
        grad_c * previous_c * f * (1 - f),
        grad_c * i * (1 - g**2),
        grad_h * tanh_c * o * (1 - o),
    ], axis=-1)
    grad_previous_h = _apply_mask(
        _matmul(grad_gates, kernel_transposed, compute_dtype), recurrent_mask
    )
    return (grad_c * f, grad_previous_h), grad_gates

  (grad_initial_c, grad_initial_h), grad_gates = _scan_prefetched(
      step,
      (grad_final_c, grad_final_h),
      (grad_outputs, cells, previous_cells, activations),
      reverse=True,
      unroll=unroll,
  )
  # The weight gradient as one [H, T*B] x [T*B, 4H] matmul, not T small ones, on
  # flattened operands: contracting (t, b) as two axes made XLA:CPU copy both
  # operands into a (b, t) order first.
  grad_kernel = jax.lax.dot_general(
      previous_h.reshape(-1, previous_h.shape[-1]).astype(compute_dtype),
      grad_gates.reshape(-1, grad_gates.shape[-1]).astype(compute_dtype),
      (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32,
  )
  grad_mask = None if recurrent_mask is None else jnp.zeros_like(recurrent_mask)
  return grad_gates, grad_kernel, (grad_initial_c, grad_initial_h), grad_mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lstm_recurrence(
    projected_inputs: jax.Array,
    recurrent_kernel: jax.Array,
    carry: tuple[jax.Array, jax.Array],
    recurrent_mask: jax.Array | None,
    unroll: int = 1,
    compute_dtype: str = "float32",
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """The recurrent part of an LSTM layer over a window, with a hand-written gradient.

  Autodiff of `lax.scan` would accumulate the recurrent kernel's gradient
  inside the backward loop, T rank-B updates of an [H, 4H] array; this
  gradient keeps only the [B, 4H] x [4H, H] matmul in the loop and computes
  the kernel's gradient after it in one matmul. Tests check it against
  autodiff.

  Args:
    projected_inputs: [T, B, 4H] x_t W_x + b, gate order (i, f, g, o).
    recurrent_kernel: [H, 4H].
    carry: (c, h), each [B, H].
    recurrent_mask: [B, H] variational mask on h for its recurrent use, or None.
    unroll: time steps per loop iteration (speed only).
    compute_dtype: the matmuls' input type ("bfloat16" for mixed precision);
      they accumulate in float32, and gates, cells and gradients stay float32.

  Returns:
    outputs [T, B, H] (the unmasked h_t) and the final (c, h).
  """
  return _lstm_recurrence_fwd(
      projected_inputs, recurrent_kernel, carry, recurrent_mask, unroll, compute_dtype
  )[0]


lstm_recurrence.defvjp(_lstm_recurrence_fwd, _lstm_recurrence_bwd)


def cudnn_weights(
    input_kernel: jax.Array, recurrent_kernel: jax.Array, bias: jax.Array
) -> jax.Array:
  """Our layer's parameters as the flat weight vector of a one-layer `jax.experimental.rnn.lstm`.

  cuDNN's layout (as `rnn.unpack_lstm_weights` reads it): W_ih [4H, D], W_hh
  [4H, H], b_ih [4H], b_hh [4H], gate order (i, f, g, o) as ours; our single
  bias goes in b_ih and b_hh is zero.
  """
  return jnp.concatenate([
      input_kernel.T.reshape(-1), recurrent_kernel.T.reshape(-1), bias, jnp.zeros_like(bias)
  ])


class LSTMLayer(nn.Module):
  """One LSTM layer with fused gates (order i, f, g, o) and a single bias.

  The input-to-hidden matmul for all time steps is one large matmul outside
  the time loop; only the recurrent matmul runs inside `lax.scan`. With
  implementation="cudnn" the whole layer is one `jax.experimental.rnn.lstm`
  call (cuDNN, NVIDIA GPUs only) on the same parameters, which takes no
  recurrent dropout mask.
  """

  hidden_size: int
  init_scale: float
  unroll: int = 1
  compute_dtype: str = "float32"
  implementation: str = "scan"

  @nn.compact
  def __call__(
      self,
      inputs: jax.Array,
      carry: tuple[jax.Array, jax.Array],
      recurrent_mask: jax.Array | None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Runs the layer over a window.

    Args:
      inputs: [T, B, D] time-major inputs (already masked by the caller).
      carry: (c, h), each [B, H].
      recurrent_mask: [B, H] variational mask on h for its recurrent use, or
        None.

    Returns:
      outputs [T, B, H] (the unmasked h_t) and the final (c, h).
    """
    init = uniform_init(self.init_scale)
    num_gates = 4 * self.hidden_size
    input_kernel = self.param("input_kernel", init, (inputs.shape[-1], num_gates))
    recurrent_kernel = self.param(
        "recurrent_kernel", init, (self.hidden_size, num_gates)
    )
    bias = self.param("bias", init, (num_gates,))

    if self.implementation == "cudnn":
      c, h = carry
      batch_size, input_size = inputs.shape[1], inputs.shape[2]
      outputs, h, c = rnn.lstm(
          inputs.transpose(1, 0, 2), h[None], c[None],
          cudnn_weights(input_kernel, recurrent_kernel, bias),
          jnp.full((batch_size,), inputs.shape[0], jnp.int32),
          input_size, self.hidden_size, 1, 0.0, False,
      )
      return outputs.transpose(1, 0, 2), (c[0], h[0])
    projected_inputs = _dense(inputs, input_kernel, self.compute_dtype) + bias
    return lstm_recurrence(
        projected_inputs, recurrent_kernel, carry, recurrent_mask, self.unroll, self.compute_dtype
    )


class LSTMLanguageModel(nn.Module):
  """Embedding -> `num_layers` LSTMs -> logits, with optional weight tying.

  When `tie_embeddings` is set the output layer is `embed.attend`, so the one
  [V, E] embedding serves as both input lookup and output classifier (the
  paper's RE). Variational dropout masks are drawn once per window for the
  LSTM input, for each layer's hidden state (shared between its recurrent use
  and its use as the next layer's input) and for the final output.
  """

  vocab_size: int
  embed_dim: int
  hidden_size: int
  num_layers: int = 2
  tie_embeddings: bool = True
  output_bias: bool = False
  # With tying and hidden_size != embed_dim: project h to embed_dim if True,
  # otherwise refuse (the paper ties equal sizes; a projection is a choice).
  output_projection: bool = False
  init_scale: float = 0.1
  input_dropout: float = 0.0
  hidden_dropout: float = 0.0
  output_dropout: float = 0.0
  # Time steps per iteration of the scan's loop; a speed knob only.
  unroll: int = 1
  # "bfloat16": matmul inputs in bf16 (float32 accumulation); parameters, LSTM
  # gates and cells, and the losses stay float32.
  compute_dtype: str = "float32"
  # "cudnn": each LSTM layer is one cuDNN call (NVIDIA GPUs, float32). cuDNN
  # takes no recurrent dropout mask, so each layer's hidden mask then drops only
  # the next layer's input, as in experiments/torch_reference.py.
  lstm_implementation: str = "scan"

  def setup(self) -> None:
    problems = field_problems({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
    if problems:
      raise ValueError(problems[0])
    init = uniform_init(self.init_scale)
    self.embed = TiedEmbed(self.vocab_size, self.embed_dim, embedding_init=init)
    # nn.Dense's own dot of bf16 inputs would give bf16 logits, and XLA:CPU runs it in fp32.
    dtype = self.compute_dtype
    dense_options = (
        {} if dtype == "float32"
        else {"dot_general": lambda x, kernel, *_, **__: mixed_matmul(x, kernel, dtype)}
    )
    self.layers = [
        LSTMLayer(
            self.hidden_size, self.init_scale, self.unroll, self.compute_dtype,
            self.lstm_implementation, name=f"lstm_{i}",
        )
        for i in range(self.num_layers)
    ]
    if self.tie_embeddings:
      self.projection = (
          nn.Dense(self.embed_dim, use_bias=False, kernel_init=init, **dense_options)
          if self.hidden_size != self.embed_dim
          else None
      )
    else:
      output_options = dense_options or {  # float32: output_scores' gradient
          "dot_general": lambda x, kernel, *_, **__: output_scores(x, kernel.T)
      }
      self.output_kernel = nn.Dense(
          self.vocab_size, use_bias=False, kernel_init=init, **output_options
      )
    if self.output_bias:
      self.bias = self.param("output_bias", init, (self.vocab_size,))

  def for_evaluation(self, num_steps: int) -> "LSTMLanguageModel":
    """This model as evaluation runs it on windows of `num_steps`: same numbers.

    The forward-only loop is unrolled in full: on a CPU the per-iteration cost
    of 2 * num_steps tiny steps dominates evaluation. Reported perplexities are
    float32, whatever the training precision.
    """
    return self.clone(unroll=num_steps, compute_dtype="float32")

  def initial_carry(self, batch_size: int) -> Carry:
    """Zero state: per layer (c, h), each [batch_size, H] float32."""
    shape = (batch_size, self.hidden_size)
    # Separate buffers per leaf, so that each can be donated.
    return tuple(
        (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
        for _ in range(self.num_layers)
    )

  def dropout_masks(self, batch_size: int, *, deterministic: bool) -> DropoutMasks:
    """Draws scaled Bernoulli keep-masks from the 'dropout' RNG (Gal & Ghahramani)."""

    def mask(rate, width):
      if deterministic or rate == 0.0:
        return None
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, (batch_size, width))
      return keep.astype(jnp.float32) / (1.0 - rate)

    return DropoutMasks(
        input=mask(self.input_dropout, self.embed_dim),
        hidden=tuple(
            mask(self.hidden_dropout, self.hidden_size) for _ in range(self.num_layers)
        ),
        output=mask(self.output_dropout, self.hidden_size),
    )

  def hidden_states(
      self, tokens: jax.Array, carry: Carry, masks: DropoutMasks
  ) -> tuple[jax.Array, Carry]:
    """Embedding and LSTM stack: tokens [B, T] -> (last layer's masked h [B, T, H], carry)."""
    # Static shapes, checked once per trace: a [T] row would broadcast against a
    # [B, H] carry into B copies of itself.
    state_shape = (tokens.shape[0], self.hidden_size) if tokens.ndim == 2 else None
    if (tokens.ndim != 2 or len(carry) != self.num_layers
        or any(jnp.shape(x) != state_shape for layer in carry for x in layer)):
      raise ValueError(
          f"tokens have shape {tokens.shape} and the carry {jax.tree.map(jnp.shape, carry)}; "
          f"the model needs tokens [B, T] and, per layer, (c, h) each [B, {self.hidden_size}] "
          "(`initial_carry(B)`)")
    x = _apply_mask(self.embed(tokens.T), masks.input)  # [T, B, E], time-major
    new_carry = []
    for i, (layer, layer_carry, mask) in enumerate(
        zip(self.layers, carry, masks.hidden, strict=True)
    ):
      h, layer_carry = layer(x, layer_carry, mask)
      new_carry.append(layer_carry)
      # The next layer sees h through the same mask as the recurrence.
      x = _apply_mask(h, mask) if i + 1 < self.num_layers else h
    return _apply_mask(x, masks.output).transpose(1, 0, 2), tuple(new_carry)

  def output_logits(self, hidden: jax.Array) -> jax.Array:
    """The bias-free logits W h: hidden [B, T, H] -> [B, T, V] (W = Lᵀ when tied)."""
    if self.tie_embeddings:
      if self.projection is not None:
        hidden = self.projection(hidden)
      if self.compute_dtype == "float32":
        return self.embed.attend(hidden)
      return mixed_matmul(hidden, self.embed.embedding.T, self.compute_dtype)
    return self.output_kernel(hidden)

  def outputs(
      self,
      tokens: jax.Array,
      carry: Carry,
      *,
      deterministic: bool,
      masks: DropoutMasks | None = None,
  ) -> LMOutputs:
    """Forward pass returning everything the losses need, computed once.

    Args:
      tokens: [B, T] integer word ids in [0, V) (unchecked, as jit requires: an id
        outside [-V, V) gives NaN logits in its row from that step on, and one in
        [-V, 0) is the word it wraps around to, not padding).
      carry: the state from `initial_carry` or from the previous window.
      deterministic: if True and `masks` is None, no dropout (evaluation).
      masks: explicit dropout masks; drawn with `dropout_masks` if None.
    """
    if masks is None:
      masks = self.dropout_masks(tokens.shape[0], deterministic=deterministic)
    return self.output_terms(*self.hidden_states(tokens, carry, masks))

  def output_terms(self, hidden: jax.Array, carry: Carry) -> LMOutputs:
    """The LMOutputs of the last layer's masked h [B, T, H], with `carry` passed through."""
    bias_free_logits = self.output_logits(hidden)
    bias = self.bias if self.output_bias else None
    logits = bias_free_logits if bias is None else bias_free_logits + bias
    return LMOutputs(logits, bias_free_logits, bias, self.embed.embedding, carry)

  def __call__(
      self, tokens: jax.Array, carry: Carry, *, deterministic: bool
  ) -> tuple[jax.Array, Carry]:
    """tokens [B, T], carry -> (logits [B, T, V], new carry)."""
    out = self.outputs(tokens, carry, deterministic=deterministic)
    return out.logits, out.carry
