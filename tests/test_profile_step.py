"""experiments/profile_step.py: a tiny run writes its blocks with their FLOP counts."""


import jax
import numpy as np
import pytest

from configs import default
from experiments import benchmark, profile_step
from tied_lm import data, losses, train


def test_profile_step_times_each_block(run_tiny_timing):
  stdout, results = run_tiny_timing("profile_step")
  assert results["commit"] and results["command"].startswith("python -m experiments.profile_step")
  (row,) = results["rows"]
  blocks = row["blocks"]
  assert list(blocks) == ["lstm", "output", "update", "step", "matmuls",
                          "eval_lstm", "eval_output", "eval"]
  assert row["eval_batch_size"] == 10
  assert blocks["update"]["flops"] == 0 and blocks["update"]["peak_fraction"] == 0
  config = default.get_config()
  windows = data.train_windows(data.load_corpus("ptb").train, row["batch_size"], config.num_steps)
  flops = benchmark.step_flops(config, 10000, row["batch_size"], 10,
                               train.distinct_targets_bound(windows[1], 1))
  assert blocks["lstm"]["flops"] + blocks["output"]["flops"] == blocks["step"]["flops"]
  assert blocks["step"]["flops"] == blocks["matmuls"]["flops"] == flops["train"]
  assert blocks["eval_lstm"]["flops"] + blocks["eval_output"]["flops"] == (
      blocks["eval"]["flops"]) == flops["eval"]
  assert sum(2 * mm["count"] * mm["m"] * mm["k"] * mm["n"] for mm in row["matmuls"]) == (
      flops["train"])
  # One peak sample before the row and one at the end; every share is of the best.
  assert results["complete"] and len(results["matmul_peak_samples"]) == 2
  peak = max(results["matmul_peak_samples"])
  assert row["matmul_peak_flops"] == peak
  for stats in blocks.values():
    assert len(stats["repeat_seconds"]) == 2 and stats["ms"] > 0
    assert stats["peak_fraction"] == stats["flops"] / (stats["ms"] / 1e3) / peak
    assert "torch_ms" not in stats  # torch only with --compare=torch
  assert "output" in stdout  # the printed table


def test_the_update_block_is_the_clipped_sgd_step_of_training():
  config = default.get_config()
  config.optim.clip_norm = 0.5  # below the random gradient's norm, so clipping acts
  update = profile_step.OurUpdate(config, train.make_model(config, 50), steps_per_epoch=10)
  before = jax.tree.map(np.asarray, update.state.params)
  grads = jax.tree.map(np.asarray, update.grads)
  norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in jax.tree.leaves(grads)))
  assert norm > config.optim.clip_norm
  update.run(2)
  scale = 2 * config.optim.learning_rate * config.optim.clip_norm / norm
  expected = jax.tree.map(lambda p, g: p - scale * g, before, grads)
  for got, want in zip(jax.tree.leaves(update.state.params), jax.tree.leaves(expected),
                       strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def tiny_window():
  """configs/default.py's model over a vocabulary of 50, its params, and one window of 3
  rows: (config, model, params, inputs, targets, carry)."""
  config = default.get_config()
  model = train.make_model(config, 50)
  inputs, targets = np.random.default_rng(0).integers(0, 50, (2, 3, config.num_steps))
  carry = model.initial_carry(3)
  params = model.init(jax.random.key(1), inputs, carry, deterministic=True)["params"]
  return config, model, params, inputs, targets, carry


def test_the_eval_blocks_compose_to_the_eval_step():
  config, model, params, inputs, targets, carry = tiny_window()
  blocks = profile_step.our_eval_blocks(model, params, inputs, targets)
  hidden = blocks["eval_lstm"].fn()
  assert hidden.shape == (3, config.num_steps, config.model.hidden_size)
  weights = np.ones(inputs.shape, np.float32)
  _, nll = train.eval_step(params, carry, np.float32(0), inputs[None], targets[None],
                           weights[None], model=model)
  np.testing.assert_allclose(blocks["eval_output"].fn(), nll, rtol=1e-6)


def test_the_output_block_is_the_gradient_of_the_training_objective():
  # Against the unfused losses: Σ (CE + γτ KL) / B over the window, at the block's hidden
  # states (the window's, under the dropout of key 0).
  config, model, params, inputs, targets, carry = tiny_window()
  output_params = {k: v for k, v in params.items() if not k.startswith("lstm_")}
  masks = model.apply({"params": params}, 3, deterministic=False,
                      rngs={"dropout": jax.random.key(0)}, method=model.dropout_masks)
  hidden = model.apply({"params": params}, inputs, carry, masks, method=model.hidden_states)[0]

  def objective(output_params, hidden):
    out = model.apply({"params": {**params, **output_params}}, hidden, carry,
                      method=model.output_terms)
    kl = losses.augmented_loss(out.bias_free_logits, targets, out.embedding, config.loss.tau)
    per_token = losses.cross_entropy(out.logits, targets) + (
        config.loss.gamma * config.loss.tau * kl)
    return per_token.sum() / 3

  assert config.loss.augmented
  expected = jax.grad(objective, argnums=(0, 1))(output_params, hidden)
  got = profile_step.our_blocks(config, model, params, inputs, targets)["output"].fn()
  for got_leaf, expected_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                                     strict=True):
    np.testing.assert_allclose(got_leaf, expected_leaf, rtol=1e-4, atol=1e-6)


def test_profile_step_times_torchs_blocks_beside_ours(run_tiny_timing):
  # The path experiments/gpu_session.sh runs on a GPU lease.
  pytest.importorskip("torch")
  (row,) = run_tiny_timing("profile_step", "--compare=torch")[1]["rows"]
  for name in ("lstm", "output", "update", "step", "eval_lstm", "eval_output", "eval"):
    stats = row["blocks"][name]
    assert stats["torch_ms"] > 0, name
    assert stats["ratio_vs_torch"] == pytest.approx(stats["torch_ms"] / stats["ms"]), name
