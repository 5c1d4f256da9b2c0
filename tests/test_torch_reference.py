"""The PyTorch reference of experiments/ computes our model's loss and every gradient.

Runs where the `bench` extra (torch) is installed, as in CI; skipped without torch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from tied_lm import models, train

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
  torch_grads = flax_layout_gradients(reference)
  assert jax.tree.structure(torch_grads) == jax.tree.structure(grads)
  for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree.leaves(torch_grads), strict=True):
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def flax_layout_gradients(model) -> dict:
  """The reference's gradients in our parameter tree (the inverse of `load_flax_params`)."""

  def grad(parameter):
    return parameter.grad.numpy()

  grads = {"embed": {"embedding": grad(model.embed.weight)}}
  for i, layer in enumerate(model.layers):
    # Our one bias stands for torch's two, which get the same gradient.
    np.testing.assert_array_equal(grad(layer.bias_hh_l0), grad(layer.bias_ih_l0))
    grads[f"lstm_{i}"] = {"bias": grad(layer.bias_ih_l0),
                          "input_kernel": grad(layer.weight_ih_l0).T,
                          "recurrent_kernel": grad(layer.weight_hh_l0).T}
  if model.projection is not None:
    grads["projection"] = {"kernel": grad(model.projection.weight).T}
  if model.decoder.weight is not model.embed.weight:  # untied
    grads["output_kernel"] = {"kernel": grad(model.decoder.weight).T}
  if model.output_bias is not None:
    grads["output_bias"] = grad(model.output_bias)
  return grads
