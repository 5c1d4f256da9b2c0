"""The train step's objective and pmap equivalence, evaluation bookkeeping, configs, and runs."""

import functools
import json
import logging
import os
import re
import shutil
import signal
import sys
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging

from configs import default, ptb, wikitext2
from tied_lm import data, fileio, losses, models, reporting, train
from tied_lm.checkpoints import Checkpoints
from tied_lm.errors import UserError

B, T, V = 4, 5, 23


def small_config(**model):
  config = default.get_config()
  config.batch_size, config.num_steps = B, T
  config.model.embed_dim = config.model.hidden_size = 8
  config.model.init_scale = 0.3
  config.model.update(model)
  config.loss.tau, config.loss.gamma = 2.0, 0.7
  return config


def batch(seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, V, (B, T)).astype(np.int32), rng.integers(0, V, (B, T)).astype(np.int32)


def test_learning_rate_schedule():
  config = default.get_config()
  config.optim.update(learning_rate=1.0, decay_start_epoch=2, decay_rate=0.5)
  schedule = train.learning_rate_schedule(config.optim, steps_per_epoch=10)
  rates = [float(schedule(step)) for step in (0, 19, 20, 29, 30, 45)]
  assert rates == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]


@pytest.mark.parametrize("augmented,distinct_targets,form,kl_output_bias,tied,stop_target", [
    (False, False, "kl", False, True, False), (True, False, "kl", False, True, False),
    (True, True, "kl", False, True, False), (True, True, "cross_entropy", False, True, False),
    (True, True, "kl", True, True, False), (True, True, "kl", False, False, False),
    (False, False, "kl", False, False, False), (True, True, "kl", False, True, True)])
def test_train_step_is_sgd_on_time_summed_batch_averaged_loss(
    augmented, distinct_targets, form, kl_output_bias, tied, stop_target):
  """Independent check of the objective: sum over steps, mean over rows, + gamma*tau*KL.

  kl_output_bias: a tied model with an output bias whose KL reads the biased logits,
  the same `logits` as the cross-entropy here. Untied (the paper's AL): W and a bias, and
  the KL reads the logits without the bias; untied without the KL: VD. stop_target: ỹ
  passes no gradient to L.
  """
  config = small_config(output_bias=kl_output_bias or not tied, tie_embeddings=tied)
  config.loss.augmented = augmented
  config.loss.augmented_form = form
  config.loss.kl_output_bias = kl_output_bias
  config.loss.stop_gradient_target = stop_target
  config.optim.clip_norm = 1e9  # no clipping here
  config.optim.learning_rate = 0.3
  model = train.make_model(config, V)
  state = train.create_train_state(config, model, steps_per_epoch=10)
  inputs, targets = batch()

  def objective(params):
    logits, _ = model.apply({"params": params}, inputs, model.initial_carry(B), deterministic=True)
    per_token = losses.cross_entropy(logits, targets)
    if augmented:
      embedding = params["embed"]["embedding"]
      kl_logits = logits if tied else logits - params["output_bias"]
      per_token += 0.7 * 2.0 * losses.augmented_loss(
          kl_logits, targets, embedding, 2.0, form=form, stop_gradient_target=stop_target)
    return per_token.sum() / B

  expected = jax.tree.map(lambda p, g: p - 0.3 * g, state.params, jax.grad(objective)(state.params))
  # distinct_targets: ỹ once per distinct target word, as train_and_evaluate runs it.
  max_distinct_targets = train.distinct_targets_bound(targets[None], 1) if distinct_targets else 0
  assert max_distinct_targets < B * T and (max_distinct_targets > 0) == distinct_targets
  step = train.pmap_train_step(
      config.loss, jax.devices()[:1], max_distinct_targets=max_distinct_targets)
  new_state, _, metrics = step(
      train.replicate(state, jax.devices()[:1]),
      train.replicate(model.initial_carry(B), jax.devices()[:1]),
      inputs[None], targets[None], jax.random.key(0),
  )
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6),
      new_state.params, expected,
  )
  logits, _ = model.apply({"params": state.params}, inputs, model.initial_carry(B),
                          deterministic=True)
  np.testing.assert_allclose(
      metrics["cross_entropy_sum"], losses.cross_entropy(logits, targets).sum(), rtol=1e-5
  )
  assert float(metrics["num_tokens"]) == B * T
  assert (float(metrics["kl_sum"]) > 0) == augmented


def test_the_step_fed_its_own_outputs_does_not_compile_again():
  # train.replicate lays state and carry out as the step returns them; with
  # flax.jax_utils.replicate's layout the step compiled twice more.
  compiles, counting = [], [False]
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **kwargs: compiles.append(name)
      if counting[0] and name == "/jax/core/compile/backend_compile_duration" else None
  )
  config = small_config()
  model = train.make_model(config, V)
  step = train.pmap_train_step(config.loss)
  devices = jax.local_devices()
  inputs, targets = (np.stack(np.split(x, len(devices))) for x in batch())
  key = jax.random.key(0)
  state = train.replicate(train.create_train_state(config, model, steps_per_epoch=10))
  state, carry, _ = step(
      state, train.replicate(model.initial_carry(B // len(devices))), inputs, targets, key
  )
  counting[0] = True
  state, carry, _ = step(state, carry, inputs, targets, key)
  step(state, train.replicate(model.initial_carry(B // len(devices))), inputs, targets, key)
  counting[0] = False
  assert compiles == []


def test_gradients_are_clipped_to_the_global_norm():
  config = small_config()
  config.optim.clip_norm = 1e-3
  model = train.make_model(config, V)
  state = train.create_train_state(config, model, steps_per_epoch=10)
  inputs, targets = batch()
  devices = jax.devices()[:1]
  new_state, _, metrics = train.pmap_train_step(config.loss, devices)(
      train.replicate(state, devices),
      train.replicate(model.initial_carry(B), devices),
      inputs[None], targets[None], jax.random.key(0),
  )
  update = jax.tree.map(lambda a, b: a[0] - b, new_state.params, state.params)
  assert float(metrics["grad_norm"]) > 1e-2
  np.testing.assert_allclose(optax.global_norm(update), 1e-3, rtol=1e-4)


# clip_norm 0.1: every step's gradient (norm about 0.4) is clipped, after the average.
@pytest.mark.parametrize("clip_norm", [5.0, 0.1])
def test_two_devices_give_the_same_steps_as_one(clip_norm):
  assert jax.device_count() >= 2, "conftest.py sets two host devices"
  config = small_config()  # no dropout, augmented loss on, tied
  config.optim.clip_norm = clip_norm
  model = train.make_model(config, V)
  state = train.create_train_state(config, model, steps_per_epoch=10)
  results = {}
  for num_devices in (1, 2):
    devices = jax.devices()[:num_devices]
    step = train.pmap_train_step(config.loss, devices)
    s = train.replicate(state, devices)
    carry = train.replicate(model.initial_carry(B // num_devices), devices)
    for seed in range(3):  # the carry flows between steps, device by device
      inputs, targets = batch(seed)
      split = lambda x, n=num_devices: x.reshape(n, B // n, T)  # noqa: E731
      s, carry, metrics = step(s, carry, split(inputs), split(targets), jax.random.key(0))
      jax.block_until_ready(metrics)  # see the in-flight bound in train.train_and_evaluate
    full_carry = jax.tree.map(lambda x: np.asarray(x).reshape(B, -1), carry)
    results[num_devices] = (jax.tree.map(lambda x: np.asarray(x[0]), s.params), full_carry,
                            jax.device_get(metrics))
    assert (float(metrics["grad_norm"]) > clip_norm) == (clip_norm < 1)
  for one, two in zip(results[1], results[2], strict=True):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), one, two)


def final_states_with_dropout(num_devices: int, step_count: int) -> np.ndarray:
  """The last layer's h after one step on the first 2 rows of `batch()`, the same rows on
  each of `num_devices` devices, from a state at `step_count`, under dropout 0.5:
  [num_devices, 2, H]."""
  config = small_config(input_dropout=0.5, hidden_dropout=0.5, output_dropout=0.5)
  model = train.make_model(config, V)
  state = train.create_train_state(config, model, steps_per_epoch=10)
  devices = jax.devices()[:num_devices]
  inputs, targets = batch()
  _, carry, _ = train.pmap_train_step(config.loss, devices)(
      train.replicate(state.replace(step=step_count), devices),
      train.replicate(model.initial_carry(2), devices),
      np.stack([inputs[:2]] * num_devices), np.stack([targets[:2]] * num_devices),
      jax.random.key(0),
  )
  return np.asarray(carry[-1][1])


def test_each_device_draws_its_own_dropout_masks():
  h = final_states_with_dropout(num_devices=2, step_count=0)
  assert np.abs(h[0] - h[1]).max() > 1e-3


def test_each_step_draws_its_own_dropout_masks_from_the_same_key():
  # Step 0 and step 1 from the same params and window: other masks, other states; the
  # same step again: the same masks (a resumed run redraws what it would have drawn).
  at_step_1 = final_states_with_dropout(num_devices=1, step_count=1)
  assert np.abs(final_states_with_dropout(1, 0) - at_step_1).max() > 1e-3
  np.testing.assert_array_equal(final_states_with_dropout(1, 1), at_step_1)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_uniform_model_has_perplexity_equal_to_vocabulary_size(batch_size):
  config = small_config()
  model = train.make_model(config, V)
  params = train.create_train_state(config, model, steps_per_epoch=1).params
  params = dict(params, embed={"embedding": jnp.zeros((V, 8))})  # tied: all logits are 0
  ids = np.random.default_rng(0).integers(0, V, 103)
  perplexity, scored = train.evaluate(model, params, ids, batch_size, num_steps=T)
  assert scored == 102
  assert perplexity == pytest.approx(V, rel=1e-5)


def test_a_model_whose_parameters_alone_exceed_memory_is_refused_before_its_workdir(
    monkeypatch, tmp_path):
  # hidden_size=10**6 logged 16e12 params, then aborted in XLA (status 134) after the
  # workdir was made.
  model = train.make_model(small_config(embed_dim=1000, hidden_size=1000), V)
  # Two 1000 x 4000 kernels per layer, 4000 biases per layer, a 23 x 1000 embedding.
  count = 2 * (2 * 1000 * 4000 + 4000) + V * 1000
  monkeypatch.setattr(train.hostmem, "total_bytes", lambda: 8 * count - 1)
  assert train.parameters_memory_problem(model) == (
      f"the model's {count:,} parameters need 0.2 GB for themselves and their gradients alone "
      "(float32), more than this host's 0.1 GB of memory; make it smaller (model.hidden_size, "
      "model.embed_dim, model.num_layers)")
  assert "on each of 2 devices" in train.parameters_memory_problem(model, num_devices=2)
  monkeypatch.setattr(train.hostmem, "total_bytes", lambda: 8 * count)
  assert train.parameters_memory_problem(model) is None
  # In a run, before anything is written.
  monkeypatch.setattr(train.hostmem, "total_bytes", lambda: 8 * count - 1)
  monkeypatch.setattr(train.data, "load_corpus", lambda *args: data.Corpus(
      train=np.arange(300) % V, valid=np.arange(60) % V, test=np.arange(60) % V,
      vocab=tuple(f"w{i}" for i in range(V))))
  config = small_config(embed_dim=1000, hidden_size=1000)
  with pytest.raises(train.ConfigError, match="^the model's .* parameters need"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fields", [
    {"num_layers": 1}, {"num_layers": 3},
    {"num_layers": 5, "tie_embeddings": False, "output_bias": True},
    {"num_layers": 4, "embed_dim": 6, "output_projection": True},
])
def test_the_memory_check_counts_the_parameters_of_a_model_of_any_depth(monkeypatch, fields):
  model = train.make_model(small_config(**fields), V)
  count = train.count_params(model.init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32), model.initial_carry(1),
      deterministic=True))
  monkeypatch.setattr(train.hostmem, "total_bytes", lambda: 8 * count - 1)
  assert f"the model's {count:,} parameters" in train.parameters_memory_problem(model)
  monkeypatch.setattr(train.hostmem, "total_bytes", lambda: 8 * count)
  assert train.parameters_memory_problem(model) is None


def test_a_mistyped_number_of_layers_is_refused_at_once(monkeypatch):
  # num_layers=100000 traced every layer to count them: minutes with no output.
  monkeypatch.setattr(train.hostmem, "total_bytes", lambda: 16 * 2**30)  # any host's RAM
  start = time.monotonic()
  problem = train.parameters_memory_problem(
      train.make_model(small_config(embed_dim=200, hidden_size=200, num_layers=100_000), V))
  assert time.monotonic() - start < 10.0
  assert problem.startswith(f"the model's {100_000 * 4 * 200 * 401 + V * 200:,} parameters")


def test_a_batch_whose_logits_alone_exceed_memory_is_refused(monkeypatch):
  # eval_batch_size one below the valid split's targets asked XLA for 103 GB (traceback).
  monkeypatch.setattr(train.hostmem, "total_bytes", lambda: 25_300_000_000)
  rows = 25_300_000_000 // (35 * 10_000 * 4) + 1  # one row more than the host holds
  message = train.logits_memory_problem("eval_batch_size", rows, rows, 35, 10_000)
  # 25.3008 GB: rounded up, so that it does not read "25.3 GB, more than 25.3 GB".
  assert message == (
      f"eval_batch_size={rows} needs 25.4 GB for its float32 logits alone ([{rows:,}, 35, "
      "10,000]), more than this host's 25.3 GB of memory; lower eval_batch_size")
  assert train.logits_memory_problem("eval_batch_size", rows, rows - 1, 35, 10_000) is None
  with monkeypatch.context() as unknown:  # a system that does not say: nothing refused
    unknown.setattr(train.hostmem, "total_bytes", lambda: None)
    assert train.logits_memory_problem("eval_batch_size", rows, rows, 35, 10_000) is None
  # A CPU's devices share the host: two of them hold twice the logits.
  half = (rows + 1) // 2
  assert "on each of 2 devices" in train.logits_memory_problem(
      "batch_size", 2 * half, half, 35, 10_000, num_devices=2)
  assert train.logits_memory_problem("batch_size", 2 * half, half, 35, 10_000) is None

  class Gpu:  # a device that reports its allocator's limit: each device on its own
    def memory_stats(self):
      return {"bytes_limit": 1000 * 35 * 10_000 * 4}
  monkeypatch.setattr(train.jax, "local_devices", lambda: [Gpu()])
  assert train.logits_memory_problem("batch_size", 2000, 1000, 35, 10_000, num_devices=2) is None
  assert train.logits_memory_problem("batch_size", 2002, 1001, 35, 10_000, num_devices=2) == (
      "batch_size=2002 needs 1.5 GB for its float32 logits alone ([1,001, 35, 10,000] on each "
      "of 2 devices), more than a device's 1.4 GB of memory; lower batch_size")


def test_evaluate_checks_the_logits_memory_before_it_runs(monkeypatch):
  config = small_config()
  model = train.make_model(config, V)
  params = train.create_train_state(config, model, steps_per_epoch=1).params
  ids = np.random.default_rng(1).integers(0, V, 38).astype(np.int32)
  monkeypatch.setattr(train.hostmem, "total_bytes", lambda: 7 * T * V * 4 - 1)  # a row short
  with pytest.raises(data.DataError, match=(
      rf"^eval_batch_size=7 needs 0.1 GB for its float32 logits alone \(\[7, {T}, {V}\]\)")):
    train.evaluate(model, params, ids, batch_size=7, num_steps=T)
  assert train.evaluate(model, params, ids, batch_size=6, num_steps=T)[1] == 37


# 3: the 8 windows in 3 calls, the last with a padding window; 32: in one call. The
# untied model with an output bias (VD, AL) scores its logits with the bias.
@pytest.mark.parametrize("windows_per_call,model_fields", [
    (3, {}), (32, {}), (3, {"tie_embeddings": False, "output_bias": True})])
def test_evaluation_with_batch_one_equals_scoring_the_whole_stream_at_once(
    monkeypatch, windows_per_call, model_fields):
  monkeypatch.setattr(train, "MAX_EVAL_WINDOWS_PER_CALL", windows_per_call)
  config = small_config(**model_fields)
  model = train.make_model(config, V)
  params = train.create_train_state(config, model, steps_per_epoch=1).params
  if model_fields:
    assert float(jnp.abs(params["output_bias"]).max()) > 0.2
  ids = np.random.default_rng(1).integers(0, V, 38).astype(np.int32)
  logits, _ = model.apply({"params": params}, ids[None, :-1], model.initial_carry(1),
                          deterministic=True)
  expected = float(jnp.exp(losses.cross_entropy(logits, ids[None, 1:]).mean()))
  perplexity, scored = train.evaluate(model, params, ids, batch_size=1, num_steps=T)
  assert scored == 37
  assert perplexity == pytest.approx(expected, rel=1e-5)


def test_a_long_evaluation_logs_its_progress_and_a_short_one_does_not(monkeypatch, caplog):
  # At batch 1 an evaluation takes minutes with nothing on the screen otherwise.
  monkeypatch.setattr(train, "MAX_EVAL_WINDOWS_PER_CALL", 2)
  config = small_config()
  model = train.make_model(config, V)
  params = train.create_train_state(config, model, steps_per_epoch=1).params
  ids = np.random.default_rng(1).integers(0, V, 5 * T + 1).astype(np.int32)  # 5 windows, 3 calls
  caplog.set_level(logging.INFO)
  quiet = train.evaluate(model, params, ids, batch_size=1, num_steps=T, split="test")
  assert "scoring test" not in caplog.text
  logged = train.evaluate(model, params, ids, batch_size=1, num_steps=T, split="test",
                          log_every_seconds=0)
  assert logged == quiet
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring")]
  # None after the first call, which compiles: the time left is timed from its end.
  assert [re.sub(r", \d+m\d\ds, about \d+m\d\ds left$", "", line) for line in lines] == [
      "scoring test: 4 of 5 windows"]


# 59 targets in rows of 20 (the last 19), 4 windows in 2 calls; 60 in rows of 20, 4 windows
# in 1 call; 37 in rows of 10 (the last 7), 2 windows in 1 call.
@pytest.mark.parametrize("length,batch_size,windows_per_call", [
    (60, 3, 2), (61, 3, 32), (38, 4, 32)])
def test_evaluation_with_batches_equals_scoring_each_row_from_a_zero_state(
    monkeypatch, length, batch_size, windows_per_call):
  # Batch B splits the N - 1 targets into B contiguous rows of ceil((N - 1) / B), the last
  # one shorter; each row starts from a zero state and carries it through its windows.
  monkeypatch.setattr(train, "MAX_EVAL_WINDOWS_PER_CALL", windows_per_call)
  config = small_config()
  model = train.make_model(config, V)
  params = train.create_train_state(config, model, steps_per_epoch=1).params
  ids = np.random.default_rng(3).integers(0, V, length).astype(np.int32)
  row_length = -(-(length - 1) // batch_size)
  nll_sum = 0.0
  for start in range(0, length - 1, row_length):
    row = ids[start:min(start + row_length, length - 1) + 1]
    logits, _ = model.apply({"params": params}, row[None, :-1], model.initial_carry(1),
                            deterministic=True)
    nll_sum += float(losses.cross_entropy(logits, row[None, 1:]).sum())
  perplexity, scored = train.evaluate(model, params, ids, batch_size=batch_size, num_steps=T)
  assert scored == length - 1
  assert perplexity == pytest.approx(np.exp(nll_sum / (length - 1)), rel=1e-5)


def test_evaluation_compiles_once_whether_its_params_come_from_the_state_a_checkpoint_or_numpy():
  # Params from the pmapped state, then from a checkpoint's NumPy arrays: each compiled
  # the eval step again (three programs for every run).
  config = small_config()
  model = train.make_model(config, V)
  params = train.create_train_state(config, model, steps_per_epoch=1).params
  ids = np.random.default_rng(2).integers(0, V, 61).astype(np.int32)
  sources = [train.first_replica(train.replicate(params)), train.to_numpy(params), params]
  perplexities = [train.evaluate(model, sources[0], ids, batch_size=3, num_steps=T)[0]]
  compiled = train.eval_step._cache_size()
  perplexities += [train.evaluate(model, p, ids, batch_size=3, num_steps=T)[0] for p in sources[1:]]
  assert train.eval_step._cache_size() == compiled
  assert perplexities[1:] == perplexities[:1] * 2


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dataset", "imdb", "dataset='imdb' is unknown"),
        ("batch_size", 0, "batch_size=0 must be positive"),
        ("batch_size", 3, "batch_size=3 is not divisible by the 2 devices"),
        ("num_steps", -1, "num_steps=-1 must be positive"),
        ("num_steps", 0, "num_steps=0 must be positive"),
        ("model.input_dropout", 1.0, r"model.input_dropout=1.0 is a drop probability in \[0, 1\)"),
        ("model.hidden_size", 16, "tie_embeddings needs model.hidden_size == model.embed_dim"),
        ("loss.tau", 0.0, r"loss.tau=0.0 must be in \[1.18e-38"),
        ("loss.tau", -1.0, r"loss.tau=-1.0 must be in \[1.18e-38"),
        ("loss.augmented_form", "js",
         "loss.augmented_form='js' must be one of kl, cross_entropy"),
        ("loss.kl_output_bias", True,
         "loss.kl_output_bias=True needs an output bias: set model.output_bias=True"),
        ("model.output_dropout", -0.1, r"model.output_dropout=-0.1 is a drop probability"),
        ("model.hidden_dropout", 1.0, r"model.hidden_dropout=1.0 is a drop probability"),
        ("model.unroll", 0, "model.unroll=0 must be positive"),
        ("model.num_layers", 0, "model.num_layers=0 must be positive"),
        ("model.embed_dim", -8, "model.embed_dim=-8 must be positive"),
        ("model.hidden_size", 0, "model.hidden_size=0 must be positive"),
        ("max_vocab_size", -1, r"max_vocab_size=-1 must be 0 \(every word\) or >= 2"),
        ("max_vocab_size", 1, r"max_vocab_size=1 must be 0 \(every word\) or >= 2"),
        ("max_vocab_size", 500, "max_vocab_size=500 applies to dataset='text' only; 'ptb' has "
         "its own fixed vocabulary"),
        ("checkpoint_every_steps", -5, "checkpoint_every_steps=-5 must be >= 0"),
        ("num_epochs", 0, "num_epochs=0 must be positive"),
        ("max_steps_per_epoch", -5, r"max_steps_per_epoch=-5 must be >= 0 \(0 = full epochs\)"),
        ("log_every_steps", 0, "log_every_steps=0 must be positive"),
        ("eval_batch_size", 0, "eval_batch_size=0 must be positive"),
        ("loss.gamma", -0.5, "loss.gamma=-0.5 must be >= 0"),  # the KL subtracted
        ("optim.clip_norm", -1.0, r"optim.clip_norm=-1.0 must be > 0"),  # the loss climbed
        ("on_nonfinite", "ignore", "on_nonfinite='ignore' must be 'stop' or 'skip'"),
        ("optim.decay_rate", 1.5, r"optim.decay_rate=1.5 must be in \(0, 1\]"),
        ("model.lstm_implementation", "cuda", "model.lstm_implementation='cuda' must be"),
        ("model.lstm_implementation", "cudnn",
         "model.lstm_implementation='cudnn' needs an NVIDIA GPU .* devices are cpu"),
        # inf passes "> 0": an infinite learning rate saved an infinite state.
        ("optim.learning_rate", float("inf"), "optim.learning_rate=inf must be finite"),
        ("optim.clip_norm", float("inf"), "optim.clip_norm=inf must be finite"),
        ("loss.tau", float("inf"), r"loss.tau=inf must be in \[1.18e-38, 3.4e\+38\] \(float32's"),
        # 0 or subnormal in float32: NaN losses.
        ("loss.tau", 1e-39, r"loss.tau=1e-39 must be in \[1.18e-38, 3.4e\+38\] \(float32's"),
        # The fused loss loses accuracy as 1/tau (tests/test_losses.py); 1e-6 gave negative KLs.
        ("loss.tau", 0.05, r"loss.tau=0.05 must be >= 0.1 to train: the fused loss's float32"),
        ("loss.tau", 1e-6, r"loss.tau=1e-06 must be >= 0.1 to train"),
        ("loss.gamma", float("inf"), "loss.gamma=inf must be finite"),
        ("model.init_scale", float("inf"), "model.init_scale=inf must be finite"),
        # Finite in float64, inf once the step casts them to float32.
        ("optim.learning_rate", 1e39,
         r"optim.learning_rate=1e\+39 must be finite in float32 \(<= 3.4e\+38\)"),
        ("loss.gamma", 1e39, r"loss.gamma=1e\+39 must be finite in float32"),
        ("optim.clip_norm", 1e300, r"optim.clip_norm=1e\+300 must be finite in float32"),
        ("model.init_scale", 1e300, r"model.init_scale=1e\+300 must be finite and at most "
         r"1.7e\+38 \(the initial weights' range, 2 \* init_scale, is float32\)"),
        ("model.init_scale", 2e38, r"model.init_scale=2e\+38 must be finite and at most"),
        # Both finite, their product (the KL's weight) is not.
        ("loss.gamma", 2e38, r"loss.gamma \* loss.tau=4e\+38 \(the KL's weight\) must be "
         r"finite in float32"),
        # Negative: more decays than epochs, from step 1; huge: int32 overflow in the step.
        ("optim.decay_start_epoch", -5,
         r"optim.decay_start_epoch=-5 must be in \[0, 2\*\*31\) \(the epochs before"),
        ("optim.decay_start_epoch", 2**31, r"optim.decay_start_epoch=2147483648 must be in"),
        ("seed", 2**32 - 1, r"seed=4294967295 must be in \[0, 2\*\*32 - 1\)"),
        ("seed", -1, r"seed=-1 must be in \[0, 2\*\*32 - 1\)"),
    ],
)
def test_bad_configs_are_refused_with_a_clear_message(field, value, message):
  config = small_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(train.ConfigError, match=message):
    train.validate_config(config, num_devices=2)


def _default_fields(tree: dict, prefix: str = "") -> list[str]:
  """Every field of `tree`, sections and their fields, as dotted paths."""
  fields = []
  for name, value in tree.items():
    fields.append(prefix + name)
    if isinstance(value, dict):
      fields += _default_fields(value, f"{prefix}{name}.")
  return fields


@pytest.mark.parametrize("field", _default_fields(default.get_config().to_dict()))
def test_a_config_without_a_field_is_refused_naming_it(field):
  # A config file of one's own that lacks a field was an AttributeError traceback, or, for
  # a field read only later, one after the workdir was made.
  tree = small_config().to_dict()
  section, _, name = field.rpartition(".")
  del (tree[section] if section else tree)[name]
  with pytest.raises(train.ConfigError, match=(
      f"^the config has no field '{name}': build it on configs/default.py's get_config\\(\\), "
      "which defines every field$")):
    train.validate_config(ml_collections.ConfigDict(tree), num_devices=2)


def test_every_field_of_the_default_config_has_a_kind_the_checks_know():
  tree = default.get_config().to_dict()
  leaves = [f for f in _default_fields(tree)
            if not isinstance(functools.reduce(dict.get, f.split("."), tree), dict)]
  assert sorted(train.CONFIG_FIELD_KINDS) == sorted(leaves)


def _wrong_kinds(value):
  """Values of another kind than `value`, a field's default: what a config file of one's
  own (not built on configs/default.py, which fixes each field's type) can hold."""
  if isinstance(value, bool):
    return ["False", 1]  # "False" is true
  if isinstance(value, int):
    return [str(value), value + 0.5, True]
  if isinstance(value, float):
    return [str(value), None, False, 10**400]  # 10**400 overflowed in the checks
  return [1, None]


@pytest.mark.parametrize("field", sorted(train.CONFIG_FIELD_KINDS))
def test_a_field_of_the_wrong_kind_is_refused_naming_it(field):
  # batch_size="20" was a TypeError traceback from a comparison inside the checks;
  # hidden_size=64.5 passed them.
  section, _, name = field.rpartition(".")
  for wrong in _wrong_kinds(default.get_config()[section][name] if section
                            else default.get_config()[name]):
    tree = small_config().to_dict()
    (tree[section] if section else tree)[name] = wrong
    message = f"{field}={wrong!r} must be {train.CONFIG_FIELD_KINDS[field][1]}"
    with pytest.raises(train.ConfigError, match=f"^{re.escape(message)}$"):
      train.validate_config(ml_collections.ConfigDict(tree), num_devices=2)


def test_a_numpy_number_in_a_config_is_refused_saying_so():
  # config.json cannot hold one: a TypeError traceback once the run had started.
  tree = small_config().to_dict()
  tree["batch_size"] = np.int64(4)  # a config file of one's own, not built on default.py
  with pytest.raises(train.ConfigError, match=(
      r"^batch_size=np.int64\(4\) must be a whole number of Python's own, not a "
      r"numpy.int64$")):
    train.validate_config(ml_collections.ConfigDict(tree), num_devices=2)


def test_an_error_inside_a_check_is_not_taken_for_a_missing_field(monkeypatch):
  def broken(dataset, max_vocab_size):
    return {}["a key"]

  monkeypatch.setattr(train.data, "max_vocab_size_problem", broken)
  with pytest.raises(KeyError, match="a key"):
    train.validate_config(small_config(), num_devices=2)


def test_a_small_tau_is_refused_only_where_the_augmented_loss_trains():
  config = small_config()
  config.loss.tau = losses.MIN_TRAINING_TAU
  train.validate_config(config, num_devices=2)
  config.loss.tau, config.loss.augmented = 0.05, False  # no KL: tau is never used
  train.validate_config(config, num_devices=2)


def test_without_a_device_count_the_config_is_checked_without_starting_a_backend(monkeypatch):
  # experiments.reproduce checks its runs' configs so; a backend started there would take
  # a GPU's memory from the runs it launches.
  def no_backend():
    raise AssertionError("a backend was started")

  monkeypatch.setattr(train.jax, "default_backend", no_backend)
  monkeypatch.setattr(train.jax, "devices", no_backend)
  config = small_config(lstm_implementation="cudnn")
  config.batch_size = 3
  train.validate_config(config, num_devices=None)  # both left to the run
  config.optim.learning_rate = -1.0
  with pytest.raises(train.ConfigError, match="optim.learning_rate=-1.0 must be > 0"):
    train.validate_config(config, num_devices=None)


def test_distinct_targets_bound_is_off_where_it_saves_nothing():
  repeats = np.array([[[1, 1, 2], [3, 3, 5]]])  # one window, batch 2, 3 steps
  assert train.distinct_targets_bound(repeats, num_devices=1) == 4
  assert train.distinct_targets_bound(repeats, num_devices=2) == 2
  assert train.distinct_targets_bound(np.array([[[1, 1, 2], [3, 4, 5]]]), num_devices=2) == 0
  assert train.distinct_targets_bound(repeats, num_devices=1, augmented=False) == 0


def test_paper_configs():
  for module, dataset in ((ptb, "ptb"), (wikitext2, "wikitext2")):
    for size in ("small", "medium", "large"):
      for variant in ("vd", "al", "re", "real"):
        config = module.get_config(f"{size},{variant}")
        train.validate_config(config, num_devices=1)
        assert config.dataset == dataset
        assert config.model.tie_embeddings == (variant in ("re", "real"))
        assert config.model.output_bias == (variant in ("vd", "al"))
        assert config.loss.augmented == (variant in ("al", "real"))
        # The paper's per-size settings (../shared/PAPER.md) and Zaremba's init range.
        # The epochs: ours (the paper gives none), after which the learning rate has fallen
        # 40-190 times; every window of every epoch.
        units, decay_start, decay_rate, clip, init_scale, epochs = {
            "small": (200, 5, 0.9, 5.0, 0.1, 40), "medium": (650, 10, 0.9, 5.0, 0.05, 60),
            "large": (1500, 1, 0.97, 6.0, 0.04, 120)}[size]
        assert (config.num_epochs, config.max_steps_per_epoch) == (epochs, 0)
        dropout = {"ptb": {"small": 0.3, "medium": 0.5, "large": 0.65},
                   "wikitext2": {"small": 0.2, "medium": 0.4, "large": 0.4}}[dataset][size]
        model, optim = config.model, config.optim
        assert (model.num_layers, model.hidden_size, model.embed_dim) == (2, units, units)
        assert (model.input_dropout, model.hidden_dropout, model.output_dropout) == (dropout,) * 3
        assert model.init_scale == init_scale
        assert (optim.decay_start_epoch, optim.decay_rate, optim.clip_norm) == (
            decay_start, decay_rate, clip)
        assert (config.batch_size, config.num_steps, optim.learning_rate) == (20, 35, 1.0)
        # γ within the appendix's range for the dataset (0.5-0.8 PTB, 1.0-1.5 WikiText-2).
        assert config.loss.tau == 10.0 and config.loss.gamma == {
            "ptb": 0.65, "wikitext2": 1.25}[dataset]
  with pytest.raises(ValueError, match=r"VARIANT in vd \| al \| re \| real"):
    ptb.get_config("small,tied")
  with pytest.raises(ValueError, match=r"SIZE in small \| medium \| large"):
    wikitext2.get_config("huge,real")
  with pytest.raises(ValueError, match=r"'medium,real,0.2' must be SIZE,VARIANT"):
    ptb.get_config("medium,real,0.2")  # not read as medium,real


def test_default_config_learns_ptb(tmp_path):
  config = default.get_config()  # 2 epochs x 150 steps of a tiny tied model with the AL
  results = train.train_and_evaluate(config, str(tmp_path))
  # An untrained model is near uniform (perplexity ~ 10,000).
  assert results["valid_perplexity"] < 1000
  assert results["test_tokens_scored"] == 82_429 and results["valid_tokens_scored"] == 73_759
  history = reporting.read_records(tmp_path, "epoch")
  assert [h["epoch"] for h in history] == [1, 2]
  assert history[1]["valid_perplexity"] < history[0]["valid_perplexity"]
  saved = json.loads((tmp_path / "results.json").read_text())
  for key in ("valid_perplexity", "test_perplexity", "test_tokens_scored", "num_params",
              "epochs_completed", "train_tokens_per_second", "config"):
    assert saved[key] == results[key]
  assert saved["epochs_completed"] == 2 and saved["config"]["model"]["embed_dim"] == 64


def write_tiny_corpus(directory):
  rng = np.random.default_rng(0)
  words = [f"w{i}" for i in range(30)]

  def lines(n):
    # A learnable language: each word is usually followed by the next one.
    out, w = [], 0
    for _ in range(n):
      line = []
      for _ in range(8):
        w = (w + 1) % 30 if rng.random() < 0.8 else int(rng.integers(30))
        line.append(words[w])
      out.append(" ".join(line))
    return "\n".join(out) + "\n"

  directory.mkdir()
  for split, n in (("train", 300), ("valid", 40), ("test", 40)):
    (directory / f"{split}.txt").write_text(lines(n))


def tiny_run_config(data_dir, num_epochs):
  config = small_config(input_dropout=0.2, hidden_dropout=0.2, output_dropout=0.2)
  config.dataset, config.data_dir = "text", str(data_dir)
  config.num_epochs, config.max_steps_per_epoch = num_epochs, 0
  config.optim.decay_start_epoch = 1
  return config


def test_the_best_validation_epoch_is_tested_and_epoch_records_sum_the_log_lines(
    tmp_path, monkeypatch):
  # Validation that rises after epoch 2: epoch 2's params are the ones tested.
  write_tiny_corpus(tmp_path / "corpus")
  config = tiny_run_config(tmp_path / "corpus", 3)
  # 134 steps per epoch: log lines at 30, 60, 90, 120 and 134; checkpoints at 60 and 120
  # cut each epoch's training time into three segments.
  config.log_every_steps, config.checkpoint_every_steps = 30, 60
  real_evaluate, calls = train.evaluate, []

  def evaluate(model, params, ids, batch_size, num_steps, split):
    calls.append(train.to_numpy(params))
    perplexity, scored = real_evaluate(model, params, ids, batch_size, num_steps, split)
    return ((50.0, 40.0, 45.0)[len(calls) - 1] if len(calls) <= 3 else perplexity), scored

  monkeypatch.setattr(train, "evaluate", evaluate)
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert len(calls) == 4  # three validations, then the test
  assert (results["best_epoch"], results["valid_perplexity"]) == (2, 40.0)
  tested, epoch_2, epoch_3 = (jax.tree.leaves(calls[i]) for i in (3, 1, 2))
  for got, expected in zip(tested, epoch_2, strict=True):
    np.testing.assert_array_equal(got, expected)
  assert any(not np.array_equal(a, b) for a, b in zip(epoch_2, epoch_3, strict=True))
  epochs = reporting.read_records(tmp_path / "run", "epoch")
  speeds = [r["train_tokens_per_second"] for r in epochs]
  assert len(speeds) == 3 and results["train_tokens_per_second"] == np.median(speeds)
  # Each epoch's training perplexity and KL: the token-weighted means of its log lines'
  # (intervals of 30 steps, the last one shorter).
  train_records = reporting.read_records(tmp_path / "run", "train")
  for epoch in epochs:
    lines = [r for r in train_records if r["epoch"] == epoch["epoch"]]
    steps = np.diff([0] + [r["step_in_epoch"] for r in lines])
    assert len(lines) > 2 and len(set(steps)) == 2
    loss, kl = (np.average([r[k] for r in lines], weights=steps) for k in ("loss", "kl"))
    assert kl > 1e-3
    assert epoch["train_perplexity"] == pytest.approx(np.exp(loss), rel=1e-6)
    assert epoch["train_kl"] == pytest.approx(kl, rel=1e-6)
    # The epoch's speed counts the time of all its segments: at least its log lines' time.
    tokens = steps * config.batch_size * config.num_steps
    lines_seconds = sum(tokens / [r["tokens_per_second"] for r in lines])
    assert tokens.sum() / epoch["train_tokens_per_second"] >= 0.95 * lines_seconds


def test_an_epoch_leaves_out_the_time_its_process_was_stopped(tmp_path, run_python_that_stops):
  # A run paused with SIGSTOP (for a benchmark) counted the pause as training time: in its
  # epoch's seconds, its wall time and its speed. Stopped once in epoch 1's training and
  # once in epoch 2's validation.
  write_tiny_corpus(tmp_path / "corpus")
  (tmp_path / "config.json").write_text(tiny_run_config(tmp_path / "corpus", 2).to_json())
  script = """
import functools, json, sys, time
import ml_collections
from tied_lm import reporting, train
config = ml_collections.ConfigDict(json.loads(open(sys.argv[1]).read()))
reporting.RunningClock = functools.partial(reporting.RunningClock, tick=0.05, slack=0.5)
real_train_epoch, real_evaluate = train.train_epoch, train.evaluate
stops, trainings = [], []  # seconds, measured here

def stopped_for_two_seconds(run):
  before = time.monotonic()
  stop_this_process(2.0)
  stops.append(time.monotonic() - before)
  return run()

def train_epoch(*args, **kwargs):
  run = functools.partial(real_train_epoch, *args, **kwargs)
  start = time.monotonic()
  result = stopped_for_two_seconds(run) if not trainings else run()
  trainings.append(time.monotonic() - start - (stops[0] if not trainings else 0.0))
  return result

def evaluate(*args):
  run = functools.partial(real_evaluate, *args)
  return stopped_for_two_seconds(run) if len(trainings) == 2 and len(stops) == 1 else run()

train.train_epoch, train.evaluate = train_epoch, evaluate
start = time.monotonic()
train.train_and_evaluate(config, sys.argv[2])
print(json.dumps({"stops": stops, "trainings": trainings, "elapsed": time.monotonic() - start}))
"""
  process = run_python_that_stops(script, str(tmp_path / "config.json"), str(tmp_path / "run"))
  assert process.returncode == 0, process.stderr
  measured = json.loads(process.stdout.splitlines()[-1])
  stops, trainings = measured["stops"], measured["trainings"]
  assert len(stops) == 2 and len(trainings) == 2
  first, second = reporting.read_records(tmp_path / "run", "epoch")
  for epoch, stop in zip((first, second), stops, strict=True):
    assert epoch["paused_seconds"] == pytest.approx(stop, abs=0.2)
  assert second["wall_seconds"] == pytest.approx(first["epoch_seconds"] + second["epoch_seconds"])
  assert second["wall_seconds"] < measured["elapsed"] - sum(stops) + 0.2
  # The speed is the training's alone: tokens over the epoch's running training time.
  tokens = 134 * B * T
  assert tokens / first["train_tokens_per_second"] == pytest.approx(trainings[0], abs=0.2)


def test_an_epoch_resumed_from_a_checkpoint_that_counted_no_stops_has_no_paused_seconds(
    tmp_path, monkeypatch):
  # Saved mid-epoch before stops were counted, the epoch's time so far may hold some:
  # 0 would be wrong.
  write_tiny_corpus(tmp_path / "corpus")
  config = tiny_run_config(tmp_path / "corpus", 2)
  real_train_epoch, real_save = train.train_epoch, Checkpoints.save

  def train_epoch(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # checkpointed after its first step
    return real_train_epoch(*args, **kwargs)

  def save_as_before(self, step, arrays, meta):
    real_save(self, step, arrays, {k: v for k, v in meta.items() if k != "epoch_paused_seconds"})

  monkeypatch.setattr(train, "train_epoch", train_epoch)
  monkeypatch.setattr(Checkpoints, "save", save_as_before)
  with pytest.raises(train.Interrupted, match="stopped by SIGTERM"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  monkeypatch.undo()
  train.train_and_evaluate(config, str(tmp_path / "run"))
  first, second = reporting.read_records(tmp_path / "run", "epoch")
  assert first["paused_seconds"] is None and second["paused_seconds"] == 0.0


def test_a_relative_data_dir_is_saved_absolute_for_the_tools_run_elsewhere(
    tmp_path, monkeypatch):
  # Saved as typed, evaluate, sample and neighbors run from another folder missed the corpus.
  write_tiny_corpus(tmp_path / "corpus")
  monkeypatch.chdir(tmp_path)
  config = tiny_run_config("corpus", 1)
  train.train_and_evaluate(config, "run")
  assert config.data_dir == "corpus"  # the caller's config is left alone
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["data_dir"] == str(tmp_path / "corpus")
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")
  assert train.load_trained(tmp_path / "run").corpus.vocab_size == 32  # 30 words, <eos>, <unk>
  # A text corpus named by $TIED_LM_DATA_DIR alone (relative, too) was saved as "".
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv(data.DATA_DIR_ENV, "corpus")
  config.data_dir = ""
  train.train_and_evaluate(config, "run_from_env")
  saved = json.loads((tmp_path / "run_from_env" / "config.json").read_text())
  assert saved["data_dir"] == str(tmp_path / "corpus")


def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, monkeypatch):
  write_tiny_corpus(tmp_path / "corpus")
  straight = train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 3), str(tmp_path / "a"))

  train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 1), str(tmp_path / "b"))
  assert len(reporting.read_records(tmp_path / "b", "epoch")) == 1
  assert (tmp_path / "b/results.json").is_file()
  # While the run trains on to 3 epochs, the 1-epoch results.json is gone: an
  # interruption must not leave it looking like the result of the longer run.
  results_while_training = []

  def train_one_epoch(*args, **kwargs):
    results_while_training.append((tmp_path / "b/results.json").exists())
    return train_one_epoch_unpatched(*args, **kwargs)

  train_one_epoch_unpatched = train._train_one_epoch
  monkeypatch.setattr(train, "_train_one_epoch", train_one_epoch)
  resumed = train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 3), str(tmp_path / "b"))
  assert results_while_training == [False, False]

  def curve(workdir):
    return [{k: v for k, v in json.loads(line).items() if "second" not in k}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]

  assert curve(tmp_path / "b") == curve(tmp_path / "a")
  assert len(reporting.read_records(tmp_path / "a", "epoch")) == 3
  for key in ("valid_perplexity", "test_perplexity", "best_epoch", "epochs_completed"):
    assert resumed[key] == straight[key]
  # A finished run is not trained again.
  again = train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 3), str(tmp_path / "b"))
  assert again["test_perplexity"] == straight["test_perplexity"]
  assert len(reporting.read_records(tmp_path / "b", "epoch")) == 3


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_download",
                      lambda url, deadline: (_ for _ in ()).throw(OSError("offline")))
  config = default.get_config()
  config.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(data.DataError, match="missing ptb.train.txt"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_a_step_with_a_non_finite_gradient_is_skipped_or_reported():
  config = small_config()
  model = train.make_model(config, V)
  state = train.replicate(train.create_train_state(config, model, steps_per_epoch=10))
  inputs, targets = batch()
  key = jax.random.key(0)

  def run(state, skip):
    step = train.pmap_train_step(config.loss, jax.local_devices()[:1], skip_nonfinite=skip)
    carry = train.replicate(model.initial_carry(B), jax.local_devices()[:1])
    return step(
        jax.tree.map(lambda x: x[:1], state), carry, inputs[None], targets[None], key
    )

  _, _, metrics = run(state, skip=True)
  assert float(metrics["nonfinite_steps"]) == 0.0
  # A NaN in the row of a word the batch uses makes the loss and the gradient NaN.
  poisoned = state.replace(params=flax.core.copy(state.params, {}))
  embedding = poisoned.params["embed"]["embedding"].at[:, int(inputs[0, 0])].set(jnp.nan)
  poisoned.params["embed"]["embedding"] = embedding
  before = jax.tree.map(np.asarray, poisoned)
  skipped, carry, metrics = run(poisoned, skip=True)
  assert float(metrics["nonfinite_steps"]) == 1.0
  for got, expected in zip(
      jax.tree.leaves(skipped.params), jax.tree.leaves(before.params), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(got)[0], expected[0])  # unchanged, NaN included
  assert int(skipped.step[0]) == 1
  # The learning-rate schedule's counter keeps pace with the step count.
  counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(skipped.opt_state)
            if path[-1].name == "count"]
  assert [int(c[0]) for c in counts] == [1]
  np.testing.assert_array_equal(np.asarray(carry[0][0]), 0.0)  # the carry stays as it was
  # A skipped step trained on no tokens.
  assert [float(metrics[k]) for k in ("cross_entropy_sum", "kl_sum", "num_tokens")] == [0, 0, 0]
  updated, _, metrics = run(poisoned, skip=False)
  assert float(metrics["nonfinite_steps"]) == 1.0
  assert not np.isfinite(np.asarray(updated.params["lstm_0"]["bias"])).all()
  # A finite loss with an infinite gradient: the row of a word the batch does not use,
  # scaled by 1e15, leaves the cross-entropy as it was and the KL finite (about 1e14), and
  # its gradient overflows. Skipped too.
  unused = min(set(range(V)) - set(inputs.ravel()) - set(targets.ravel()))
  overflowing = state.replace(params=flax.core.copy(state.params, {}))
  overflowing.params["embed"]["embedding"] = (
      overflowing.params["embed"]["embedding"].at[:, unused].multiply(1e15))
  _, _, metrics = run(overflowing, skip=False)
  assert np.isfinite(float(metrics["kl_sum"])) and float(metrics["kl_sum"]) > 1e12
  assert not np.isfinite(float(metrics["grad_norm"]))
  before = jax.tree.map(np.asarray, overflowing)
  skipped, _, metrics = run(overflowing, skip=True)
  assert float(metrics["nonfinite_steps"]) == 1.0
  for got, expected in zip(
      jax.tree.leaves(skipped.params), jax.tree.leaves(before.params), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(got)[0], expected[0])


class _Records:
  """A reporter that only keeps what train_epoch adds."""

  def __init__(self):
    self.records = []

  def advance(self):
    pass

  def add(self, record):
    self.records.append(record)


def test_skipped_steps_stay_out_of_the_logged_loss_and_gradient_norm():
  # What the skipping step returns: finite steps' sums, and zeros for a skipped one.
  steps = [
      {"cross_entropy_sum": 20.0, "kl_sum": 2.0, "num_tokens": 10.0, "grad_norm": 3.0,
       "nonfinite_steps": 0.0},
      {"cross_entropy_sum": 0.0, "kl_sum": 0.0, "num_tokens": 0.0, "grad_norm": np.nan,
       "nonfinite_steps": 1.0},
      {"cross_entropy_sum": 40.0, "kl_sum": 1.0, "num_tokens": 10.0, "grad_norm": 5.0,
       "nonfinite_steps": 0.0},
      {"cross_entropy_sum": 0.0, "kl_sum": 0.0, "num_tokens": 0.0, "grad_norm": np.inf,
       "nonfinite_steps": 1.0},
  ]
  returned = iter(steps)

  def p_train_step(state, carry, inputs, targets, key):
    return state, carry, {k: jnp.float32(v) for k, v in next(returned).items()}

  reporter = _Records()
  windows = np.zeros((4, 1, 1, 1), np.int32)
  _, _, totals, step = train.train_epoch(
      p_train_step, None, None, windows, windows, None, log_every_steps=3,
      reporter=reporter, on_nonfinite="skip",
  )
  assert step == 4
  first, second = reporter.records
  assert (first["loss"], first["kl"], first["grad_norm"]) == (3.0, 0.15, 4.0)
  assert first["nonfinite_steps"] == 1
  # An interval of skipped steps only: no loss to report, and no ZeroDivisionError.
  assert all(np.isnan(second[k]) for k in ("loss", "perplexity", "kl", "grad_norm"))
  assert np.isnan(json.loads(json.dumps(second))["loss"])  # README: written and read as NaN
  assert totals == {"cross_entropy_sum": 60.0, "kl_sum": 3.0, "num_tokens": 20.0,
                    "nonfinite_steps": 2.0}


def test_a_non_finite_step_is_named_by_its_number_in_the_epoch_after_the_last_finite_loss():
  # The interval after step 10 of the epoch: steps 11, 12 and 13; 12 is the first bad one.
  finite = {"cross_entropy_sum": 30.0, "num_tokens": 15.0, "nonfinite_steps": 0.0}
  window = [finite, {**finite, "nonfinite_steps": 1.0}, {**finite, "nonfinite_steps": 1.0}]
  with pytest.raises(train.NonFiniteError, match=(
      r"^step 12 of the epoch has a non-finite loss or gradient \(the last finite loss was "
      r"2.0000 at step 11\)$")):
    train._check_finite(window, 10, "stop")
  with pytest.raises(train.NonFiniteError, match=(
      r"^step 12 of the epoch .* \(the last finite loss was before this log interval\)$")):
    train._check_finite(window[1:], 11, "stop")
  train._check_finite(window, 10, "skip")  # counted, not raised


def test_non_finite_loss_stops_the_run_and_names_the_kept_checkpoint(tmp_path):
  write_tiny_corpus(tmp_path / "corpus")
  config = tiny_run_config(tmp_path / "corpus", 1)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  config.num_epochs, config.optim.learning_rate = 2, 1e30  # diverges in epoch 2
  with pytest.raises(train.NonFiniteError, match=(
      r"epoch 2: step \d+ of the epoch has a non-finite loss or gradient \(the last finite "
      r"loss was .*\); checkpoint \d+ in .*checkpoints is kept; "
      r"--config.on_nonfinite=skip skips such steps instead")):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert len(reporting.read_records(tmp_path / "run", "epoch")) == 1


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_an_update_that_overflows_is_never_checkpointed(tmp_path):
  # A finite loss, gradient and learning rate (validate_config refuses an infinite one), but
  # their product overflows float32: with a KL weight of 2e6 and no clipping, some gradient
  # entries times a learning rate of 1e36 exceed 3.4e38.
  write_tiny_corpus(tmp_path / "corpus")
  config = tiny_run_config(tmp_path / "corpus", 1)
  config.optim.learning_rate, config.checkpoint_every_steps = 1e36, 1
  config.optim.clip_norm, config.loss.gamma = models.FLOAT32_MAX, 1e6
  with pytest.raises(train.NonFiniteError, match=(
      r"the parameters after step 1 are not finite \(an update overflowed: is the learning "
      r"rate too large\?\); no checkpoint was written")):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not [d for d in (tmp_path / "run/checkpoints").iterdir() if d.name.isdigit()]


def test_an_evaluation_batch_larger_than_a_split_is_refused_before_training(tmp_path):
  write_tiny_corpus(tmp_path / "corpus")  # 40 lines of 8 words and <eos>: 360 tokens
  config = tiny_run_config(tmp_path / "corpus", 1)
  config.eval_batch_size = 360
  with pytest.raises(data.DataError, match=(
      "eval_batch_size=360 exceeds the 359 targets of the valid split: each row needs")):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,error", [("eval_batch_size", data.DataError),
                                         ("batch_size", train.ConfigError)])
def test_batches_whose_logits_cannot_fit_are_refused_before_training(tmp_path, monkeypatch,
                                                                     field, error):
  write_tiny_corpus(tmp_path / "corpus")
  config = tiny_run_config(tmp_path / "corpus", 1)
  if field == "batch_size":
    config.eval_batch_size = 1  # fits where the training batch does not
  vocab_size = data.load_corpus("text", str(tmp_path / "corpus")).vocab_size
  rows = config[field] // (jax.device_count() if field == "batch_size" else 1)
  devices = jax.local_device_count() if field == "batch_size" else 1
  host = rows * config.num_steps * vocab_size * 4 * devices - 1  # one byte short
  monkeypatch.setattr(train.hostmem, "total_bytes", lambda: host)
  with pytest.raises(error, match=f"^{field}={config[field]} needs .* lower {field}$"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_resume_on_another_vocabulary_is_refused_and_leaves_the_run_as_it_was(tmp_path):
  write_tiny_corpus(tmp_path / "corpus")
  run = tmp_path / "run"
  train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 1), str(run))
  saved = {name: (run / name).read_bytes() for name in ("config.json", "results.json")}
  # The same words with two of them renamed: same vocabulary size, so same shapes.
  other = tmp_path / "other"
  other.mkdir()
  for split in ("train", "valid", "test"):
    text = (tmp_path / "corpus" / f"{split}.txt").read_text()
    (other / f"{split}.txt").write_text(re.sub(r"\bw([12])\b", r"v\1", text))
  with pytest.raises(train.ConfigError, match=(
      "the workdir's checkpoints were trained on another vocabulary than the corpus of "
      "dataset='text', data_dir=.*other' gives now")):
    train.train_and_evaluate(tiny_run_config(other, 2), str(run))
  assert {name: (run / name).read_bytes() for name in saved} == saved


@pytest.mark.parametrize("edit,difference", [
    ({"output_bias": True}, "model.output_bias=True (checkpoint: False)"),
    ({"hidden_size": 100, "embed_dim": 100},
     "model.embed_dim=100 (checkpoint: 64), model.hidden_size=100 (checkpoint: 64)"),
])
def test_a_reader_refuses_a_config_json_that_is_not_its_checkpoints(
    trained_run, tmp_path, edit, difference):
  # config.json edited, or copied from another run: flax's ScopeParam tracebacks before.
  run = tmp_path / "run"
  shutil.copytree(trained_run[0], run)
  config = json.loads((run / "config.json").read_text())
  (run / "config.json").write_text(json.dumps({**config, "model": {**config["model"], **edit}}))
  step = train.Checkpoints(run, read_only=True).restore_best_params()[0]
  with pytest.raises(train.ConfigError, match=re.escape(
      f"{run / 'config.json'} does not match checkpoint {step}: {difference}; restore the "
      "run's own config.json")):
    train.load_trained(run)
  # Another seed (a launch of older code, killed before its first checkpoint) is read.
  (run / "config.json").write_text(json.dumps({**config, "seed": 7}))
  assert train.load_trained(run).checkpoint_step == step


@pytest.mark.parametrize("edit,message", [
    # A traceback (ValueError, or TypeError from a comparison) or, in some tools, no word.
    ({"model": {"lstm_implementation": "bogus"}},
     "model.lstm_implementation='bogus' must be 'scan' or 'cudnn'"),
    ({"model": {"unroll": 0}}, "model.unroll=0 must be positive"),
    ({"model": {"unroll": "x"}}, "a model field is missing or of the wrong type"),
    ({"data_dir": 5}, "data_dir=5 must be a folder's name or ''"),
])
def test_a_reader_refuses_a_hand_edited_field_the_checkpoint_does_not_fix(
    trained_run, tmp_path, edit, message):
  run = tmp_path / "run"
  shutil.copytree(trained_run[0], run)
  config = json.loads((run / "config.json").read_text())
  edited = {**config, **edit, "model": {**config["model"], **edit.get("model", {})}}
  (run / "config.json").write_text(json.dumps(edited))
  with pytest.raises(UserError, match=(
      rf"^{re.escape(str(run / 'config.json'))}: {re.escape(message)}.*; restore the run's own")):
    train.load_trained(run)


@pytest.mark.parametrize("removed,named", [
    (["checkpoints"], "results.json and epoch records in metrics.jsonl"),
    (["checkpoints", "results.json"], "epoch records in metrics.jsonl"),
])
def test_a_trained_run_without_its_checkpoints_is_refused_and_left_as_it_was(
    trained_run, tmp_path, removed, named):
  # Its checkpoints deleted to free the disk, the same command trained it again from
  # scratch and replaced its results.json and metrics.jsonl.
  run = tmp_path / "run"
  shutil.copytree(trained_run[0], run)
  for name in removed:
    shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
  def contents():
    return {p: p.read_bytes() if p.is_file() else None for p in run.rglob("*")
            if p.name != "lock"}

  before = contents()
  config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
  with pytest.raises(UserError, match=re.escape(
      f"{run} holds a trained run ({named}) but no checkpoint to resume from: training from "
      "scratch would replace its results. Move them away, or use a new --workdir")):
    train.train_and_evaluate(config, str(run))
  assert contents() == before  # no file changed, none added, not even checkpoints/


def test_a_run_stopped_before_its_first_checkpoint_starts_again(trained_run, tmp_path):
  # Its records are of steps no checkpoint kept: nothing to lose.
  run = tmp_path / "run"
  shutil.copytree(trained_run[0], run)
  shutil.rmtree(run / "checkpoints")
  (run / "results.json").unlink()
  train_records = reporting.read_records(run, "train")
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_records[:1]))
  config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
  results = train.train_and_evaluate(config, str(run))
  assert results["test_perplexity"] == trained_run[1]["test_perplexity"]


def test_a_reader_refuses_a_run_folder_entry_of_the_wrong_kind(trained_run, tmp_path):
  # A file named checkpoints was reported as "no checkpoint yet".
  run = tmp_path / "run"
  shutil.copytree(trained_run[0], run)
  shutil.rmtree(run / "checkpoints")
  (run / "checkpoints").write_text("")
  with pytest.raises(UserError, match=re.escape(
      f"{run / 'checkpoints'} is a file, where a run keeps its folder checkpoints")):
    train.load_trained(run)


def test_a_reader_refuses_a_changed_corpus_a_bad_config_and_a_run_without_an_epoch(
    tmp_path, monkeypatch):
  write_tiny_corpus(tmp_path / "corpus")
  run = tmp_path / "run"
  train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 1), str(run))
  assert train.load_trained(run).checkpoint_step > 0
  # The corpus edited in place: same vocabulary size, two words renamed.
  for split in ("train", "valid", "test"):
    path = tmp_path / "corpus" / f"{split}.txt"
    path.write_text(re.sub(r"\bw([12])\b", r"v\1", path.read_text()))
  with pytest.raises(UserError, match="was trained on another vocabulary than the corpus of "
                     "dataset='text'.*: its scores would be of the wrong words"):
    train.load_trained(run)
  (run / "config.json").write_text("{}")
  with pytest.raises(UserError, match="config.json does not describe a tied_lm run"):
    train.load_trained(run)

  # Stopped within epoch 1, after a mid-epoch checkpoint: its best parameters are the
  # initial ones, which evaluate, sample, ... would otherwise score as the run's.
  config = tiny_run_config(tmp_path / "corpus", 1)
  config.checkpoint_every_steps = 2

  def stop(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(train, "evaluate", stop)
  with pytest.raises(train.Interrupted, match="stopped by SIGINT at once: checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "early"))
  with pytest.raises(UserError, match=r"early has no finished epoch yet \(checkpoint \d+ is "
                     r"within epoch 1\): its best parameters are still the initial ones"):
    train.load_trained(tmp_path / "early")


def test_a_torn_checkpoint_is_set_aside_the_previous_one_used_and_tmp_saves_removed(
    tmp_path, caplog):
  write_tiny_corpus(tmp_path / "corpus")
  straight = train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 3), str(tmp_path / "a"))
  train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 2), str(tmp_path / "b"))
  checkpoints = tmp_path / "b" / "checkpoints"
  newest = max((d for d in checkpoints.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
  for file in newest.rglob("*"):
    if file.is_file():  # as if the kill came in the middle of writing it
      file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
  # A kill during a save leaves orbax's tmp directory (named as orbax names a save in flight).
  in_flight = checkpoints / "999.orbax-checkpoint-tmp-1732760000"
  (in_flight / "state").mkdir(parents=True)
  (in_flight / "state" / "half_written").write_bytes(b"\0" * 100)
  resumed = train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 3), str(tmp_path / "b"))
  assert not in_flight.exists()
  assert f"checkpoint {newest.name} in {checkpoints.resolve()} cannot be read" in caplog.text
  assert [d.name.split(".")[0] for d in (tmp_path / "b" / "torn_checkpoints").iterdir()] == [
      newest.name]
  for key in ("valid_perplexity", "test_perplexity", "epochs_completed"):
    assert resumed[key] == straight[key]


def test_a_saved_carry_is_split_over_the_devices_in_either_layout():
  # Checkpoints before the per-row layout saved [devices, rows per device, H].
  rows = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)  # batch 4, H 3
  like = train.replicate(((np.zeros((2, 3), np.float32),) * 2,))  # 2 devices, 2 rows each
  for saved in (rows, rows.reshape(2, 2, 3)):
    carry = train._local_carry(((saved, saved),), like=like)
    np.testing.assert_array_equal(np.asarray(carry[0][0]), rows.reshape(2, 2, 3))
  gathered = train._gather_carry(train._local_carry(((rows, rows),), like=like))
  np.testing.assert_array_equal(gathered[0][1], rows)  # saved per row again


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_test_evaluation_is_one_line_and_a_rerun_tests(
    tmp_path, monkeypatch, caplog, signum):
  write_tiny_corpus(tmp_path / "corpus")
  config = tiny_run_config(tmp_path / "corpus", 1)
  evaluate = train.evaluate
  calls = []

  def evaluate_until_the_test(*args):
    calls.append(args)
    if len(calls) == 2:  # epoch 1's validation, then the test
      os.kill(os.getpid(), signum)  # SIGTERM's default would end the process silently
    return evaluate(*args)

  monkeypatch.setattr(train, "evaluate", evaluate_until_the_test)
  with pytest.raises(train.Interrupted) as raised:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  checkpoints = (tmp_path / "run" / "checkpoints").resolve()
  assert re.fullmatch(
      rf"stopped by {signum.name} before the test evaluation ended: checkpoint \d+ in "
      rf"{re.escape(str(checkpoints))} holds every epoch; run the same command again to "
      r"evaluate", str(raised.value))
  assert raised.value.signum == signum
  assert not (tmp_path / "run" / "results.json").exists()
  monkeypatch.setattr(train, "evaluate", evaluate)
  caplog.set_level(logging.INFO)
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  # Not "epoch 2, window 0" of a 1-epoch run.
  assert re.search(r"resumed from checkpoint \d+ in .* \(training finished at epoch 1\)",
                   caplog.text)
  assert results["epochs_completed"] == 1 and results["test_perplexity"] > 1
  assert len(reporting.read_records(tmp_path / "run", "epoch")) == 1


def test_a_second_ctrl_c_while_the_stops_checkpoint_is_written_waits_for_it(
    tmp_path, monkeypatch, caplog, terminal_sigint):
  # It raised KeyboardInterrupt inside orbax's wait: the checkpoint was left half-written
  # (the run resumed from the one before) under pages of tracebacks.
  write_tiny_corpus(tmp_path / "corpus")
  save = Checkpoints.save

  def save_after_two_ctrl_cs(self, step, arrays, meta):
    signal.raise_signal(signal.SIGINT)  # stop after this step (the last of epoch 1)
    signal.raise_signal(signal.SIGINT)  # impatient
    save(self, step, arrays, meta)

  monkeypatch.setattr(Checkpoints, "save", save_after_two_ctrl_cs)
  with pytest.raises(train.Interrupted) as raised:
    train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 2), str(tmp_path / "run"))
  step = int(re.fullmatch(r"stopped by SIGINT: checkpoint (\d+) saved in .*; run the same "
                          r"command again to resume", str(raised.value))[1])
  assert f"SIGINT again: writing checkpoint {step} first; once more to abandon it" in caplog.text
  monkeypatch.setattr(Checkpoints, "save", save)
  results = train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 2),
                                     str(tmp_path / "run"))
  assert results["epochs_completed"] == 2
  launches = [json.loads(line) for line in (tmp_path / "run/launches.jsonl").open()]
  assert [launch["resumed_step"] for launch in launches] == [None, step]


def test_a_third_ctrl_c_abandons_the_checkpoints_write_in_one_line(
    tmp_path, monkeypatch, caplog, terminal_sigint):
  # It printed orbax's traceback of the KeyboardInterrupt raised inside its wait, and named
  # the checkpoint before as the latest, where the abandoned write could still finish.
  write_tiny_corpus(tmp_path / "corpus")
  wait = ocp.CheckpointManager.wait_until_finished

  def wait_after_three_ctrl_cs(self):
    # The wait of tied_lm's save, once orbax has begun writing (not orbax's own wait for
    # the save before, at the start of the next).
    if sys._getframe(1).f_globals["__name__"] == "tied_lm.checkpoints":
      try:
        for _ in range(3):  # the third abandons the write
          signal.raise_signal(signal.SIGINT)
      except KeyboardInterrupt:
        absl_logging.exception("Save Finalize thread failed.")  # as orbax does
        raise
    wait(self)

  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait_after_three_ctrl_cs)
  config = tiny_run_config(tmp_path / "corpus", 2)
  config.checkpoint_every_steps = 60
  with caplog.at_level("INFO"), pytest.raises(train.Interrupted) as raised:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert raised.value.at_once and raised.value.signum == signal.SIGINT
  # Orbax counts the step it is writing among its steps: not "else from checkpoint 60".
  assert re.fullmatch(
      r"stopped by SIGINT at once, while writing checkpoint 60 in .*checkpoints: the same "
      r"command resumes from it if the write finished, else from the start", str(raised.value))
  assert "failed" not in caplog.text and "Traceback" not in caplog.text
  assert "SIGINT again: writing checkpoint 60 first; once more to abandon it" in caplog.text
  absl_logging.exception("Not during a write: shown.", exc_info=(KeyboardInterrupt, None, None))
  assert "Not during a write: shown." in caplog.text


# At epoch 2's validation epoch 1 is checkpointed; at epoch 1's, nothing is yet.
@pytest.mark.parametrize("validation", [2, 1])
def test_a_second_ctrl_c_during_training_names_the_checkpoint_to_resume_from(
    tmp_path, monkeypatch, terminal_sigint, validation):
  # It ended in errors.command's generic 'stopped by SIGINT (Ctrl-C)', which did not say
  # that the run resumes, nor from where.
  write_tiny_corpus(tmp_path / "corpus")
  evaluate, calls = train.evaluate, []

  def evaluate_after_two_ctrl_cs(*args):
    calls.append(args)
    if len(calls) == validation:
      signal.raise_signal(signal.SIGINT)
      signal.raise_signal(signal.SIGINT)
    return evaluate(*args)

  monkeypatch.setattr(train, "evaluate", evaluate_after_two_ctrl_cs)
  with pytest.raises(train.Interrupted) as raised:
    train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 3), str(tmp_path / "run"))
  checkpoints = tmp_path / "run" / "checkpoints"
  steps = [int(d.name) for d in checkpoints.iterdir()]
  assert raised.value.signum == signal.SIGINT
  assert len(reporting.read_records(tmp_path / "run", "epoch")) == validation - 1
  if validation == 1:
    assert steps == [] and str(raised.value) == (
        "stopped by SIGINT at once: no checkpoint was written yet")
    return
  (step,) = steps
  assert str(raised.value) == (
      f"stopped by SIGINT at once: checkpoint {step} in {checkpoints.resolve()} is the "
      "latest; run the same command again to resume from it")


def test_a_signal_in_the_last_epoch_stops_before_the_test(tmp_path, monkeypatch):
  write_tiny_corpus(tmp_path / "corpus")
  config = tiny_run_config(tmp_path / "corpus", 1)
  evaluate, calls = train.evaluate, []

  def evaluate_and_count(*args):
    calls.append(args)
    if len(calls) == 1:  # the last epoch's validation: SIGTERM arrives
      os.kill(os.getpid(), signal.SIGTERM)
    return evaluate(*args)

  monkeypatch.setattr(train, "evaluate", evaluate_and_count)
  with pytest.raises(train.Interrupted, match="stopped by SIGTERM before the test evaluation "
                     "ended: checkpoint .* holds every epoch"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert len(calls) == 1  # no test was started
  assert len(reporting.read_records(tmp_path / "run", "epoch")) == 1


def test_a_workdir_of_another_model_shape_or_epoch_layout_is_refused_by_name(tmp_path, caplog):
  write_tiny_corpus(tmp_path / "corpus")
  run = tmp_path / "run"
  train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 1), str(run))
  saved = {name: (run / name).read_bytes()
           for name in ("config.json", "launches.jsonl", "metrics.jsonl", "results.json")}
  config = tiny_run_config(tmp_path / "corpus", 2)
  config.model.embed_dim = config.model.hidden_size = 12
  with pytest.raises(train.ConfigError, match=(
      r"the workdir holds checkpoints of another run: model.embed_dim=12 \(checkpoint: 8\), "
      r"model.hidden_size=12 \(checkpoint: 8\)")):
    train.train_and_evaluate(config, str(run))
  # Another number of windows per epoch would misplace the step count, the schedule
  # and a mid-epoch resume.
  config = tiny_run_config(tmp_path / "corpus", 2)
  config.num_steps, config.max_steps_per_epoch = 4, 3
  with pytest.raises(train.ConfigError, match=(
      r"another run: num_steps=4 \(checkpoint: 5\), max_steps_per_epoch=3 \(checkpoint: 0\)")):
    train.train_and_evaluate(config, str(run))
  config = tiny_run_config(tmp_path / "corpus", 2)
  config.batch_size = 2  # the same shapes of every parameter, other windows
  with pytest.raises(train.ConfigError, match=r"another run: batch_size=2 \(checkpoint: 4\)"):
    train.train_and_evaluate(config, str(run))
  # Every validation perplexity of a run, and so its best epoch, is on one eval batch
  # size; another size is `tied_lm.evaluate --eval_batch_size`'s job.
  config = tiny_run_config(tmp_path / "corpus", 2)
  config.eval_batch_size = 1
  with pytest.raises(train.ConfigError, match=r"another run: eval_batch_size=1 \(checkpoint: 10\)"):
    train.train_and_evaluate(config, str(run))
  # The seed drew the initial parameters and draws each step's dropout: another one gave
  # a run of neither seed, recorded as the second.
  config = tiny_run_config(tmp_path / "corpus", 2)
  config.seed = 7
  with pytest.raises(train.ConfigError, match=r"another run: seed=7 \(checkpoint: 0\)"):
    train.train_and_evaluate(config, str(run))
  assert {name: (run / name).read_bytes() for name in saved} == saved  # nothing overwritten
  # Other fields may change on resume, e.g. more epochs.
  assert train.train_and_evaluate(
      tiny_run_config(tmp_path / "corpus", 2), str(run))["epochs_completed"] == 2
  # Fewer epochs than done cannot undo any: said, and the results say what was done.
  with caplog.at_level("WARNING"):
    results = train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 1), str(run))
  assert results["epochs_completed"] == 2
  assert "num_epochs=1, but the run has 2 epochs done: it is tested as trained" in caplog.text


def test_a_checkpoint_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch):
  write_tiny_corpus(tmp_path / "corpus")

  def full_disk(self, *args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(UserError, match=(
      r"could not write checkpoint \d+ in .*checkpoints: \[Errno 28\] No space left on "
      r"device; no earlier checkpoint")):
    train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 1), str(tmp_path / "run"))


def test_an_unwritable_workdir_is_refused_before_any_work(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match="cannot write the workdir .*file/run: .*file is not a dir"):
    train.train_and_evaluate(default.get_config(), str(tmp_path / "file" / "run"))


def test_a_folder_of_other_folders_is_refused_as_a_new_workdir_and_left_alone(
    tmp_path, monkeypatch):
  # --workdir=~/tied_lm_runs (the folder of all runs), ~ or the repository: the run put
  # its checkpoints/, config.json, metrics.jsonl... among their entries.
  monkeypatch.setattr(train.data, "load_corpus", lambda *args: pytest.fail("loaded first"))
  (tmp_path / "runs" / "ptb_small_vd" / "checkpoints").mkdir(parents=True)
  (tmp_path / "runs" / "notes.txt").write_text("mine")
  before = sorted(tmp_path.rglob("*"))
  with pytest.raises(UserError, match=(
      rf"^the workdir {re.escape(str(tmp_path / 'runs'))} holds no run but other folders "
      r"\(ptb_small_vd\): give the run a new or empty folder, e\.g\. .*runs/my_run$")):
    train.train_and_evaluate(default.get_config(), str(tmp_path / "runs"))
  assert sorted(tmp_path.rglob("*")) == before
  # A new run's folder may hold files (a log), and a run's own folders are its own.
  fileio.check_new_run_has_its_own_folder(tmp_path / "runs" / "ptb_small_vd")
  (tmp_path / "new").mkdir()
  (tmp_path / "new" / "train.log").write_text("")
  for folder in ("lost+found", ".ipynb_checkpoints"):  # a mounted volume's, a notebook's
    (tmp_path / "new" / folder).mkdir()
  fileio.check_new_run_has_its_own_folder(tmp_path / "new")
  fileio.check_new_run_has_its_own_folder(tmp_path / "missing")


def test_a_workdir_another_process_trains_in_is_refused_and_left_alone(tmp_path):
  write_tiny_corpus(tmp_path / "corpus")
  run = tmp_path / "run"
  run.mkdir()
  held = fileio.lock_directory(run)  # as the other trainer holds it
  try:
    with pytest.raises(UserError) as raised:
      train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 1), str(run))
    assert str(raised.value) == (
        f"{run} is in use by another training process (pid {os.getpid()}): wait for it to "
        "end, or use another --workdir")
    assert sorted(p.name for p in run.iterdir()) == ["lock"]
  finally:
    held.close()
  # Released (the kernel also releases it when its process dies): the run trains.
  results = train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 1), str(run))
  assert results["epochs_completed"] == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stop_signals_turn_the_first_signal_into_a_stop_and_restore_the_handlers(
    signum, set_signal_handler):
  # Whatever the tests inherited (under nohup SIGHUP is ignored, and stays so: next test).
  set_signal_handler(signum, signal.default_int_handler)
  with train.StopSignals() as signals:
    assert not signals.stop_at(0)
    signal.raise_signal(signum)
    assert signals.received == signum
    assert signals.stop_at(1)
  assert signal.getsignal(signum) is signal.default_int_handler


def test_an_ignored_hangup_stays_ignored(set_signal_handler):  # nohup: closing the terminal
  set_signal_handler(signal.SIGHUP, signal.SIG_IGN)
  with train.StopSignals() as signals:
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    signal.raise_signal(signal.SIGHUP)
    assert signals.received is None and not signals.stop_at(0)  # stops nothing


def test_a_second_sigint_interrupts_at_once(terminal_sigint):
  with train.StopSignals(), pytest.raises(KeyboardInterrupt):
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_waits_for_the_checkpoint_being_written_and_a_third_does_not(
    signum, set_signal_handler):
  set_signal_handler(signum, signal.default_int_handler)
  with train.StopSignals() as signals:
    signal.raise_signal(signum)
    with signals.writing(7):
      signal.raise_signal(signum)  # held: the checkpoint is written first
    assert signals.received == signum
    with signals.writing(8), pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signum)
      signal.raise_signal(signum)  # the third of a stop: give up waiting
  assert signal.getsignal(signum) is signal.default_int_handler


def test_a_run_folder_or_appended_file_that_cannot_be_written_is_refused_before_any_work(
    tmp_path, monkeypatch):
  # Another user's run, say: an unwritable tensorboard/ failed only after this start was
  # appended to launches.jsonl, and an unwritable checkpoints/ at the first checkpoint,
  # an epoch of training later. /proc refuses new files even to root.
  write_tiny_corpus(tmp_path / "corpus")
  run = tmp_path / "run"
  train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 1), str(run))
  tensorboard = run / "tensorboard"
  before = {p: p.read_bytes() for p in run.rglob("*")
            if p.is_file() and not p.is_relative_to(tensorboard)}
  tensorboard.rename(tmp_path / "tensorboard")
  tensorboard.symlink_to("/proc/self")
  with pytest.raises(UserError) as refused:
    train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 2), str(run))
  assert str(refused.value) == (
      f"cannot write the run's tensorboard folder {tensorboard} (no file can be made in it)")
  assert {p: p.read_bytes() for p in before} == before  # launches.jsonl too
  tensorboard.unlink()
  (tmp_path / "tensorboard").rename(tensorboard)
  monkeypatch.setattr(train.data, "load_corpus", lambda *args: pytest.fail("loaded first"))
  (run / "checkpoints").rename(tmp_path / "checkpoints")
  (run / "checkpoints").symlink_to("/proc/self")
  with pytest.raises(UserError, match=r"^cannot write the run's checkpoints folder "):
    train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 2), str(run))
  (run / "checkpoints").unlink()
  (tmp_path / "checkpoints").rename(run / "checkpoints")
  (run / "launches.jsonl").rename(tmp_path / "launches.jsonl")
  (run / "launches.jsonl").symlink_to("/proc/version")  # open(..., "a") fails, root or not
  with pytest.raises(UserError, match=rf"^cannot write {re.escape(str(run))}/launches.jsonl: "):
    train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 2), str(run))


def test_a_resume_on_another_train_or_valid_text_is_refused_and_leaves_the_run_as_it_was(
    tmp_path):
  # A text corpus edited between launches, with the same vocabulary: the resume trained on
  # (and numbered its checkpoints by) the new text, and chose its best epoch across two
  # validation texts.
  corpus = tmp_path / "corpus"
  write_tiny_corpus(corpus)
  run = tmp_path / "run"
  train.train_and_evaluate(tiny_run_config(corpus, 1), str(run))
  saved = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  original = {split: (corpus / f"{split}.txt").read_text() for split in ("train", "valid")}
  edits = {
      "train": original["train"] * 2,  # the same words, as often relatively: same ids
      "valid": "".join(reversed(original["valid"].splitlines(keepends=True))),
  }
  for split, text in edits.items():
    (corpus / f"{split}.txt").write_text(text)
    with pytest.raises(train.ConfigError) as refused:
      train.train_and_evaluate(tiny_run_config(corpus, 2), str(run))
    assert str(refused.value) == (
        f"the workdir's checkpoints were trained on another {split} text than the corpus "
        f"of dataset='text', data_dir={str(corpus)!r} gives now (same vocabulary); use the "
        "corpus they were trained on, or a new --workdir")
    assert {p: p.read_bytes() for p in saved} == saved
    (corpus / f"{split}.txt").write_text(original[split])
  # The test text is scored once, at the end: a finished run is tested on the new one.
  (corpus / "test.txt").write_text("".join((corpus / "test.txt").read_text().splitlines(True)[:3]))
  results = train.train_and_evaluate(tiny_run_config(corpus, 1), str(run))
  assert results["test_tokens_scored"] == 3 * 9 - 1  # 8 words and <eos> a line


def test_a_rerun_of_a_trained_run_refuses_settings_that_would_only_relabel_it(
    tmp_path, caplog):
  # It only tests the run: loss.augmented=False made config.json and results.json call a
  # REAL run RE (summarize and reproduce read them), and a new learning rate or seed
  # named settings it never trained with.
  write_tiny_corpus(tmp_path / "corpus")
  run = tmp_path / "run"
  train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 1), str(run))
  saved = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  config = tiny_run_config(tmp_path / "corpus", 1)
  config.loss.augmented, config.optim.learning_rate = False, 0.01
  with caplog.at_level("INFO"), pytest.raises(train.ConfigError) as refused:
    train.train_and_evaluate(config, str(run))
  assert "resumed from" not in caplog.text  # refused before the arrays are restored
  assert str(refused.value) == (
      "the run is trained (1 epochs done, num_epochs=1), so this command only tests it: "
      "loss.augmented=False (trained: True), optim.learning_rate=0.01 (trained: 1.0) would "
      "change nothing but the config its results name; use the run's values, or a new "
      "--workdir")
  assert {p: p.read_bytes() for p in saved} == saved
  # Settings of speed, logging and the corpus's place may change; so may anything once
  # more epochs train with it.
  config = tiny_run_config(tmp_path / "corpus", 1)
  config.model.unroll, config.log_every_steps = 5, 7
  assert train.train_and_evaluate(config, str(run))["epochs_completed"] == 1
  config = tiny_run_config(tmp_path / "corpus", 2)
  config.optim.learning_rate = 0.5
  results = train.train_and_evaluate(config, str(run))
  assert (results["epochs_completed"], results["config"]["optim"]["learning_rate"]) == (2, 0.5)


def test_a_rerun_with_fewer_epochs_inside_the_next_one_says_so_and_keeps_records_in_order(
    tmp_path, monkeypatch, caplog):
  # Stopped inside epoch 2, then rerun with num_epochs=1: no warning, and the test record
  # (at step 134) came after epoch 2's log lines.
  write_tiny_corpus(tmp_path / "corpus")
  run = tmp_path / "run"
  config = tiny_run_config(tmp_path / "corpus", 2)
  config.log_every_steps = 2
  real_train_epoch = train.train_epoch

  def train_epoch(*args, **kwargs):
    if kwargs.get("first_step", 0) == 0 and len(reporting.read_records(run, "epoch")) == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # epoch 2: checkpointed after its first step
    return real_train_epoch(*args, **kwargs)

  monkeypatch.setattr(train, "train_epoch", train_epoch)
  with pytest.raises(train.Interrupted, match="stopped by SIGTERM"):
    train.train_and_evaluate(config, str(run))
  monkeypatch.setattr(train, "train_epoch", real_train_epoch)
  config.num_epochs = 1
  with caplog.at_level("WARNING"):
    results = train.train_and_evaluate(config, str(run))
  assert results["epochs_completed"] == 1
  assert ("num_epochs=1, but the run has 1 epochs done and 1 steps of epoch 2: it is tested "
          "as trained") in caplog.text
  steps = [r["step"] for r in reporting.read_records(run)]
  assert steps == sorted(steps) and reporting.read_records(run)[-1]["kind"] == "test"


def test_a_resume_rewrites_metrics_left_behind_the_checkpoint_by_a_kill(tmp_path, monkeypatch):
  # kill -9 between a checkpoint's save and the rewrite of metrics.jsonl: the file stayed
  # an epoch short (summarize, reproduce) until the next save, or longer if killed again.
  write_tiny_corpus(tmp_path / "corpus")
  run = tmp_path / "run"
  train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 1), str(run))
  complete = reporting.read_records(run)
  (run / "results.json").unlink()
  (run / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in complete if r["kind"] == "train"))

  def ctrl_c_twice(*args, **kwargs):  # stops at once, before any save
    raise KeyboardInterrupt

  monkeypatch.setattr(train, "train_epoch", ctrl_c_twice)
  with pytest.raises(train.Interrupted, match="stopped by SIGINT at once"):
    train.train_and_evaluate(tiny_run_config(tmp_path / "corpus", 2), str(run))
  assert reporting.read_records(run) == [r for r in complete if r["kind"] != "test"]


def test_a_data_directory_that_is_a_file_names_the_setting_the_user_gave(
    tmp_path, monkeypatch):
  # A text corpus named by $TIED_LM_DATA_DIR alone was blamed on config.data_dir, which
  # the trainer had filled in from it.
  (tmp_path / "corpus").write_text("")
  monkeypatch.setenv("TIED_LM_DATA_DIR", str(tmp_path / "corpus"))
  config = tiny_run_config("", 1)
  with pytest.raises(UserError) as refused:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(refused.value) == (
      f"the data directory {tmp_path / 'corpus'} ($TIED_LM_DATA_DIR) is a file, not a "
      "directory")
