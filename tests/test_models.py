"""The model against a NumPy reference, the tying invariants and parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tied_lm import losses, models
from tied_lm.models import DropoutMasks, LSTMLanguageModel

V, E, B, T = 17, 6, 3, 5


def make_model(**overrides):
  kwargs = dict(vocab_size=V, embed_dim=E, hidden_size=E, num_layers=2, init_scale=0.3)
  kwargs.update(overrides)
  return LSTMLanguageModel(**kwargs)


def init(model, batch_size=B):
  tokens = jnp.zeros((batch_size, T), jnp.int32)
  return model.init(jax.random.key(0), tokens, model.initial_carry(batch_size), deterministic=True)[
      "params"
  ]


def np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_forward(params, tokens, masks, num_layers, tied):
  """Step-by-step reference: per-time-step gates, masks applied by hand."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  embedding = params["embed"]["embedding"]
  x = embedding[tokens] * masks.input[:, None, :]  # [B, T, E]
  for layer in range(num_layers):
    p = params[f"lstm_{layer}"]
    mask = masks.hidden[layer]
    hidden = p["recurrent_kernel"].shape[0]
    c = np.zeros((tokens.shape[0], hidden))
    h = np.zeros((tokens.shape[0], hidden))
    outputs = []
    for t in range(tokens.shape[1]):
      gates = x[:, t] @ p["input_kernel"] + (h * mask) @ p["recurrent_kernel"] + p["bias"]
      i, f, g, o = np.split(gates, 4, axis=-1)
      c = np_sigmoid(f) * c + np_sigmoid(i) * np.tanh(g)
      h = np_sigmoid(o) * np.tanh(c)
      outputs.append(h)
    h_all = np.stack(outputs, axis=1)
    x = h_all * mask[:, None, :] if layer + 1 < num_layers else h_all
  x = x * masks.output[:, None, :]
  if "projection" in params:  # tied, hidden_size != embed_dim: h P, then Lᵀ
    x = x @ params["projection"]["kernel"]
  if tied:
    return x @ embedding.T
  return x @ params["output_kernel"]["kernel"] + params["output_bias"]


@pytest.mark.parametrize("tied", [True, False])
def test_forward_matches_numpy_reference_with_dropout_masks(tied):
  model = make_model(tie_embeddings=tied, output_bias=not tied)
  params = init(model)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, V, (B, T))

  def mask():
    return (rng.random((B, E)) > 0.4) / 0.6

  masks = DropoutMasks(input=mask(), hidden=(mask(), mask()), output=mask())
  out = model.apply(
      {"params": params}, jnp.asarray(tokens), model.initial_carry(B), deterministic=False,
      masks=jax.tree.map(jnp.asarray, masks), method=model.outputs,
  )
  expected = np_forward(params, tokens, masks, 2, tied)
  np.testing.assert_allclose(out.logits, expected, rtol=1e-4, atol=1e-5)
  if not tied:
    np.testing.assert_allclose(
        out.bias_free_logits, expected - np.asarray(params["output_bias"]), rtol=1e-4, atol=1e-5
    )
  np.testing.assert_array_equal(out.embedding, params["embed"]["embedding"])


def test_tied_model_has_one_vocab_matrix_and_untied_has_two():
  tied = init(make_model(tie_embeddings=True, output_bias=False))
  assert set(tied) == {"embed", "lstm_0", "lstm_1"}
  untied = init(make_model(tie_embeddings=False, output_bias=True))
  assert set(untied) == {"embed", "lstm_0", "lstm_1", "output_kernel", "output_bias"}
  assert untied["output_kernel"]["kernel"].shape == (E, V)


def analytic_param_count(vocab, units, layers, tied, output_bias):
  lstm = sum(4 * units * (units + units) + 4 * units for _ in range(layers))
  return vocab * units + lstm + (0 if tied else units * vocab) + (vocab if output_bias else 0)


@pytest.mark.parametrize(
    "units,tied,expected_millions",
    [(650, True, 13.27), (650, False, 19.78), (1500, True, 51.0), (1500, False, 66.0)],
)
def test_param_counts_match_the_paper(units, tied, expected_millions):
  model = LSTMLanguageModel(
      vocab_size=10000, embed_dim=units, hidden_size=units, num_layers=2,
      tie_embeddings=tied, output_bias=not tied,
  )
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, 2), jnp.int32), model.initial_carry(1),
          deterministic=True,
      )
  )
  count = sum(x.size for x in jax.tree.leaves(shapes))
  assert count == analytic_param_count(10000, units, 2, tied, not tied)
  # The paper's table: medium 20M untied / 14M tied, large 66M / 51M.
  assert count / 1e6 == pytest.approx(expected_millions, rel=0.03)


def test_tied_equals_untied_with_w_equal_to_l_transposed_including_gradients():
  """The tied embedding's gradient is the sum of its input and output parts."""
  tied_model = make_model(tie_embeddings=True, output_bias=False)
  untied_model = make_model(tie_embeddings=False, output_bias=False)
  params = init(tied_model)
  untied_params = dict(params, output_kernel={"kernel": params["embed"]["embedding"].T})
  tokens = jax.random.randint(jax.random.key(3), (B, T), 0, V)
  targets = jax.random.randint(jax.random.key(4), (B, T), 0, V)

  def loss(model, p):
    logits, _ = model.apply({"params": p}, tokens, model.initial_carry(B), deterministic=True)
    return losses.cross_entropy(logits, targets).sum()

  np.testing.assert_allclose(loss(tied_model, params), loss(untied_model, untied_params), rtol=1e-6)
  tied_grad = jax.grad(lambda p: loss(tied_model, p))(params)["embed"]["embedding"]
  untied_grads = jax.grad(lambda p: loss(untied_model, p))(untied_params)
  input_part = untied_grads["embed"]["embedding"]
  output_part = untied_grads["output_kernel"]["kernel"].T
  np.testing.assert_allclose(tied_grad, input_part + output_part, rtol=1e-5, atol=1e-7)
  # Both parts are really there: rows of words never fed in get only output gradient.
  unused = np.setdiff1d(np.arange(V), np.asarray(tokens))
  assert unused.size and not np.asarray(input_part)[unused].any()
  assert float(jnp.abs(input_part).max()) > 1e-4 and float(jnp.abs(output_part).max()) > 1e-4


def test_tying_with_mismatched_sizes_projects_or_refuses():
  model = make_model(hidden_size=E + 2, tie_embeddings=True, output_projection=True)
  params = init(model)
  assert params["projection"]["kernel"].shape == (E + 2, E)
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, V, (B, T))

  def mask(width):
    return (rng.random((B, width)) > 0.4) / 0.6

  # The output mask drops units of h, before the projection.
  masks = DropoutMasks(input=mask(E), hidden=(mask(E + 2), mask(E + 2)), output=mask(E + 2))
  logits = model.apply(
      {"params": params}, jnp.asarray(tokens), model.initial_carry(B), deterministic=False,
      masks=jax.tree.map(jnp.asarray, masks), method=model.outputs,
  ).logits
  np.testing.assert_allclose(logits, np_forward(params, tokens, masks, 2, tied=True),
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="hidden_size == embed_dim"):
    init(make_model(hidden_size=E + 2, tie_embeddings=True, output_projection=False))


def test_carry_makes_two_windows_equal_one_long_window():
  model = make_model()
  params = init(model)
  tokens = jax.random.randint(jax.random.key(5), (B, 2 * T), 0, V)

  def run(x, carry):
    return model.apply({"params": params}, x, carry, deterministic=True)

  long_logits, long_carry = run(tokens, model.initial_carry(B))
  first, carry = run(tokens[:, :T], model.initial_carry(B))
  second, carry = run(tokens[:, T:], carry)
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), long_logits, atol=1e-5)
  for (c1, h1), (c2, h2) in zip(carry, long_carry, strict=True):
    np.testing.assert_allclose(c1, c2, atol=1e-6)
    np.testing.assert_allclose(h1, h2, atol=1e-6)


def test_tokens_and_a_carry_that_do_not_fit_are_refused_not_broadcast():
  model = make_model()
  params = {"params": init(model)}
  tokens = jnp.zeros((B, T), jnp.int32)
  cases = [
      (tokens[0], model.initial_carry(B)),  # one row: it became B copies of itself
      (tokens, model.initial_carry(B + 1)),
      (tokens, model.initial_carry(B)[:1]),  # a layer short
      (tokens, tuple((c, h[:, :-1]) for c, h in model.initial_carry(B))),
  ]
  for bad_tokens, carry in cases:
    with pytest.raises(ValueError, match=rf"the model needs tokens \[B, T\] and, per layer, "
                       rf"\(c, h\) each \[B, {E}\] \(`initial_carry\(B\)`\)"):
      model.apply(params, bad_tokens, carry, deterministic=True)
  model.apply(params, tokens, model.initial_carry(B), deterministic=True)  # fits


def test_dropout_masks_are_per_row_per_unit_and_scaled():
  # hidden_size != embed_dim: the input mask is as wide as the embedding, the others as h.
  H = E + 2
  model = make_model(input_dropout=0.25, hidden_dropout=0.5, output_dropout=0.75,
                     hidden_size=H, tie_embeddings=True, output_projection=True)
  masks = model.apply(
      {"params": init(model)}, 4000, deterministic=False, rngs={"dropout": jax.random.key(0)},
      method=model.dropout_masks,
  )
  for mask, rate, width in [
      (masks.input, 0.25, E), (masks.hidden[0], 0.5, H), (masks.hidden[1], 0.5, H),
      (masks.output, 0.75, H),
  ]:
    assert mask.shape == (4000, width)  # no time axis: the same units drop at every step
    np.testing.assert_allclose(np.unique(mask), [0.0, 1 / (1 - rate)], rtol=1e-6)
    assert float((mask == 0).mean()) == pytest.approx(rate, abs=0.02)
  assert not np.array_equal(masks.hidden[0], masks.hidden[1])
  off = model.apply(
      {"params": init(model)}, 4, deterministic=True, method=model.dropout_masks
  )
  assert off == DropoutMasks(None, (None, None), None)


def test_dropout_is_off_when_deterministic_and_on_otherwise():
  tokens = jax.random.randint(jax.random.key(6), (B, T), 0, V)
  dropped = make_model(input_dropout=0.5, hidden_dropout=0.5, output_dropout=0.5)
  params = init(dropped)
  plain, _ = make_model().apply({"params": params}, tokens, make_model().initial_carry(B),
                                deterministic=True)
  evaluated, _ = dropped.apply({"params": params}, tokens, dropped.initial_carry(B),
                               deterministic=True)
  np.testing.assert_array_equal(evaluated, plain)
  trained, _ = dropped.apply({"params": params}, tokens, dropped.initial_carry(B),
                             deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert float(jnp.abs(trained - plain).max()) > 1e-3


def test_initialisation_is_uniform_within_init_scale():
  # Every parameter, the LSTMs' included (Zaremba's init): U(-0.05, 0.05) fills the range
  # and has mean |x| = 0.025. Sizes large enough (>= 64 values) for both to show.
  params = init(make_model(vocab_size=64, embed_dim=32, hidden_size=32, init_scale=0.05,
                           output_bias=True, tie_embeddings=False))
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    magnitude = np.abs(np.asarray(leaf))
    assert magnitude.max() <= 0.05, jax.tree_util.keystr(path)
    assert magnitude.max() > 0.045 and abs(magnitude.mean() - 0.025) < 0.004, (
        jax.tree_util.keystr(path))


def reference_recurrence(projected_inputs, recurrent_kernel, carry, recurrent_mask):
  """The plain lax.scan LSTM whose gradient autodiff derives."""

  def step(state, projected_input):
    c, h = state
    h = h if recurrent_mask is None else h * recurrent_mask
    i, f, g, o = jnp.split(projected_input + h @ recurrent_kernel, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h

  carry, outputs = jax.lax.scan(step, carry, projected_inputs)
  return outputs, carry


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("unroll", [1, 3])
def test_prefetched_scan_equals_lax_scan(reverse, unroll):
  xs = {"a": jnp.arange(7.0), "b": jnp.arange(14.0).reshape(7, 2)}

  def step(carry, x):  # order-sensitive: each step sees the carry of the previous one
    carry = 2.0 * carry + x["a"] + x["b"]
    return carry, (carry, x["a"])

  expected = jax.lax.scan(step, jnp.zeros(2), xs, reverse=reverse)
  got = models._scan_prefetched(step, jnp.zeros(2), xs, reverse=reverse, unroll=unroll)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(g, e)


def test_output_scores_and_their_gradient_equal_the_plain_product():
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, 3, 5))  # leading axes are flattened in the gradient
  embedding = jax.random.normal(keys[1], (11, 5))
  weights = jax.random.normal(keys[2], (2, 3, 11))

  def objective(scores):
    return lambda x, embedding: jnp.sum(weights * jnp.sin(scores(x, embedding)))

  plain = lambda x, embedding: jnp.einsum("bte,ve->btv", x, embedding)  # noqa: E731
  np.testing.assert_allclose(models.output_scores(x, embedding), plain(x, embedding),
                             rtol=1e-6)
  got = jax.grad(objective(models.output_scores), argnums=(0, 1))(x, embedding)
  expected = jax.grad(objective(plain), argnums=(0, 1))(x, embedding)
  for g, e in zip(got, expected, strict=True):
    assert g.shape == e.shape
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("unroll", [1, 3])
def test_lstm_recurrence_gradient_equals_autodiff_of_the_plain_scan(masked, unroll):
  hidden = 4
  keys = jax.random.split(jax.random.key(0), 5)
  projected_inputs = jax.random.normal(keys[0], (7, B, 4 * hidden))
  recurrent_kernel = 0.5 * jax.random.normal(keys[1], (hidden, 4 * hidden))
  carry = (jax.random.normal(keys[2], (B, hidden)), jax.random.normal(keys[3], (B, hidden)))
  mask = (jax.random.uniform(keys[4], (B, hidden)) > 0.3) / 0.7 if masked else None

  def objective(recurrence):
    def f(projected_inputs, recurrent_kernel, carry):
      outputs, (c, h) = recurrence(projected_inputs, recurrent_kernel, carry, mask)
      # Weights on every output, including the final carry, exercise all cotangents.
      return jnp.sum(outputs**2) + jnp.sum(1.3 * c) + jnp.sum(0.7 * h)

    return f

  fused = objective(lambda *args: models.lstm_recurrence(*args, unroll))
  reference = objective(reference_recurrence)
  args = (projected_inputs, recurrent_kernel, carry)
  np.testing.assert_allclose(fused(*args), reference(*args), rtol=1e-6)
  got = jax.grad(fused, argnums=(0, 1, 2))(*args)
  expected = jax.grad(reference, argnums=(0, 1, 2))(*args)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_unroll_changes_no_output():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
  params = init(make_model())
  outputs = [
      make_model(unroll=unroll).apply(
          {"params": params}, tokens, make_model().initial_carry(B), deterministic=True
      )[0]
      for unroll in (1, 2, T)
  ]
  for out in outputs[1:]:
    np.testing.assert_allclose(out, outputs[0], rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32_and_keeps_float32_params_and_grads():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
  params = init(make_model())
  targets = jnp.roll(tokens, -1, axis=1)

  def loss(params, dtype):
    model = make_model(compute_dtype=dtype)
    logits, _ = model.apply({"params": params}, tokens, model.initial_carry(B), deterministic=True)
    return losses.cross_entropy(logits, targets).mean(), logits

  (loss32, logits32), grads32 = jax.value_and_grad(loss, has_aux=True)(params, "float32")
  (loss16, logits16), grads16 = jax.value_and_grad(loss, has_aux=True)(params, "bfloat16")
  assert logits16.dtype == loss16.dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits32, atol=3e-2)
  assert not np.array_equal(logits16, logits32)  # the bf16 mode did round
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
  for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32), strict=True):
    assert g16.dtype == jnp.float32
    np.testing.assert_allclose(g16, g32, atol=2e-2 * float(jnp.abs(g32).max()) + 1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_bfloat16_output_layers_round_their_inputs_untied_and_through_a_projection(tied):
  # The largest products: untied logits W h, and a tied model's projection then L p.
  def rounded(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)

  model = make_model(compute_dtype="bfloat16", hidden_size=E + 2, tie_embeddings=tied,
                     output_projection=tied, output_bias=not tied)
  params = init(model)
  hidden = jax.random.normal(jax.random.key(3), (B, T, E + 2))
  logits = model.apply({"params": params}, hidden, method=model.output_logits)
  if tied:
    projected = rounded(hidden) @ rounded(params["projection"]["kernel"])
    expected = rounded(projected) @ rounded(params["embed"]["embedding"]).T
  else:
    expected = rounded(hidden) @ rounded(params["output_kernel"]["kernel"])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  in_float32 = make_model(hidden_size=E + 2, tie_embeddings=tied, output_projection=tied,
                          output_bias=not tied).apply(
      {"params": params}, hidden, method=model.output_logits)
  assert np.abs(np.asarray(logits - in_float32)).max() > 1e-4  # it did round


def test_evaluation_copy_of_a_bfloat16_model_computes_the_float32_models_numbers():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
  trained = make_model(compute_dtype="bfloat16", unroll=2)
  params = init(trained)
  evaluation = trained.for_evaluation(T)
  assert (evaluation.unroll, evaluation.compute_dtype) == (T, "float32")
  assert trained.compute_dtype == "bfloat16"  # a copy: the training model is unchanged
  logits = [
      model.apply({"params": params}, tokens, model.initial_carry(B), deterministic=True)[0]
      for model in (evaluation, make_model())
  ]
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-6)


def test_mixed_matmul_rounds_inputs_and_cotangents_to_bfloat16_and_accumulates_in_float32():
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, 3, 40))
  y = jax.random.normal(keys[1], (40, 7))
  cotangent = jax.random.normal(keys[2], (2, 3, 7))
  out, vjp = jax.vjp(lambda x, y: models.mixed_matmul(x, y, "bfloat16"), x, y)
  rounded = [a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, y, cotangent)]
  np.testing.assert_allclose(out, rounded[0] @ rounded[1], rtol=1e-5, atol=1e-5)
  grad_x, grad_y = vjp(cotangent)
  assert out.dtype == grad_x.dtype == grad_y.dtype == jnp.float32
  np.testing.assert_allclose(grad_x, rounded[2] @ rounded[1].T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      grad_y, jnp.einsum("abk,abn->kn", rounded[0], rounded[2]), rtol=1e-5, atol=1e-4
  )



def _reference_cudnn_lstm(x, h_0, c_0, weights, seq_lengths, input_size, hidden_size,
                          num_layers, dropout, bidirectional):
  """jax.experimental.rnn's own pure-JAX reference, on the flat cuDNN weight vector."""
  from jax.experimental import rnn

  unpacked = rnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers, bidirectional)
  return rnn.lstm_ref(x, h_0, c_0, *unpacked, seq_lengths, input_size, hidden_size, num_layers,
                      dropout, bidirectional)


def _loss_and_grads(model, params, tokens, masks):
  def loss(params):
    out = model.apply({"params": params}, tokens, model.initial_carry(B), deterministic=False,
                      masks=masks, method=model.outputs)
    carry_sum = sum(jnp.sum(c) + 2 * jnp.sum(h) for c, h in out.carry)
    return jnp.sum(jnp.sin(out.logits)) + carry_sum, (out.logits, out.carry)

  return jax.value_and_grad(loss, has_aux=True)(params)


def _check_cudnn_layers():
  """The cuDNN model against the scan: same function without recurrent masks, and its
  hidden mask on the next layer's input only."""
  scan = make_model(input_dropout=0.2, hidden_dropout=0.3, output_dropout=0.4)
  cudnn = scan.clone(lstm_implementation="cudnn")
  params = init(scan)
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
  masks = jax.tree.map(jnp.asarray, scan.apply(
      {"params": params}, B, deterministic=False, rngs={"dropout": jax.random.key(5)},
      method=scan.dropout_masks,
  ))
  unmasked = masks._replace(hidden=(None, None))
  (_, (logits, carry)), grads = _loss_and_grads(cudnn, params, tokens, unmasked)
  (_, (scan_logits, scan_carry)), scan_grads = _loss_and_grads(scan, params, tokens, unmasked)
  for got, expected in zip(jax.tree.leaves((logits, carry, grads)),
                           jax.tree.leaves((scan_logits, scan_carry, scan_grads)), strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  # With the hidden masks: layer 0's output is masked before layer 1, never on the recurrence.
  (_, (logits, _)), _ = _loss_and_grads(cudnn, params, tokens, masks)
  x = scan.apply({"params": params}, tokens.T, method=lambda m, t: m.embed(t)) * masks.input
  carry = scan.initial_carry(B)
  layer = models.LSTMLayer(E, 0.3)
  h, _ = layer.apply({"params": params["lstm_0"]}, x, carry[0], None)
  h, _ = layer.apply({"params": params["lstm_1"]}, h * masks.hidden[0], carry[1], None)
  expected = (h * masks.output).transpose(1, 0, 2) @ params["embed"]["embedding"].T
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_cudnn_layers_equal_the_scan_without_recurrent_masks(monkeypatch):
  # On CPU, jax.experimental.rnn's pure-JAX reference stands in for the cuDNN call:
  # this checks our weight packing, layouts, carry order and mask placement.
  monkeypatch.setattr(models.rnn, "lstm", _reference_cudnn_lstm)
  _check_cudnn_layers()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_kernel_equals_the_scan_on_gpu():
  _check_cudnn_layers()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("lstm_implementation", "cuda", "lstm_implementation='cuda' must be 'scan' or 'cudnn'"),
        ("compute_dtype", "bf16", "compute_dtype='bf16' must be 'float32' or 'bfloat16'"),
        ("compute_dtype", jnp.bfloat16, r"compute_dtype=<class 'jax.numpy.bfloat16'> must be "
         r"'float32' or 'bfloat16' \(a name, not a dtype\)"),
        ("input_dropout", 1.0, r"input_dropout=1.0 is a drop probability in \[0, 1\)"),
        ("hidden_dropout", -0.5, r"hidden_dropout=-0.5 is a drop probability in \[0, 1\)"),
        ("vocab_size", 0, "vocab_size=0 must be positive"),
        ("init_scale", float("inf"), "init_scale=inf must be finite"),
        ("init_scale", 2e38, r"init_scale=2e\+38 must be finite and at most 1.7e\+38"),
        ("unroll", 0, "unroll=0 must be positive"),
    ],
)
def test_the_module_refuses_the_fields_a_config_would(field, value, message):
  # Notebook users build the module without a config; validate_config's checks are these.
  fields = dict(vocab_size=10, embed_dim=4, hidden_size=4) | {field: value}
  model = models.LSTMLanguageModel(**fields)
  with pytest.raises(ValueError, match=f"^{message}"):
    model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
