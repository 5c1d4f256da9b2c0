"""The PyTorch reference of experiments/ computes our model's loss and every gradient.

Runs where the `bench` extra (torch) is installed, as in CI; skipped without torch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from tied_lm import data, models, train

torch = pytest.importorskip("torch")
torch_reference = pytest.importorskip("experiments.torch_reference")


MODELS = [
    {},  # tied, no bias
    {"tie_embeddings": False, "output_bias": True},
    {"hidden_size": 48, "output_projection": True},
]


# The KL reads the output bias (kl_output_bias) only where the model has one.
@pytest.mark.parametrize("model_overrides,form,kl_output_bias", [
    (model, form, kl_output_bias) for model in MODELS
    for form, kl_output_bias in (("kl", False), ("cross_entropy", False), ("kl", True))
    if model.get("output_bias", False) or not kl_output_bias])
def test_torch_reference_matches_loss_and_gradients(model_overrides, form, kl_output_bias):
  config = default.get_config()
  config.model.update(model_overrides)
  config.loss.augmented_form = form
  config.loss.kl_output_bias = kl_output_bias
  assert config.loss.augmented and not config.loss.stop_gradient_target
  check_loss_and_gradients(config)


def check_loss_and_gradients(config) -> None:
  """Our loss and every gradient on a tiny batch, against the reference's, without dropout."""
  vocab_size, batch_size = 50, 3
  model = train.make_model(config, vocab_size)
  state = train.create_train_state(config, model, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, vocab_size, (batch_size, config.num_steps)).astype(np.int32)
  targets = rng.integers(0, vocab_size, (batch_size, config.num_steps)).astype(np.int32)

  def objective(params):
    outputs = model.apply(
        {"params": params}, inputs, model.initial_carry(batch_size), deterministic=True,
        method=models.LSTMLanguageModel.outputs,
    )
    cross_entropy, kl = train.loss_terms(outputs, targets, config.loss)
    alpha = config.loss.gamma * config.loss.tau
    return jnp.sum(cross_entropy + alpha * kl) / batch_size

  loss, grads = jax.value_and_grad(objective)(state.params)

  reference = torch_reference.TorchLanguageModel(**config.model, vocab_size=vocab_size)
  torch_reference.load_flax_params(reference, state.params)
  reference.eval()  # no dropout
  logits, bias_free_logits, _ = reference(
      torch.from_numpy(inputs).long(), reference.initial_state(batch_size)
  )
  cross_entropy, kl = torch_reference.loss_terms(
      logits, bias_free_logits, torch.from_numpy(targets).long(), reference.embed.weight,
      config.loss,
  )
  torch_loss = (cross_entropy + config.loss.gamma * config.loss.tau * kl).sum() / batch_size
  torch_loss.backward()

  np.testing.assert_allclose(torch_loss.item(), float(loss), rtol=1e-5)
  torch_grads = flax_layout(reference)
  assert jax.tree.structure(torch_grads) == jax.tree.structure(grads)
  for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree.leaves(torch_grads), strict=True):
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def flax_layout(model, of=lambda parameter: parameter.grad.numpy()) -> dict:
  """`of` each of the reference's parameters (default: its gradient) in our parameter tree,
  the inverse of `load_flax_params`."""
  tree = {"embed": {"embedding": of(model.embed.weight)}}
  for i, layer in enumerate(model.layers):
    # Our one bias is torch's b_ih; b_hh stays 0, untrained.
    assert layer.bias_hh_l0.grad is None and not layer.bias_hh_l0.requires_grad
    np.testing.assert_array_equal(layer.bias_hh_l0.detach().numpy(), 0.0)
    tree[f"lstm_{i}"] = {"bias": of(layer.bias_ih_l0),
                         "input_kernel": of(layer.weight_ih_l0).T,
                         "recurrent_kernel": of(layer.weight_hh_l0).T}
  if model.projection is not None:
    tree["projection"] = {"kernel": of(model.projection.weight).T}
  if model.decoder.weight is not model.embed.weight:  # untied
    tree["output_kernel"] = {"kernel": of(model.decoder.weight).T}
  if model.output_bias is not None:
    tree["output_bias"] = of(model.output_bias)
  return tree


VOCAB, B, T = 50, 3, 5  # B != T: the loss divides by the batch, not the window


def _config(**model):
  config = default.get_config()
  config.model.update(model)
  config.num_steps = T
  config.optim.learning_rate = 0.7
  config.optim.clip_norm = 0.05  # below the gradient's norm: clipping is on
  return config


def _windows(num_windows, seed=0):
  ids = np.random.default_rng(seed).integers(0, VOCAB, B * (num_windows * T + 1))
  inputs, targets = data.train_windows(ids, B, T)
  return inputs[:num_windows], targets[:num_windows]


@pytest.mark.parametrize("model_overrides", [{}, {"tie_embeddings": False, "output_bias": True}])
def test_two_torch_train_steps_are_two_of_ours(model_overrides):
  # Same learning rate, clipping, loss normalisation, KL weight and carried state:
  # the parameters, the state and the metrics after two consecutive windows agree.
  config = _config(**model_overrides)
  model = train.make_model(config, VOCAB)
  state = train.create_train_state(config, model, steps_per_epoch=100)
  # Away from the init's uniform predictions, where the KL weighs too little to be seen.
  state = state.replace(params=jax.tree.map(lambda x: 3 * x, state.params))
  inputs, targets = _windows(2)
  devices = jax.devices()[:1]
  step = train.pmap_train_step(config.loss, devices)
  ours_state, carry = train.replicate(state, devices), train.replicate(model.initial_carry(B),
                                                                      devices)
  reference = torch_reference.TorchLanguageModel(**config.model, vocab_size=VOCAB)
  torch_reference.load_flax_params(reference, state.params)
  torch_step = torch_reference.make_train_step(reference, config)
  torch_state = reference.initial_state(B)
  for w in range(2):
    ours_state, carry, metrics = step(ours_state, carry, inputs[w][None], targets[w][None],
                                      jax.random.key(0))
    torch_state, torch_metrics = torch_step(torch.from_numpy(inputs[w]).long(),
                                            torch.from_numpy(targets[w]).long(), torch_state)
    assert float(metrics["grad_norm"]) > config.optim.clip_norm
    for name, rtol in (("cross_entropy_sum", 1e-5), ("kl_sum", 1e-3), ("grad_norm", 1e-4)):
      np.testing.assert_allclose(float(torch_metrics[name]), float(metrics[name]), rtol=rtol,
                                 err_msg=f"window {w}: {name}")
  ours_params = train.first_replica(ours_state.params)
  theirs = flax_layout(reference, of=lambda parameter: parameter.detach().numpy())
  assert jax.tree.structure(theirs) == jax.tree.structure(ours_params)
  for (path, ours), value in zip(jax.tree_util.tree_leaves_with_path(ours_params),
                                 jax.tree.leaves(theirs), strict=True):
    np.testing.assert_allclose(value, ours, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  for (c, h), (torch_h, torch_c) in zip(train.first_replica(carry), torch_state, strict=True):
    np.testing.assert_allclose(torch_h[0].detach().numpy(), h, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(torch_c[0].detach().numpy(), c, rtol=1e-4, atol=1e-6)


def test_dropout_masks_are_per_window_scaled_and_at_our_places(monkeypatch):
  reference = torch_reference.TorchLanguageModel(
      VOCAB, embed_dim=30, hidden_size=20, output_projection=True,
      input_dropout=0.1, hidden_dropout=0.2, output_dropout=0.3)
  reference.train()
  x = torch.ones(4, 500, 40)
  y = reference._mask(x, 0.25)
  assert torch.equal(y, y[:1].expand_as(y))  # one mask for every time step
  assert set(np.unique(y.numpy()).tolist()) == {0.0, np.float32(1 / 0.75)}
  assert abs(float((y[0] == 0).float().mean()) - 0.25) < 0.02  # 7 standard errors
  calls = []
  mask = reference._mask
  monkeypatch.setattr(reference, "_mask",
                      lambda x, rate: (calls.append((tuple(x.shape), rate)), mask(x, rate))[1])
  reference(torch.zeros(B, T, dtype=torch.long), reference.initial_state(B))
  # The embedding, between the layers, and the last layer's h.
  assert calls == [((T, B, 30), 0.1), ((T, B, 20), 0.2), ((T, B, 20), 0.3)]
  reference.eval()
  assert torch.equal(mask(x, 0.25), x)


def test_eval_step_is_our_evaluation_over_consecutive_windows():
  config = _config(tie_embeddings=False, output_bias=True, input_dropout=0.5,
                   hidden_dropout=0.5, output_dropout=0.5)
  model = train.make_model(config, VOCAB)
  params = train.create_train_state(config, model, steps_per_epoch=1).params
  inputs, targets = _windows(3, seed=1)
  ours_carry, ours = train.eval_step(
      params, model.initial_carry(B), jnp.float32(0), inputs, targets,
      np.ones(inputs.shape, np.float32), model=model)
  reference = torch_reference.TorchLanguageModel(**config.model, vocab_size=VOCAB)
  torch_reference.load_flax_params(reference, params)
  reference.train()  # as after a train step: eval_step turns dropout off itself
  state, total = reference.initial_state(B), 0.0
  for w in range(3):
    state, nll = torch_reference.eval_step(reference, torch.from_numpy(inputs[w]).long(),
                                           torch.from_numpy(targets[w]).long(), state)
    total += float(nll)
  np.testing.assert_allclose(total, float(ours), rtol=1e-5)


def test_the_train_step_drops_out_after_an_evaluation():
  config = _config(input_dropout=0.5, output_dropout=0.5)
  model = train.make_model(config, VOCAB)
  params = train.create_train_state(config, model, steps_per_epoch=1).params
  reference = torch_reference.TorchLanguageModel(**config.model, vocab_size=VOCAB)
  torch_reference.load_flax_params(reference, jax.tree.map(lambda x: 3 * x, params))
  inputs, targets = (torch.from_numpy(x[0]).long() for x in _windows(1))
  step = torch_reference.make_train_step(reference, config)
  torch.manual_seed(0)
  _, nll = torch_reference.eval_step(reference, inputs, targets, reference.initial_state(B))
  _, metrics = step(inputs, targets, reference.initial_state(B))
  assert abs(float(metrics["cross_entropy_sum"]) - float(nll)) > 1e-3 * float(nll)


LOSS_CASES = [
    ({}, {"stop_gradient_target": True}),
    ({}, {"augmented": False}),
    ({"output_projection": True}, {}),  # equal sizes: no projection, as in ours
]


@pytest.mark.parametrize("model_overrides,loss_overrides", LOSS_CASES)
def test_torch_reference_matches_loss_and_gradients_in_more_configs(model_overrides,
                                                                    loss_overrides):
  config = default.get_config()
  config.model.update(model_overrides)
  config.loss.update(loss_overrides)
  check_loss_and_gradients(config)


def test_bfloat16_computes_under_bfloat16_autocast():
  config = _config(compute_dtype="bfloat16")
  reference = torch_reference.TorchLanguageModel(**config.model, vocab_size=VOCAB)
  dtypes = []
  reference.decoder.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
  inputs, targets = (torch.from_numpy(x[0]).long() for x in _windows(1))
  torch_reference.make_train_step(reference, config)(inputs, targets, reference.initial_state(B))
  assert dtypes == [torch.bfloat16]


def test_its_own_initialisation_is_uniform_in_plus_minus_init_scale():
  reference = torch_reference.TorchLanguageModel(VOCAB, 30, 30, init_scale=0.1)
  values = np.concatenate([p.detach().numpy().ravel() for p in reference.parameters()])
  assert values.min() >= -0.1 and values.max() <= 0.1
  assert values.min() < -0.099 and values.max() > 0.099 and abs(values.mean()) < 0.005
